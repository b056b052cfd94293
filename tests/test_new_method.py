"""Adding a method is one file: defined outside the package (by `--import` or an installed entry
point), it is listed by `atas recipes`, accepted by `--methods`, has its options checked before
anything trains, trains, and is labelled in the report, with no edit to atas itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import FMNIST, needs_fmnist

ROOT = Path(__file__).resolve().parent.parent

# The whole method: an FGSM step of factor * eps from x itself (a toy, prone to CO like FGSM).
METHOD_FILE = textwrap.dedent('''
    from dataclasses import dataclass

    from atas.methods import Method, register
    from atas.threat import bn_mode, input_grad, signed_step
    from atas.values import ConfigError


    @register
    class HalfStep(Method):
        """FGSM from x with step factor * eps (no random start)."""

        name = "half_step"
        label = "Half-Step"
        cost = "2 fwd + 2 bwd"
        prone_to_co = True

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


def _atas(*args: str, cwd: Path, pythonpath: list[Path] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in [*pythonpath, ROOT]), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "atas", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.mark.slow
def test_a_method_from_an_entry_point_is_listed(tmp_path):
    site = tmp_path / "site"
    (site / "half_step_plugin").mkdir(parents=True)
    (site / "half_step_plugin" / "__init__.py").write_text(METHOD_FILE)
    info = site / "half_step_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: half-step-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[atas.methods]\nhalf_step = half_step_plugin\n")
    proc = _atas("recipes", cwd=tmp_path, pythonpath=[site])
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.strip().startswith("half_step"))
    assert "Half-Step" in line and "2 fwd + 2 bwd" in line


@pytest.mark.slow
def test_its_options_are_checked_before_any_run_trains(tmp_path):
    (tmp_path / "half_step.py").write_text(METHOD_FILE)
    proc = _atas(
        "compare",
        "fmnist",
        "--import",
        "half_step",
        "--methods",
        "fgsm_rs,half_step",
        "--out",
        str(tmp_path / "out"),
        "half_step.factor=2",
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "method.factor must lie in (0, 1], got 2" in proc.stderr
    assert not (tmp_path / "out" / "runs").exists()  # fgsm_rs, first in line, did not train


@needs_fmnist
@pytest.mark.slow
def test_a_method_in_one_file_trains_and_is_labelled_in_the_report(tmp_path):
    (tmp_path / "half_step.py").write_text(METHOD_FILE)
    tiny = [
        "model.arch=wong_cnn",
        "data.subset=128",
        "train.epochs=1",
        "train.batch_size=64",
        "train.probe_size=32",
        "train.probe_steps=2",
        "eval.pgd_steps=2",
        "eval.pgd_restarts=1",
        "train.progress=false",
        f"data.data_dir={FMNIST}",
    ]
    proc = _atas(
        "compare",
        "fmnist",
        "--import",
        "half_step",
        "--methods",
        "half_step",
        "--eps",
        "0.1",
        "--attacks",
        "clean,pgd",
        "--n-examples",
        "32",
        "--out",
        str(tmp_path / "out"),
        *tiny,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    runs = json.loads((tmp_path / "out" / "summary.json").read_text())["runs"]
    assert [(r["method"], r["epochs"]) for r in runs] == [("half_step", 1)]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| Half-Step |" in md and "Half-Step shows catastrophic overfitting:" in md
