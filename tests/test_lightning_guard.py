"""The guard inside Lightning (atas.lightning.AdversarialTraining(probe=...)): a collapse in a
LightningModule is caught by the probe and the monitor, rolled back to the healthy epoch's state,
remedied and replayed; the record and the healthy state travel in Lightning's checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import atas
from atas import guard as guard_module

L = pytest.importorskip("lightning")
import atas.lightning  # noqa: E402

# tiny runs learn little: every unflagged epoch counts as healthy (the clean-accuracy floor has its own test)
LENIENT = lambda verdict, monitor, row, n: not verdict["co"] and not monitor.pending  # noqa: E731


def data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n + 32, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long() + 2 * (x[:, 0, :, :4].mean((1, 2)) > 0.5).long()
    return x, y


class Lit(L.LightningModule):
    def __init__(self, n):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
        self.atk = atas.ATAS(eps=0.1, num_samples=n, relative=True, warmup_epochs=0)
        self.ends = []  # (method epoch, weights, store) at each epoch's end, after the guard's decision

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        return self.atk.loss(self, self.atk.perturb(self, x, y, idx), y, x)

    def on_train_epoch_end(self):
        self.ends.append(
            (
                self.atk.current_epoch,
                copy.deepcopy(self.net.state_dict()),
                self.atk.store.delta.clone(),
                copy.deepcopy(self.trainer.optimizers[0].state_dict()),
            )
        )

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


class Injected:
    """The real probe, with a collapse (PGD to 0, FGSM above clean) at method epoch `at` before any recovery."""

    def __init__(self, probe, callback, at):
        self.probe, self.callback, self.at, self.x = probe, callback, at, probe.x

    def __call__(self, model):
        row = self.probe(model)
        g = self.callback.guard
        if not g.events and model.atk.current_epoch == self.at:
            row.update(probe_pgd=0.0, probe_pgd_worst=0.0, probe_fgsm=min(1.0, row["probe_clean"] + 0.2))
        return row


def fit(tmp_path, max_epochs, at=3, ckpt_path=None, checkpoint=False):
    torch.manual_seed(0)
    x, y = data()
    model = Lit(48)
    loader = DataLoader(atas.IndexedDataset(TensorDataset(x[:48], y[:48])), batch_size=16, shuffle=True)
    callback = atas.lightning.AdversarialTraining(seed=0)
    callback.probe = Injected(atas.Probe(x[48:], y[48:], eps=0.1, steps=2), callback, at)
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpoint,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return model, callback, trainer


@pytest.fixture
def lenient(monkeypatch):
    # tiny runs learn little: every unflagged epoch counts as healthy (the clean floor has its own test)
    monkeypatch.setattr(guard_module, "is_healthy", LENIENT)


def test_a_collapse_in_a_lightning_module_is_rolled_back_remedied_and_replayed(tmp_path, lenient, capsys):
    model, callback, trainer = fit(tmp_path, max_epochs=4, at=3)
    (event,) = callback.guard.events
    assert event["event"] == "recovery" and event["epoch"] == 3 and event["rollback_to"] == 2
    assert "signature" in event["reason"] and event["changes"] == {"step_scale": 0.75}
    # method epochs 1, 2, 3 (collapsed, rolled back to 2: the state at its end is epoch 2's), 3 again, 4
    assert [e[0] for e in model.ends] == [1, 2, 2, 3, 4]
    assert trainer.current_epoch == 5 and model.atk.current_epoch == 4  # max_epochs grew by the replayed epoch
    _, healthy_w, healthy_store, healthy_opt = model.ends[1]
    _, after_w, after_store, after_opt = model.ends[2]
    for name, w in healthy_w.items():
        assert torch.equal(after_w[name], w), name
    assert torch.equal(after_store, healthy_store)
    for k, s in healthy_opt["state"].items():
        assert torch.equal(after_opt["state"][k]["momentum_buffer"], s["momentum_buffer"])
    assert model.atk.opt.step_scale == 0.75 and callback.guard.outcome == "recovered"
    assert [r["epoch"] for r in guard_module.epoch_rows(callback.guard.rows)] == [1, 2, 3, 4]
    rows = guard_module.epoch_rows(callback.guard.rows)
    assert all({"probe_clean", "probe_fgsm", "probe_pgd"} <= set(r) for r in rows)
    assert "GUARD epoch 3: recovery 1: rolled back to epoch 2" in capsys.readouterr().out


def test_the_guard_record_and_the_remedy_resume_from_a_lightning_checkpoint(tmp_path, lenient):
    model, callback, trainer = fit(tmp_path / "a", max_epochs=3, at=3, checkpoint=True)
    (ckpt,) = (tmp_path / "a").rglob("*.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    (state,) = [v for k, v in saved["callbacks"].items() if "AdversarialTraining" in k]
    assert [e["event"] for e in guard_module.events(state["guard"]["rows"])] == ["recovery"]
    assert state["options"]["step_scale"] == 0.75
    resumed, callback2, trainer2 = fit(tmp_path / "b", max_epochs=4, at=99, ckpt_path=str(ckpt))
    assert resumed.atk.opt.step_scale == 0.75 and callback2.guard.events == callback.guard.events
    assert [e[0] for e in resumed.ends] == [4] and trainer2.current_epoch == 5


def test_without_a_probe_the_callback_is_unchanged(tmp_path):
    torch.manual_seed(0)
    x, y = data()
    model = Lit(48)
    callback = atas.lightning.AdversarialTraining(seed=0)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[callback],
    )
    trainer.fit(model, DataLoader(atas.IndexedDataset(TensorDataset(x[:48], y[:48])), batch_size=16))
    assert callback.guard is None and [e[0] for e in model.ends] == [1, 2]
