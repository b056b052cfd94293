"""The public catastrophic-overfitting protection (atas.Probe, atas.COMonitor, atas.Guard) in an own
loop: a collapse is caught and rolled back to the healthy epoch's state, the method's remedy is
applied and the undone epochs are replayed; docs/own-code.md's block runs as written; a method's
option changes are part of its state."""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import atas
from atas import guard as guard_module

DOCS = Path(__file__).resolve().parent.parent / "docs" / "own-code.md"


# tiny runs learn little: every unflagged epoch counts as healthy (the clean-accuracy floor has its own test)
LENIENT = lambda verdict, monitor, row, n: not verdict["co"] and not monitor.pending  # noqa: E731


def tiny_run(seed=0, n=48, method="atas"):
    torch.manual_seed(seed)
    x = torch.rand(n + 32, 1, 8, 8)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long() + 2 * (x[:, 0, :, :4].mean((1, 2)) > 0.5).long()
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    atk = (
        atas.method(method, eps=0.1, num_samples=n, relative=True, warmup_epochs=0)
        if method == "atas"
        else atas.method(method, eps=0.1, num_samples=n)
    )
    loader = DataLoader(atas.IndexedDataset(TensorDataset(x[:n], y[:n])), batch_size=16, shuffle=True)
    return model, opt, sched, atk, loader, x[n:], y[n:]


def train_epoch(model, opt, atk, loader):
    for x, y, idx in atk.batches(loader):
        loss = atk.loss(model, atk.perturb(model, x, y, idx), y, x)
        opt.zero_grad()
        loss.backward()
        opt.step()


class Injected:
    """The real probe, with a collapse injected at one epoch of the first pass (PGD accuracy to 0
    while FGSM accuracy climbs above clean: the CO signature), the same every time it is asked."""

    def __init__(self, probe, guard_ref, at):
        self.probe, self.guard_ref, self.at, self.x = probe, guard_ref, at, probe.x

    def __call__(self, model):
        row = self.probe(model)
        g = self.guard_ref[0]
        if not g.events and len(g.rows) + 1 == self.at:  # the first pass's epoch `at`
            row.update(probe_pgd=0.0, probe_pgd_worst=0.0, probe_fgsm=min(1.0, row["probe_clean"] + 0.2))
        return row


def test_a_collapse_in_an_own_loop_is_rolled_back_remedied_and_replayed(monkeypatch, capsys):
    # tiny runs learn little: every unflagged epoch counts as healthy (the clean-accuracy floor has its own test)
    monkeypatch.setattr(guard_module, "is_healthy", LENIENT)
    model, opt, sched, atk, loader, x_val, y_val = tiny_run()
    ref = [None]
    g = atas.Guard(
        model, opt, atk, probe=Injected(atas.Probe(x_val, y_val, eps=0.1, steps=3), ref, at=4), scheduler=sched
    )
    ref[0] = g
    options_before = copy.deepcopy(atk.opt)
    seen, kept = [], {}
    for epoch in g.epochs(5):
        seen.append(epoch)
        train_epoch(model, opt, atk, loader)
        sched.step()
        state = {
            "model": copy.deepcopy(model.state_dict()),
            "opt": copy.deepcopy(opt.state_dict()),
            "sched": sched.state_dict(),
            "store": atk.store.delta.clone(),
            "epoch": atk.current_epoch,
        }
        result = g.end_epoch(epoch)
        if result["healthy"]:
            kept[epoch] = state
        if result["event"] is not None:  # the state right after the rollback
            after = {
                "model": copy.deepcopy(model.state_dict()),
                "opt": copy.deepcopy(opt.state_dict()),
                "sched": sched.state_dict(),
                "store": atk.store.delta.clone(),
                "epoch": atk.current_epoch,
            }
    assert seen == [1, 2, 3, 4, 4, 5]  # epoch 4 collapsed and was replayed
    (event,) = g.events
    assert event["event"] == "recovery" and event["epoch"] == 4 and event["rollback_to"] == 3
    assert "signature" in event["reason"] and event["replayed_epochs"] == 1
    # rolled back to exactly the healthy epoch's state: weights, optimizer, scheduler, per-sample store, epoch
    for name, w in kept[3]["model"].items():
        assert torch.equal(after["model"][name], w), name
    assert torch.equal(after["store"], kept[3]["store"]) and after["epoch"] == 3 and after["sched"] == kept[3]["sched"]
    for k, s in kept[3]["opt"]["state"].items():
        assert torch.equal(after["opt"]["state"][k]["momentum_buffer"], s["momentum_buffer"])
    # the method's remedy applied (ATAS: a smaller step), and kept in its state
    assert event["changes"] == {"step_scale": 0.75} and atk.opt == dataclasses.replace(options_before, step_scale=0.75)
    assert atk.state_dict()["options"]["step_scale"] == 0.75
    assert [r["epoch"] for r in g.rows if r.get("discarded")] == [4]
    assert [r["epoch"] for r in guard_module.epoch_rows(g.rows)] == [1, 2, 3, 4, 5]
    assert g.outcome == "recovered"
    out = capsys.readouterr().out
    assert "CATASTROPHIC OVERFITTING at epoch 4" in out and "GUARD epoch 4: recovery 1: rolled back to epoch 3" in out


def test_the_guard_gives_up_and_the_loop_stops(monkeypatch):
    monkeypatch.setattr(guard_module, "is_healthy", LENIENT)
    model, opt, sched, atk, loader, x_val, y_val = tiny_run()
    ref = [None]
    g = atas.Guard(
        model,
        opt,
        atk,
        probe=Injected(atas.Probe(x_val, y_val, eps=0.1, steps=2), ref, at=2),
        max_recoveries=0,
        verbose=False,
    )
    ref[0] = g
    seen = []
    for epoch in g.epochs(5):
        seen.append(epoch)
        train_epoch(model, opt, atk, loader)
        g.end_epoch(epoch)
    assert seen == [1, 2] and g.events[0]["event"] == "gave_up" and g.outcome == "gave up"


def test_a_run_that_never_learns_is_not_healthy_and_says_did_not_learn():
    assert guard_module.outcome([{"epoch": 1}], final_clean=0.12, chance=0.1) == "did not learn"
    recovered = [{"epoch": 1}, {"event": "recovery", "epoch": 1}]
    assert guard_module.outcome(recovered, final_clean=0.13, chance=0.1) == "did not learn"  # never 'recovered'
    assert guard_module.outcome(recovered, final_clean=0.6, chance=0.1) == "recovered"
    assert guard_module.outcome([{"event": "gave_up"}], final_clean=0.6, chance=0.1) == "gave up"
    assert guard_module.outcome([], final_clean=0.6, chance=0.1) == "healthy"


def test_end_epoch_is_required_and_checked():
    model, opt, sched, atk, loader, x_val, y_val = tiny_run()
    g = atas.Guard(model, opt, atk, probe=atas.Probe(x_val, y_val, eps=0.1, steps=1), verbose=False)
    with pytest.raises(RuntimeError, match=r"without guard.end_epoch\(1\)"):
        for _ in g.epochs(2):
            pass
    g = atas.Guard(model, opt, atk, probe=atas.Probe(x_val, y_val, eps=0.1, steps=1), verbose=False)
    with pytest.raises(ValueError, match="the epoch being trained is 1"):
        for _ in g.epochs(2):
            g.end_epoch(2)


def test_the_healthy_state_can_live_in_a_file_and_the_guard_state_round_trips(tmp_path, monkeypatch):
    monkeypatch.setattr(guard_module, "is_healthy", LENIENT)
    model, opt, sched, atk, loader, x_val, y_val = tiny_run()
    ref = [None]
    g = atas.Guard(
        model,
        opt,
        atk,
        probe=Injected(atas.Probe(x_val, y_val, eps=0.1, steps=2), ref, at=3),
        keep=tmp_path / "healthy.pt",
        verbose=False,
    )
    ref[0] = g
    for epoch in g.epochs(3):
        train_epoch(model, opt, atk, loader)
        if epoch == 2:
            at_two = copy.deepcopy(model.state_dict())
        g.end_epoch(epoch)
    assert g.events[0]["rollback_to"] == 2 and torch.load(tmp_path / "healthy.pt", weights_only=True)["epoch"] == 3
    state = g.state_dict()
    assert state["rows"] == g.rows and at_two  # plain rows; the file holds the state
    h = atas.Guard(model, opt, atk, probe=atas.Probe(x_val, y_val, eps=0.1, steps=2), verbose=False)
    h.load_state_dict(state)
    assert h.rows == g.rows and h.last_healthy() == 3


def test_probe_checks_its_input_and_leaves_the_rng_alone():
    with pytest.raises(ValueError, match=r"images \[N, C, H, W\]"):
        atas.Probe(torch.rand(8, 64), torch.zeros(8), eps=0.1)
    with pytest.raises(ValueError, match="pixels in"):
        atas.Probe(torch.rand(8, 1, 4, 4) * 255, torch.zeros(8), eps=0.1)
    model, *_, x_val, y_val = tiny_run()
    p = atas.Probe((x_val * 255).to(torch.uint8), y_val, eps="1/10", steps=2)
    state = torch.get_rng_state()
    row = p(model)
    assert torch.equal(torch.get_rng_state(), state) and row == p(model)
    assert set(row) >= {"probe_clean", "probe_fgsm", "probe_pgd", "probe_pgd_worst"} and p.eps == 0.1


def test_the_documented_guard_block_runs(capsys):
    """docs/own-code.md's guard block, as written, on a tiny run."""
    section = DOCS.read_text().split("### Catastrophic overfitting: the probe, the monitor and the guard", 1)[1]
    block = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)[0]
    model, opt, sched, atk, loader, x_val, y_val = tiny_run()
    scope = {
        "atas": atas,
        "model": model,
        "opt": opt,
        "sched": sched,
        "atk": atk,
        "loader": loader,
        "device": "cpu",
        "x_val": x_val,
        "y_val": y_val,
    }
    exec(compile(block, str(DOCS), "exec"), scope)
    assert scope["guard"].outcome in guard_module.OUTCOMES and atk.current_epoch >= 1
    assert len(guard_module.epoch_rows(scope["guard"].rows)) == atk.current_epoch
    assert {"Guard", "Probe", "COMonitor"} <= set(atas.__all__)


def test_the_guard_and_the_trainer_share_one_engine():
    import atas.trainer as trainer

    src = Path(trainer.__file__).read_text()
    assert "guard.Guard(" in src and "Probe(" in src and "def probe(" not in src
    assert "atas.methods" not in Path(atas.monitor.__file__).read_text().split('"""', 2)[2]


# -- a method's option changes are part of its state ----------------------------------------------
def test_set_options_survives_state_dict_and_a_differing_load_says_so(tmp_path):
    f = atas.FGSMRS(eps=0.2)
    f.set_options(alpha_factor=1.0)
    torch.save(f.state_dict(), tmp_path / "s.pt")
    g = atas.FGSMRS(eps=0.2)
    with pytest.warns(UserWarning, match=r"alpha_factor 1.25 -> 1.0.*loaded ones are used"):
        g.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert g.opt.alpha_factor == 1.0
    same = atas.FGSMRS(eps=0.2, alpha_factor=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(f.state_dict())  # nothing differs: silent
    old = {k: v for k, v in f.state_dict().items() if k != "options"}  # saved before options were kept
    h = atas.FGSMRS(eps=0.2)
    h.load_state_dict(old)
    assert h.opt.alpha_factor == 1.25


def test_a_remedy_survives_a_resume_for_every_method(tmp_path):
    for name in atas.list_methods():
        m = atas.method(name, eps=0.1, num_samples=8)
        changes = m.remedy(1) or {"eps_ramp_epochs": 3}
        m.set_options(**changes)
        torch.save(m.state_dict(), tmp_path / f"{name}.pt")
        fresh = atas.method(name, eps=0.1, num_samples=8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh.load_state_dict(torch.load(tmp_path / f"{name}.pt", weights_only=True))
        assert fresh.opt == m.opt, name


def test_a_state_whose_options_do_not_load_is_a_clear_error():
    state = atas.FGSMRS(eps=0.2).state_dict()
    state["options"]["alpha_factor"] = "big"
    with pytest.raises(ValueError, match="the state's options do not load"):
        atas.FGSMRS(eps=0.2).load_state_dict(state)
