"""A trained run's evaluation: its config's test set, attacks and settings -> eval.json.

What `atas train` does at the end, `atas eval RUN_DIR` and `atas compare` for each run.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from atas.checkpoint import DiskFullError, check_output, check_own_file, is_special_file
from atas.config import Config, ConfigError, check_attacks
from atas.data import TestSplit, check_subset, data_source, dataset_info, image_folder, load_tensors, val_indices
from atas.evaluation.attacks import pgd_step
from atas.evaluation.protocol import attack_names, evaluate, fingerprint_model, save_result
from atas.rundir import EVAL, clean_staged_files


def load_test_set(dataset: str | Config, n_examples: int | None = None, data_dir: str | Path | None = None,
                  download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The unpadded test images (uint8 [N, C, H, W]) and labels of a dataset name ("fmnist",
    "cifar10", ...; read from data_dir, see atas.data) or of a run's Config (its data section:
    data_dir, download, test_subset); the first n_examples if given (an error unless 1 <=
    n_examples <= the test set's size: a size is what was asked, or an error)."""
    if isinstance(dataset, Config):
        cfg = dataset
    else:
        cfg = Config()
        cfg.data.name, cfg.data.download = dataset_info(dataset).name, download
        cfg.data.data_dir = None if data_dir is None else str(data_dir)
    if n_examples is not None and n_examples < 1:
        raise ConfigError(f"--n-examples / eval.n_examples must be >= 1, got {n_examples}")
    split = TestSplit(cfg.data.name, cfg.data.data_dir, cfg.data.download)
    size = min(len(split), cfg.data.test_subset) if cfg.data.test_subset else len(split)
    if n_examples is not None and n_examples > size:
        raise ConfigError(f"--n-examples / eval.n_examples is {n_examples} but the {split.info.name} test set has "
                          f"{size} images{' (data.test_subset)' if cfg.data.test_subset else ''}; "
                          f"give at most {size} (or leave it unset for all)")
    return split.take(n_examples if n_examples is not None else size)


def load_val_set(cfg: Config, n_examples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation split of data.val_size=V: the last V images of the (data.subset of the) training split
    (or V evenly spread ones: data.val_from=stride), the ones `make_data` holds out of training, unaugmented
    and unpadded (uint8), with their labels; the first n_examples of them if given. A folder dataset's images
    are centre-cropped from their frame to the model's input size, as its test images are."""
    info, d = dataset_info(cfg.data.name), cfg.data
    if d.val_size < 1:
        raise ConfigError("this run has no validation split (data.val_size=0); set data.val_size=N to hold out "
                          "the last N training images")
    if n_examples is not None and not 1 <= n_examples <= d.val_size:
        raise ConfigError(f"validation on {n_examples} images, but data.val_size={d.val_size} holds out only "
                          f"{d.val_size}; give 1..{d.val_size}")
    n = d.val_size if n_examples is None else n_examples
    if info.resident:
        x, y = load_tensors(info.name, "train", d.data_dir, d.download)
        held = val_indices(check_subset(d.subset, len(x)), d.val_size, d.val_from)[:n]   # data.val_from
        return x[held], y[held]
    train_set = image_folder(info.name, "train", d.data_dir)
    held = val_indices(check_subset(d.subset, len(train_set)), d.val_size, d.val_from)[:n]
    items = [train_set[i] for i in held.tolist()]
    offset = (info.frame_size - info.image_size) // 2
    x = torch.stack([it[0] for it in items])[..., offset:offset + info.image_size, offset:offset + info.image_size]
    return x.mul(255).round().to(torch.uint8), torch.tensor([int(it[1]) for it in items])


# The validation attack of `atas train` (val.json) and `atas compare --tune`: cheap next to the final
# evaluation (it runs once per searched value), with the threat model's measured step.
VAL_ATTACKS = ("clean", "pgd")
VAL_PGD_STEPS, VAL_PGD_RESTARTS, VAL_N_EXAMPLES = 10, 1, 1000
VAL_FILE = "val.json"


def validation_request(cfg: Config, n_examples: int | None = None) -> dict:
    """What a validation evaluation of this run measures: a val.json with other settings is stale."""
    e = cfg.eval
    return {"val_size": cfg.data.val_size, "n_examples": min(VAL_N_EXAMPLES, cfg.data.val_size)
            if n_examples is None else n_examples, "attacks": list(VAL_ATTACKS), "pgd_steps": VAL_PGD_STEPS,
            "pgd_restarts": VAL_PGD_RESTARTS, "pgd_alpha": e.pgd_alpha, "pgd_schedule": e.pgd_schedule,
            "pgd_loss": e.pgd_loss, "eps": cfg.method.eps.text}


def evaluate_validation(model: nn.Module, cfg: Config, run_dir: str | Path, n_examples: int | None = None,
                        progress: bool = False) -> dict:
    """Clean and PGD-10 accuracy (one restart, the eval section's step, or the threat model's measured
    default) of `model` on the first n_examples (default: up to 1000) held-out validation images of
    data.val_size; written to RUN/val.json with the request that made it, and returned."""
    request = validation_request(cfg, n_examples)
    check_own_file(Path(run_dir) / VAL_FILE)  # before the work, not after it
    x, y = load_val_set(cfg, request["n_examples"])
    model.eval()
    e = cfg.eval
    result = evaluate(model, x, y, float(cfg.method.eps), attacks=VAL_ATTACKS, pgd_steps=VAL_PGD_STEPS,
                      pgd_restarts=VAL_PGD_RESTARTS, pgd_alpha=e.pgd_alpha, pgd_schedule=e.pgd_schedule,
                      pgd_loss=e.pgd_loss, batch_size=e.batch_size, device=next(model.parameters()).device,
                      progress=progress, eps_label=cfg.method.eps.text)
    result.pop("per_sample", None)  # a choice between values needs the accuracies, not 1000 verdicts
    result["split"] = "validation (the last data.val_size training images, never trained on)"
    result["request"] = request
    save_result(result, Path(run_dir) / VAL_FILE, named=False)
    return result


def _settings_name(attacks, n_examples: int | None, eps: float | None) -> str:
    attacks = "+".join(attack_names(attacks))
    n = n_examples if n_examples is not None else "all"
    suffix = "" if eps is None else "-eps" + getattr(eps, "text", str(eps)).replace("/", "-")
    return f"{attacks}-n{n}{suffix}"


def eval_file_name(cfg: Config, eps: float | None = None) -> str:
    """Where `atas eval` writes by default: a name of its own per attacks / size / eps, so that the
    run's eval.json (end of training) is never overwritten and a killed evaluation resumes."""
    return f"eval-{_settings_name(cfg.eval.attacks, cfg.eval.n_examples, eps)}.json"


def model_eval_file_name(spec: str, data: str, attacks: str, n_examples: int | None, eps: float,
                         weights: str | Path | None = None) -> str:
    """Where `atas eval --model` writes by default: named by the model (factory and weights), the
    data and, as for a run, the attacks, size and eps, so that evaluating with other settings never
    replaces an earlier result; only the same evaluation again rewrites its own file."""
    model = spec.replace(":", ".") + (f"-{Path(weights).stem}" if weights else "")
    return f"eval-{model}-{data}-{_settings_name(attacks, n_examples, eps)}.json"


def evaluate_run(model: nn.Module, cfg: Config, run_dir: str | Path, *, eps: float | None = None, seed: int = 0,
                 out: str | Path | None = None, progress: bool | None = None,
                 checkpoint: dict | None = None, named_out: bool | None = None, weights: str | None = None) -> dict:
    """Evaluate `model` with cfg.eval's attacks on the unpadded test set; save JSON; return the result.

    The result says which weights it measured: "model" carries their sha256 (an export checks it
    before putting the result on a card), "checkpoint" what the caller knows of them (file, epoch,
    step, ...), "mid_run" whether the run was still unfinished or training, and "weights" which of a
    run's weights they are: "raw" or "averaged" (train.wa_tau; `weights`, else the checkpoint's).

    named_out: `out` is a path the user chose (default: whether `out` is given), so a device or
    FIFO there is written in place; a file atas names itself must be a regular file
    (atas.checkpoint.check_own_file), checked before the attacks run."""
    e = cfg.eval
    eps = cfg.method.eps if eps is None else eps
    try:
        pgd_step(eps, e.pgd_alpha, e.pgd_schedule, e.pgd_loss)
    except ValueError as err:
        raise ConfigError(f"PGD step at eps {getattr(eps, 'text', eps)}: {err}") from None
    named = out is not None if named_out is None else named_out
    out = check_output(Path(out) if out else Path(run_dir) / EVAL)
    if not named:
        check_own_file(out)
    # A device or FIFO the user named (--out /dev/stdout) is written in place, and gets no progress
    # file beside it.
    state_path = None if named and is_special_file(out) else check_own_file(out.with_suffix(".state"))
    if state_path is not None:  # what a killed write of this evaluation left behind
        clean_staged_files(out.parent, names=(out.name, state_path.name))
    x, y = load_test_set(cfg, e.n_examples)
    device = next(model.parameters()).device
    model.eval()  # evaluation is always in eval mode; say so up front rather than be warned
    result = evaluate(model, x, y, float(eps), attacks=attack_names(e.attacks),
                      pgd_steps=e.pgd_steps, pgd_restarts=e.pgd_restarts,
                      pgd_alpha=e.pgd_alpha, pgd_schedule=e.pgd_schedule, pgd_loss=e.pgd_loss,
                      batch_size=e.batch_size,
                      seed=seed, device=device, progress=cfg.train.progress if progress is None else progress,
                      state_path=state_path, eps_label=getattr(eps, "text", str(eps)))
    if float(eps) != float(cfg.method.eps):
        import warnings

        msg = (f"evaluating at eps={getattr(eps, 'text', eps)} but the model was trained at "
               f"eps={cfg.method.eps.text}")
        warnings.warn(msg, stacklevel=2)
        result.setdefault("warnings", []).append(msg)
    result["model"] = {"arch": cfg.model.arch, "dataset": cfg.data.name, "method": cfg.method.name,
                       "train_eps": cfg.method.eps.text, "sha256": fingerprint_model(model)}
    folder = data_source(cfg.data.name, "test", cfg.data.data_dir)  # None: a dataset's own loader chose
    result["data"] = {"name": cfg.data.name, "folder": None if folder is None else str(folder)}
    # Which weights were measured: "raw" (trained) or "averaged" (train.wa_tau); None: not known here
    # (an export folder: its card says).
    result["weights"] = weights or (checkpoint.get("weights", "raw") if checkpoint is not None else None)
    if checkpoint is not None:
        result["checkpoint"] = {k: v for k, v in checkpoint.items() if k not in ("mid_run", "warning")}
        result["mid_run"] = bool(checkpoint.get("mid_run"))
        if checkpoint.get("warning"):
            result.setdefault("warnings", []).append(checkpoint["warning"])
    try:
        save_result(result, out, named=named)
    except DiskFullError as err:
        if state_path is None:  # written in place: its own message says so
            raise
        kept = (f"the per-sample verdicts are kept in {state_path}" if state_path.exists()
                else "nothing was written")
        raise DiskFullError(err.path, kept, "free space and run the same evaluation again: it resumes from "
                            "there without attacking again") from None
    return result


def check_final_eval_extras(cfg: Config) -> None:
    """Refuse before training, not hours later, when the end-of-run evaluation needs an optional
    package that is not installed (AutoAttack's pyautoattack): the one attack-list reader,
    atas.config.check_attacks, says what to install and what runs without it."""
    check_attacks(cfg.eval.attacks, "eval.attacks: ", installed=True)


def evaluate_trained(run, cfg: Config) -> None:
    """The end-of-training evaluation of a `train()` result (atas.trainer.RunResult), what `atas
    train` and `atas.train()` both write: RUN/eval.json, and RUN/val.json when data.val_size holds
    training images out (the images a hyper-parameter is chosen on). Sets run.evaluation and
    run.validation."""
    from atas.export import resolve_artifact

    last = run.metrics[-1] if run.metrics else {}
    checkpoint = resolve_artifact(run.run_dir)
    weights = {"file": checkpoint.name, "path": str(checkpoint), "epoch": last.get("epoch"),
               "step": last.get("step"), "epochs_planned": cfg.train.epochs, "mid_run": False}
    picked = getattr(run, "weights", None) or {}
    weights.update(picked)  # which weights: raw or averaged, and by which rule (train.select, atas.selection)
    if "epoch" in picked:   # the validation's pick: selected.pt, from its epoch
        from atas.selection import SELECTED

        weights.update(file=SELECTED, path=str(Path(run.run_dir) / SELECTED))
    try:
        run.evaluation = evaluate_run(run.model, cfg, run.run_dir, checkpoint=weights)
    except DiskFullError as e:  # the training is done and saved: say how to get its evaluation
        out = Path(run.run_dir) / EVAL
        raise DiskFullError(e.path, f"training finished and its checkpoint {checkpoint} is intact",
                            f"free space and run the end-of-training evaluation with `atas eval {run.run_dir} "
                            f"--out {out}` (it resumes from {out.with_suffix('.state')})") from None
    if cfg.data.val_size:
        run.validation = evaluate_validation(run.model, cfg, run.run_dir)
