"""Honest evaluation: the PGD step (defaults per threat model, schedules, recorded in the result),
the weak-attack warning when AutoAttack beats PGD by a margin (on a real gradient-masking model),
progress within an attack, sizes that are what was asked or an error, `atas eval` leaving the
training-end eval.json alone, SIGTERM during training, exporting an unfinished run, and the
`atas compare` table/report columns and out_dir."""

from __future__ import annotations

import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from atas.checkpoint import load_checkpoint, save_checkpoint
from atas.cli import main as cli
from atas.config import ConfigError, load_config
from atas.report import AA_NOT_RUN, build_report, format_summary_table
from atas.trainer import CHECKPOINT, train
from tests.helpers import FMNIST, needs_fmnist

ev = importlib.import_module("atas.evaluation")  # the package (atas.evaluate is the function)
ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "model.arch=wong_cnn",
    "train.co_action=keep_best",
    "data.subset=256",
    "train.batch_size=64",
    "train.probe_size=32",
    "train.probe_steps=2",
    "train.progress=false",
    "optim.lr=0.02",
    "method.atas.warmup_epochs=1",
    f"data.data_dir={FMNIST}",
]


# --------------------------------------------------------------------------------------------
# The PGD step
# --------------------------------------------------------------------------------------------
def test_pgd_step_defaults_per_threat_model_and_parsing():
    for eps in (0.1, 0.2, 0.3):
        alpha, schedule, loss, rule = ev.pgd_step(eps)
        frac, want, want_loss = ev.PGD_DEFAULTS["mnist-scale"]
        assert math.isclose(alpha, frac * eps) and (schedule, loss) == (want, want_loss) and "mnist-scale" in rule
    for eps in (2 / 255, 8 / 255, 16 / 255):
        alpha, schedule, loss, rule = ev.pgd_step(eps)
        assert math.isclose(alpha, eps / 4) and (schedule, loss) == ("constant", "ce") and "cifar-scale" in rule
    assert math.isclose(ev.pgd_step(0.2, "eps/10")[0], 0.02)
    assert math.isclose(ev.pgd_step(0.2, "0.25eps")[0], 0.05)
    assert math.isclose(ev.pgd_step(0.2, "2.5*eps/50")[0], 0.01)
    assert math.isclose(ev.pgd_step(8 / 255, "2/255")[0], 2 / 255)
    assert ev.pgd_step(0.2, "0.01") == (0.01, "constant", "ce", "given: 0.01")
    assert ev.pgd_step(0.2, "eps/2", "cosine", "margin")[1:3] == ("cosine", "margin")
    for bad, schedule, loss, match in [
        ("eps/0", None, None, "not a step"),
        ("fast", None, None, "not a step"),
        ("1.0", None, None, "outside"),
        ("eps/4", "linear", None, "schedule"),
        ("eps/4", None, "dlr", "loss"),
    ]:
        with pytest.raises(ValueError, match=match):
            ev.pgd_step(0.2, bad, schedule, loss)


def test_cosine_schedule_decays_from_alpha_and_is_recorded():
    pgd = ev.PGD(0.2, steps=10, alpha=0.1, restarts=1, schedule="cosine")
    sizes = [pgd.step_size(t) for t in range(10)]
    assert sizes[0] == pytest.approx(0.1) and all(a > b > 0 for a, b in zip(sizes, sizes[1:]))
    assert sizes[5] == pytest.approx(0.05)
    assert ev.PGD(0.2, steps=10).step_size(7) == pytest.approx(0.05)  # constant eps/4
    s = pgd.settings()
    assert s["schedule"] == "cosine" and s["alpha"] == 0.1 and s["alpha_over_eps"] == 0.5


def _linear(d: int = 64, k: int = 10, reverse: bool = False) -> nn.Module:
    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(d, k)
            with torch.no_grad():
                self.lin.weight.copy_(torch.randn(k, d, generator=torch.Generator().manual_seed(0)))
                self.lin.bias.zero_()

        def forward(self, x):
            return self.lin((_ReverseGrad.apply(x) if reverse else x).flatten(1))

    return Linear().eval()


class _ReverseGrad(torch.autograd.Function):
    """Identity forward, negated gradient: a gradient-masking layer that sends every gradient
    attack the wrong way while a black-box attack (Square, inside AutoAttack) is unaffected."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


def _confident_points(model: nn.Module, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Points classified with a logit margin > 8: random starts in the eps=0.3 ball never flip them
    (the noise moves a margin by ~2 std), the worst case in the ball does (it moves it by ~20)."""
    x = torch.rand(400, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
    top = logits.topk(2, 1).values
    keep = (top[:, 0] - top[:, 1]) > 8.0
    return x[keep][:n], logits.argmax(1)[keep][:n]


def test_weak_attack_warning_fires_when_autoattack_beats_pgd():
    pytest.importorskip("pyautoattack")
    masked = _linear(reverse=True)
    x, y = _confident_points(masked)
    result = ev.evaluate(
        masked, x, y, 0.3, attacks=("clean", "pgd", "aa"), pgd_steps=10, pgd_restarts=2, progress=False
    )
    acc = {k: v["accuracy"] for k, v in result["results"].items()}
    assert acc["clean"] == 1.0 and acc["pgd"] == 1.0 and acc["aa"] < 0.5  # PGD fooled by the masking
    weak = [w for w in result["warnings"] if w.startswith("WEAK ATTACK")]
    frac, schedule, _ = ev.PGD_DEFAULTS["mnist-scale"]
    assert len(weak) == 1 and "PGD-10-2" in weak[0] and "AutoAttack" in weak[0]
    assert f"eps*{frac:g}, {schedule}" in weak[0]  # the step used is named
    assert "WEAK ATTACK" in ev.format_table(result)

    honest = _linear(reverse=False)  # the same network without the masking: PGD finds the worst case
    x, y = _confident_points(honest)
    result = ev.evaluate(
        honest, x, y, 0.3, attacks=("clean", "pgd", "aa"), pgd_steps=10, pgd_restarts=2, progress=False
    )
    assert not [w for w in result["warnings"] if w.startswith("WEAK ATTACK")]
    assert result["results"]["pgd"]["accuracy"] - result["results"]["aa"]["accuracy"] <= ev.WEAK_PGD_POINTS / 100


def test_pgd_step_and_rule_are_in_the_result():
    model = _linear()
    x, y = _confident_points(model, 4)
    r = ev.evaluate(model, x, y, 0.2, attacks=("pgd",), pgd_steps=3, pgd_restarts=1, progress=False)
    s = r["results"]["pgd"]["settings"]
    frac, schedule, loss = ev.PGD_DEFAULTS["mnist-scale"]
    assert s["alpha"] == pytest.approx(frac * 0.2) and (s["schedule"], s["loss"]) == (schedule, loss)
    assert "default" in s["step_rule"]
    r = ev.evaluate(
        model,
        x,
        y,
        0.2,
        attacks=("pgd",),
        pgd_steps=3,
        pgd_restarts=1,
        pgd_alpha="eps/10",
        pgd_schedule="cosine",
        pgd_loss="margin",
        progress=False,
    )
    s = r["results"]["pgd"]["settings"]
    assert s["alpha"] == pytest.approx(0.02) and (s["schedule"], s["loss"]) == ("cosine", "margin")
    assert s["step_rule"] == "given: eps/10"


def test_margin_loss_pgd_finds_the_analytic_worst_case_of_a_linear_model():
    """On a linear model the worst case in the box-clipped ball is known; margin-loss PGD reaches it."""
    model = _linear()
    x, y = _confident_points(model, 8)
    w = model.lin.weight.detach()
    eps = 0.3
    with torch.no_grad():  # the sign step against every wrong class k, clipped to the box: the exact optimum
        fooled = torch.zeros(len(y), dtype=torch.bool)
        for k in range(w.shape[0]):
            d = (w[k] - w[y]).view(-1, 1, 8, 8)  # gradient of z_k - z_y
            x_adv = (x + eps * d.sign()).clamp(0, 1)
            fooled |= (model(x_adv).argmax(1) != y) & (y != k)
    _, robust = ev.PGD(eps, steps=20, restarts=1, loss="margin").run(model, x, y)
    assert fooled.any() and torch.equal(~robust, fooled)


def test_pgd_reports_every_step_to_the_progress_bar():
    """restarts x steps ticks per batch, however early the samples fall (progress within the attack)."""
    model = _linear()
    x, y = _confident_points(model, 6)
    for eps in (0.01, 0.3):  # nobody falls / everybody falls in the first restart
        ticks = []
        ev.PGD(eps, steps=7, restarts=3).run(model, x, y, tick=ticks.append)
        assert sum(ticks) == 21 and len(ticks) > 1


# --------------------------------------------------------------------------------------------
# The command line: sizes, attack names, the output file, SIGTERM, export
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 1-epoch run (training-end eval.json on 16 images), and a copy claiming 2 planned epochs."""
    tmp = tmp_path_factory.mktemp("run")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config("fmnist", TINY + ["train.epochs=1", "eval.attacks=clean,fgsm", "eval.n_examples=16"])
        from atas.evaluation.run import evaluate_run

        run = train(cfg, run_dir=tmp / "r")
        evaluate_run(run.model, cfg, run.run_dir, progress=False)
    finally:
        torch.set_num_threads(n)
    return tmp / "r"


@needs_fmnist
@pytest.mark.parametrize(
    "args, message",
    [
        (["--n-examples", "0"], "n_examples must be >= 1"),
        (["--n-examples", "-5"], "got -5"),
        (["--n-examples", "20000"], "test set has 10000 images"),
        (["--attacks", ""], "(none given); valid: clean, fgsm, pgd"),
        (["--attacks", "clean,pgdd"], "unknown attack(s) pgdd; valid: clean, fgsm, pgd, aa"),
        (["--pgd-alpha", "fast"], "not a step"),
        (["--pgd-steps", "0"], "eval.pgd_steps must be >= 1"),
    ],
)
def test_eval_bad_sizes_and_names_are_one_line_errors(run_dir, capsys, args, message):
    assert cli(["eval", str(run_dir), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@needs_fmnist
def test_atas_eval_leaves_the_training_end_eval_json_intact(run_dir, capsys, one_thread):
    before = (run_dir / "eval.json").read_bytes()
    argv = [
        "eval",
        str(run_dir),
        "--attacks",
        "clean,pgd",
        "--n-examples",
        "8",
        "--pgd-steps",
        "2",
        "--pgd-restarts",
        "1",
        "--pgd-alpha",
        "eps/10",
        "--no-progress",
    ]
    assert cli(argv) == 0
    assert (run_dir / "eval.json").read_bytes() == before
    (out,) = run_dir.glob("eval-clean+pgd-n8-*.json")
    assert f"saved: {out}" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["n_examples"] == 8 and result["results"]["pgd"]["settings"]["alpha"] == pytest.approx(0.02)
    assert json.loads(before)["n_examples"] == 16
    assert (
        cli(argv[:2] + ["--attacks", "clean", "--n-examples", "4", "--out", str(run_dir / "x.json"), "--no-progress"])
        == 0
    )
    assert json.loads((run_dir / "x.json").read_text())["n_examples"] == 4


@needs_fmnist
def test_export_of_an_unfinished_run_warns_and_records_the_epoch(run_dir, tmp_path, capsys):
    assert cli(["export", str(run_dir), "--out", str(tmp_path / "done")]) == 0
    assert "warning:" not in capsys.readouterr().err
    card = json.loads((tmp_path / "done" / "card.json").read_text())
    assert card["training"]["finished"] is True and card["training"]["epoch"] == 1

    state = load_checkpoint(run_dir / CHECKPOINT)  # the same checkpoint, as epoch 1 of a 3-epoch run
    state.pop("format", None)
    state["config"]["train"]["epochs"] = 3
    (tmp_path / "killed").mkdir()
    save_checkpoint(tmp_path / "killed" / CHECKPOINT, state)
    assert cli(["export", str(tmp_path / "killed"), "--out", str(tmp_path / "e")]) == 0
    err = capsys.readouterr().err
    assert "atas: warning:" in err and "unfinished run: epoch 1 of 3" in err and "--resume" in err
    card = json.loads((tmp_path / "e" / "card.json").read_text())
    assert card["training"] == {
        "epoch": 1,
        "epochs_planned": 3,
        "finished": False,
        "checkpoint": CHECKPOINT,
        "note": card["training"]["note"],
    }


@needs_fmnist
@pytest.mark.slow
def test_sigterm_during_training_says_the_checkpoint_is_intact(tmp_path):
    run = tmp_path / "r"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "atas",
            "train",
            "fmnist",
            *TINY,
            "train.epochs=500",
            "eval.at_end=false",
            "--run-dir",
            str(run),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not (run / CHECKPOINT).exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert (run / CHECKPOINT).exists(), "no epoch finished in time"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143
    assert "terminated (SIGTERM)" in err and "checkpoint is intact" in err
    assert f"atas train --resume {run}" in err and "Traceback" not in err
    assert load_checkpoint(run / CHECKPOINT)["epoch"] >= 1


# --------------------------------------------------------------------------------------------
# atas compare: columns, AA not run, out_dir
# --------------------------------------------------------------------------------------------
def _row(method, seed, **acc):
    return {
        "method": method,
        "eps": "0.2",
        "eps_value": 0.2,
        "seed": seed,
        "clean": 0.8,
        "fgsm": acc.get("fgsm"),
        "pgd": 0.4,
        "aa": acc.get("aa"),
        "pgd_label": "PGD-50-10",
        "n_examples": 100,
        "chance": 0.1,
        "train_time_s": 10.0,
        "epochs": 1,
        "epochs_planned": 1,
        "co_detected": False,
        "co_epochs": [],
        "co_final_signature": None,
        "eval_warnings": acc.get("warnings", []),
        "method_args": {},
        "run_dir": f"runs/{method}_{seed}",
        "curves": {"epoch": [1]},
    }


def test_summary_table_shows_exactly_the_attacks_that_ran(tmp_path):
    with_fgsm = format_summary_table([_row("atas", 0, fgsm=0.6), _row("fgsm_rs", 0, fgsm=0.9)])
    header = with_fgsm.splitlines()[2]
    assert "FGSM (%)" in header and "AA (%)" not in header and "time vs PGD-AT" not in header
    assert "| ATAS | 1 | 80.0 (1 seed) | 60.0 (1 seed) | 40.0 (1 seed) |" in with_fgsm
    with_aa = format_summary_table([_row("atas", 0, aa=0.35)])
    assert "AA (%)" in with_aa and "FGSM (%)" not in with_aa and "35.0 (1 seed)" in with_aa

    md = build_report([_row("atas", 0, fgsm=0.6)], tmp_path, "atas compare fmnist", {"cpu": "test"}).read_text()
    assert AA_NOT_RUN in md
    weak = _row("atas", 0, aa=0.3, warnings=["WEAK ATTACK: PGD-50-10 ..."])
    md = build_report([weak], tmp_path, "atas compare fmnist", {"cpu": "test"}).read_text()
    assert AA_NOT_RUN not in md and "WEAK ATTACK in 1 run(s) (runs/atas_0)" in md


@needs_fmnist
def test_compare_refuses_more_examples_than_the_test_set_before_training(tmp_path, monkeypatch, capsys):
    import atas.trainer

    def boom(*args, **kwargs):
        raise AssertionError("nothing may train here")

    monkeypatch.setattr(atas.trainer, "train", boom)
    assert cli(["compare", "fmnist", "--n-examples", "20000", "--out", str(tmp_path), f"data.data_dir={FMNIST}"]) == 2
    assert "test set has 10000 images" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_compare_out_dir_override_is_the_report_folder(tmp_path, monkeypatch, capsys):
    import atas.compare

    seen = {}

    def stop(recipe, methods, eps_list, n_seeds, routed, out):
        seen["out"] = out
        raise ConfigError("stop here")

    monkeypatch.setattr(atas.compare, "plan_runs", stop)
    assert cli(["compare", "fmnist", f"out_dir={tmp_path / 'x'}"]) == 2
    assert seen["out"] == tmp_path / "x" / "fmnist"
    assert cli(["compare", "fmnist", f"out_dir={tmp_path}", "--out", str(tmp_path / "y")]) == 2
    assert "either with --out or as out_dir" in capsys.readouterr().err
