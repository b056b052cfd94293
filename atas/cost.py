"""What a run cost: training wall time, peak memory and forward/backward passes per optimizer step.

The FastAT benchmark (arXiv 2604.22853) reports, per run, the training time (the epochs' training
loops, validation excluded) and the peak GPU memory (torch.cuda.max_memory_allocated). Here:

    train_time_s     sum of the epochs' epoch_time_s (the training loop only: the per-epoch probe,
                     the validation and the final evaluation are not in it), every epoch trained
                     counted, the ones the guard replayed included: that is what the run cost.
    peak_memory_mb   GPU: torch.cuda.max_memory_allocated during the epochs' training loops (the
                     peak counter is reset when each epoch's loop starts, so the probe and the
                     evaluation do not count), the maximum over the epochs.
                     CPU: the process's peak resident set size (getrusage ru_maxrss). This is the
                     whole process's high-water mark since it started: data loading, the probe, and
                     every earlier run of the same process (`atas compare` trains its runs in one
                     process) are in it. It bounds the run's memory from above; it does not isolate it.
    memory_kind      which of the two: "cuda_max_allocated" | "cpu_peak_rss_process".
    passes_per_step  forward / backward passes over a batch per optimizer step (Method.passes_per_step).
"""

from __future__ import annotations

import json
import resource
import sys

import torch

COST_FILE = "cost.json"


def memory_kind(device: torch.device) -> str:
    return "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss_process"


def start_epoch(device: torch.device) -> None:
    """Reset the GPU peak counter when an epoch's training loop starts (nothing to do on the CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since `start_epoch` (GPU) or since the process started (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def epoch_cost(method, device: torch.device) -> dict:
    """The cost entries of an epoch's metrics row (call at the end of its training loop)."""
    fwd, bwd = method.passes_per_step()
    return {
        "peak_memory_mb": peak_memory_mb(device),
        "memory_kind": memory_kind(device),
        "passes_fwd": float(fwd),
        "passes_bwd": float(bwd),
    }


def run_cost(rows: list[dict]) -> dict:
    """A run's cost from its metrics rows (every epoch trained, replayed ones included)."""
    epochs = [r for r in rows if "epoch_time_s" in r]
    last = epochs[-1] if epochs else {}
    peaks = [r["peak_memory_mb"] for r in epochs if r.get("peak_memory_mb") is not None]
    return {
        "train_time_s": sum(float(r["epoch_time_s"]) for r in epochs),
        "peak_memory_mb": max(peaks) if peaks else None,
        "memory_kind": last.get("memory_kind"),
        "passes_per_step": [last["passes_fwd"], last["passes_bwd"]] if "passes_fwd" in last else None,
        "steps": last.get("step"),
        "epochs_trained": len(epochs),
    }


def write_cost(path, rows: list[dict]) -> dict:
    from atas.checkpoint import atomic_write_text

    cost = run_cost(rows)
    atomic_write_text(path, json.dumps(cost, indent=1) + "\n")
    return cost
