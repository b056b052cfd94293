"""Model export (safetensors + JSON card) and loading a model from any artefact a run leaves.

An exported model is the normalising wrapper's state dict with no `module.`/`_orig_mod.` prefixes,
so it rebuilds anywhere from the card's "model" entry (the arguments of `build_model`):

    card = json.load(open("exported/card.json"))
    model = atas.models.build_model(**card["model"])
    model.load_state_dict(safetensors.torch.load_file("exported/model.safetensors"))

The card's "evaluation" is the run's evaluation of these very weights (matched by their sha256),
or null with "evaluation_note" saying why: a card never carries another checkpoint's scores.
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

from atas.checkpoint import (
    CheckpointError,
    atomic_write,
    check_output,
    check_own_file,
    check_readable,
    load_checkpoint,
    save_json,
)
from atas.config import Config, ConfigError, config_from_dict
from atas.data import dataset_info
from atas.models import build_model, clean_state_dict, unwrap
from atas.provenance import __version__
from atas.rundir import BEST, CHECKPOINT, EVAL, MetricsLog, run_end, run_finished

MODEL_FILE, CARD_FILE = "model.safetensors", "card.json"


def model_arguments(cfg: Config) -> dict:
    """The keyword arguments of `build_model` that rebuild cfg's model (the card's "model")."""
    info = dataset_info(cfg.data.name)
    return {
        "name": cfg.model.arch,
        "num_classes": info.num_classes,
        "in_channels": info.channels,
        "mean": list(info.mean),
        "std": list(info.std),
    }


def _build(cfg: Config) -> nn.Module:
    return build_model(**model_arguments(cfg))


def _load_weights(model: nn.Module, state: dict, source: str) -> nn.Module:
    try:
        model.load_state_dict(clean_state_dict(state))
    except RuntimeError as e:
        raise CheckpointError(
            f"the weights in {source} do not fit the model its config describes "
            f"({str(e)[:300]}). The file was made by another architecture or dataset."
        ) from None
    return model.eval()


def resolve_artifact(path: str | Path) -> Path:
    """A run folder, a checkpoint file, or an export folder / its model.safetensors."""
    path = Path(path)
    check_readable(path)
    if path.is_dir():
        for name in (MODEL_FILE, CHECKPOINT, "checkpoint-rank0-of1.pt"):
            if (path / name).exists():
                return path / name
        ranked = sorted(path.glob("checkpoint-rank0-of*.pt"))
        if ranked:
            return ranked[0]
        raise CheckpointError(
            f"{path} holds no checkpoint.pt or {MODEL_FILE}; pass a run folder, a checkpoint or an export folder"
        )
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    return path


WEIGHTS = ("selected", "raw", "averaged")


def load_model(
    path: str | Path, device: str | torch.device = "cpu", weights: str = "selected"
) -> tuple[nn.Module, Config, dict]:
    """(model in eval mode, its config, extra info such as the card or epoch) from any artefact.

    weights (a run folder or checkpoint): "selected" (default) the weights the run hands on by its
    train.select rule (atas.selection: raw without weight averaging), "raw" the trained weights,
    "averaged" the weight average; extra["weights"] says which ("raw" | "averaged")."""
    if weights not in WEIGHTS:
        raise ConfigError(f"--which-weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    path = resolve_artifact(path)
    if path.suffix == ".safetensors":
        card_path = path.with_name(CARD_FILE)
        if not card_path.exists():
            raise CheckpointError(f"{path} has no {CARD_FILE} beside it: the card says which model to build")
        redo = "Export the model again (`atas export RUN_DIR --out DIR`)."
        try:
            card = json.loads(card_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
            raise CheckpointError(
                f"{card_path} is not valid JSON ({e}): the card is truncated or corrupt. {redo}"
            ) from None
        try:
            cfg = config_from_dict(card["config"])
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(
                f"{card_path}: cannot rebuild the model from its config ({type(e).__name__}: {e}). {redo}"
            ) from None
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is truncated or not a safetensors file ({str(e)[:200]}). {redo}") from None
        model = _load_weights(_build(cfg), tensors, str(path))
        return model.to(device), cfg, {"card": card}
    state = load_checkpoint(path, map_location="cpu")
    try:
        cfg = config_from_dict(state["config"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot rebuild the model from the saved config ({e})") from None
    weights_state, extra = _pick_weights(path, state, cfg, weights)
    model = _load_weights(_build(cfg), weights_state, str(path))
    return (
        model.to(device),
        cfg,
        {"epoch": int(state["epoch"]), "step": int(state["step"]), "metrics": state.get("metrics"), **extra},
    )


def _pick_weights(path: Path, state: dict, cfg: Config, weights: str) -> tuple[dict, dict]:
    """(the state_dict to load, what it is) from a checkpoint, by `weights` (see load_model)."""
    from atas.selection import SELECTED, selection_mode

    if "optimizer" not in state:  # best.pt / selected.pt: weights only, one model, its own label
        if weights == "averaged" and state.get("weights", "raw") != "averaged":
            raise CheckpointError(
                f"{path} holds {state.get('weights', 'raw')} weights only; the averaged weights "
                "are in the run's checkpoint.pt"
            )
        return state["model"], {"weights": state.get("weights", "raw")}
    mode = weights if weights != "selected" else selection_mode(cfg.train.select, cfg.train.wa_tau, cfg.data.val_size)
    if mode == "averaged":
        if "wa" not in state:
            raise CheckpointError(
                f"{path} has no weight average (the run trained with train.wa_tau=0); use --which-weights raw"
            )
        return state["wa"]["model"], {"weights": "averaged"}
    if mode == "val":
        selected = path.parent / SELECTED
        if not selected.exists():
            raise CheckpointError(
                f"{path}: the run selects its weights on the validation split "
                f"(train.select) but {selected} does not exist (no epoch validated yet); "
                "use --which-weights raw or --which-weights averaged"
            )
        chosen = load_checkpoint(selected, map_location="cpu")
        return chosen["model"], {
            "weights": chosen.get("weights", "raw"),
            "selected_epoch": int(chosen["epoch"]),
            "selected_file": SELECTED,
        }
    return state["model"], {"weights": "raw"}


def _is_previous(path: Path) -> bool:
    return ".prev." in path.name


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
        # the checkpoint's own metrics say whether the guard gave up or co_action=stop ended the
        # run at this epoch; an older checkpoint without them: the run's log up to this epoch
        rows = extra.get("metrics")
        if rows is None:
            rows = [r for r in MetricsLog(path.parent).read() if r.get("epoch", 0) <= epoch]
        finished = run_end(rows, cfg) is not None
    note = None
    if path.name == "selected.pt":
        finished = bool(run_finished(path.parent, cfg))
        note = (
            None
            if finished
            else (
                f"{path} holds the validation-selected weights (epoch {epoch}) of an "
                f"unfinished run; finish it with `atas train --resume {path.parent}`"
            )
        )
    elif path.name == BEST:
        note = (
            f"{path} is the best-robust checkpoint (epoch {epoch} of {planned}, chosen by the CO monitor), "
            "not the final model"
        )
    elif _is_previous(path):  # one save older than the run's latest checkpoint, whatever the run's state
        latest = path.with_name(path.name.replace(".prev.", "."))
        run_done = run_finished(path.parent, cfg)
        whose = "a finished run" if run_done else "an unfinished run" if run_done is False else "its run"
        note = (
            f"{path} is an older checkpoint of {whose} (epoch {epoch} of {planned}), kept as the fallback "
            f"for a damaged {latest.name}; it is not the run's latest model ({latest})"
        )
    elif not finished:
        note = (
            f"{path} is from an unfinished run: epoch {epoch} of {planned}; finish it with "
            f"`atas train --resume {path.parent}` before publishing, or publish it knowing that"
        )
    return {"epoch": epoch, "epochs_planned": planned, "finished": finished, "checkpoint": path.name, "note": note}


def checkpoint_record(source: str | Path, cfg: Config, extra: dict) -> dict | None:
    """What an evaluation of `source` measures, for its result: {"file", "epoch", "step",
    "epochs_planned", "mid_run", "warning"}. mid_run: the run is being trained right now (a live
    process holds its lock) or has not finished, so these weights are not its final model (the
    best.pt or older checkpoint of a finished run is not mid-run: it is what its name says).
    None for an export folder, whose card says what it is."""
    from atas.rundir import live_writer

    state = training_state(source, cfg, extra)
    if state is None:
        return None
    path = resolve_artifact(source)
    run_dir = path.parent
    writer = live_writer(run_dir)
    finished = (
        state["finished"]
        if path.name.startswith("checkpoint") and not _is_previous(path)
        else run_finished(run_dir, cfg)
    )
    record = {
        "file": path.name,
        "path": str(path),
        "epoch": state["epoch"],
        "step": extra.get("step"),
        "epochs_planned": state["epochs_planned"],
        "mid_run": writer is not None or finished is False,
        "warning": None,
        "weights": extra.get("weights", "raw"),
    }
    if "selected_epoch" in extra:  # the validation's pick (train.select), kept in selected.pt
        record.update(selected_epoch=extra["selected_epoch"], selected_file=extra["selected_file"])
    what = (
        f"this evaluates {path.name} as it is on disk, epoch {state['epoch']} of {state['epochs_planned']}, "
        "not the run's final model; the result records it (mid_run: true, with the epoch)"
    )
    if writer is not None:
        record["warning"] = f"{run_dir} is being trained right now (PID {writer} holds its lock): {what}"
    elif finished is False:
        record["warning"] = f"{run_dir} is an unfinished run (finish it with `atas train --resume {run_dir}`): {what}"
    return record


def run_evaluation(source: str | Path, model: nn.Module) -> tuple[dict | None, str | None]:
    """(the run's evaluation of exactly these weights, None) or (None, why there is none).

    eval.json is computed from the run's final model; `source` may be best.pt or an older
    checkpoint with other weights. An evaluation counts only if the sha256 of the weights it
    measured (recorded by atas.evaluation.run.evaluate_run) is that of `model`: eval.json first, then
    the `atas eval` results beside the checkpoint (eval-*.json), newest first."""
    from atas.evaluation.protocol import fingerprint_model

    path = resolve_artifact(source)
    if path.suffix == ".safetensors":
        return None, None
    files = [path.with_name(EVAL)] + sorted(
        path.parent.glob("eval-*.json"), key=lambda f: f.stat().st_mtime, reverse=True
    )
    files = [f for f in files if f.is_file()]
    if not files:
        return None, None
    mine = fingerprint_model(model)
    unverifiable = []
    for file in files:
        try:
            result = json.loads(file.read_text())
            sha = result.get("model", {}).get("sha256")
        except (OSError, ValueError, AttributeError):
            continue
        if sha == mine:
            result["file"] = file.name
            return result, None
        if sha is None:
            unverifiable.append(file.name)
    why = (
        f"{', '.join(f.name for f in files)} in {path.parent} evaluate other weights than {path.name}"
        + (f" ({', '.join(unverifiable)} records no weights sha256: written by an older atas)" if unverifiable else "")
        + f"; evaluate these weights with `atas eval {path}` and export again to include it"
    )
    return None, why


def export_model(
    source: str | Path, out_dir: str | Path, evaluation: dict | None = None, weights: str = "selected"
) -> Path:
    """Write out_dir/model.safetensors and out_dir/card.json; returns out_dir. Exporting an
    unfinished run (or best.pt) warns, and the card's "training" says at which epoch it stopped.
    The card's "evaluation" is `evaluation` if given, else the run's evaluation of these very
    weights (see `run_evaluation`); when there is none that matches, it is left out, with a
    warning and the card's "evaluation_note" saying why."""
    import warnings

    out_dir = check_output(out_dir, folder=True)
    for name in (MODEL_FILE, CARD_FILE, ROBUSTBENCH_FILE):  # the files atas names in the folder: regular files only
        check_own_file(out_dir / name)
    model, cfg, extra = load_model(source, weights=weights)
    state = training_state(source, cfg, extra)
    if state and state["note"]:
        warnings.warn(state["note"], stacklevel=2)
    note = None
    card_in = extra.get("card")
    if evaluation is None:
        evaluation, note = run_evaluation(source, model)
        if note:
            warnings.warn(f"the card carries no evaluation: {note}", stacklevel=2)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in clean_state_dict(unwrap(model).state_dict()).items()}
    atomic_write(out_dir / MODEL_FILE, lambda f: f.write(_safetensors_bytes(tensors)))
    info = dataset_info(cfg.data.name)
    card = {
        "library": "atas",
        "version": __version__,
        "architecture": cfg.model.arch,
        "dataset": cfg.data.name,
        "num_classes": info.num_classes,
        "normalization": {"mean": list(info.mean), "std": list(info.std), "inside_model": True},
        "input": "images in [0, 1], shape [B, C, H, W]",
        "model": model_arguments(cfg),  # atas.models.build_model(**card["model"]) rebuilds it
        "method": cfg.method.name,
        "eps": cfg.method.eps.text,
        "eps_value": float(cfg.method.eps),
        "epoch": extra.get("epoch"),
        "training": state,
        "config": cfg.to_dict(),
        "evaluation": evaluation,
        # Which weights these are: "raw" or "averaged" (train.wa_tau), and the epoch validation chose.
        "weights": extra.get("weights", (card_in or {}).get("weights", "raw")),
        "selected_epoch": extra.get("selected_epoch"),
    }
    card["robustbench"] = robustbench_entry(card, evaluation)
    if card["robustbench"] is None:
        (out_dir / ROBUSTBENCH_FILE).unlink(missing_ok=True)  # an earlier export's entry is not these weights'
        card["robustbench_note"] = robustbench_note(source)  # a note, not a warning: most exports need no entry
    else:
        save_json(out_dir / ROBUSTBENCH_FILE, card["robustbench"])
    if note:
        card["evaluation_note"] = note
    save_json(out_dir / CARD_FILE, card)
    return out_dir


# RobustBench's names of our architectures (its model_info "architecture" field).
ROBUSTBENCH_ARCH = {
    "preact_resnet18": "PreActResNet-18",
    "resnet18_cifar": "ResNet-18",
    "resnet18": "ResNet-18",
    "resnet50": "ResNet-50",
    "wrn28_10": "WideResNet-28-10",
    "wrn34_10": "WideResNet-34-10",
}
ROBUSTBENCH_FILE = "robustbench.json"
PLACEHOLDER = "FILL IN"


def robustbench_entry(card: dict, evaluation: dict | None) -> dict | None:
    """The fields of a RobustBench model_info entry (https://github.com/RobustBench/robustbench,
    model_info/<dataset>/Linf/<name>.json) from the card and its evaluation of these very weights:
    clean_acc and autoattack_acc (percent, two decimals, as RobustBench writes them) need an
    evaluation with the clean and "aa" (standard AutoAttack) attacks; None without one. name,
    authors, venue and link are placeholders for the user to fill; "reported" is this evaluation's
    AutoAttack accuracy (the paper's own number, if different, goes there instead)."""
    results = (evaluation or {}).get("results") or {}
    if "clean" not in results or "aa" not in results:
        return None
    pct = lambda name: f"{100 * results[name]['accuracy']:.2f}"  # noqa: E731
    return {
        "link": PLACEHOLDER,
        "name": PLACEHOLDER,
        "authors": PLACEHOLDER,
        "venue": PLACEHOLDER,
        "architecture": ROBUSTBENCH_ARCH.get(card["architecture"], card["architecture"]),
        "eps": card["eps"],
        "threat_model": "Linf",
        "dataset": card["dataset"],
        "additional_data": False,
        "number_forward_passes": 1,
        "clean_acc": pct("clean"),
        "autoattack_acc": pct("aa"),
        "reported": pct("aa"),
        "n_examples": int(results["aa"].get("n", (evaluation or {}).get("n_examples"))),
        "footnote": f"atas {card['method']}, {card.get('weights', 'raw')} weights; evaluated on "
        f"{int(results['aa'].get('n', (evaluation or {}).get('n_examples')))} test images",
        "unreliable": False,
    }


def robustbench_note(source) -> str:
    return (
        f"no evaluation of these weights with clean and AutoAttack: run `atas eval {source} "
        "--attacks clean,aa` (the whole test set: RobustBench's numbers are on 10,000 CIFAR images) "
        "and export again"
    )


def _safetensors_bytes(tensors: dict) -> bytes:
    """The safetensors file of `tensors`, byte for byte the same for the same weights: safetensors
    writes its JSON header from a hash map, whose key order (of the metadata) changes from call to
    call; the header is rewritten here with sorted keys, the tensor data untouched (its offsets are
    relative to the end of the header, so they stay valid)."""
    from safetensors.torch import save

    raw = save(tensors, metadata={"format": "pt", "library": "atas"})
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header with spaces to 8-byte alignment
    return len(header).to_bytes(8, "little") + header + raw[8 + n :]


__all__ = ["checkpoint_record", "export_model", "load_model", "model_arguments", "resolve_artifact", "run_evaluation"]
