"""`atas compare`: the override routing, the CO verdict and column, the findings on synthetic rows;
bad input rejected before anything trains; and one small end-to-end sweep on Fashion-MNIST that
writes summary.json, report.md/html and valid PNGs, then re-runs without training anything."""

from __future__ import annotations

import json
import re

import pytest

import atas.evaluation.run
import atas.trainer
from atas.cli import main as cli
from atas.config import ConfigError
from atas.evaluation.run import evaluate_run
from atas.monitor import co_verdict
from atas.report import (
    ALPHA_PLOT,
    PROBE_PLOT,
    TIME_PLOT,
    build_report,
    co_column,
    findings,
    format_summary_table,
    method_label,
)
from atas.sweep import plan_runs, route_overrides, run_name
from tests.helpers import needs_fmnist

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _forbid_training(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("nothing may train or evaluate here")

    monkeypatch.setattr(atas.trainer, "train", boom)
    monkeypatch.setattr(atas.evaluation.run, "evaluate_run", boom)


# --------------------------------------------------------------------------------------------
# Override routing
# --------------------------------------------------------------------------------------------
def test_prefix_override_reaches_only_its_method():
    r = route_overrides(
        ["train.epochs=2", "pgd.steps=2", "method.warmup_epochs=1", "atas.c=0.02", "method.fgsm_rs.alpha_factor=1.0"],
        ["atas", "fgsm_rs", "pgd"],
    )
    assert r.common == ["train.epochs=2"]
    assert r.per_method == {
        "atas": ["method.warmup_epochs=1", "method.c=0.02"],
        "fgsm_rs": ["method.alpha_factor=1.0"],
        "pgd": ["method.steps=2"],
    }
    assert any("warmup_epochs" in n and "fgsm_rs" in n for n in r.notes)


def test_generic_method_option_goes_to_every_method_that_has_it():
    r = route_overrides(["method.bn_mode=eval", "pgd.bn_mode=train"], ["atas", "fgsm_rs", "pgd"])
    assert r.per_method["atas"] == ["method.bn_mode=eval"]
    assert r.per_method["fgsm_rs"] == ["method.bn_mode=eval"]
    assert r.per_method["pgd"] == ["method.bn_mode=eval", "method.bn_mode=train"]  # the targeted one wins


@pytest.mark.parametrize(
    "bad, match",
    [
        ("method.nope=1", "none of the compared methods"),
        ("pgd.nope=1", "pgd has no option"),
        ("method.name=pgd", "--methods"),
        ("train.epochs", "key=value"),
    ],
)
def test_bad_overrides_are_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        route_overrides([bad], ["atas", "pgd"])


def test_prefix_for_a_method_not_compared_is_ignored_with_a_note():
    r = route_overrides(["pgd.steps=2"], ["atas"])
    assert r.per_method == {"atas": []} and "pgd" in r.notes[0]


def test_plan_runs_builds_checked_configs(tmp_path):
    methods = ["atas", "fgsm_rs", "pgd"]
    routed = route_overrides(["train.epochs=3", "pgd.steps=2", "method.warmup_epochs=1"], methods)
    specs = plan_runs("fmnist", methods, ["0.1", "8/255"], 2, routed, tmp_path)
    assert len(specs) == 12
    assert [(s.method, s.eps, s.seed) for s in specs[:3]] == [
        ("atas", "0.1", 0),
        ("atas", "0.1", 1),
        ("fgsm_rs", "0.1", 0),
    ]
    by = {(s.method, s.eps, s.seed): s for s in specs}
    assert by["pgd", "0.1", 0].cfg.method.args["steps"] == 2
    assert "steps" not in by["atas", "0.1", 0].cfg.method.args
    assert by["atas", "0.1", 0].cfg.method.args["warmup_epochs"] == 1
    assert "warmup_epochs" not in by["fgsm_rs", "0.1", 0].cfg.method.args
    assert by["pgd", "8/255", 1].cfg.method.eps == pytest.approx(8 / 255)
    assert by["pgd", "8/255", 1].cfg.train.seed == 1 and by["pgd", "8/255", 1].cfg.train.epochs == 3
    assert by["pgd", "8/255", 1].run_dir == tmp_path / "runs" / "pgd_eps8-255_seed1"
    assert run_name("atas", "0.1", 0) == "atas_eps0.1_seed0"


# --------------------------------------------------------------------------------------------
# CO verdict and the report on synthetic rows (no training)
# --------------------------------------------------------------------------------------------
def _probe(curve, co=False):
    return [
        {"epoch": e, "probe_clean": c, "probe_fgsm": f, "probe_pgd": p, "co": co}
        for e, (c, f, p) in enumerate(curve, 1)
    ]


def test_co_verdict_uses_the_probe_and_the_final_fgsm_signature():
    flagged = _probe([(0.6, 0.45, 0.40), (0.7, 0.72, 0.10), (0.7, 0.75, 0.05)])
    quiet = _probe([(0.6, 0.45, 0.40), (0.66, 0.50, 0.43)])
    assert co_verdict(flagged, {"clean": 0.8, "pgd": 0.5}) == (True, [2, 3], None)
    # robust accuracy under a tenth of clean at the final evaluation is the signature too
    assert co_verdict(flagged, {"clean": 0.8, "pgd": 0.0}) == (True, [2, 3], True)
    assert co_verdict(quiet, {"clean": 0.82, "fgsm": 0.68, "pgd": 0.006, "aa": 0.004}) == (True, [], True)
    assert co_verdict(quiet, {"clean": 0.7, "fgsm": 0.6, "pgd": 0.45, "aa": 0.38}) == (False, [], False)
    assert co_verdict(quiet, {"clean": 0.8, "fgsm": 0.9, "pgd": 0.0}) == (True, [], True)
    assert co_verdict(quiet, {"clean": 0.8, "fgsm": 0.5, "pgd": 0.4}) == (False, [], False)
    assert co_verdict([], {"clean": 0.8}) == (False, [], None)


def test_co_verdict_replays_the_monitor_instead_of_trusting_the_logged_column():
    # A run logged by an older monitor: its `co` column says no, the probe curve says a collapse.
    old_log = _probe([(0.68, 0.55, 0.50), (0.74, 0.64, 0.55), (0.71, 0.65, 0.30)], co=False)
    assert co_verdict(old_log, {"clean": 0.7, "fgsm": 0.6})[:2] == (True, [3])
    # and a column flag the curve does not support is not taken on trust
    assert co_verdict(_probe([(0.6, 0.45, 0.40), (0.66, 0.50, 0.43)], co=True), {"clean": 0.7})[:2] == (False, [])


def _row(method, eps, seed, clean, pgd, aa=None, t=10.0, co=False, curve=(0.3, 0.4, 0.45)):
    epochs = list(range(1, len(curve) + 1))
    curves = {"epoch": epochs, "probe_pgd": list(curve), "co": [co and e == len(curve) for e in epochs]}
    if method == "atas":
        curves.update(
            alpha_mean=[0.1, 0.15, 0.2][: len(curve)],
            alpha_min=[0.1, 0.1, 0.12][: len(curve)],
            alpha_max=[0.1, 0.2, 0.3][: len(curve)],
        )
    return {
        "method": method,
        "eps": eps,
        "eps_value": float(eps),
        "seed": seed,
        "clean": clean,
        "fgsm": None,
        "pgd": pgd,
        "aa": aa,
        "pgd_label": "PGD-50-10",
        "n_examples": 1000,
        "train_time_s": t,
        "epochs": len(curve),
        "co_detected": co,
        "co_epochs": [len(curve)] if co else [],
        "co_final_signature": None,
        "chance": 0.1,
        "method_args": {"alpha_min": "0.1", "alpha_max": "0.35"} if method == "atas" else {},
        "run_dir": f"runs/{method}_eps{eps}_seed{seed}",
        "curves": curves,
    }


def test_co_column_counts_flagged_seeds():
    runs = [_row("fgsm_rs", "0.3", s, 0.8, 0.0, co=c) for s, c in enumerate([True, False, True])]
    assert co_column(runs) == "yes (2/3)"
    assert co_column([_row("atas", "0.3", s, 0.8, 0.4) for s in range(3)]) == "no (0/3)"
    assert co_column(runs + [{"method": "fgsm_rs", "eps": "0.3", "seed": 3, "failed": "NaN"}]) == "yes (2/3)"


SYNTHETIC = (
    [_row("atas", "0.3", s, 0.80, 0.40 + 0.01 * s, aa=0.38 + 0.01 * s, t=10.0) for s in range(2)]
    + [_row("fgsm_rs", "0.3", s, 0.85, 0.0, aa=0.0, t=8.0, co=True, curve=(0.3, 0.35, 0.0)) for s in range(2)]
    + [_row("pgd", "0.3", s, 0.78, 0.46, aa=0.44, t=40.0) for s in range(2)]
)


def test_findings_state_the_claims_and_report_a_miss_as_a_miss():
    facts = " ".join(findings(SYNTHETIC)["0.3"])
    assert "ATAS shows catastrophic overfitting: no (0/2" in facts
    assert "FGSM-RS shows catastrophic overfitting: yes, 2/2" in facts
    # ATAS AA 38.5 vs PGD-AT 44.0: 5.5 points below, a miss
    assert "ATAS AA within 3 points of PGD-AT: no (ATAS 38.5% vs PGD-AT 44.0%, 5.5 points below" in facts
    assert "time ratio 0.25" in facts
    close = [dict(r, aa=0.43) if r["method"] == "atas" else r for r in SYNTHETIC]
    assert "within 3 points of PGD-AT: yes" in " ".join(findings(close)["0.3"])
    assert "near chance" not in facts
    dead = [dict(r, clean=0.135, aa=0.135, chance=0.1) for r in SYNTHETIC]
    assert "ATAS clean accuracy 13.5% is near chance (10%)" in " ".join(findings(dead)["0.3"])
    one_dead = [dict(r, clean=0.093, aa=0.093) if (r["method"], r["seed"]) == ("pgd", 1) else r for r in SYNTHETIC]
    facts = " ".join(findings(one_dead)["0.3"])
    assert "PGD-AT: 1/2 seeds did not learn (clean accuracy near chance, seed 1)" in facts
    assert "ATAS: " not in facts and "is near chance" not in facts


def test_summary_table_rows_and_relative_time():
    table = format_summary_table(SYNTHETIC)
    atas_line = next(line for line in table.splitlines() if line.startswith("| ATAS |"))
    assert "80.0 ± 0.0" in atas_line and "40.5 ± 0.7" in atas_line and "0.25×" in atas_line
    assert "no (0/2)" in atas_line
    assert "| FGSM-RS |" in table and "yes (2/2)" in table and "| PGD-AT |" in table and "PGD-50-10 (%)" in table


def test_build_report_on_synthetic_rows(tmp_path):
    md = build_report(SYNTHETIC, tmp_path, "atas compare fmnist ...", {"cpu": "test", "cores": 2})
    assert md == tmp_path / "report.md"
    for name in (PROBE_PLOT, ALPHA_PLOT, TIME_PLOT):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    html = (tmp_path / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and all(f'src="{n}"' in html for n in (PROBE_PLOT, TIME_PLOT))
    failed = {
        "method": "atas",
        "eps": "0.3",
        "eps_value": 0.3,
        "seed": 2,
        "failed": "loss became NaN",
        "run_dir": "runs/atas_eps0.3_seed2",
    }
    build_report(SYNTHETIC + [failed], tmp_path, "x", {})
    md = (tmp_path / "report.md").read_text()
    assert "| ATAS | 2 of 3 (1 failed) |" in md and "failed: loss became NaN" in md
    # without ATAS there is no step-size plot, and a stale one is removed
    build_report([r for r in SYNTHETIC if r["method"] != "atas"], tmp_path, "x", {})
    assert not (tmp_path / ALPHA_PLOT).exists()
    assert ALPHA_PLOT not in (tmp_path / "report.html").read_text().split("Not drawn")[0]


# --------------------------------------------------------------------------------------------
# Bad input: rejected before anything trains, exit status 2, the valid names listed
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, match",
    [
        (["--methods", "atas,fgsm_rs,bogus"], "fgsm_rs"),
        (["--attacks", "clean,pgd,nope"], "apgd-ce"),
        (["--seeds", "0"], "--seeds"),
        (["method.nope=1"], "none of the compared methods"),
    ],
)
def test_bad_input_exits_2_before_training(tmp_path, monkeypatch, capsys, extra, match):
    _forbid_training(monkeypatch)
    assert cli(["compare", "fmnist", "--out", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert "atas compare: error:" in err and match in err
    if "bogus" in extra[-1]:
        assert "valid:" in err and "pgd" in err and "atas" in err
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------
TINY = [
    "model.arch=wong_cnn",
    "train.co_action=keep_best",
    "data.subset=256",
    "train.epochs=2",
    "train.batch_size=64",
    "train.probe_size=32",
    "train.probe_steps=2",
    "eval.pgd_steps=2",
    "eval.pgd_restarts=1",
    "train.progress=false",
    "method.warmup_epochs=1",
]
RUN_KEYS = {
    "method",
    "eps",
    "seed",
    "clean",
    "pgd",
    "aa",
    "train_time_s",
    "co_detected",
    "co_epochs",
    "co_final_signature",
    "curves",
    "run_dir",
}


@needs_fmnist
@pytest.mark.slow
def test_compare_end_to_end_then_rerun_trains_nothing(tmp_path, monkeypatch, capsys, one_thread):
    argv = [
        "compare",
        "fmnist",
        "--methods",
        "atas,fgsm_rs",
        "--seeds",
        "2",
        "--eps",
        "0.1,0.2",
        "--attacks",
        "clean,pgd",
        "--n-examples",
        "32",
        "--out",
        str(tmp_path),
        *TINY,
    ]
    assert cli(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    runs = summary["runs"]
    assert len(runs) == 8
    assert {(r["method"], r["eps"], r["seed"]) for r in runs} == {
        (m, e, s) for m in ("atas", "fgsm_rs") for e in ("0.1", "0.2") for s in (0, 1)
    }
    for r in runs:
        assert RUN_KEYS <= set(r), r.keys()
        assert r["aa"] is None and 0 <= r["clean"] <= 1 and 0 <= r["pgd"] <= 1
        assert r["train_time_s"] > 0 and r["epochs"] == 2 and r["n_examples"] == 32
        assert r["curves"]["epoch"] == [1, 2] and len(r["curves"]["probe_pgd"]) == 2
        assert (tmp_path / r["run_dir"] / "eval.json").exists()
    assert all(len(r["curves"]["alpha_mean"]) == 2 for r in runs if r["method"] == "atas")
    assert summary["machine"]["cores"] and summary["machine"]["torch"]

    md = (tmp_path / "report.md").read_text()
    for eps in ("0.1", "0.2"):
        section = md.split(f"### eps = {eps}")[1].split("###")[0]
        for method in ("atas", "fgsm_rs"):
            line = next(x for x in section.splitlines() if x.startswith(f"| {method_label(method)} |"))
            # every seed is accounted for: judged for CO (k/n), or counted apart as not learning
            co = re.search(r"(?:yes|no) \((\d+)/(\d+)\)(?:, (\d+) did not learn)?|did not learn \((2)/2\)", line)
            assert "±" in line and co and int(co[2] or 0) + int(co[3] or 0) + int(co[4] or 0) == 2, line
        assert "ATAS shows catastrophic overfitting:" in section
        assert "FGSM-RS shows catastrophic overfitting:" in section
    assert "PGD-2-1 (%)" in md and "compare fmnist" in md
    html = (tmp_path / "report.html").read_text()
    for name in (PROBE_PLOT, ALPHA_PLOT, TIME_PLOT):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
        assert f'src="{name}"' in html and f"({name})" in md
    assert "| ATAS |" in out and "report:" in out  # the table is printed too

    # The same command again: everything is finished, nothing trains or evaluates, same numbers.
    _forbid_training(monkeypatch)
    assert cli(argv) == 0
    again = json.loads((tmp_path / "summary.json").read_text())
    assert again["runs"] == runs
    assert capsys.readouterr().out.count("finished before: read back") == 8

    # A lost eval.json is redone from the evaluation's state file, still without training.
    monkeypatch.setattr(atas.evaluation.run, "evaluate_run", evaluate_run)
    (tmp_path / runs[0]["run_dir"] / "eval.json").unlink()
    assert cli(argv) == 0
    assert capsys.readouterr().out.count(": evaluated;") == 1
    assert json.loads((tmp_path / "summary.json").read_text())["runs"] == runs


@needs_fmnist
def test_unfinished_run_resumes_and_its_time_adds_up(tmp_path, capsys, monkeypatch, one_thread):
    argv = [
        "compare",
        "fmnist",
        "--methods",
        "atas",
        "--eps",
        "0.1",
        "--attacks",
        "clean",
        "--n-examples",
        "16",
        "--out",
        str(tmp_path),
        *TINY,
    ]
    assert cli([*argv, "train.epochs=1"]) == 0  # stands in for a sweep killed after epoch 1
    capsys.readouterr()

    # --report-only: a look at the sweep while it runs; nothing trains, the unfinished runs are named.
    with monkeypatch.context() as m:
        _forbid_training(m)
        assert cli([*argv, "--eps", "0.1,0.2", "--report-only"]) == 0
    assert "training unfinished (--report-only)" in capsys.readouterr().out
    partial = json.loads((tmp_path / "summary.json").read_text())["runs"]
    assert [(r["eps"], r.get("missing")) for r in partial] == [("0.1", "training unfinished"), ("0.2", "not started")]
    md = (tmp_path / "report.md").read_text()
    assert "PARTIAL: 2 of 2 planned runs have not finished" in md and "not finished: not started" in md

    assert cli(argv) == 0
    assert "resumed training" in capsys.readouterr().out
    (run,) = json.loads((tmp_path / "summary.json").read_text())["runs"]
    metrics = [json.loads(x) for x in (tmp_path / run["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and run["curves"]["epoch"] == [1, 2]
    assert run["train_time_s"] == pytest.approx(sum(m["epoch_time_s"] for m in metrics))
    # asking for fewer epochs than the folder holds is refused, not silently reported
    assert cli([*argv, "train.epochs=1"]) == 2
    assert "more than the train.epochs=1" in capsys.readouterr().err


@needs_fmnist
def test_a_diverged_run_is_reported_as_diverged(tmp_path, capsys, monkeypatch, one_thread):
    from atas.methods.atas import ATAS

    original = ATAS.training_loss

    def poisoned(self, model, x_adv, y, x, state):
        loss, logits = original(self, model, x_adv, y, x, state)
        return (loss * float("nan"), logits) if state.epoch == 2 else (loss, logits)

    argv = [
        "compare",
        "fmnist",
        "--methods",
        "atas",
        "--eps",
        "0.1",
        "--attacks",
        "clean",
        "--n-examples",
        "16",
        "--out",
        str(tmp_path),
        *TINY,
    ]
    with monkeypatch.context() as m:
        m.setattr(ATAS, "training_loss", poisoned)
        assert cli(argv) == 0  # one diverged run does not end the sweep
    (row,) = json.loads((tmp_path / "summary.json").read_text())["runs"]
    assert row["diverged"]["epoch"] == 2 and row["diverged"]["loss"] == "nan"
    capsys.readouterr()

    with monkeypatch.context() as m:
        _forbid_training(m)
        assert cli([*argv, "--report-only"]) == 0
    assert "diverged at epoch 2 (loss nan)" in capsys.readouterr().out
    (row,) = json.loads((tmp_path / "summary.json").read_text())["runs"]
    assert row["diverged"]["epoch"] == 2 and "missing" not in row
    md = (tmp_path / "report.md").read_text()
    assert "diverged at epoch 2 (loss nan)" in md and "not started" not in md and "(1 diverged)" in md
