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
from atas.evaluation.protocol import (
    attack_names,
    evaluate,
    evaluation_request,
    fingerprint_model,
    request_digest,
    save_result,
)
from atas.rundir import EVAL, clean_staged_files


def load_test_set(
    dataset: str | Config, n_examples: int | None = None, data_dir: str | Path | None = None, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
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
        raise ConfigError(
            f"--n-examples / eval.n_examples is {n_examples} but the {split.info.name} test set has "
            f"{size} images{' (data.test_subset)' if cfg.data.test_subset else ''}; "
            f"give at most {size} (or leave it unset for all)"
        )
    return split.take(n_examples if n_examples is not None else size)


def load_val_set(cfg: Config, n_examples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation split of data.val_size=V: the last V images of the (data.subset of the) training split
    (or V evenly spread ones: data.val_from=stride), the ones `make_data` holds out of training, unaugmented
    and unpadded (uint8), with their labels; the first n_examples of them if given. A folder dataset's images
    are centre-cropped from their frame to the model's input size, as its test images are."""
    info, d = dataset_info(cfg.data.name), cfg.data
    if d.val_size < 1:
        raise ConfigError(
            "this run has no validation split (data.val_size=0); set data.val_size=N to hold out "
            "the last N training images"
        )
    if n_examples is not None and not 1 <= n_examples <= d.val_size:
        raise ConfigError(
            f"validation on {n_examples} images, but data.val_size={d.val_size} holds out only "
            f"{d.val_size}; give 1..{d.val_size}"
        )
    n = d.val_size if n_examples is None else n_examples
    if info.resident:
        x, y = load_tensors(info.name, "train", d.data_dir, d.download)
        held = val_indices(check_subset(d.subset, len(x)), d.val_size, d.val_from)[:n]  # data.val_from
        return x[held], y[held]
    train_set = image_folder(info.name, "train", d.data_dir)
    held = val_indices(check_subset(d.subset, len(train_set)), d.val_size, d.val_from)[:n]
    items = [train_set[i] for i in held.tolist()]
    offset = (info.frame_size - info.image_size) // 2
    x = torch.stack([it[0] for it in items])[..., offset : offset + info.image_size, offset : offset + info.image_size]
    return x.mul(255).round().to(torch.uint8), torch.tensor([int(it[1]) for it in items])


# The validation attack of `atas train` (val.json) and `atas compare --tune`: cheap next to the final
# evaluation (it runs once per searched value), with the threat model's measured step.
VAL_ATTACKS = ("clean", "pgd")
VAL_PGD_STEPS, VAL_PGD_RESTARTS, VAL_N_EXAMPLES = 10, 1, 1000
VAL_FILE = "val.json"


def validation_request(cfg: Config, n_examples: int | None = None) -> dict:
    """What a validation evaluation of this run measures: a val.json with other settings is stale."""
    e = cfg.eval
    return {
        "val_size": cfg.data.val_size,
        "n_examples": min(VAL_N_EXAMPLES, cfg.data.val_size) if n_examples is None else n_examples,
        "attacks": list(VAL_ATTACKS),
        "pgd_steps": VAL_PGD_STEPS,
        "pgd_restarts": VAL_PGD_RESTARTS,
        "pgd_alpha": e.pgd_alpha,
        "pgd_schedule": e.pgd_schedule,
        "pgd_loss": e.pgd_loss,
        "eps": cfg.method.eps.text,
    }


def evaluate_validation(
    model: nn.Module, cfg: Config, run_dir: str | Path, n_examples: int | None = None, progress: bool = False
) -> dict:
    """Clean and PGD-10 accuracy (one restart, the eval section's step, or the threat model's measured
    default) of `model` on the first n_examples (default: up to 1000) held-out validation images of
    data.val_size; written to RUN/val.json with the request that made it, and returned."""
    request = validation_request(cfg, n_examples)
    check_own_file(Path(run_dir) / VAL_FILE)  # before the work, not after it
    x, y = load_val_set(cfg, request["n_examples"])
    model.eval()
    e = cfg.eval
    result = evaluate(
        model,
        x,
        y,
        float(cfg.method.eps),
        attacks=VAL_ATTACKS,
        pgd_steps=VAL_PGD_STEPS,
        pgd_restarts=VAL_PGD_RESTARTS,
        pgd_alpha=e.pgd_alpha,
        pgd_schedule=e.pgd_schedule,
        pgd_loss=e.pgd_loss,
        batch_size=e.batch_size,
        device=next(model.parameters()).device,
        progress=progress,
        eps_label=cfg.method.eps.text,
    )
    result.pop("per_sample", None)  # a choice between values needs the accuracies, not 1000 verdicts
    result["split"] = "validation (the last data.val_size training images, never trained on)"
    result["request"] = request
    save_result(result, Path(run_dir) / VAL_FILE, named=False)
    return result


def _settings_name(attacks, n_examples: int | None, eps: float | None, digest: str) -> str:
    attacks = "+".join(attack_names(attacks))
    n = n_examples if n_examples is not None else "all"
    suffix = "" if eps is None else "-eps" + getattr(eps, "text", str(eps)).replace("/", "-")
    return f"{attacks}-n{n}{suffix}-{digest}"


def eval_file_name(cfg: Config, eps: float | None, digest: str) -> str:
    """Where `atas eval RUN` writes by default: eval-<attacks>-n<N>[-eps<eps>]-<digest>.json, the
    readable part for people, `digest` (`request_digest` of the evaluation's request: every setting
    that changes the numbers, the weights' and the images' sha256 included) so that an evaluation
    with any other setting, or of other weights, gets a file of its own. The run's eval.json (end of
    training) is never written here; the same evaluation again rewrites (or resumes) its own file."""
    return f"eval-{_settings_name(cfg.eval.attacks, cfg.eval.n_examples, eps, digest)}.json"


def request_file_name(
    model: nn.Module,
    cfg: Config,
    eps: float | None = None,
    seed: int = 0,
    test_set: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> str:
    """The `eval_file_name` an evaluation of `model` with cfg.eval's settings (at `eps`, default
    the training eps, and `seed`) gets: its request's digest needs the weights and the images."""
    e = cfg.eval
    x, y = test_set if test_set is not None else load_test_set(cfg, e.n_examples)
    request = evaluation_request(
        model,
        x,
        y,
        float(cfg.method.eps if eps is None else eps),
        e.attacks,
        pgd_steps=e.pgd_steps,
        pgd_restarts=e.pgd_restarts,
        pgd_alpha=e.pgd_alpha,
        pgd_schedule=e.pgd_schedule,
        pgd_loss=e.pgd_loss,
        batch_size=e.batch_size,
        seed=seed,
    )
    return eval_file_name(cfg, eps, request_digest(request))


def model_eval_file_name(
    spec: str, data: str, attacks: str, n_examples: int | None, eps: float, weights: str | Path | None, digest: str
) -> str:
    """Where `atas eval --model` writes by default: named, for people, by the model (factory and
    weights file), the data, the attacks, size and eps, and by `digest` (as `eval_file_name`), so
    that evaluating other weights or with other settings never replaces an earlier result."""
    model = spec.replace(":", ".") + (f"-{Path(weights).stem}" if weights else "")
    return f"eval-{model}-{data}-{_settings_name(attacks, n_examples, eps, digest)}.json"


def keep_earlier(out: Path, result: dict) -> Path | None:
    """Before `result` is saved to `out`: if `out` holds an evaluation with another request (other
    settings, weights or data; or one too old to say), move it aside to a name of its own,
    <stem>-<its digest>.json beside it, warn, and return where it went. The same request again
    simply replaces its own file (the numbers are the same)."""
    import hashlib
    import json
    import os
    import warnings

    if not out.is_file() or out.is_symlink():
        return None
    try:
        raw = out.read_bytes()
        earlier = json.loads(raw)
    except (OSError, ValueError):
        return None  # not a result (or unreadable): check_output already allowed writing it
    if not isinstance(earlier, dict) or "results" not in earlier:
        return None
    digest = earlier.get("request_sha256")
    if digest == result.get("request_sha256"):
        return None
    name = digest if isinstance(digest, str) and digest.isalnum() else "earlier-" + hashlib.sha256(raw).hexdigest()[:12]
    kept = out.with_name(f"{out.stem}-{name}{out.suffix}")
    os.replace(out, kept)
    what = _request_difference(earlier.get("request"), result.get("request"))
    warnings.warn(f"{out} held an evaluation with other settings ({what}); kept it as {kept}", stacklevel=2)
    return kept


def _request_difference(old: dict | None, new: dict | None) -> str:
    if not isinstance(old, dict) or not isinstance(new, dict):
        return "recorded by an older atas, without its settings"
    names = {"model_sha256": "weights", "data_sha256": "test images"}
    keys = [k for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]
    return ", ".join(f"{names.get(k, k)} {_short(old.get(k))} -> {_short(new.get(k))}" for k in keys) or "?"


def _short(value) -> str:
    text = str(value)
    return text[:12] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text


def evaluate_run(
    model: nn.Module,
    cfg: Config,
    run_dir: str | Path,
    *,
    eps: float | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    progress: bool | None = None,
    checkpoint: dict | None = None,
    by_settings: bool = False,
    named_out: bool | None = None,
    weights: str | None = None,
) -> dict:
    """Evaluate `model` with cfg.eval's attacks on the unpadded test set; save JSON; return the result.

    Saved to `out`, else (by_settings) run_dir/`eval_file_name` (a name per request), else the
    run's own run_dir/eval.json. An earlier evaluation in that file with another request is kept
    beside it (`keep_earlier`), never silently replaced.
    The result says which weights it measured: "model" carries their sha256 (an export checks it
    before putting the result on a card), "checkpoint" what the caller knows of them (file, epoch,
    step, ...), "mid_run" whether the run was still unfinished or training, and "weights" which of a
    run's weights they are: "raw" or "averaged" (train.wa_tau; `weights`, else the checkpoint's);
    "data" the test images (dataset, folder, which images, their sha256); "request" every setting.

    named_out: `out` is a path the user chose (default: whether `out` is given), so a device or
    FIFO there is written in place; a file atas names itself must be a regular file
    (atas.checkpoint.check_own_file), checked before the attacks run."""
    e = cfg.eval
    eps_given, eps = eps, cfg.method.eps if eps is None else eps
    try:
        pgd_step(eps, e.pgd_alpha, e.pgd_schedule, e.pgd_loss)
    except ValueError as err:
        raise ConfigError(f"PGD step at eps {getattr(eps, 'text', eps)}: {err}") from None
    named = out is not None if named_out is None else named_out
    if out or not by_settings:
        out = check_output(Path(out) if out else Path(run_dir) / EVAL)
        if not named:
            check_own_file(out)
    x, y = load_test_set(cfg, e.n_examples)
    device = next(model.parameters()).device
    model.eval()  # evaluation is always in eval mode; say so up front rather than be warned
    if not out:  # named by the request: known before the first attack, so a killed evaluation resumes
        out = check_own_file(check_output(Path(run_dir) / request_file_name(model, cfg, eps_given, seed, (x, y))))
    # A device or FIFO the user named (--out /dev/stdout) is written in place, and gets no progress
    # file beside it.
    state_path = None if named and is_special_file(out) else check_own_file(out.with_suffix(".state"))
    if state_path is not None:  # what a killed write of this evaluation left behind
        clean_staged_files(out.parent, names=(out.name, state_path.name))
    result = evaluate(
        model,
        x,
        y,
        float(eps),
        attacks=attack_names(e.attacks),
        pgd_steps=e.pgd_steps,
        pgd_restarts=e.pgd_restarts,
        pgd_alpha=e.pgd_alpha,
        pgd_schedule=e.pgd_schedule,
        pgd_loss=e.pgd_loss,
        batch_size=e.batch_size,
        seed=seed,
        device=device,
        progress=cfg.train.progress if progress is None else progress,
        state_path=state_path,
        eps_label=getattr(eps, "text", str(eps)),
    )
    if float(eps) != float(cfg.method.eps):
        import warnings

        msg = f"evaluating at eps={getattr(eps, 'text', eps)} but the model was trained at eps={cfg.method.eps.text}"
        warnings.warn(msg, stacklevel=2)
        result.setdefault("warnings", []).append(msg)
    result["model"] = {
        "arch": cfg.model.arch,
        "dataset": cfg.data.name,
        "method": cfg.method.name,
        "train_eps": cfg.method.eps.text,
        "sha256": fingerprint_model(model),
    }
    folder = data_source(cfg.data.name, "test", cfg.data.data_dir)  # None: a dataset's own loader chose
    result["data"] = {
        "name": cfg.data.name,
        "folder": None if folder is None else str(folder),
        "split": "test",
        "images": f"the first {result['n_examples']}"
        + (f" of data.test_subset={cfg.data.test_subset}" if cfg.data.test_subset else ""),
        "sha256": result["request"]["data_sha256"],
    }
    # Which weights were measured: "raw" (trained) or "averaged" (train.wa_tau); None: not known here
    # (an export folder: its card says).
    result["weights"] = weights or (checkpoint.get("weights", "raw") if checkpoint is not None else None)
    if checkpoint is not None:
        result["checkpoint"] = {k: v for k, v in checkpoint.items() if k not in ("mid_run", "warning")}
        result["mid_run"] = bool(checkpoint.get("mid_run"))
        if checkpoint.get("warning"):
            result.setdefault("warnings", []).append(checkpoint["warning"])
    try:
        if state_path is not None:
            keep_earlier(out, result)
        save_result(result, out, named=named)
    except DiskFullError as err:
        if state_path is None:  # written in place: its own message says so
            raise
        kept = f"the per-sample verdicts are kept in {state_path}" if state_path.exists() else "nothing was written"
        raise DiskFullError(
            err.path,
            kept,
            "free space and run the same evaluation again: it resumes from there without attacking again",
        ) from None
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
    weights = {
        "file": checkpoint.name,
        "path": str(checkpoint),
        "epoch": last.get("epoch"),
        "step": last.get("step"),
        "epochs_planned": cfg.train.epochs,
        "mid_run": False,
    }
    picked = getattr(run, "weights", None) or {}
    weights.update(picked)  # which weights: raw or averaged, and by which rule (train.select, atas.selection)
    if "epoch" in picked:  # the validation's pick: selected.pt, from its epoch
        from atas.selection import SELECTED

        weights.update(file=SELECTED, path=str(Path(run.run_dir) / SELECTED))
    try:
        run.evaluation = evaluate_run(run.model, cfg, run.run_dir, checkpoint=weights)
    except DiskFullError as e:  # the training is done and saved: say how to get its evaluation
        out = Path(run.run_dir) / EVAL
        raise DiskFullError(
            e.path,
            f"training finished and its checkpoint {checkpoint} is intact",
            f"free space and run the end-of-training evaluation with `atas eval {run.run_dir} "
            f"--out {out}` (it resumes from {out.with_suffix('.state')})",
        ) from None
    if cfg.data.val_size:
        run.validation = evaluate_validation(run.model, cfg, run.run_dir)
