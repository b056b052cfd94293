"""The validation split (data.val_size) and `atas compare --tune`: the split holds out exactly the
last N training images and training never sees them; val_size=0 is today's run bit for bit; bad
sizes are clear errors before anything trains; --tune picks the value with the best validation
robust accuracy (an evaluation stubbed to known numbers), runs the seeds with it, records grid and
choice in summary.json and the report, re-uses its runs; an explicit value skips the search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import atas.evaluation.run
import atas.trainer
from atas.checkpoint import CheckpointError
from atas.cli import main as cli
from atas.config import ConfigError, load_config
from atas.data import load_tensors
from atas.evaluation.run import VAL_FILE, load_val_set, validation_request
from atas.methods import get_method
from atas.trainer import check_resumable, make_data
from atas.tune import choose
from tests.helpers import needs_fmnist

TINY = [
    "model.arch=wong_cnn",
    "data.subset=256",
    "train.epochs=1",
    "train.batch_size=64",
    "train.probe_size=0",
    "eval.pgd_steps=2",
    "eval.pgd_restarts=1",
    "train.progress=false",
    "train.co_action=keep_best",
]


pytestmark = pytest.mark.usefixtures("one_thread")
TRAIN_AND_EVAL = ("atas.trainer.train", "atas.evaluation.run.evaluate_run", "atas.evaluation.run.evaluate_validation")


def _forbid(monkeypatch, *names):
    def boom(*args, **kwargs):
        raise AssertionError("nothing may train or evaluate here")

    for name in names:
        module, attr = name.rsplit(".", 1)
        modules = {"atas.trainer": atas.trainer, "atas.evaluation.run": atas.evaluation.run}
        monkeypatch.setattr(modules[module], attr, boom)


# --------------------------------------------------------------------------------------------
# The validation split
# --------------------------------------------------------------------------------------------
@needs_fmnist
def test_val_split_holds_out_exactly_the_last_n_and_never_trains_on_them():
    cfg = load_config("fmnist", TINY + ["data.val_size=64"])
    x_all, y_all = load_tensors("fmnist", "train")
    data = make_data(cfg, torch.device("cpu"))
    assert data.num_train == 192
    assert torch.equal(data.loader.x, x_all[:192]) and torch.equal(data.loader.y, y_all[:192])
    x_val, y_val = load_val_set(cfg)
    assert torch.equal(x_val, x_all[192:256]) and torch.equal(y_val, y_all[192:256])
    assert torch.equal(load_val_set(cfg, 10)[0], x_all[192:202])
    # One epoch of the loader: every training index 0..191 exactly once, never a held-out image.
    seen = torch.cat([idx.cpu() for _, _, idx in data.loader])
    assert sorted(seen.tolist()) == list(range(192))
    batches = list(data.loader)
    for x, _, idx in batches:
        assert torch.equal((x * 255).round().to(torch.uint8), x_all[idx])
    held_out = {tuple(img.flatten().tolist()) for img in x_val}
    assert not any(
        tuple(img.flatten().tolist()) in held_out for x, _, _ in batches for img in (x * 255).round().to(torch.uint8)
    )


@needs_fmnist
def test_val_size_zero_is_todays_run_bit_for_bit_and_old_runs_still_resume(tmp_path):
    base = TINY + ["method.name=fgsm_rs", "train.max_steps=2", "eval.at_end=false"]
    runs = [
        atas.trainer.train(load_config("fmnist", base + extra), run_dir=tmp_path / name)
        for name, extra in (("plain", []), ("zero", ["data.val_size=0"]))
    ]
    a, b = (r.model.state_dict() for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A run saved before data.val_size existed compares equal to val_size 0 (resumable), not to 64.
    saved = yaml.safe_load((tmp_path / "plain" / "config.yaml").read_text())
    del saved["data"]["val_size"]
    check_resumable(saved, load_config("fmnist", base))
    with pytest.raises(CheckpointError, match="val_size"):
        check_resumable(saved, load_config("fmnist", base + ["data.val_size=64"]))


@pytest.mark.parametrize(
    "extra, match",
    [
        (["data.val_size=-1"], "data.val_size must be >= 0"),
        (["data.val_size=256"], "holds out all of the data.subset=256"),
        (["data.val_size=abc"], "data.val_size: expected an integer"),
    ],
)
def test_bad_val_sizes_are_config_errors(extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config("fmnist", TINY + extra)


@needs_fmnist
def test_val_size_as_large_as_the_training_split_fails_before_training():
    cfg = load_config("fmnist", ["model.arch=wong_cnn", "data.val_size=60000"])
    with pytest.raises(ConfigError, match="data.val_size=60000 but the training split has only 60000 images"):
        make_data(cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match="no validation split"):
        load_val_set(load_config("fmnist", TINY))
    with pytest.raises(ConfigError, match="give 1..64"):
        load_val_set(load_config("fmnist", TINY + ["data.val_size=64"]), 65)


@needs_fmnist
def test_atas_train_reports_validation_accuracy(tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        cli(
            [
                "train",
                "fmnist",
                *TINY,
                "data.subset=96",
                "data.val_size=32",
                "eval.attacks=clean",
                "eval.n_examples=8",
                "--run-dir",
                str(run),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "validation (32 of the 32 held-out training images): clean" in out and "PGD-10-1" in out
    val = json.loads((run / VAL_FILE).read_text())
    assert set(val["results"]) == {"clean", "pgd"} and val["results"]["pgd"]["n"] == 32
    assert val["results"]["pgd"]["label"] == "PGD-10-1" and val["request"]["val_size"] == 32
    assert json.loads((run / "eval.json").read_text())["n_examples"] == 8  # the test evaluation is unchanged


# --------------------------------------------------------------------------------------------
# Choosing a value
# --------------------------------------------------------------------------------------------
def test_choose_best_robust_then_clean_then_first_and_skips_failures():
    rows = [
        {"value": 10.0, "clean": 0.9, "pgd": 0.2},
        {"value": 100.0, "clean": 0.7, "pgd": 0.5},
        {"value": 1000.0, "clean": 0.8, "pgd": 0.5},
        {"value": 1e4, "failed": "loss became NaN"},
    ]
    assert choose(rows) == 1000.0  # robust tie 0.5 broken by clean 0.8 > 0.7
    assert choose([dict(r, clean=0.7) for r in rows[:3]]) == 100.0  # full tie: the first in the grid
    assert choose(rows[3:]) is None and choose([]) is None


def test_the_searched_options_are_declared_only_where_they_do_not_transfer():
    assert get_method("elle").search == {"lam": (10.0, 100.0, 1000.0)}
    assert get_method("elle_a").search == {"lam_max": (10.0, 100.0, 1000.0)}
    assert get_method("grad_align").search == {"lam": (0.5, 2.0, 8.0)}
    for name in ("atas", "fgsm_rs", "n_fgsm", "fgsm_pgi", "free", "pgd", "none"):
        assert get_method(name).search == {}, name
    for name in ("elle", "elle_a", "grad_align"):  # every searched option is a real option of the method
        (option,) = get_method(name).search
        assert option in {f for f in get_method(name).Options.__dataclass_fields__}


# --------------------------------------------------------------------------------------------
# atas compare --tune, end to end on a tiny sweep with a stubbed validation
# --------------------------------------------------------------------------------------------
# Validation accuracies by lam: 100 and 1000 tie on robust accuracy, 1000 is cleaner: 1000 wins.
FAKE = {10.0: (0.90, 0.20), 100.0: (0.70, 0.50), 1000.0: (0.80, 0.50)}


def _fake_validation(calls):
    def fake(model, cfg, run_dir, n_examples=None, progress=False):
        lam = float(cfg.method.args["lam"])
        calls.append((lam, cfg.data.val_size, n_examples, cfg.train.seed))
        clean, pgd = FAKE[lam]
        result = {
            "results": {
                "clean": {"label": "clean", "accuracy": clean, "n": n_examples},
                "pgd": {"label": "PGD-10-1", "accuracy": pgd, "n": n_examples},
            },
            "request": validation_request(cfg, n_examples),
        }
        (Path(run_dir) / VAL_FILE).write_text(json.dumps(result))
        return result

    return fake


@needs_fmnist
@pytest.mark.slow
def test_tune_picks_the_best_value_runs_the_seeds_with_it_and_records_it(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(atas.evaluation.run, "evaluate_validation", _fake_validation(calls))
    argv = [
        "compare",
        "fmnist",
        "--methods",
        "elle,fgsm_rs",
        "--eps",
        "0.1",
        "--seeds",
        "2",
        "--attacks",
        "clean",
        "--n-examples",
        "16",
        "--tune",
        "--tune-val-size",
        "64",
        "--tune-n-examples",
        "32",
        "--out",
        str(tmp_path),
        *TINY,
    ]
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert "search elle eps=0.1: chose lam=1000" in out
    # One search run per grid value, at the base seed, on the training split less its last 64 images.
    assert sorted(calls) == [(10.0, 64, 32, 0), (100.0, 64, 32, 0), (1000.0, 64, 32, 0)]
    for value in ("10", "100", "1000"):
        saved = yaml.safe_load((tmp_path / "tune" / f"elle_eps0.1_lam{value}" / "config.yaml").read_text())
        assert saved["data"]["val_size"] == 64 and saved["method"]["args"]["lam"] == float(value)
    # The seeds: ELLE at the chosen value on the full training split; FGSM-RS declares no search.
    for seed in (0, 1):
        saved = yaml.safe_load((tmp_path / "runs" / f"elle_eps0.1_seed{seed}" / "config.yaml").read_text())
        assert saved["method"]["args"]["lam"] == 1000.0 and saved["data"]["val_size"] == 0
    assert not list((tmp_path / "tune").glob("fgsm_rs*"))

    summary = json.loads((tmp_path / "summary.json").read_text())
    (search,) = summary["search"]
    assert {k: search[k] for k in ("method", "eps", "option", "grid", "chosen", "val_size", "n_examples", "seed")} == {
        "method": "elle",
        "eps": "0.1",
        "option": "lam",
        "grid": [10.0, 100.0, 1000.0],
        "chosen": 1000.0,
        "val_size": 64,
        "n_examples": 32,
        "seed": 0,
    }
    assert [(r["value"], r["clean"], r["pgd"]) for r in search["results"]] == [(v, *FAKE[v]) for v in FAKE]
    assert [r["method_args"]["lam"] for r in summary["runs"] if r["method"] == "elle"] == [1000.0, 1000.0]
    assert "--tune --tune-val-size 64 --tune-n-examples 32" in summary["equivalent"]

    md = (tmp_path / "report.md").read_text()
    section = md.split("## Hyper-parameter search")[1].split("\n## ")[0]
    assert "last 64 training images" in section and "first 32 of them" in section
    lines = {line.split(" | ")[4]: line for line in section.splitlines() if line.startswith("| ELLE | 0.1 | lam |")}
    assert set(lines) == {"10", "100", "1000"}
    assert "| 80.0 | 50.0 | yes |" in lines["1000"] and "| yes |" not in lines["10"] + lines["100"]
    assert "ELLE at eps 0.1 ran with lam = 1000, chosen on a validation split" in md
    assert "Hyper-parameter search" in (tmp_path / "report.html").read_text()

    # Again: the search and the seeds are read back; nothing trains or validates.
    _forbid(monkeypatch, *TRAIN_AND_EVAL)
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert out.count("finished before: read back") == 3 + 4 and "chose lam=1000" in out
    again = json.loads((tmp_path / "summary.json").read_text())
    assert again["search"] == summary["search"] and again["runs"] == summary["runs"]


@needs_fmnist
def test_an_explicit_value_skips_the_search(tmp_path, monkeypatch, capsys):
    _forbid(monkeypatch, *TRAIN_AND_EVAL)
    for override in ("elle.lam=100", "method.lam=100"):
        assert (
            cli(
                [
                    "compare",
                    "fmnist",
                    "--methods",
                    "elle,elle_a",
                    "--eps",
                    "0.1,0.2",
                    "--attacks",
                    "clean",
                    "--tune",
                    "--tune-val-size",
                    "64",
                    "--out",
                    str(tmp_path),
                    "--report-only",
                    *TINY,
                    override,
                ]
            )
            == 0
        )
        out = capsys.readouterr().out
        assert "note: elle.lam=100 is given: its hyper-parameter search (lam over 10, 100, 1000) is skipped" in out
        assert out.count("search elle eps=0.1: skipped (lam=100 given explicitly)") == 1
        # ELLE-A's searched option is lam_max: it is still searched (here: not started, --report-only).
        assert "search elle_a eps=0.2 lam_max=1000: not started (--report-only)" in out
        summary = json.loads((tmp_path / "summary.json").read_text())
        elle = [s for s in summary["search"] if s["method"] == "elle"]
        assert [(s["eps"], s["skipped"], s["chosen"], s["results"]) for s in elle] == [
            ("0.1", "lam=100 given explicitly", None, []),
            ("0.2", "lam=100 given explicitly", None, []),
        ]
        runs = {(r["method"], r["eps"]): r["missing"] for r in summary["runs"]}
        assert runs[("elle", "0.1")] == "not started"  # planned with lam=100, no search to wait for
        assert runs[("elle_a", "0.1")] == "hyper-parameter search not finished"
        md = (tmp_path / "report.md").read_text()
        assert "| ELLE | 0.1 | lam | 10, 100, 1000 | — | — | — | not searched: lam=100 given explicitly |" in md
    assert not (tmp_path / "tune").exists() and not (tmp_path / "runs").exists()


@needs_fmnist
@pytest.mark.parametrize(
    "extra, match",
    [
        (["--tune-val-size", "0"], "--tune-val-size must be >= 1"),
        (["--tune-val-size", "256"], "give at most 255"),
        (["--tune-val-size", "64", "--tune-n-examples", "65"], "give 1..64"),
        (["--tune-n-examples", "0"], "give 1..5000"),
    ],
)
def test_bad_tune_sizes_exit_2_before_anything_trains(tmp_path, monkeypatch, capsys, extra, match):
    _forbid(monkeypatch, *TRAIN_AND_EVAL)
    argv = ["compare", "fmnist", "--methods", "elle", "--tune", *extra, "--out", str(tmp_path), *TINY]
    if "--tune-n-examples" in extra and "--tune-val-size" not in extra:
        argv[argv.index("data.subset=256")] = "data.subset=6000"
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "atas compare: error:" in err and match in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "tune").exists()


def test_tune_sizes_without_tune_are_refused(tmp_path, monkeypatch, capsys):
    _forbid(monkeypatch, *TRAIN_AND_EVAL)
    assert cli(["compare", "fmnist", "--methods", "elle", "--tune-val-size", "64", "--out", str(tmp_path), *TINY]) == 2
    assert "add --tune" in capsys.readouterr().err
