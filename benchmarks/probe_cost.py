"""Probe cost vs a training epoch: the per-epoch probe as the trainer runs it (512 held-out images,
FGSM, cross-entropy and margin PGD-10, linearity error) on a trained run's model, against that
run's own mean epoch time (metrics.jsonl).

    python benchmarks/probe_cost.py reports/fmnist-quick/runs/atas_eps0.3_seed0
"""
import json, time, sys, torch
from atas.export import load_model
from atas.trainer import probe
from atas.data import load_tensors
run = sys.argv[1]
model, cfg, _ = load_model(run, "cpu")
x, y = load_tensors("fmnist", "test")
xp, yp = x[-512:].float().div(255), y[-512:]
probe(model, xp, yp, float(cfg.method.eps), cfg.train.probe_steps)   # warm-up
ts = []
for _ in range(3):
    t = time.perf_counter(); probe(model, xp, yp, float(cfg.method.eps), cfg.train.probe_steps); ts.append(time.perf_counter() - t)
rows = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
epoch = sum(r["epoch_time_s"] for r in rows) / len(rows)
print(f"probe {min(ts):.2f} s (min of 3: {[round(t,2) for t in ts]}), mean epoch {epoch:.2f} s, ratio {min(ts)/epoch:.3f}, threads {torch.get_num_threads()}")
