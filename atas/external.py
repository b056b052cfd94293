"""Models from the user's own code: `module:factory` specs, plugin imports, safe weight files.

    atas eval --model my_pkg.models:factory --weights weights.safetensors --data fmnist --eps 0.2
    atas train my.yaml model.arch=my_net --import my_pkg.models      # a model registered by the user

Weights load without unpickling anything: `.safetensors` through safetensors, anything else through
torch.load(weights_only=True), which refuses a file holding arbitrary Python objects.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from atas.registry import GROUPS, load_entry_points
from atas.values import ConfigError


def _importable_from_here() -> None:
    """Let `--model my_models:make` and `--import my_models` find a module in the current folder,
    as `python -m` and pytest do: the `atas` console script's sys.path[0] is its own bin folder,
    not the folder it was started from. Appended, so an installed package of the same name wins."""
    here = os.getcwd()
    if not any(os.path.abspath(p or os.curdir) == here for p in sys.path):
        sys.path.append(here)
        importlib.invalidate_caches()


def import_plugins(modules: list[str] | None = None) -> list[str]:
    """Import the user's modules (their `atas.register_model(...)`, `@register` ... fill the
    registries) and every installed entry point of the groups in atas.registry.GROUPS; returns what
    was loaded."""
    loaded = []
    if modules:
        _importable_from_here()
    for name in modules or []:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(
                f"--import {name}: cannot import it ({type(e).__name__}: {e}); is it installed or on PYTHONPATH?"
            ) from e
        loaded.append(name)
    for group in GROUPS:  # methods, models, datasets and attacks of installed packages
        loaded += load_entry_points(group)
    return loaded


def model_from_factory(spec: str) -> nn.Module:
    """`package.module:function` -> the nn.Module that function returns (called without arguments)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--model {spec!r}: expected MODULE:FUNCTION, e.g. my_pkg.models:make_net")
    _importable_from_here()
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"--model {spec}: cannot import {module_name!r} ({type(e).__name__}: {e}); is it "
            "installed, in the current folder or on PYTHONPATH?"
        ) from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"--model {spec}: {module_name} has no callable {attr!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model {spec}: {attr}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _first_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(1)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (a weights file's identity in an evaluation's result)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict into `model`, safely; a dict with a "model" or "state_dict" entry is
    unwrapped. Key mismatches are reported by name."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--weights {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConfigError(f"--weights {path}: not a readable safetensors file ({e})") from e
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if (
                not zipfile.is_zipfile(path) and _first_byte(path) != b"\x80"
            ):  # neither torch format (a pickle opens with PROTO)
                raise ConfigError(
                    f"--weights {path}: not a readable torch file (neither a torch zip archive nor a "
                    "pickle); give a .safetensors file or a torch.save(state_dict) file"
                ) from None
            raise ConfigError(
                f"--weights {path}: refused. It is a pickle holding Python objects beyond tensors, and unpickling "
                "runs arbitrary code, so atas never does it for a file it did not write. Save the weights as a "
                "state dict: safetensors.torch.save_file(model.state_dict(), 'weights.safetensors') or "
                f"torch.save(model.state_dict(), 'weights.pt'). (torch: {str(e).splitlines()[0]})"
            ) from e
        except (RuntimeError, EOFError, OSError) as e:
            raise ConfigError(f"--weights {path}: not a readable torch file ({str(e).splitlines()[0]})") from e
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"--weights {path}: expected a state dict (parameter name -> tensor)")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches: torch names each key
        detail = "; ".join(line.strip() for line in str(e).splitlines()[1:4])
        raise ConfigError(f"--weights {path} does not fit the model: {detail}") from e
    if result.missing_keys or result.unexpected_keys:

        def names(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = []
        if result.missing_keys:
            parts.append(f"missing from the file: {names(result.missing_keys)}")
        if result.unexpected_keys:
            parts.append(f"not in the model: {names(result.unexpected_keys)}")
        raise ConfigError(
            f"--weights {path} does not match the model's keys; "
            + "; ".join(parts)
            + ". Is it the weights of this architecture?"
        )
    return model
