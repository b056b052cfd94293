"""Which PGD step is strong enough? PGD-50-10 at several step sizes / schedules against APGD-CE
and standard AutoAttack, on the same first N test images of each model.

    python benchmarks/pgd_step.py runs/fmnist_atas runs/fmnist_fgsm_rs reports/fmnist/runs/* \\
        --n-examples 200 --out benchmarks/results/pgd_step

Arguments are run folders, checkpoints or export folders (anything `atas eval` takes). Each
model is evaluated at its training eps; every PGD variant has the same budget (steps x restarts)
except where a variant says otherwise, and keeps the worst case over restarts per sample. The
device is the GPU when there is one (--device to choose). Output: OUT/pgd_step.json (every number,
the settings, timings, machine) and OUT/pgd_step.md (per model: each attack's accuracy and its
gap to AutoAttack in points; then per threat model the mean and worst gap of each variant).

The variants (eps-relative steps scale with eps; 0.01 is the MNIST-family protocol's absolute
step, Wong et al. 2020, and is run only where eps >= 0.1):
    pgd eps/4      constant eps/4 (atas' old default for every eps)
    pgd 0.01       constant 0.01 (MNIST-family only)
    pgd eps/10     constant eps/10
    pgd cos eps/2  cosine decay from eps/2 to 0 over the 50 steps
    pgd cos eps    cosine decay from eps to 0
    pgd margin eps/4, pgd margin cos eps/2   the same on the margin (CW) loss instead of cross-entropy
    pgd-100-5 eps/10  half the restarts, twice the steps (same budget)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from atas.checkpoint import atomic_write_text
from atas.evaluation import evaluate
from atas.evaluation.attacks import MNIST_SCALE_EPS
from atas.evaluation.run import load_test_set
from atas.export import load_model, resolve_artifact
from atas.trainer import resolve_device


def variants(eps: float, steps: int, restarts: int) -> list[dict]:
    """PGD settings to compare: name, alpha (text for atas.evaluation.pgd_step), schedule, steps, restarts."""
    out = [dict(name="pgd eps/4", alpha="eps/4", schedule="constant")]
    if eps >= MNIST_SCALE_EPS - 1e-12:
        out.append(dict(name="pgd 0.01", alpha="0.01", schedule="constant"))
    out += [
        dict(name="pgd eps/10", alpha="eps/10", schedule="constant"),
        dict(name="pgd cos eps/2", alpha="eps/2", schedule="cosine"),
        dict(name="pgd cos eps", alpha="eps", schedule="cosine"),
        dict(name="pgd margin eps/4", alpha="eps/4", schedule="constant", loss="margin"),
        dict(name="pgd margin cos eps/2", alpha="eps/2", schedule="cosine", loss="margin"),
    ]
    for v in out:
        v.update(steps=steps, restarts=restarts)
    if restarts % 2 == 0:
        out.append(
            dict(
                name=f"pgd-{2 * steps}-{restarts // 2} eps/10",
                alpha="eps/10",
                schedule="constant",
                steps=2 * steps,
                restarts=restarts // 2,
            )
        )
    return out


def scale_of(eps: float) -> str:
    return (
        f"mnist-scale (eps >= {MNIST_SCALE_EPS:g})"
        if eps >= MNIST_SCALE_EPS - 1e-12
        else f"cifar-scale (eps < {MNIST_SCALE_EPS:g})"
    )


def bench_model(
    source: str,
    n: int,
    device: torch.device,
    steps: int,
    restarts: int,
    batch_size: int,
    seed: int,
    with_aa: bool,
    progress: bool,
    data_dir: str | None = None,
) -> dict:
    model, cfg, extra = load_model(source, device)
    if data_dir:
        cfg.data.data_dir = data_dir
    eps = cfg.method.eps
    x, y = load_test_set(cfg, n)
    row = {
        "source": str(resolve_artifact(source)),
        "method": cfg.method.name,
        "arch": cfg.model.arch,
        "dataset": cfg.data.name,
        "eps": float(eps),
        "eps_label": eps.text,
        "epoch": extra.get("epoch", (extra.get("card") or {}).get("epoch")),
        "epochs_planned": cfg.train.epochs,
        "n_examples": int(len(y)),
        "attacks": {},
    }
    common = dict(batch_size=batch_size, seed=seed, device=device, progress=progress, eps_label=eps.text)
    base = evaluate(model, x, y, float(eps), attacks=["clean"] + (["apgd-ce", "aa"] if with_aa else []), **common)
    row["clean"] = base["results"]["clean"]["accuracy"]
    for name in ("apgd-ce", "aa"):
        if name in base["results"]:
            row["attacks"][name] = {
                "accuracy": base["results"][name]["accuracy"],
                "time_s": base["timing"][name],
                "settings": base["results"][name]["settings"],
            }
    for v in variants(float(eps), steps, restarts):
        r = evaluate(
            model,
            x,
            y,
            float(eps),
            attacks=["pgd"],
            pgd_steps=v["steps"],
            pgd_restarts=v["restarts"],
            pgd_alpha=v["alpha"],
            pgd_schedule=v["schedule"],
            pgd_loss=v.get("loss", "ce"),
            **common,
        )
        row["attacks"][v["name"]] = {
            "accuracy": r["results"]["pgd"]["accuracy"],
            "time_s": r["timing"]["pgd"],
            "settings": r["results"]["pgd"]["settings"],
        }
        print(
            f"  {v['name']:<22} {100 * r['results']['pgd']['accuracy']:6.1f}%  ({r['timing']['pgd']:.1f} s)", flush=True
        )
    aa = row["attacks"].get("aa", {}).get("accuracy")
    for res in row["attacks"].values():
        res["gap_to_aa_points"] = None if aa is None else round(100 * (res["accuracy"] - aa), 2)
    return row


def summarize(rows: list[dict]) -> dict:
    """Per threat model and variant: mean / max gap to AA over models, and how often it is the strongest PGD."""
    out: dict[str, dict] = {}
    for scale in dict.fromkeys(scale_of(r["eps"]) for r in rows):
        group = [r for r in rows if scale_of(r["eps"]) == scale and "aa" in r["attacks"]]
        names = [k for k in group[0]["attacks"] if k.startswith("pgd")] if group else []
        stats = {}
        for name in names:
            gaps = [r["attacks"][name]["gap_to_aa_points"] for r in group if name in r["attacks"]]
            best = sum(
                r["attacks"][name]["accuracy"]
                <= min(a["accuracy"] for k, a in r["attacks"].items() if k.startswith("pgd"))
                for r in group
            )
            stats[name] = {
                "models": len(gaps),
                "mean_gap": round(statistics.fmean(gaps), 2),
                "max_gap": max(gaps),
                "strongest_pgd_on": best,
            }
        out[scale] = stats
    return out


def markdown(rows: list[dict], summary: dict, meta: dict) -> str:
    names = list(dict.fromkeys(k for r in rows for k in r["attacks"]))
    lines = [
        f"# PGD step size vs AutoAttack ({meta['date']})",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['machine']}; device {meta['device']}; torch {meta['torch']}.",
        "",
        "Robust accuracy (%) on the first N test images; in brackets the gap to AutoAttack in points "
        f"(positive: the attack overstates robustness). PGD variants: PGD-{meta['steps']}-{meta['restarts']} "
        "unless named otherwise.",
        "",
    ]
    head = ["model", "eps", "epoch", "N", "clean"] + names
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            f"{Path(r['source']).parent.name}/{Path(r['source']).name} ({r['method']}, {r['arch']})",
            r["eps_label"],
            f"{r['epoch']}/{r['epochs_planned']}" if r["epoch"] is not None else "—",
            str(r["n_examples"]),
            f"{100 * r['clean']:.1f}",
        ]
        for k in names:
            a = r["attacks"].get(k)
            if a is None:
                cells.append("—")
            else:
                gap = "" if a["gap_to_aa_points"] is None or k == "aa" else f" ({a['gap_to_aa_points']:+.1f})"
                cells.append(f"{100 * a['accuracy']:.1f}{gap}")
        lines.append("| " + " | ".join(cells) + " |")
    for scale, stats in summary.items():
        if not stats:
            continue
        lines += [
            "",
            f"## {scale}: gap of each PGD variant to AutoAttack, over models",
            "",
            "| variant | models | mean gap (points) | worst gap | strongest PGD on |",
            "|---|---|---|---|---|",
        ]
        for name, s in sorted(stats.items(), key=lambda kv: kv[1]["mean_gap"]):
            lines.append(
                f"| {name} | {s['models']} | {s['mean_gap']:+.2f} | {s['max_gap']:+.1f} | "
                f"{s['strongest_pgd_on']} of {s['models']} |"
            )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("models", nargs="+", help="run folders, checkpoints or export folders")
    p.add_argument("--n-examples", type=int, default=200, help="first N test images (default: 200)")
    p.add_argument("--out", default="benchmarks/results/pgd_step", help="output folder (JSON + markdown)")
    p.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda, cuda:1 ...")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--restarts", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="where the test set is (default: each run's data.data_dir)")
    p.add_argument("--no-aa", action="store_true", help="skip APGD-CE and AutoAttack (no gaps then)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.n_examples < 1:
        p.error(f"--n-examples must be >= 1, got {args.n_examples}")
    device = resolve_device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/pgd_step.py"] + (argv if argv is not None else sys.argv[1:])),
        "machine": gpu
        or f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "device": str(device),
        "torch": torch.__version__,
        "steps": args.steps,
        "restarts": args.restarts,
    }
    out = Path(args.out)
    rows: list[dict] = []
    for source in args.models:
        print(f"{source}:", flush=True)
        t0 = time.perf_counter()
        rows.append(
            bench_model(
                source,
                args.n_examples,
                device,
                args.steps,
                args.restarts,
                args.batch_size,
                args.seed,
                not args.no_aa,
                not args.no_progress,
                args.data_dir,
            )
        )
        rows[-1]["total_time_s"] = round(time.perf_counter() - t0, 1)
        summary = summarize(rows)  # written after every model: a long run killed half-way keeps what it did
        atomic_write_text(out / "pgd_step.json", json.dumps({**meta, "models": rows, "summary": summary}, indent=2))
        md = markdown(rows, summary, meta)
        atomic_write_text(out / "pgd_step.md", md)
    print("\n" + md)
    print(f"wrote {out / 'pgd_step.json'} and {out / 'pgd_step.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
