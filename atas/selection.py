"""Which weights a run hands on (eval.json, val.json, export): raw, averaged, or the benchmark's choice.

The FastAT benchmark (arXiv 2604.22853, fzjcdt/FastAT_Benchmark) validates, after every epoch, both the
raw and the weight-averaged model on a held-out validation split (the last 1,000 CIFAR training
images; 2,000 on Tiny-ImageNet) by PGD-10 with alpha = 2/255 (here eps/4: 2/255 at its eps 8/255),
takes the better of the two (the raw one on a tie) and keeps the best epoch's pick over the run
(higher PGD accuracy; on equal PGD accuracy, higher clean accuracy); its final numbers are that model's.

train.select (the run-level rule, resolved by `selection_mode`):
    raw       the final raw weights (what every run did before weight averaging existed)
    averaged  the final averaged weights (needs train.wa_tau > 0)
    val       the benchmark's rule above (needs data.val_size > 0); with weight averaging off, the
              best epoch of the raw weights
    auto      (default) val with averaging on and a validation split, averaged with averaging on
              and none, raw otherwise: existing runs are unchanged.
The chosen weights of `val` are kept in RUN/selected.pt (weights only, like best.pt), with which
weights they are ("raw" / "averaged") and their epoch; every epoch's scores go into metrics.jsonl
(val_pgd_raw, val_pgd_averaged, val_pick, selected_epoch).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from atas.values import ConfigError

SELECT_MODES = ("auto", "raw", "averaged", "val")
SELECTED = "selected.pt"
# The benchmark's validation attack: PGD-10, one random start, cross-entropy, step 2/255 at its eps
# 8/255: here eps/4, which is 2/255 there and scales with other radii.
VAL_STEPS, VAL_ALPHA_OVER_EPS = 10, 0.25


def selection_mode(select: str, wa_tau: float, val_size: int) -> str:
    """The concrete rule (raw | averaged | val) of train.select for a run; refuses what cannot work."""
    if select not in SELECT_MODES:
        raise ConfigError(f"train.select must be one of {', '.join(SELECT_MODES)}, got {select!r}")
    if select == "auto":
        return "val" if wa_tau > 0 and val_size > 0 else "averaged" if wa_tau > 0 else "raw"
    if select == "averaged" and wa_tau <= 0:
        raise ConfigError("train.select=averaged needs weight averaging: set train.wa_tau (e.g. 0.9995)")
    if select == "val" and val_size < 1:
        raise ConfigError(
            "train.select=val validates on held-out training images: set data.val_size "
            "(the benchmark: 1000 on CIFAR, 2000 on Tiny-ImageNet)"
        )
    return select


def better(raw: dict, averaged: dict | None) -> str:
    """The benchmark's pick of one epoch: 'averaged' only if its PGD accuracy is strictly higher."""
    return "averaged" if averaged is not None and averaged["pgd"] > raw["pgd"] else "raw"


def improves(score: dict, best: dict | None) -> bool:
    """Whether an epoch's pick beats the best so far: higher PGD accuracy, or equal and higher clean."""
    return (
        best is None or score["pgd"] > best["pgd"] or (score["pgd"] == best["pgd"] and score["clean"] > best["clean"])
    )


@torch.no_grad()
def _clean(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch]).argmax(1) == y[i : i + batch] for i in range(0, len(x), batch)])


def score(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, batch_size: int = 256) -> dict:
    """Clean and PGD-10 (alpha eps/4) accuracy of `model` (eval mode) on x in [0, 1], on a fixed-seed
    RNG of its own: validating never shifts the training's random stream, and two models are
    attacked from the same random starts."""
    from atas.evaluation.attacks import PGD

    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(0)
        clean = _clean(model, x, y, batch_size)
        attack = PGD(eps, steps=VAL_STEPS, alpha=VAL_ALPHA_OVER_EPS * eps, restarts=1)
        robust = torch.cat(
            [attack.run(model, x[i : i + batch_size], y[i : i + batch_size])[1] for i in range(0, len(x), batch_size)]
        )
    model.train(was_training)
    return {"clean": clean.float().mean().item(), "pgd": robust.float().mean().item()}


class Selector:
    """The benchmark's selection over a run: `judge` each epoch, the best pick kept in `best`."""

    def __init__(self, x_val: torch.Tensor, y_val: torch.Tensor, eps: float):
        self.x_val, self.y_val, self.eps = x_val, y_val, float(eps)
        self.best: dict | None = None  # {"pgd", "clean", "weights", "epoch", "step"}

    def judge(self, raw: nn.Module, averaged: nn.Module | None, epoch: int, step: int) -> tuple[dict, bool]:
        """(the epoch's metrics row entries, whether its pick is the new best)."""
        s_raw = score(raw, self.x_val, self.y_val, self.eps)
        s_avg = None if averaged is None else score(averaged, self.x_val, self.y_val, self.eps)
        pick = better(s_raw, s_avg)
        chosen = s_avg if pick == "averaged" and s_avg is not None else s_raw
        row = {"val_clean_raw": s_raw["clean"], "val_pgd_raw": s_raw["pgd"], "val_pick": pick}
        if s_avg is not None:
            row.update(val_clean_averaged=s_avg["clean"], val_pgd_averaged=s_avg["pgd"])
        new = improves(chosen, self.best)
        if new:
            self.best = {**chosen, "weights": pick, "epoch": epoch, "step": step}
        assert self.best is not None  # improves() is True against no best yet
        row["selected_epoch"] = self.best["epoch"]
        return row, new

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        """Keeps the better of the two bests: a resume takes the checkpoint's, a guard rollback
        (whose checkpoint is older) keeps the run's own, since an undone epoch's weights were still
        trained and validated, and selected.pt holds them."""
        theirs = (state or {}).get("best")
        if theirs is not None and improves(theirs, self.best):
            self.best = dict(theirs)


def handed_on(run_dir: Path, cfg) -> str:
    """Which weights a finished run hands on ("raw" | "averaged"), by its train.select rule."""
    mode = selection_mode(cfg.train.select, cfg.train.wa_tau, cfg.data.val_size)
    if mode != "val":
        return mode
    from atas.checkpoint import load_checkpoint

    path = Path(run_dir) / SELECTED
    return str(load_checkpoint(path, map_location="cpu").get("weights", "raw")) if path.exists() else "raw"


def save_selected(path: Path, model: nn.Module, config: dict, best: dict) -> None:
    """RUN/selected.pt: the selected weights only (for evaluation and export, not for resuming)."""
    from atas.checkpoint import save_checkpoint

    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "config": config,
            "epoch": best["epoch"],
            "step": best["step"],
            "weights": best["weights"],
            "selection": {"rule": "val", "val_pgd": best["pgd"], "val_clean": best["clean"]},
        },
    )
