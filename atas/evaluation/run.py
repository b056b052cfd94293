"""A trained run's evaluation: its config's test set, attacks and settings -> eval.json.

What `atas train` does at the end, `atas eval RUN_DIR` and `atas compare` for each run.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from atas.checkpoint import DiskFullError, check_output, is_special_file
from atas.config import Config, ConfigError
from atas.data import TestSplit, data_source
from atas.evaluation.attacks import pgd_step
from atas.evaluation.protocol import attack_names, evaluate, fingerprint_model, save_result
from atas.rundir import clean_staged_files


def load_test_set(cfg: Config, n_examples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded test images (uint8) and labels; the first n_examples if given (an error unless
    1 <= n_examples <= the test set's size: a size is what was asked, or an error)."""
    if n_examples is not None and n_examples < 1:
        raise ConfigError(f"--n-examples / eval.n_examples must be >= 1, got {n_examples}")
    split = TestSplit(cfg.data.name, cfg.data.data_dir, cfg.data.download)
    size = min(len(split), cfg.data.test_subset) if cfg.data.test_subset else len(split)
    if n_examples is not None and n_examples > size:
        raise ConfigError(f"--n-examples / eval.n_examples is {n_examples} but the {split.info.name} test set has "
                          f"{size} images{' (data.test_subset)' if cfg.data.test_subset else ''}; "
                          f"give at most {size} (or leave it unset for all)")
    return split.take(n_examples if n_examples is not None else size)


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
                 checkpoint: dict | None = None) -> dict:
    """Evaluate `model` with cfg.eval's attacks on the unpadded test set; save JSON; return the result.

    The result says which weights it measured: "model" carries their sha256 (an export checks it
    before putting the result on a card), "checkpoint" what the caller knows of them (file, epoch,
    step, ...) and "mid_run" whether the run was still unfinished or training."""
    e = cfg.eval
    eps = cfg.method.eps if eps is None else eps
    try:
        pgd_step(eps, e.pgd_alpha, e.pgd_schedule, e.pgd_loss)
    except ValueError as err:
        raise ConfigError(f"PGD step at eps {getattr(eps, 'text', eps)}: {err}") from None
    out = check_output(Path(out) if out else Path(run_dir) / "eval.json")
    # A device or FIFO (--out /dev/stdout) is written in place, and gets no progress file beside it.
    state_path = None if is_special_file(out) else out.with_suffix(".state")
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
        warnings.warn(msg)
        result.setdefault("warnings", []).append(msg)
    result["model"] = {"arch": cfg.model.arch, "dataset": cfg.data.name, "method": cfg.method.name,
                       "train_eps": cfg.method.eps.text, "sha256": fingerprint_model(model)}
    result["data"] = {"name": cfg.data.name, "folder": str(data_source(cfg.data.name, "test", cfg.data.data_dir))}
    if checkpoint is not None:
        result["checkpoint"] = {k: v for k, v in checkpoint.items() if k not in ("mid_run", "warning")}
        result["mid_run"] = bool(checkpoint.get("mid_run"))
        if checkpoint.get("warning"):
            result.setdefault("warnings", []).append(checkpoint["warning"])
    try:
        save_result(result, out)
    except DiskFullError as err:
        if state_path is None:  # written in place: its own message says so
            raise
        kept = (f"the per-sample verdicts are kept in {state_path}" if state_path.exists()
                else "nothing was written")
        raise DiskFullError(err.path, kept, "free space and run the same evaluation again: it resumes from "
                            "there without attacking again") from None
    return result
