"""Training throughput of every registered method against FGSM-RS, measured through the real trainer.

    python benchmarks/speed.py                                   # PreActResNet-18, CIFAR-shaped data
    python benchmarks/speed.py --model small_cnn --steps 20      # Fashion-MNIST-shaped, quick on CPU
    python benchmarks/speed.py --device cuda --amp bf16 --channels-last --steps 100

Every method runs `atas.trainer.train` itself (method objects, PairedAugment, PerSampleStore, the
AMP / channels_last / compile switches and the per-step sequence gather -> augment -> attack ->
loss -> step -> scatter), on the same data and model, for 1 + --repeats epochs of --steps steps.
Epoch 1 is the warm-up (allocator, cuDNN autotuning, torch.compile) and is not counted; each
later epoch's time is the trainer's own `epoch_time_s`, which ends after a device sync (the
epoch's metrics are read back to the host) and starts after the previous epoch's checkpoint
save (also a sync), so on CUDA the number is honest without extra synchronisation. The per-epoch
probe is off (probe_size=0) and ATAS runs with warmup_epochs=0, so the timed epochs include the
adaptive step (gather/scatter of v) and the prior write-back.

The data are random uint8 images of the dataset's shape (CIFAR: 3x32x32, zero-padded by 4 to the
40x40 frame; Fashion-MNIST: 1x28x28, pad 2); `--data real` uses the dataset on disk instead.
Pixel values do not change the cost of a step.

Reported per method (all of atas.list_methods() unless --methods says otherwise; FGSM-RS always runs,
as the reference): images/s (mean ± std over the timed epochs), ms per optimizer step, throughput
relative to `none`, time per step relative to FGSM-RS, the method's forward/backward passes per step
(Method.passes_per_step: what the ratio would be if a pass cost the same whatever its batch) and the
peak memory the trainer recorded (atas.cost: GPU max allocated; on the CPU the process's peak RSS,
which only grows from method to method in this one process, so it is printed for the GPU only).
And ATAS relative to FGSM-RS: the claim of the paper is that ATAS costs what FGSM-RS costs
(2 forward + 2 backward per step), so the target is atas/fgsm_rs throughput >= 0.95. ELLE and
ELLE-A are reported as time per step relative to FGSM-RS (5 forward + 5 backward passes of B images
per step, no target).
Then the per-sample store memory for CIFAR-10 per dtype (PerSampleStore.estimate_bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atas import trainer
from atas.augment import PairedAugment
from atas.config import load_config
from atas.data import dataset_info
from atas.loaders import ResidentLoader
from atas.store import DTYPES, PerSampleStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store_memory import human

# The dataset (shape, pad, eps) each model is benchmarked on unless --dataset says otherwise.
MODEL_DATASET = {
    "preact_resnet18": "cifar10",
    "wrn28_10": "cifar10",
    "wrn34_10": "cifar10",
    "small_cnn": "fmnist",
    "wong_cnn": "fmnist",
}
DATASET_EPS = {"cifar10": "8/255", "cifar100": "8/255", "svhn": "8/255", "fmnist": "0.1", "mnist": "0.3"}
REFERENCE = "fgsm_rs"


def synthetic_make_data(cfg, device, shard=None):
    """Drop-in for trainer.make_data: random uint8 images of the dataset's shape, the real loader
    and the real paired augmentation (same padding, flip and frame as make_data)."""
    info = dataset_info(cfg.data.name)
    n = cfg.data.subset
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, info.channels, info.image_size, info.image_size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, info.num_classes, (n,), generator=g)
    indices = shard(n) if shard else None
    loader = ResidentLoader(
        x.to(device),
        y.to(device),
        cfg.train.batch_size,
        indices=indices,
        seed=cfg.train.seed,
        drop_last=cfg.train.drop_last,
    )
    pad = info.train_pad if cfg.data.train_pad is None else cfg.data.train_pad
    flip = info.flip if cfg.data.flip is None else cfg.data.flip
    augment = PairedAugment(info.image_size, pad=pad, flip=flip)
    return trainer.TrainData(loader, n, augment, (info.channels, augment.frame, augment.frame), x[:0], y[:0], indices)


def method_config(args, dataset: str, method: str, run_root: Path):
    overrides = [
        f"name=speed-{method}",
        f"out_dir={run_root}",
        f"data.name={dataset}",
        f"data.subset={args.steps * args.batch_size}",
        f"model.arch={args.model}",
        f"method.name={method}",
        f"method.eps={DATASET_EPS.get(dataset, '8/255')}",
        f"train.epochs={1 + args.repeats}",
        f"train.batch_size={args.batch_size}",
        "train.drop_last=true",
        f"train.device={args.device}",
        f"train.channels_last={args.channels_last}",
        f"train.compile={args.compile}",
        f"train.store_dtype={args.store_dtype}",
        "train.probe_size=0",
        "train.progress=false",
        "train.co_action=none",
        "optim.schedule=constant",
        "optim.lr=0.01",
        "eval.at_end=false",
    ]
    if args.amp != "off":  # (`train.amp=off` would reach YAML as the boolean false)
        overrides.append(f"train.amp={args.amp}")
    if method == "atas":
        overrides.append("method.warmup_epochs=0")  # time the adaptive step, not the warm-up's alpha = eps
    if method == "pgd":
        overrides.append(f"method.steps={args.pgd_steps}")
    return load_config(None, overrides)


def time_method(args, dataset: str, method: str, run_root: Path) -> tuple[list[float], dict]:
    """(seconds per timed epoch (epochs 2..1+repeats), the last epoch's metrics row) of one trainer run."""
    cfg = method_config(args, dataset, method, run_root)
    make_data = trainer.make_data
    if args.data == "synthetic":
        trainer.make_data = synthetic_make_data
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the trainer's per-epoch log lines
            result = trainer.train(cfg, run_dir=run_root / method)
    finally:
        trainer.make_data = make_data
    # Free-AT replays each minibatch (m optimizer steps): the per-step numbers divide by it.
    return [row["epoch_time_s"] for row in result.metrics[1:]], {**result.metrics[-1], "replays": result.method.replays}


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip() + (
            "+dirty"
            if subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
            ).stdout.strip()
            else ""
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _device_name(device: str) -> str:
    dev = trainer.resolve_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def store_memory_table() -> str:
    lines = ["per-sample store, CIFAR-10 (50000 x 3x40x40 prior + fp32 v):"]
    fp32 = PerSampleStore.estimate_bytes(50000, (3, 40, 40), "float32")
    for dtype in DTYPES:
        b = PerSampleStore.estimate_bytes(50000, (3, 40, 40), dtype)
        lines.append(f"  {dtype:9s} {human(b):>9s}  ({b / fp32:.2f}x fp32)")
    return "\n".join(lines)


def format_table(rates: dict[str, tuple[float, float]], rows: dict[str, dict], args) -> str:
    """One line per method: throughput (images of minibatches per second), ms per optimizer step, vs
    none, time per optimizer step vs FGSM-RS, passes per optimizer step, memory."""
    label = {"pgd": f"pgd (K={args.pgd_steps})"}
    gpu = any(r.get("memory_kind") == "cuda_max_allocated" for r in rows.values())
    lines = [
        f"{'method':14s} {'images/s':>16s} {'ms/step':>9s} {'vs none':>8s} {'time vs FGSM-RS':>16s} "
        f"{'passes fwd/bwd':>15s}" + (f" {'peak MB':>9s}" if gpu else "")
    ]

    def step_ms(method: str) -> float:
        return 1000 * args.batch_size / rates[method][0] / rows[method].get("replays", 1)

    for method, (mean, std) in rates.items():
        vs_none = f"{mean / rates['none'][0]:.3f}" if "none" in rates else "-"
        vs_ref = f"{step_ms(method) / step_ms(REFERENCE):.2f}x" if REFERENCE in rates else "-"
        row = rows[method]
        passes = f"{row['passes_fwd']:g}/{row['passes_bwd']:g}" if "passes_fwd" in row else "-"
        ms = step_ms(method)
        line = (
            f"{label.get(method, method):14s} {mean:9.1f} ± {std:5.1f} {ms:9.2f} {vs_none:>8s} {vs_ref:>16s} "
            f"{passes:>15s}"
        )
        if gpu:
            line += f" {row.get('peak_memory_mb', float('nan')):9.0f}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", default="preact_resnet18", help="preact_resnet18 (CIFAR shape) | small_cnn (FMNIST) | ..."
    )
    p.add_argument("--dataset", default=None, help="shape/pad/eps source (default: by model; cifar10 or fmnist)")
    p.add_argument("--data", choices=["synthetic", "real"], default="synthetic")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--store-dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--steps", type=int, default=50, help="steps per epoch (timed epochs and the warm-up epoch)")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per method, after one warm-up epoch")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--methods", default=None, help="comma list (default: every registered method, atas.list_methods())")
    args = p.parse_args(argv)
    dataset = args.dataset or MODEL_DATASET.get(args.model, "cifar10")
    from atas.methods import list_methods

    methods = list_methods() if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in list_methods()]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(list_methods())}")
    if REFERENCE not in methods:  # the ratios are against FGSM-RS
        methods.insert(0, REFERENCE)
    info = dataset_info(dataset)

    print(f"device: {_device_name(args.device)} | torch {torch.__version__} | commit {_commit()}")
    print(
        f"model {args.model} on {args.data} {dataset}-shaped data "
        f"{info.channels}x{info.image_size}x{info.image_size} "
        f"(pad {info.train_pad}) | batch {args.batch_size} | {args.steps} steps/epoch, 1 warm-up + {args.repeats} "
        f"timed epochs | amp {args.amp} | channels_last {args.channels_last} | compile {args.compile} | "
        f"store {args.store_dtype}"
    )
    rates: dict[str, tuple[float, float]] = {}
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="atas-speed-") as tmp:
        for method in methods:
            seconds, rows[method] = time_method(args, dataset, method, Path(tmp))
            per_epoch = [args.steps * args.batch_size / s for s in seconds]
            rates[method] = (statistics.mean(per_epoch), statistics.stdev(per_epoch) if len(per_epoch) > 1 else 0.0)

    print()
    print(format_table(rates, rows, args))
    if "atas" in rates and "fgsm_rs" in rates:
        ratio = rates["atas"][0] / rates["fgsm_rs"][0]
        verdict = "meets" if ratio >= 0.95 else "MISSES"
        print(
            f"\natas / fgsm_rs throughput: {ratio:.3f} ({verdict} the target >= 0.95, i.e. ATAS time <= 1.05x FGSM-RS)"
        )
    for method in ("elle", "elle_a"):  # no target: the paper's point is 'cheaper than GradAlign', not 'as FGSM'
        if method in rates and "fgsm_rs" in rates:
            print(f"{method} time per step / fgsm_rs: {rates['fgsm_rs'][0] / rates[method][0]:.2f}x")
    print()
    print(store_memory_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
