"""Glue between a trained model, its config and the evaluation: the test set, the settings, the file."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from atas.config import Config, ConfigError
from atas.data import dataset_info, image_folder, load_tensors
from atas.evaluate import evaluate, save_result


def load_test_set(cfg: Config, n_examples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded test images (uint8) and labels; the first n_examples if given (an error unless
    1 <= n_examples <= the test set's size: a size is what was asked, or an error)."""
    info = dataset_info(cfg.data.name)
    if n_examples is not None and n_examples < 1:
        raise ConfigError(f"--n-examples / eval.n_examples must be >= 1, got {n_examples}")
    if info.resident:
        x, y = load_tensors(info.name, "test", cfg.data.data_dir, cfg.data.download)
        size = len(y)
    else:
        test_set = image_folder(info.name, "test", cfg.data.data_dir)
        size = len(test_set)
    if cfg.data.test_subset:
        size = min(size, cfg.data.test_subset)
    if n_examples is not None and n_examples > size:
        raise ConfigError(f"--n-examples / eval.n_examples is {n_examples} but the {info.name} test set has "
                          f"{size} images{' (data.test_subset)' if cfg.data.test_subset else ''}; "
                          f"give at most {size} (or leave it unset for all)")
    n = n_examples if n_examples is not None else size
    if info.resident:
        return x[:n], y[:n]
    items = [test_set[i] for i in range(n)]
    x = torch.stack([it[0] for it in items]).mul(255).round().to(torch.uint8)
    return x, torch.tensor([int(it[1]) for it in items])


def eval_file_name(cfg: Config, eps: float | None = None) -> str:
    """Where `atas eval` writes by default: a name of its own per attacks / size / eps, so that the
    run's eval.json (end of training) is never overwritten and a killed evaluation resumes."""
    attacks = "+".join(a.strip().lower() for a in cfg.eval.attacks.split(",") if a.strip())
    n = cfg.eval.n_examples if cfg.eval.n_examples is not None else "all"
    suffix = "" if eps is None else "-eps" + getattr(eps, "text", str(eps)).replace("/", "-")
    return f"eval-{attacks}-n{n}{suffix}.json"


def evaluate_run(model: nn.Module, cfg: Config, run_dir: str | Path, *, eps: float | None = None, seed: int = 0,
                 out: str | Path | None = None, progress: bool | None = None) -> dict:
    """Evaluate `model` with cfg.eval's attacks on the unpadded test set; save JSON; return the result."""
    from atas.evaluate import pgd_step

    e = cfg.eval
    eps = cfg.method.eps if eps is None else eps
    try:
        pgd_step(eps, e.pgd_alpha, e.pgd_schedule, e.pgd_loss)
    except ValueError as err:
        raise ConfigError(f"PGD step at eps {getattr(eps, 'text', eps)}: {err}") from None
    x, y = load_test_set(cfg, e.n_examples)
    device = next(model.parameters()).device
    model.eval()  # evaluation is always in eval mode; say so up front rather than be warned
    out = Path(out) if out else Path(run_dir) / "eval.json"
    result = evaluate(model, x, y, float(eps), attacks=[a.strip() for a in e.attacks.split(",") if a.strip()],
                      pgd_steps=e.pgd_steps, pgd_restarts=e.pgd_restarts,
                      pgd_alpha=e.pgd_alpha, pgd_schedule=e.pgd_schedule, pgd_loss=e.pgd_loss,
                      batch_size=e.batch_size,
                      seed=seed, device=device, progress=cfg.train.progress if progress is None else progress,
                      state_path=out.with_suffix(".state"), eps_label=getattr(eps, "text", str(eps)))
    if float(eps) != float(cfg.method.eps):
        import warnings

        msg = (f"evaluating at eps={getattr(eps, 'text', eps)} but the model was trained at "
               f"eps={cfg.method.eps.text}")
        warnings.warn(msg)
        result.setdefault("warnings", []).append(msg)
    result["model"] = {"arch": cfg.model.arch, "dataset": cfg.data.name, "method": cfg.method.name,
                       "train_eps": cfg.method.eps.text}
    save_result(result, out)
    return result
