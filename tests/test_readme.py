"""The README's Python examples run, as written, on a small subset (sizes capped by the prelude)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import atas
from tests.helpers import needs_fmnist

README = Path(__file__).resolve().parent.parent / "README.md"
SMALL_EVAL = {"n_examples": 16, "attacks": ["clean", "pgd"], "pgd_steps": 2, "pgd_restarts": 1, "progress": False}


def python_blocks() -> list[str]:
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@needs_fmnist
def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    # Prelude: what the first snippet takes from the reader's own code, small; sizes capped so the
    # suite stays fast (the code itself is the README's, unchanged).
    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    tiny = [
        "model.arch=wong_cnn",
        "data.subset=128",
        "train.epochs=1",
        "train.probe_size=0",
        "train.progress=false",
        "eval.at_end=false",
    ]
    real_load_config, real_benchmark, real_evaluate = atas.load_config, atas.benchmark, atas.evaluate
    monkeypatch.setattr(atas, "load_config", lambda name, overrides=(): real_load_config(name, list(overrides) + tiny))
    monkeypatch.setattr(atas, "benchmark", lambda *a, **k: real_benchmark(*a, **{**k, **SMALL_EVAL}))
    monkeypatch.setattr(atas, "evaluate", lambda *a, **k: real_evaluate(*a, **{**k, **SMALL_EVAL}))
    scope = {
        "train_set": torch.utils.data.TensorDataset(x, y),
        "model": model,
        "device": "cpu",
        "opt": torch.optim.SGD(model.parameters(), lr=0.01),
        "DataLoader": torch.utils.data.DataLoader,
        "torch": torch,
        "range": lambda *a: range(*a[:-1], min(a[-1], 2)),
    }
    for block in blocks:
        exec(compile(block, "README.md", "exec"), scope)
    assert scope["atk"].current_epoch == 2 and Path("ckpt.pt").exists()
    assert scope["result"]["n_examples"] == 16 and isinstance(scope["model"], torch.nn.Module)


def test_readme_own_loop_resumes_exactly(tmp_path, monkeypatch):
    """The first snippet, killed after epoch 1 and run again, ends bit for bit where one unbroken
    run ends: its checkpoint holds everything the next epoch depends on (optimizer momentum, the
    RNG of the shuffle, crops and prior resets, the per-sample store)."""
    loop = python_blocks()[0]
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(48, 1, 8, 8, generator=g), torch.randint(0, 10, (48,), generator=g)

    def run(epochs: int, folder: str, seed: int) -> dict:
        (tmp_path / folder).mkdir(exist_ok=True)
        monkeypatch.chdir(tmp_path / folder)
        torch.manual_seed(seed)  # a resumed process builds its model anew: other initial weights
        model = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.Dropout(0.2), torch.nn.ReLU(), torch.nn.Linear(32, 10)
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scope = {
            "train_set": torch.utils.data.TensorDataset(x, y),
            "model": model,
            "device": "cpu",
            "opt": opt,
            "DataLoader": lambda ds, batch_size, shuffle: torch.utils.data.DataLoader(ds, 16, shuffle=shuffle),
            "torch": torch,
            "range": lambda *a: range(*a[:-1], min(a[-1], epochs)),
        }
        with pytest.warns(UserWarning):  # batch 16, not ATAS's reference 128: said, and irrelevant here
            exec(compile(loop, "README.md", "exec"), scope)
        return {"model": model.state_dict(), "atas": scope["atk"].state_dict(), "epoch": scope["atk"].current_epoch}

    straight = run(3, "straight", seed=0)
    run(1, "killed", seed=0)
    torch.manual_seed(123)  # whatever the RNG of the new process holds, the checkpoint's is restored
    resumed = run(3, "killed", seed=1)
    assert straight["epoch"] == resumed["epoch"] == 3
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for key in ("delta", "grad_sq_ema"):
        assert torch.equal(straight["atas"]["store"][key], resumed["atas"]["store"][key]), key
