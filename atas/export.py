"""Model export (safetensors + JSON card) and loading a model from any artefact a run leaves.

An exported model is the normalising wrapper's state dict with no `module.`/`_orig_mod.` prefixes,
so `atas.models.build_model(**card["model"])` plus `load_state_dict` rebuilds it anywhere.
Nothing here unpickles: training checkpoints go through `load_checkpoint` (weights_only) and
exports through safetensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from atas import __version__
from atas.checkpoint import CheckpointError, atomic_write, load_checkpoint, save_json
from atas.config import Config, config_from_dict
from atas.data import dataset_info
from atas.models import build_model, clean_state_dict, unwrap

MODEL_FILE, CARD_FILE = "model.safetensors", "card.json"


def _build(cfg: Config) -> nn.Module:
    info = dataset_info(cfg.data.name)
    return build_model(cfg.model.arch, num_classes=info.num_classes, in_channels=info.channels,
                       mean=info.mean, std=info.std)


def _load_weights(model: nn.Module, state: dict, source: str) -> nn.Module:
    try:
        model.load_state_dict(clean_state_dict(state))
    except RuntimeError as e:
        raise CheckpointError(f"the weights in {source} do not fit the model its config describes "
                              f"({str(e)[:300]}). The file was made by another architecture or dataset.") from None
    return model.eval()


def resolve_artifact(path: str | Path) -> Path:
    """A run folder, a checkpoint file, or an export folder / its model.safetensors."""
    path = Path(path)
    if path.is_dir():
        for name in (MODEL_FILE, "checkpoint.pt", "checkpoint-rank0-of1.pt"):
            if (path / name).exists():
                return path / name
        ranked = sorted(path.glob("checkpoint-rank0-of*.pt"))
        if ranked:
            return ranked[0]
        raise CheckpointError(f"{path} holds no checkpoint.pt or {MODEL_FILE}; pass a run folder, a checkpoint "
                              "or an export folder")
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Config, dict]:
    """(model in eval mode, its config, extra info such as the card or epoch) from any artefact."""
    path = resolve_artifact(path)
    if path.suffix == ".safetensors":
        card_path = path.with_name(CARD_FILE)
        if not card_path.exists():
            raise CheckpointError(f"{path} has no {CARD_FILE} beside it: the card says which model to build")
        redo = "Export the model again (`atas export RUN_DIR --out DIR`)."
        try:
            card = json.loads(card_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
            raise CheckpointError(f"{card_path} is not valid JSON ({e}): the card is truncated or corrupt. "
                                  f"{redo}") from None
        try:
            cfg = config_from_dict(card["config"])
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{card_path}: cannot rebuild the model from its config "
                                  f"({type(e).__name__}: {e}). {redo}") from None
        try:
            weights = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is truncated or not a safetensors file ({str(e)[:200]}). "
                                  f"{redo}") from None
        model = _load_weights(_build(cfg), weights, str(path))
        return model.to(device), cfg, {"card": card}
    state = load_checkpoint(path, map_location="cpu")
    try:
        cfg = config_from_dict(state["config"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot rebuild the model from the saved config ({e})") from None
    model = _load_weights(_build(cfg), state["model"], str(path))
    return model.to(device), cfg, {"epoch": int(state["epoch"]), "step": int(state["step"])}


def training_state(source: str | Path, cfg: Config, extra: dict) -> dict | None:
    """How far the exported checkpoint's run had trained: {"epoch", "epochs_planned", "finished",
    "checkpoint", "note"}; None for an export folder (no epoch to tell). A run counts as finished
    at its last epoch, at train.max_steps, or when train.co_action=stop ended it."""
    if extra.get("epoch") is None:
        return None
    path = resolve_artifact(source)
    epoch, step, planned = extra["epoch"], extra.get("step", 0), cfg.train.epochs
    finished = epoch >= planned or (cfg.train.max_steps is not None and step >= cfg.train.max_steps)
    if not finished and cfg.train.co_action in ("stop", "recover"):
        from atas.guard import epoch_rows, gave_up
        from atas.trainer import MetricsLog

        log = MetricsLog(path.parent).read()
        rows = [r for r in epoch_rows(log) if r.get("epoch") == epoch]
        finished = gave_up(log) if cfg.train.co_action == "recover" else bool(rows and rows[-1].get("co"))
    note = None
    if path.name == "best.pt":
        note = (f"{path} is the best-robust checkpoint (epoch {epoch} of {planned}, chosen by the CO monitor), "
                "not the final model")
    elif not finished:
        note = (f"{path} is from an unfinished run: epoch {epoch} of {planned}; finish it with "
                f"`atas train --resume {path.parent}` before publishing, or publish it knowing that")
    return {"epoch": epoch, "epochs_planned": planned, "finished": finished, "checkpoint": path.name, "note": note}


def export_model(source: str | Path, out_dir: str | Path, evaluation: dict | None = None) -> Path:
    """Write out_dir/model.safetensors and out_dir/card.json; returns out_dir. Exporting an
    unfinished run (or best.pt) warns, and the card's "training" says at which epoch it stopped."""
    model, cfg, extra = load_model(source)
    state = training_state(source, cfg, extra)
    if state and state["note"]:
        import warnings

        warnings.warn(state["note"], stacklevel=2)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in clean_state_dict(unwrap(model).state_dict()).items()}
    atomic_write(out_dir / MODEL_FILE, lambda f: f.write(_safetensors_bytes(tensors)))
    if evaluation is None:
        run_eval = Path(source) / "eval.json" if Path(source).is_dir() else Path(source).with_name("eval.json")
        evaluation = json.loads(run_eval.read_text()) if run_eval.exists() else None
    info = dataset_info(cfg.data.name)
    card = {
        "library": "atas", "version": __version__,
        "architecture": cfg.model.arch, "dataset": cfg.data.name, "num_classes": info.num_classes,
        "normalization": {"mean": list(info.mean), "std": list(info.std), "inside_model": True},
        "input": "images in [0, 1], shape [B, C, H, W]",
        "method": cfg.method.name, "eps": cfg.method.eps.text, "eps_value": float(cfg.method.eps),
        "epoch": extra.get("epoch"), "training": state, "config": cfg.to_dict(), "evaluation": evaluation,
    }
    save_json(out_dir / CARD_FILE, card)
    return out_dir


def _safetensors_bytes(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata={"format": "pt", "library": "atas"})


__all__ = ["export_model", "load_model", "resolve_artifact"]
