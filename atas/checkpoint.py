"""Checkpoints that survive crashes and never execute code on load.

Saving writes a temporary file in the same folder, fsyncs it and renames it over the target
(os.replace is atomic on POSIX), so a crash or a full disk mid-save leaves the previous
checkpoint intact and no temporary file behind. Loading uses `torch.load(weights_only=True)`:
tensors, numbers, strings and containers only; a checkpoint holding any other object is refused
instead of unpickled. Exported models are safetensors plus a JSON card.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

FORMAT = "atas-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says why and what to do."""


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write `path` through `write(file)` via temp file + fsync + rename; clean up on any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise CheckpointError(
                f"no space left on the device while writing {path}; nothing was replaced"
                f"{' (the previous file is intact)' if path.exists() else ''}. Free some disk space "
                "and resume the run with `atas train --resume RUN_DIR`.") from e
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Atomically save a training state (dict of tensors / plain values)."""
    state = {"format": FORMAT, **state}
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint without unpickling arbitrary objects; clear errors for bad files."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut-off one has no directory
        raise CheckpointError(
            f"{path} is truncated or not a checkpoint (not a complete torch zip archive). If a save was "
            "interrupted, the run folder still holds the previous epoch's checkpoint.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it holds Python objects other than tensors and plain values, "
            "and unpickling them could run arbitrary code. Only load checkpoints written by atas "
            f"(or convert the file yourself from a trusted environment). Detail: {str(e)[:300]}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(
            f"{path} is truncated or not a checkpoint ({type(e).__name__}: {str(e)[:200]}). If a save "
            "was interrupted, use the previous epoch's checkpoint in the same folder.") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an atas checkpoint (no '{FORMAT}' marker)")
    return state


def save_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
