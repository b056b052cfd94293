"""What produced a number: package versions, the machine, the commit (airbench: report the device,
torch version, commit and load with every result). Shared by the evaluation (eval.json) and
`atas compare` (summary.json and the report)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

# The package's version; atas/__init__ re-exports it (kept here so that no module imports the
# package top just to read it).
__version__ = "0.1.0"


def version(dist: str) -> str:
    """The installed version of distribution `dist`, or "unknown"."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def atas_version() -> str:
    found = version("atas")
    return __version__ if found == "unknown" else found  # a source checkout: the package's own


def versions() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
        "pyautoattack": version("pyautoattack"),
        "atas": atas_version(),
        "python": platform.python_version(),
    }


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The checkout's commit (and whether it has uncommitted changes); None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return head.stdout.strip() + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def load_average() -> float | None:
    """1-minute load average: train times from a busy shared machine are not comparable."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def machine_info(train_device: str, load_at_start: float | None = None) -> dict:
    gpu = None
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        gpu = ", ".join(f"{names.count(n)}x {n}" for n in dict.fromkeys(names))
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "gpu": gpu or "none",
        "training device": train_device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "atas commit": git_commit(),
        "load average (1 min) at start / end": f"{load_at_start} / {load_average()}",
    }
