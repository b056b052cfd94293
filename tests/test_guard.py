"""The guard of train.co_action=recover (atas.guard): rollback to the last healthy epoch, the method's
remedy, events in metrics.jsonl, exact resume after a kill during a recovery, its limits; and the
eps schedule every method shares."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

import atas.trainer as trainer
from atas import guard
from atas.checkpoint import healthy_path, load_checkpoint
from atas.cli import main as cli
from atas.config import ConfigError, Frac, load_config
from atas.export import load_model
from atas.methods import get_method, list_methods
from atas.monitor import COMonitor
from atas.rundir import CHECKPOINT, MetricsLog
from atas.trainer import train
from tests.helpers import needs_fmnist as needs_data

TINY = [
    "model.arch=wong_cnn",
    "data.subset=256",
    "train.batch_size=64",
    "train.probe_size=32",
    "train.probe_steps=1",
    "train.progress=false",
    "eval.at_end=false",
    "eval.attacks=clean",
    "method.atas.warmup_epochs=1",
    "train.deterministic=true",
    "train.epochs=5",
]


def tiny(tmp_path, *extra):
    return load_config("fmnist", TINY + [f"out_dir={tmp_path}"] + list(extra))


class Scripted(COMonitor):
    """A monitor that flags exactly the epochs it is told to (`script`: epoch -> reason) as long as
    the run has had no recovery, and judges nothing else: the guard's mechanics, not the probe's."""

    script: dict = {}

    def update(self, row):
        reason = self.script.get(row["epoch"], "") if not self.recovered else ""
        if reason:
            self.flagged_epochs.append(row["epoch"])
        self.stuck_run = 0
        return {"co": bool(reason), "best": False, "reason": reason}


@pytest.fixture
def scripted(monkeypatch):
    def monitor_for(opt, rows):
        m = Scripted()
        m.recovered = bool(guard.events(rows))
        m.replay(guard.epoch_rows(rows))
        return m

    monkeypatch.setattr(guard, "monitor_for", monitor_for)
    # tiny runs learn little: every unflagged epoch counts as healthy here (the clean-accuracy
    # floor of guard.is_healthy has its own test below)
    monkeypatch.setattr(guard, "is_healthy", lambda verdict, monitor, row, n: not verdict["co"] and not monitor.pending)
    return Scripted


def logged(run_dir):
    return MetricsLog(run_dir).read()


@needs_data
def test_co_rolls_back_to_the_last_healthy_epoch_and_applies_the_methods_remedy(tmp_path, scripted):
    scripted.script = {4: "collapse: scripted"}
    run = train(tiny(tmp_path), run_dir=tmp_path / "r")
    rows = logged(tmp_path / "r")
    event = next(r for r in rows if r.get("event") == "recovery")
    assert event["epoch"] == 4 and event["rollback_to"] == 3 and event["replayed_epochs"] == 1
    assert event["changes"] == {"step_scale": 0.75} and "the method's own" in event["remedy"]
    assert [r["epoch"] for r in rows if r.get("discarded")] == [4]
    assert [r["epoch"] for r in guard.epoch_rows(rows)] == [1, 2, 3, 4, 5] == [r["epoch"] for r in run.metrics]
    assert run.method.opt.step_scale == 0.75 and run.events == [event]
    # the run's own checkpoint carries the event, so a resume re-applies the remedy
    assert load_checkpoint(tmp_path / "r" / CHECKPOINT)["metrics"][-1]["epoch"] == 5


@needs_data
def test_a_run_that_never_got_healthy_restarts_from_its_initial_weights_with_a_longer_ramp(tmp_path, scripted):
    scripted.script = {1: "stuck: scripted", 2: "stuck: scripted"}
    cfg = tiny(tmp_path, "train.eps_ramp_epochs=1")
    run = train(cfg, run_dir=tmp_path / "r")
    event = next(r for r in logged(tmp_path / "r") if r.get("event") == "recovery")
    assert event["rollback_to"] == 0 and event["epoch"] == 1
    assert event["changes"] == {"eps_ramp_epochs": 3, "eps_ramp_start": 1} and "initial weights" in event["remedy"]
    assert run.method.eps_at(1) == pytest.approx(0.2 / 3) and run.method.eps_at(3) == 0.2


@needs_data
def test_a_method_without_a_remedy_gets_the_eps_ramp_restarted(tmp_path, scripted):
    scripted.script = {3: "collapse: scripted"}
    train(tiny(tmp_path, "method.name=pgd", "method.steps=1"), run_dir=tmp_path / "r")
    event = next(r for r in logged(tmp_path / "r") if r.get("event") == "recovery")
    assert event["changes"] == {"eps_ramp_epochs": 3, "eps_ramp_start": 3} and event["remedy"].startswith("generic")


@needs_data
def test_the_guard_gives_up_past_its_budget_with_one_clear_line(tmp_path, scripted, capsys):
    scripted.script = {4: "collapse: scripted"}
    assert cli(["train", "fmnist", *TINY, "train.recover_budget_epochs=0", "--run-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert (
        "GUARD epoch 4: the guard gave up (rolling back to epoch 3 would replay 1 epochs, but only 0 of the "
        "budget of 0 are left (train.recover_budget_epochs))" in out
    )
    assert "the run ends with the weights of its last healthy epoch, 3 (early stopping)" in out
    rows = logged(tmp_path / "r")
    # Giving up ends the run at its last healthy epoch: epoch 4 is undone, the final weights are epoch 3's.
    assert rows[-1]["event"] == "gave_up" and rows[-1]["rollback_to"] == 3
    assert [r["epoch"] for r in guard.epoch_rows(rows)] == [1, 2, 3]
    assert [r["epoch"] for r in rows if r.get("discarded")] == [4]
    final = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    healthy = load_checkpoint(tmp_path / "r" / "checkpoint.healthy.pt")
    assert int(final["epoch"]) == 3 and all(torch.equal(final["model"][k], healthy["model"][k]) for k in final["model"])


@pytest.mark.parametrize(
    "where", ["before the rollback is saved", "after the rollback is saved", "in the replayed epoch"]
)
@needs_data
def test_a_kill_during_a_recovery_resumes_to_the_same_final_weights(tmp_path, scripted, monkeypatch, where):
    import atas.runstate as runstate
    import atas.trainer as trainer

    scripted.script = {3: "collapse: scripted"}
    whole = train(tiny(tmp_path), run_dir=tmp_path / "whole")
    armed = [True]

    def kill():
        armed[0] = False
        raise KeyboardInterrupt  # what SIGKILL leaves: the files as they are at that instant

    with monkeypatch.context() as m:
        if where == "before the rollback is saved":
            real_roll_back = runstate.roll_back
            m.setattr(runstate, "roll_back", lambda *a: kill() if armed[0] else real_roll_back(*a))
        elif where == "after the rollback is saved":  # _restore follows the rollback's save
            real_restore = runstate.restore
            m.setattr(
                runstate,
                "restore",
                lambda run, state, rows: kill() if armed[0] and guard.events(rows) else real_restore(run, state, rows),
            )
        else:
            real_epoch = trainer._train_epoch
            m.setattr(
                trainer,
                "_train_epoch",
                lambda run, epoch, step: (
                    kill() if armed[0] and run.method.opt.step_scale == 0.75 else real_epoch(run, epoch, step)
                ),
            )
        with pytest.raises(KeyboardInterrupt):
            train(tiny(tmp_path), run_dir=tmp_path / "killed")
    assert not armed[0]
    resumed = train(tiny(tmp_path), run_dir=tmp_path / "killed", resume=True)
    for name, w in whole.model.state_dict().items():
        assert torch.equal(w, resumed.model.state_dict()[name]), name
    assert torch.equal(whole.store.delta, resumed.store.delta)
    assert guard.events(logged(tmp_path / "killed")) == guard.events(logged(tmp_path / "whole"))


@needs_data
def test_healthy_link_and_initial_snapshot_cost_no_copy(tmp_path):
    cfg = tiny(tmp_path, "train.epochs=2")
    train(cfg, run_dir=tmp_path / "r")
    ckpt, healthy = tmp_path / "r" / CHECKPOINT, healthy_path(tmp_path / "r" / CHECKPOINT)
    assert healthy.exists() and load_checkpoint(healthy)["epoch"] in (0, 1, 2)
    rows = logged(tmp_path / "r")
    if rows[-1].get("healthy"):
        assert healthy.stat().st_ino == ckpt.stat().st_ino  # a hard link of the latest checkpoint


def test_every_method_shares_the_eps_schedule_and_declares_a_remedy_or_none():
    for name in list_methods():
        cls = get_method(name)
        m = cls(0.3, cls.Options(eps_ramp_epochs=3), num_samples=8)
        assert [m.eps_at(e) for e in (1, 2, 3, 4)] == pytest.approx([0.1, 0.2, 0.3, 0.3])
        m.set_options(eps_ramp_start=5)
        assert m.eps_at(5) == pytest.approx(0.1) and m.eps_at(7) == pytest.approx(0.3)
        remedy = m.remedy(1)
        assert isinstance(remedy, dict)
        if remedy:
            m.set_options(**remedy)  # a remedy is a valid option change
    with pytest.raises(ConfigError, match="eps_ramp_start"):
        get_method("atas")(0.3).set_options(eps_ramp_start=0)


def test_atas_follows_eps_t_and_is_the_official_step_without_a_ramp():
    atas = get_method("atas")
    official = atas(8 / 255)
    assert official.step_rule(8 / 255) == (16 / 255, 4 / 255, 14 / 255)
    relative = atas(
        0.3,
        atas.Options(
            step_numerator="2eps", alpha_unit="eps", alpha_min=Frac("0.5"), alpha_max=Frac("1.75"), eps_ramp_epochs=3
        ),
    )
    numerator, lo, hi = relative.step_rule(relative.eps_at(1))
    assert numerator == pytest.approx(0.2) and lo == pytest.approx(0.05) and hi == pytest.approx(0.175)
    relative.set_options(step_scale=0.5)
    assert relative.step_rule(0.3) == pytest.approx((0.3, 0.075, 0.2625))


def test_train_level_schedule_reaches_every_method_unless_overridden():
    cfg = load_config("fmnist", ["train.eps_ramp_epochs=2"])
    assert cfg.method.args["eps_ramp_epochs"] == 2
    cfg = load_config("fmnist", ["train.eps_ramp_epochs=2", "method.atas.eps_ramp_epochs=0"])
    assert cfg.method.args["eps_ramp_epochs"] == 0
    with pytest.raises(ConfigError, match="train.co_action must be one of none, stop, keep_best, recover"):
        load_config("fmnist", ["train.co_action=rescue"])


def _best_epoch(run_dir):
    scored = [r for r in guard.all_epochs(logged(run_dir)) if "probe_pgd" in r]
    return max(scored, key=lambda r: r["probe_pgd"])["epoch"]


@pytest.mark.parametrize(
    "where", ["during the best.pt save", "between best.pt and the checkpoint", "between the checkpoint and the metrics"]
)
@needs_data
def test_best_pt_is_the_best_epoch_the_metrics_name_after_a_kill(tmp_path, monkeypatch, where):
    import atas.runstate as runstate

    cfg = tiny(tmp_path, "train.co_action=keep_best")
    whole = tmp_path / "whole"
    train(cfg, run_dir=whole)
    target = next(e for e in range(2, 6) if _best_epoch_upto(whole, e) == e)  # an epoch that set a new best
    real_save, real_log = runstate.save_checkpoint, runstate.MetricsLog.write_all

    def save(path, ckpt, **kw):
        if ckpt.get("epoch") == target and armed:
            if Path(path).name == "best.pt" and where == "during the best.pt save":
                raise KeyboardInterrupt  # before the rename: the old best.pt stays
            if Path(path).name == CHECKPOINT and where == "between best.pt and the checkpoint":
                raise KeyboardInterrupt
        real_save(path, ckpt, **kw)

    def write_all(self, rows):
        if armed and rows and rows[-1].get("epoch") == target and where == "between the checkpoint and the metrics":
            raise KeyboardInterrupt
        real_log(self, rows)

    armed = True
    with monkeypatch.context() as m:
        m.setattr(runstate, "save_checkpoint", save)
        m.setattr(runstate.MetricsLog, "write_all", write_all)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, run_dir=tmp_path / "killed")
    armed = False
    train(cfg, run_dir=tmp_path / "killed", resume=True)
    best = load_checkpoint(tmp_path / "killed" / "best.pt")
    assert best["epoch"] == _best_epoch(tmp_path / "killed") == _best_epoch(whole)
    for name, w in load_checkpoint(whole / "best.pt")["model"].items():
        assert torch.equal(w, best["model"][name]), name


def _best_epoch_upto(run_dir, epoch):
    scored = [r for r in guard.all_epochs(logged(run_dir)) if "probe_pgd" in r and r["epoch"] <= epoch]
    return max(scored, key=lambda r: r["probe_pgd"])["epoch"]


@needs_data
def test_a_best_pt_lost_by_the_older_save_order_is_rewritten_on_resume(tmp_path, capsys):
    # Older versions saved best.pt after the checkpoint: a kill between the two left the checkpoint
    # of the best epoch without its best.pt. One epoch: epoch 1 is the best the metrics name.
    run_dir = tmp_path / "r"
    train(tiny(tmp_path, "train.co_action=keep_best", "train.epochs=1"), run_dir=run_dir)
    (run_dir / "best.pt").unlink()
    train(tiny(tmp_path, "train.co_action=keep_best", "train.epochs=2"), run_dir=run_dir, resume=True)
    assert "best.pt held no epoch, the metrics name epoch 1: rewritten from the checkpoint" in capsys.readouterr().out
    assert load_checkpoint(run_dir / "best.pt")["epoch"] == _best_epoch(run_dir)


def test_n_fgsm_raises_its_noise_only_while_the_image_survives_it():
    n_fgsm = get_method("n_fgsm")
    assert n_fgsm(8 / 255).remedy(1) == {"noise_factor": 3.0}  # 3 eps = 0.09: more noise
    assert n_fgsm(0.3).remedy(1) == {"step_factor": 0.8}  # 3 eps = 0.9: a smaller step
    m = n_fgsm(0.1)
    m.set_options(**m.remedy(1))
    assert m.opt.noise_factor == 3.0 and m.remedy(2) == {"noise_factor": 4.5}  # 4.5 eps = 0.45: still below 0.5
    m.set_options(**m.remedy(2))
    assert m.remedy(3) == {"step_factor": 0.8}  # 6.75 eps = 0.675: too much


def test_an_epoch_at_chance_is_not_a_rollback_target():
    quiet = {"co": False}
    row = {"probe_clean": 0.08}
    assert not guard.is_healthy(quiet, COMonitor(), row, num_classes=10)
    assert guard.is_healthy(quiet, COMonitor(), {"probe_clean": 0.6}, num_classes=10)
    assert not guard.is_healthy({"co": True}, COMonitor(), {"probe_clean": 0.6}, num_classes=10)


# ---------------------------------------------------------------- a run that ended stays ended
def _same_weights(a, b):
    for name, w in a.state_dict().items():
        assert torch.equal(w, b.state_dict()[name]), name


def _ended_cfg(tmp_path, action):
    if action == "gave_up":
        return tiny(tmp_path, "train.recover_budget_epochs=0")
    return tiny(tmp_path, "train.co_action=stop")


@pytest.mark.parametrize("action", ["gave_up", "stop"])
@needs_data
def test_a_run_that_ended_stays_ended_on_resume_and_trains_on_only_when_asked(tmp_path, scripted, capsys, action):
    scripted.script = {3: "collapse: scripted"}
    cfg, run_dir = _ended_cfg(tmp_path, action), tmp_path / "r"
    ended = train(cfg, run_dir=run_dir)
    rows = logged(run_dir)
    # stop ends at the flagged epoch; giving up ends at the last healthy one (epoch 3 undone)
    assert [r["epoch"] for r in guard.epoch_rows(rows)] == ([1, 2] if action == "gave_up" else [1, 2, 3])
    capsys.readouterr()
    for _ in range(2):  # every resume: nothing trained, nothing appended
        again = train(cfg, run_dir=run_dir, resume=True)
        assert not again.trained and logged(run_dir) == rows
        _same_weights(ended.model, again.model)
    out = capsys.readouterr().out
    why = "the guard gave up at epoch 3" if action == "gave_up" else "train.co_action=stop ended it at epoch 3"
    assert f"{run_dir} has ended: {why}" in out and "Nothing to train" in out
    command = re.findall(r"`(atas train --resume [^`]+)`", out)[-1]
    assert command == f"atas train --resume {run_dir} train.epochs=6"
    assert cli(shlex.split(command)[1:]) == 0  # the advice works: the explicit choice trains on
    assert [r["epoch"] for r in guard.epoch_rows(logged(run_dir))] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "where", ["before its checkpoint is saved", "between the checkpoint and the metrics", "after everything is saved"]
)
@pytest.mark.parametrize("action", ["gave_up", "stop"])
@needs_data
def test_a_kill_on_the_way_out_resumes_to_the_same_ended_run(tmp_path, scripted, monkeypatch, action, where):
    import atas.runstate as runstate

    scripted.script = {3: "collapse: scripted"}
    cfg = _ended_cfg(tmp_path, action)
    whole = train(cfg, run_dir=tmp_path / "whole")
    real_save, real_log, real_epochs = runstate.save_checkpoint, MetricsLog.write_all, trainer._epochs
    armed = [True]

    def kill():
        armed[0] = False
        raise KeyboardInterrupt  # what SIGKILL leaves: the files as they are at that instant

    def save(path, ckpt, **kw):
        # the checkpoint that ends the run: epoch 3 (stop), or the rollback to epoch 2 with the gave_up event
        last = ckpt.get("metrics", [{}])[-1] if isinstance(ckpt, dict) else {}
        ends = ckpt["epoch"] == 3 if action == "stop" else last.get("event") == "gave_up"
        if armed[0] and where.startswith("before") and Path(path).name == CHECKPOINT and ends:
            kill()
        real_save(path, ckpt, **kw)

    def write_all(self, rows):
        if armed[0] and where.startswith("between") and rows and rows[-1]["epoch"] == 3:
            kill()
        real_log(self, rows)

    def epochs(*a):
        real_epochs(*a)
        if armed[0] and where.startswith("after"):
            kill()

    with monkeypatch.context() as m:
        m.setattr(runstate, "save_checkpoint", save)
        m.setattr(MetricsLog, "write_all", write_all)
        m.setattr(trainer, "_epochs", epochs)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, run_dir=tmp_path / "killed")
    assert not armed[0]
    resumed = train(cfg, run_dir=tmp_path / "killed", resume=True)
    again = train(cfg, run_dir=tmp_path / "killed", resume=True)
    assert not again.trained
    for run in (resumed, again):
        _same_weights(whole.model, run.model)
    untimed = [
        [{k: v for k, v in r.items() if k not in ("epoch_time_s", "peak_memory_mb")} for r in logged(tmp_path / name)]
        for name in ("whole", "killed")
    ]
    assert untimed[0] == untimed[1]  # one gave_up / stop, no epoch trained twice


# ---------------------------------------------------------------- a lost or damaged checkpoint.healthy.pt
def _kill_at_epoch(monkeypatch, cfg, run_dir, at):
    """Train until epoch `at` starts, then die there (the checkpoint of epoch at-1 is on disk)."""
    real_epoch = trainer._train_epoch

    def epoch(run, e, step):
        if e == at:
            raise KeyboardInterrupt
        return real_epoch(run, e, step)

    with monkeypatch.context() as m:
        m.setattr(trainer, "_train_epoch", epoch)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, run_dir=run_dir)


@pytest.mark.parametrize("harm", ["deleted", "damaged"])
@needs_data
def test_a_lost_healthy_checkpoint_falls_back_to_the_checkpoint_of_that_epoch(
    tmp_path, scripted, monkeypatch, capsys, harm
):
    scripted.script = {4: "collapse: scripted"}
    cfg = tiny(tmp_path)
    whole = train(cfg, run_dir=tmp_path / "whole")
    _kill_at_epoch(monkeypatch, cfg, tmp_path / "r", 4)
    healthy = healthy_path(tmp_path / "r" / CHECKPOINT)
    if harm == "deleted":
        healthy.unlink()
    else:
        healthy.unlink()  # a hard link of checkpoint.pt: damage a copy of its own
        healthy.write_bytes((tmp_path / "r" / CHECKPOINT).read_bytes()[:5000])
    resumed = train(cfg, run_dir=tmp_path / "r", resume=True)
    out = capsys.readouterr().out
    # checkpoint.pt is the healthy epoch 3 of this run: the rollback is the one of the whole run
    assert guard.events(logged(tmp_path / "r")) == guard.events(logged(tmp_path / "whole"))
    _same_weights(whole.model, resumed.model)
    assert "GUARD epoch 4: recovery 1: rolled back to epoch 3" in out
    assert load_checkpoint(healthy)["epoch"] >= 3  # the link is whole again


@needs_data
def test_with_no_healthy_state_on_disk_the_rollback_rebuilds_the_initial_weights_exactly(
    tmp_path, scripted, monkeypatch, capsys
):
    # Nothing is ever healthy: epoch 2 is flagged and the run goes back to its initial weights,
    # which the epoch-0 snapshot holds; without it they are rebuilt from the seed, bit for bit.
    scripted.script = {2: "stuck: scripted"}
    monkeypatch.setattr(guard, "is_healthy", lambda verdict, monitor, row, n: False)
    cfg = tiny(tmp_path, "train.epochs=3")
    whole = train(cfg, run_dir=tmp_path / "whole")
    _kill_at_epoch(monkeypatch, cfg, tmp_path / "r", 2)
    healthy_path(tmp_path / "r" / CHECKPOINT).unlink()
    resumed = train(cfg, run_dir=tmp_path / "r", resume=True)
    assert guard.events(logged(tmp_path / "r")) == guard.events(logged(tmp_path / "whole"))
    assert guard.events(logged(tmp_path / "r"))[0]["rollback_to"] == 0
    _same_weights(whole.model, resumed.model)
    assert torch.equal(whole.store.delta, resumed.store.delta)


@needs_data
def test_a_healthy_epoch_no_file_holds_falls_back_to_an_older_one_and_says_so(tmp_path, scripted, monkeypatch, capsys):
    # Only epoch 1 is healthy; at the flag of epoch 4 checkpoint.pt holds epoch 3 and the one before
    # it epoch 2: with checkpoint.healthy.pt gone, no file holds epoch 1, so the run restarts from
    # its initial weights, says so, and finishes.
    scripted.script = {4: "collapse: scripted"}
    monkeypatch.setattr(guard, "is_healthy", lambda verdict, monitor, row, n: row["epoch"] == 1)
    cfg = tiny(tmp_path)
    _kill_at_epoch(monkeypatch, cfg, tmp_path / "r", 4)
    healthy_path(tmp_path / "r" / CHECKPOINT).unlink()
    train(cfg, run_dir=tmp_path / "r", resume=True)
    out = capsys.readouterr().out
    assert "GUARD the last healthy epoch 1 cannot be restored (checkpoint.healthy.pt missing" in out
    assert "rolling back to the initial weights (epoch 0) instead" in out
    event = guard.events(logged(tmp_path / "r"))[0]
    assert event["rollback_to"] == 0 and event["epoch"] == 4
    assert [r["epoch"] for r in guard.epoch_rows(logged(tmp_path / "r"))] == [1, 2, 3, 4, 5]


@needs_data
def test_a_damaged_healthy_checkpoint_names_the_way_out_and_the_way_out_works(tmp_path, scripted, monkeypatch, capsys):
    cfg = tiny(tmp_path, "train.epochs=3")
    _kill_at_epoch(monkeypatch, cfg, tmp_path / "r", 3)
    healthy = healthy_path(tmp_path / "r" / CHECKPOINT)
    healthy.unlink()
    healthy.write_bytes(b"PK\x03\x04 not a checkpoint")
    capsys.readouterr()
    assert cli(["eval", str(healthy), "--n-examples", "16", "--no-progress"]) == 2
    err = capsys.readouterr().err
    commands = re.findall(r"`([^`]+)`", err)
    assert commands == [f"rm {healthy}", f"atas train --resume {tmp_path / 'r'}"], err
    subprocess.run(shlex.split(commands[0]), check=True)
    assert cli(shlex.split(commands[1])[1:]) == 0
    assert [r["epoch"] for r in guard.epoch_rows(logged(tmp_path / "r"))] == [1, 2, 3]


@needs_data
def test_a_run_killed_in_its_first_epoch_resumes_from_its_initial_weights(tmp_path, monkeypatch):
    # co_action=recover: the epoch-0 snapshot is on disk, no checkpoint.pt yet. No circle: --resume
    # continues from the snapshot, to the weights of an uninterrupted run.
    cfg = tiny(tmp_path, "train.epochs=2")
    whole = train(cfg, run_dir=tmp_path / "whole")
    _kill_at_epoch(monkeypatch, cfg, tmp_path / "r", 1)
    assert not (tmp_path / "r" / CHECKPOINT).exists() and healthy_path(tmp_path / "r" / CHECKPOINT).exists()
    from atas.sweep import training_status

    assert training_status(tmp_path / "r", cfg) == "resume"  # `atas compare` resumes it too, no refusal
    assert cli(["train", "--resume", str(tmp_path / "r")]) == 0
    _same_weights(whole.model, load_model(tmp_path / "r")[0])
