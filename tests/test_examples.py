"""Every example in examples/ runs here on a small subset, so none can rot."""

from __future__ import annotations

import gzip
import importlib.util
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import FMNIST, needs_fmnist

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
pytestmark = needs_fmnist


@pytest.fixture(scope="module")
def tv_root(tmp_path_factory):
    """A torchvision FashionMNIST root (FashionMNIST/raw/ with the unpacked IDX files)."""
    root = tmp_path_factory.mktemp("tv")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in FMNIST.glob("*.gz"):
        with gzip.open(gz) as src, open(raw / gz.name[:-3], "wb") as dst:
            shutil.copyfileobj(src, dst)
    return root


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def atas_lines(path):
    return [line for line in path.read_text().splitlines() if line.rstrip().endswith("# atas")]


def test_own_loop_marks_every_atas_line_and_needs_at_most_eight():
    text = (EXAMPLES / "own_loop.py").read_text()
    marked = atas_lines(EXAMPLES / "own_loop.py")
    assert 0 < len(marked) <= 8
    body = text.split('"""', 2)[2]  # code after the module docstring
    for line in body.splitlines():
        if re.search(r"\batas\b|\batk\b", line.split("#")[0]):
            assert line.rstrip().endswith("# atas"), line


def test_own_loop_trains_checkpoints_and_resumes(tv_root, tmp_path, capsys):
    own = load("own_loop")
    ckpt = str(tmp_path / "ckpt.pt")
    out = own.main(["--data", str(tv_root), "--subset", "256", "--epochs", "1", "--checkpoint", ckpt])
    assert 0 <= out["clean"] <= 1 and out["loss"] == out["loss"]
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 1 and state["atas"]["store"]["delta"].shape == (256, 1, 32, 32)
    again = own.main(
        ["--data", str(tv_root), "--subset", "256", "--epochs", "2", "--checkpoint", ckpt, "--resume", ckpt]
    )
    assert torch.load(ckpt, weights_only=True)["atas"]["epoch"] == 2 and again["clean"] >= 0
    assert "epoch 2:" in capsys.readouterr().out


def test_benchmark_external_evaluates_the_own_loop_model(tv_root, tmp_path):
    own = load("own_loop")
    ckpt = str(tmp_path / "ckpt.pt")
    own.main(["--data", str(tv_root), "--subset", "128", "--epochs", "1", "--checkpoint", ckpt])
    result = load("benchmark_external").main(["--weights", ckpt, "--attacks", "clean,pgd", "--n-examples", "32"])
    assert result["n_examples"] == 32
    assert result["results"]["pgd"]["accuracy"] <= result["results"]["clean"]["accuracy"]
    bf16 = load("benchmark_external").main(["--weights", ckpt, "--attacks", "clean", "--n-examples", "32", "--bf16"])
    assert abs(bf16["results"]["clean"]["accuracy"] - result["results"]["clean"]["accuracy"]) <= 0.1


def test_lightning_example_trains_probes_and_resumes_the_store(tv_root, tmp_path):
    pytest.importorskip("lightning")
    lit = load("lightning_module")
    model = lit.main(["--data", str(tv_root), "--subset", "256", "--epochs", "2", "--out", str(tmp_path)])
    assert [h["epoch"] for h in model.history] == [1, 2]
    assert all(0 <= h["probe_pgd"] <= h["probe_clean"] <= 1 and 0 <= h["probe_fgsm"] <= 1 for h in model.history)
    ckpts = sorted(tmp_path.rglob("*.ckpt"))
    assert ckpts, "Lightning wrote no checkpoint"
    saved = torch.load(ckpts[-1], weights_only=True)
    (state,) = [v for k, v in saved["callbacks"].items() if "AdversarialTraining" in k]
    assert state["epoch"] == 2 and torch.equal(state["store"]["delta"], model.atk.store.delta.cpu())
    assert [r["epoch"] for r in state["guard"]["rows"] if "event" not in r] == [1, 2]  # the guard's record, too
    # Resuming through Lightning's own mechanism restores the per-sample store.
    resumed = lit.main(
        [
            "--data",
            str(tv_root),
            "--subset",
            "256",
            "--epochs",
            "2",
            "--out",
            str(tmp_path / "b"),
            "--resume",
            str(ckpts[-1]),
        ]
    )
    assert resumed.atk.current_epoch == 2
    assert torch.equal(resumed.atk.state_dict()["store"]["delta"].cpu(), state["store"]["delta"])
