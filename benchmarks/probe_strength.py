"""The probe's worst case with the old and the new margin step, against PGD-50-10, on the same models
and the same 512 probe images (the last 512 test images, as the trainer's probe).

    python benchmarks/probe_strength.py reports/sweep03/runs/* reports/sweep03-off/runs/*

Old: margin-loss PGD-10 at a constant eps/4; new: the evaluation's measured step rule (a cosine step
from eps/2 at eps >= 0.1). Both are AND-ed per sample with the cross-entropy PGD-10, as the probe does.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from atas.evaluation.attacks import PGD, pgd_step
from atas.evaluation.run import load_test_set
from atas.export import load_model


def robust(model, x, y, eps, **kw) -> torch.Tensor:
    torch.manual_seed(0)  # the probe's own fixed stream
    return PGD(eps, **kw).run(model, x, y)[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="finished run folders")
    args = p.parse_args(argv)
    gaps = []
    for run in args.runs:
        model, cfg, _ = load_model(run, "cpu")
        x, y = load_test_set(cfg)
        x, y, eps = x[-cfg.train.probe_size :].float().div(255), y[-cfg.train.probe_size :], float(cfg.method.eps)
        alpha, schedule, _, _ = pgd_step(eps)
        ce = robust(model, x, y, eps, steps=10, restarts=1)
        old = ce & robust(model, x, y, eps, steps=10, restarts=1, alpha=eps / 4, loss="margin")
        new = ce & robust(model, x, y, eps, steps=10, restarts=1, alpha=alpha, schedule=schedule, loss="margin")
        strong = robust(model, x, y, eps, steps=50, restarts=10, alpha=alpha, schedule=schedule, loss="margin")
        acc = [t.float().mean().item() for t in (old, new, strong)]
        gaps.append((acc[0] - acc[2], acc[1] - acc[2]))
        print(f"{run}: worst-case probe old {acc[0]:.3f} new {acc[1]:.3f}, PGD-50-10 {acc[2]:.3f}")
    print(
        f"mean gap to PGD-50-10 over {len(gaps)} models: old {statistics.mean(g[0] for g in gaps):.3f}, "
        f"new {statistics.mean(g[1] for g in gaps):.3f}"
    )


if __name__ == "__main__":
    main()
