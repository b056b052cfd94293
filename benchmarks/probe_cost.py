"""Probe cost vs a training epoch: the per-epoch probe as the trainer runs it (512 held-out images,
FGSM, cross-entropy and margin PGD-10, linearity error) on a trained run's model, against that
run's own mean epoch time (metrics.jsonl, probe excluded).

    python benchmarks/probe_cost.py reports/fmnist-quick/runs/atas_eps0.3_seed0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from atas.evaluation.run import load_test_set
from atas.export import load_model
from atas.monitor import probe


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a finished run folder")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    model, cfg, _ = load_model(args.run, "cpu")
    x, y = load_test_set(cfg)
    n = cfg.train.probe_size
    x_probe, y_probe, eps = x[-n:].float().div(255), y[-n:], float(cfg.method.eps)
    args_probe = (model, x_probe, y_probe, eps, cfg.train.probe_steps, cfg.train.probe_restarts)
    probe(*args_probe)  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        probe(*args_probe)
        times.append(time.perf_counter() - t0)
    rows = [json.loads(line) for line in (Path(args.run) / "metrics.jsonl").read_text().splitlines() if line]
    rows = [r for r in rows if "epoch_time_s" in r]  # the guard's event rows have none
    epoch = sum(r["epoch_time_s"] for r in rows) / len(rows)
    print(
        f"probe {min(times):.2f} s (min of {args.repeats}), mean training epoch {epoch:.2f} s: "
        f"{100 * min(times) / epoch:.1f}% ({torch.get_num_threads()} threads)"
    )
    return min(times) / epoch


if __name__ == "__main__":
    main()
