"""Every extension point is a contract that holds end to end: a dataset, a model, an attack and a
method defined outside the package, made visible by `--import` or by an installed entry point, are
listed by `atas recipes`, trained on, evaluated with, and shown in `atas compare`'s report, with no
edit to atas itself (docs/contributing.md). The data is the plugin's own: no Fashion-MNIST needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# One file that adds one of each kind, as docs/contributing.md shows them.
PLUGIN = textwrap.dedent('''
    from dataclasses import dataclass

    import torch
    import torch.nn as nn

    import atas
    from atas.data import DatasetInfo, register_dataset
    from atas.evaluation import Attack, register_attack
    from atas.evaluation.attacks import FGSM
    from atas.methods import Method, register
    from atas.threat import bn_mode, input_grad, signed_step
    from atas.values import ConfigError


    def load(split, data_dir, download):
        """Four classes of 8x8 grey images: class k is brighter in quadrant k (learnable, deterministic)."""
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        n = 96 if split == "train" else 40
        y = torch.arange(n) % 4
        x = torch.randint(0, 96, (n, 1, 8, 8), generator=g)
        for k in range(4):
            r, c = divmod(k, 2)
            x[y == k, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 150
        return x.to(torch.uint8), y.long()


    register_dataset(DatasetInfo("synth", num_classes=4, channels=1, image_size=8, train_pad=0, flip=False,
                                 mean=(0.5,), std=(0.25,), resident=True, frame_size=8, load=load))


    @atas.register_model("tiny_net")
    def tiny_net(num_classes, in_channels=3):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, num_classes))


    def build(name, setup):
        fgsm = FGSM(setup.eps / 2)
        return {"eps": setup.eps, "step": setup.eps / 2}, lambda x, y, progress: (fgsm(setup.model, x, y), None)


    register_attack("half_fgsm", Attack("FGSM (eps/2 step)", build))


    @register
    class HalfStep(Method):
        """FGSM from x with step factor * eps (no random start)."""

        name = "half_step"
        label = "Half-Step"
        cost = "2 fwd + 2 bwd"

        @dataclass
        class Options(Method.Options):
            factor: float = 0.5

        @classmethod
        def check_options(cls, o):
            super().check_options(o)
            if not 0 < o.factor <= 1:
                raise ConfigError(f"method.factor must lie in (0, 1], got {o.factor}")

        def attack(self, model, x, y, state):
            ball = self.ball_at(state.epoch)
            with bn_mode(model, "train"):
                grad, _ = input_grad(model, x, y)
            return ball.project(signed_step(x, grad, self.opt.factor * ball.eps), x).detach()
''')

RECIPE = textwrap.dedent('''
    name: synth-run
    data: {name: synth}
    model: {arch: tiny_net}
    method: {name: half_step, eps: 0.1}
    optim: {lr: 0.1, schedule: constant}
    train: {epochs: 2, batch_size: 32, probe_size: 0, progress: false, device: cpu}
    eval: {attacks: [clean, pgd, half_fgsm], pgd_steps: 2, pgd_restarts: 1, batch_size: 40}
''')


def _atas(*args: str, cwd: Path, pythonpath: list[Path] = ()) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(p) for p in [*pythonpath, ROOT]),
        "OMP_NUM_THREADS": "1",
        "ATAS_DATA_DIR": str(cwd / "no-cache"),
    }
    return subprocess.run(
        [sys.executable, "-m", "atas", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture
def installed(tmp_path) -> Path:
    """The plugin as an installed package declaring all four entry-point groups (a dist-info on sys.path)."""
    site = tmp_path / "site"
    (site / "synth_plugin").mkdir(parents=True)
    (site / "synth_plugin" / "__init__.py").write_text(PLUGIN)
    info = site / "synth_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: synth-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "".join(f"[atas.{group}]\nsynth = synth_plugin\n" for group in ("methods", "models", "datasets", "attacks"))
    )
    return site


@pytest.mark.slow
def test_an_installed_plugin_of_each_kind_is_listed(tmp_path, installed):
    proc = _atas("recipes", cwd=tmp_path, pythonpath=[installed])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(x.split()[:2] == ["half_step", "Half-Step"] for x in lines), proc.stdout
    for title, name in (("models", "tiny_net"), ("datasets", "synth"), ("attacks", "half_fgsm")):
        line = next(x for x in lines if x.startswith(title))
        assert name in line.split(": ", 1)[1].split(", "), line


@pytest.mark.slow
def test_an_installed_dataset_model_method_and_attack_train_and_evaluate(tmp_path, installed):
    (tmp_path / "synth.yaml").write_text(RECIPE)
    run = tmp_path / "run"
    proc = _atas("train", "synth.yaml", "--run-dir", str(run), cwd=tmp_path, pythonpath=[installed])
    assert proc.returncode == 0, proc.stderr
    assert "data: synth from its own loader" in proc.stdout
    result = json.loads((run / "eval.json").read_text())
    assert list(result["results"]) == ["clean", "pgd", "half_fgsm"] and result["n_examples"] == 40
    assert result["results"]["half_fgsm"]["label"] == "FGSM (eps/2 step)"
    assert result["results"]["half_fgsm"]["settings"] == {"eps": 0.1, "step": 0.05}
    # a dataset with its own loader has no folder; the images evaluated are named by their sha256
    assert {k: result["data"][k] for k in ("name", "folder", "split", "images")} == {
        "name": "synth",
        "folder": None,
        "split": "test",
        "images": "the first 40",
    }
    assert len(result["data"]["sha256"]) == 64
    # learnt: the plugin's images are separable, so the tiny linear model is far above chance (25%)
    assert result["results"]["clean"]["accuracy"] > 0.5
    # ... and evaluated again later, from its run folder alone, on the plugin's test split
    proc = _atas(
        "eval",
        str(run),
        "--attacks",
        "clean,half_fgsm",
        "--out",
        str(tmp_path / "again.json"),
        "--no-progress",
        cwd=tmp_path,
        pythonpath=[installed],
    )
    assert proc.returncode == 0, proc.stderr
    again = json.loads((tmp_path / "again.json").read_text())
    for name in ("clean", "half_fgsm"):
        assert again["results"][name]["accuracy"] == result["results"][name]["accuracy"]


@pytest.mark.slow
def test_imported_plugins_are_compared_and_reported_in_their_own_columns(tmp_path):
    (tmp_path / "synth_plugin.py").write_text(PLUGIN)
    (tmp_path / "synth.yaml").write_text(RECIPE)
    proc = _atas(
        "compare",
        "synth.yaml",
        "--import",
        "synth_plugin",
        "--methods",
        "half_step,fgsm_rs",
        "--eps",
        "0.1",
        "--attacks",
        "clean,pgd,half_fgsm",
        "--out",
        str(tmp_path / "out"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["attacks"] == ["clean", "pgd", "half_fgsm"]
    for row in summary["runs"]:
        assert set(row["accuracy"]) == {"clean", "pgd", "half_fgsm"}
        assert row["attack_labels"]["half_fgsm"] == "FGSM (eps/2 step)"
    md = (tmp_path / "out" / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method | seeds |"))
    assert header.split(" | ")[2:5] == ["clean (%)", "PGD-2-1 (%)", "FGSM (eps/2 step) (%)"], header
    half = next(line for line in md.splitlines() if line.startswith("| Half-Step | 1 |"))
    accuracy = summary["runs"][0]["accuracy"]["half_fgsm"]
    assert f"{100 * accuracy:.1f} (1 seed)" in half.split(" | ")[4]
    run_header = next(line for line in md.splitlines() if line.startswith("| method | eps | seed |"))
    assert "FGSM (eps/2 step)" in run_header
    assert "half_fgsm" in proc.stdout  # the per-run log line names every attack's accuracy
