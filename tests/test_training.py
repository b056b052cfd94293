"""Training end to end on a Fashion-MNIST subset: runs, resumes bit-exactly, survives crashes while
saving, refuses bad checkpoints, stops on NaN, and gives clear errors for bad input."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from atas.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from atas.cli import main as cli
from atas.config import load_config
from atas.export import export_model, load_model
from atas.trainer import CHECKPOINT, TrainingDiverged, train
from tests.helpers import needs_fmnist

pytestmark = needs_fmnist

TINY = [
    "model.arch=wong_cnn",
    "train.co_action=keep_best",
    "data.subset=384",
    "train.batch_size=64",
    "train.probe_size=64",
    "train.probe_steps=2",
    "train.progress=false",
    "eval.at_end=false",
    "optim.lr=0.02",
    "method.atas.warmup_epochs=1",
    "train.deterministic=true",
]


def tiny(tmp_path, *extra):
    return load_config("fmnist", TINY + [f"out_dir={tmp_path}"] + list(extra))


def test_short_run_writes_metrics_checkpoint_and_config(tmp_path):
    run = train(tiny(tmp_path, "train.epochs=2"), run_dir=tmp_path / "r")
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 <= r["probe_pgd"] <= 1 and 0 <= r["probe_clean"] <= 1 and r["train_loss"] == r["train_loss"]
        assert r["alpha_min"] - 1e-6 <= r["alpha_mean"] <= r["alpha_max"] + 1e-6
    assert rows[0]["train_eps"] == pytest.approx(0.2 / 3)  # the recipe ramps eps over 3 epochs
    assert rows[0]["alpha_mean"] == pytest.approx(rows[0]["train_eps"])  # warm-up epoch: alpha = eps_t
    assert (tmp_path / "r" / "metrics.csv").read_text().startswith("epoch,")
    assert (tmp_path / "r" / "config.yaml").exists()
    state = load_checkpoint(tmp_path / "r" / CHECKPOINT)
    assert state["epoch"] == 2 and state["config"]["method"]["name"] == "atas"
    assert set(state) >= {"model", "optimizer", "scheduler", "method", "rng", "config"}
    assert "store" in state["method"] and state["method"]["epoch"] == 2
    assert not list((tmp_path / "r").glob(".*tmp*"))
    best_model, _, info = load_model(tmp_path / "r" / "best.pt")  # co_action=keep_best: weights only
    best_epoch = max(rows, key=lambda r: r["probe_pgd"])["epoch"]
    assert info["epoch"] == min(e["epoch"] for e in rows if e["probe_pgd"] == rows[best_epoch - 1]["probe_pgd"])
    # the store really moved away from its U(-eps, eps) start: entries hit +-eps_t after the steps
    eps_t = run.method.eps_at(2)  # the recipe's 3-epoch ramp: 2/3 of eps in epoch 2
    assert eps_t == pytest.approx(0.2 * 2 / 3) and (run.store.delta.abs() > eps_t - 1e-6).float().mean() > 0.05


@pytest.mark.parametrize("method", ["atas", "free", "fgsm_pgi"])
def test_kill_and_resume_equals_uninterrupted(tmp_path, method):
    """N epochs straight vs N/2 + resume + N/2: identical parameters, store and method state."""
    extra = [f"method.name={method}", "train.epochs=2"] + (["method.m=2"] if method == "free" else [])
    full = train(tiny(tmp_path, *extra), run_dir=tmp_path / "full")
    train(tiny(tmp_path, *extra, "train.epochs=1"), run_dir=tmp_path / "half")
    resumed = train(tiny(tmp_path, *extra), run_dir=tmp_path / "half", resume=True)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    if full.store is not None:
        assert torch.equal(full.store.delta, resumed.store.delta)
        assert torch.equal(full.store.grad_sq_ema, resumed.store.grad_sq_ema)
    assert [r["epoch"] for r in resumed.metrics] == [1, 2]


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})

    def dying_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_disk_full_while_saving_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"epoch": 1})

    def full_disk(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="no space left.*previous file is intact"):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1 and len(list(tmp_path.iterdir())) == 1


def test_truncated_and_garbage_checkpoints_refused(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"epoch": 1, "w": torch.randn(100, 100)})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    for p in (truncated, garbage):
        with pytest.raises(CheckpointError, match="truncated or not a checkpoint"):
            load_checkpoint(p)
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(1)}, plain)
    with pytest.raises(CheckpointError, match="not an atas checkpoint"):
        load_checkpoint(plain)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('ATAS_TEST_PWNED', '/tmp/atas-pwned')}",))


def test_malicious_pickle_refused_and_not_executed(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("ATAS_TEST_PWNED", str(marker))
    path = tmp_path / "evil.pt"
    torch.save({"format": "atas-checkpoint-v1", "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_model(path)
    assert not marker.exists()


def test_resume_with_other_dataset_size_or_config_refused(tmp_path):
    train(tiny(tmp_path, "train.epochs=1"), run_dir=tmp_path / "r")
    with pytest.raises((CheckpointError, ValueError), match="data.subset|dataset size"):
        train(tiny(tmp_path, "train.epochs=2", "data.subset=320"), run_dir=tmp_path / "r", resume=True)
    with pytest.raises(CheckpointError, match="method.eps"):
        train(tiny(tmp_path, "train.epochs=2", "method.eps=0.1"), run_dir=tmp_path / "r", resume=True)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(tiny(tmp_path, "train.epochs=2"), run_dir=tmp_path / "empty", resume=True)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from atas.methods.atas import ATAS

    cfg = tiny(tmp_path, "train.epochs=3")
    calls = {"n": 0}
    original = ATAS.training_loss

    def poisoned(self, model, x_adv, y, x, state):
        loss, logits = original(self, model, x_adv, y, x, state)
        calls["n"] += 1
        return (loss * float("nan"), logits) if state.epoch == 2 and calls["n"] > 8 else (loss, logits)

    monkeypatch.setattr(ATAS, "training_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step \d+.*last good checkpoint.*epoch 1"):
        train(cfg, run_dir=tmp_path / "r")
    state = load_checkpoint(tmp_path / "r" / CHECKPOINT)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_export_round_trip_without_prefixes(tmp_path):
    run = train(tiny(tmp_path, "train.epochs=1"), run_dir=tmp_path / "r")
    out = export_model(tmp_path / "r", tmp_path / "export")
    from safetensors.torch import load_file

    keys = load_file(str(out / "model.safetensors")).keys()
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in keys)
    card = json.loads((out / "card.json").read_text())
    assert card["architecture"] == "wong_cnn" and card["eps"] == "0.2" and card["method"] == "atas"
    model, cfg, _ = load_model(out)
    x = torch.rand(4, 1, 28, 28)
    run.model.eval()
    assert torch.allclose(model(x), run.model(x), atol=1e-6)


# ---------------------------------------------------------------- CLI and bad input
def test_cli_recipes_lists_shipped(capsys):
    assert cli(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "fmnist" in out and "cifar10-prn18-eps8" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["method.name=fgsmx"], "unknown method 'fgsmx'; valid: atas"),
        (["model.arch=vgg"], "unknown model 'vgg'"),
        (["data.name=cifar11"], "cifar10"),
        (["method.eps=8"], "Did you mean method.eps=8/255"),
        (["method.eps=1.5"], "larger than the whole pixel range"),
    ],
)
def test_cli_bad_input_is_one_clear_line(tmp_path, capsys, args, message):
    assert cli(["train", "fmnist", f"out_dir={tmp_path}"] + args) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_data_names_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ATAS_DATA_DIR", str(tmp_path / "cache"))
    code = cli(
        [
            "train",
            "fmnist",
            "data.name=cifar10",
            f"data.data_dir={tmp_path}",
            "model.arch=wong_cnn",
            f"out_dir={tmp_path}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "data.download=true" in err and "cifar-10-batches-py" in err


def test_cli_train_resume_and_eval(tmp_path, capsys):
    args = [
        "train",
        "fmnist",
        *TINY[:-1],
        "eval.at_end=true",
        "eval.n_examples=64",
        "eval.pgd_steps=3",
        "eval.pgd_restarts=2",
        "train.epochs=1",
        "--run-dir",
        str(tmp_path / "r"),
    ]
    args.remove("eval.at_end=false")
    assert cli(args) == 0
    assert cli(["train", "--resume", str(tmp_path / "r"), "train.epochs=2", "eval.n_examples=64"]) == 0
    assert load_checkpoint(tmp_path / "r" / CHECKPOINT)["epoch"] == 2
    assert (
        cli(
            [
                "eval",
                str(tmp_path / "r"),
                "--attacks",
                "clean,pgd",
                "--n-examples",
                "32",
                "--pgd-steps",
                "2",
                "--pgd-restarts",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "PGD-2-1" in out
    (result,) = (
        json.loads(p.read_text()) for p in (tmp_path / "r").glob("eval-clean+pgd-n32-*.json")
    )  # eval.json is training's
    assert result["n_examples"] == 32 and result["eps_label"] == "0.2"
    assert json.loads((tmp_path / "r" / "eval.json").read_text())["n_examples"] == 64
    assert cli(["eval", str(tmp_path / "r" / "garbage.pt")]) == 2


def test_checkpoint_whose_model_cannot_be_rebuilt_is_a_clear_error(tmp_path):
    train(tiny(tmp_path, "train.epochs=1"), run_dir=tmp_path / "r")
    state = load_checkpoint(tmp_path / "r" / CHECKPOINT)
    state.pop("format")
    state["config"]["model"]["arch"] = "small_cnn"  # weights of another architecture
    save_checkpoint(tmp_path / "other.pt", state)
    with pytest.raises(CheckpointError, match="do not fit the model"):
        load_model(tmp_path / "other.pt")
    state["config"]["model"]["arch"] = "no_such_net"  # a model this library cannot build
    save_checkpoint(tmp_path / "unknown.pt", state)
    with pytest.raises(CheckpointError, match="cannot rebuild"):
        load_model(tmp_path / "unknown.pt")


def test_eval_at_another_eps_warns(tmp_path, capsys):
    train(tiny(tmp_path, "train.epochs=1"), run_dir=tmp_path / "r")
    assert (
        cli(["eval", str(tmp_path / "r"), "--eps", "0.1", "--attacks", "clean", "--n-examples", "16", "--no-progress"])
        == 0
    )
    # the command line says it as one line of its own (atas.cli.say_warning)
    assert "atas: warning: evaluating at eps=0.1 but the model was trained at eps=0.2" in capsys.readouterr().err


def test_the_library_writes_what_atas_train_writes_evaluation_included(tmp_path):
    # atas.train() and `atas train` share one path: the end-of-training evaluation is the library's.
    import atas

    extra = [
        "train.epochs=1",
        "eval.at_end=true",
        "eval.attacks=clean,pgd",
        "eval.n_examples=16",
        "eval.pgd_steps=1",
        "eval.pgd_restarts=1",
        "data.val_size=32",
    ]
    run = atas.train(tiny(tmp_path, *extra), run_dir=tmp_path / "api")
    assert cli(["train", "fmnist", *TINY, *extra, f"out_dir={tmp_path}", "--run-dir", str(tmp_path / "cli")]) == 0

    def accuracies(folder, name):
        result = json.loads((tmp_path / folder / name).read_text())
        return {k: (v["accuracy"], v["n"]) for k, v in result["results"].items()}, result.get("model", {}).get("sha256")

    for name in ("eval.json", "val.json"):
        assert accuracies("api", name) == accuracies("cli", name)
    assert run.evaluation == json.loads((tmp_path / "api" / "eval.json").read_text())
    assert run.validation == json.loads((tmp_path / "api" / "val.json").read_text())
    # evaluate=False (what `atas compare` asks: it evaluates on its own terms) writes neither
    atas.train(tiny(tmp_path, *extra), run_dir=tmp_path / "quiet", evaluate=False)
    assert not (tmp_path / "quiet" / "eval.json").exists() and not (tmp_path / "quiet" / "val.json").exists()


def test_a_run_that_reached_max_steps_stays_ended_and_the_advice_trains_on(tmp_path, capsys):
    import re
    import shlex

    cfg = tiny(tmp_path, "train.epochs=3", "train.max_steps=2")
    train(cfg, run_dir=tmp_path / "r")
    capsys.readouterr()
    assert not train(cfg, run_dir=tmp_path / "r", resume=True).trained
    out = capsys.readouterr().out
    assert "has ended: it reached train.max_steps=2" in out
    command = re.findall(r"`(atas train --resume [^`]+)`", out)[-1]
    assert command.endswith("train.max_steps=8")  # one epoch of steps (6 batches) more
    assert cli(shlex.split(command)[1:]) == 0
    assert load_checkpoint(tmp_path / "r" / CHECKPOINT)["step"] == 8
