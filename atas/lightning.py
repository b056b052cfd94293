"""ATAS (or any method of the family) inside a LightningModule: one callback, three lines.

    import atas, atas.lightning

    class LitClassifier(L.LightningModule):
        def __init__(self, num_samples):
            ...
            self.atk = atas.ATAS(eps=0.2, num_samples=num_samples, augment=atas.RandomCropFlip(pad=2))

        def training_step(self, batch, batch_idx):
            x, y, idx = batch                                  # from atas.IndexedDataset(train_set)
            x = self.atk.augment_batch(x, idx)                 # paired crop/flip (skip without augment)
            x_adv = self.atk.perturb(self, x, y, idx)
            return self.atk.loss(self, x_adv, y, x)

    trainer = L.Trainer(callbacks=[atas.lightning.AdversarialTraining()])

Weight averaging (atas.WeightAverage, the FastAT benchmark's tau = 0.9995): make the average of the
network in the LightningModule's __init__ and hand it to the callback, which updates it after every
training batch (one optimizer step; with accumulate_grad_batches > 1 it would average between steps
too: keep 1) and keeps it in Lightning's checkpoints:

    self.net = ...; self.wa = atas.WeightAverage(self.net, tau=0.9995)      # in __init__
    trainer = L.Trainer(callbacks=[atas.lightning.AdversarialTraining(weight_average=model.wa)])
    atas.benchmark(model.wa.module, "cifar10", eps=8/255)                   # the averaged network

The callback starts each method epoch with Lightning's (`trainer.current_epoch + 1`, 1-based) and
keeps the method's state (epoch, per-sample store, carried tensors) in Lightning's own checkpoints,
so `trainer.fit(model, ckpt_path=...)` resumes it. Needs `pip install atas[lightning]`.

What is exact: each epoch starts torch's generators (CPU and CUDA) from a seed made of the run's seed
and the epoch number, so everything random in an epoch (the DataLoader's shuffle and worker seeds,
atas's crops/flips, ATAS's prior re-draw, dropout) depends on (seed, epoch) alone, and resuming from a
checkpoint saved after an epoch's last batch (ModelCheckpoint's default, with or without validation)
gives the final weights of the uninterrupted run, bit for bit, on the same machine and software. The
run's seed is torch.initial_seed() when the fit starts (L.seed_everything(s) makes it s), or
AdversarialTraining(seed=...); it is saved in the checkpoint.
What is not: a checkpoint saved mid-epoch (Lightning restarts that epoch's loader), Python's `random`
and NumPy's generators (not re-seeded), and random numbers a LightningModule draws in its own
`on_train_epoch_start` (in a resumed epoch they come after the loader's draw instead of before).

Catastrophic-overfitting protection, as `atas train` and atas.Guard in an own loop have it:

    AdversarialTraining(probe=atas.Probe(x_val, y_val, eps=0.2))

probes the model at the end of every epoch (clean, FGSM, PGD-10 on the held-out images), judges it
with the monitor (atas.COMonitor), keeps the last healthy state (the module's weights, the optimizer,
the LR scheduler, the method's state with its per-sample store and options, torch's RNG) and on a
flag rolls back to it, applies the method's remedy and replays the undone epochs: max_epochs grows
by the replayed epochs, so the method still trains max_epochs epochs, and the method's epoch
numbering follows the replay (Lightning's own epoch counter only goes forward). The guard's record
(`callback.guard.rows`, `.events`, `.outcome`) and the healthy state are in Lightning's checkpoint.
A gave-up run stops (`trainer.should_stop`).
"""

from __future__ import annotations

import torch

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("atas.lightning needs Lightning: pip install 'atas[lightning]' (or pip install lightning)") from e

from atas.averaging import WeightAverage
from atas.guard import EVENT, Guard, events
from atas.methods.base import Method
from atas.monitor import Probe


class AdversarialTraining(pl.Callback):
    """Lightning callback for an atas method object held by the LightningModule.

    method: the object (default: the one Method attribute of the LightningModule, found at setup).
    seed: the run's seed for the per-epoch generator seeds (default: torch.initial_seed() at setup).
    probe: an atas.Probe on held-out images: turns on the guard (module docstring); None: no probe.
    max_recoveries (3), budget_epochs (None: max_epochs): the guard's limits (atas.Guard).
    weight_average: an atas.WeightAverage to update after every training batch (default: none).
    """

    def __init__(
        self,
        method: Method | None = None,
        seed: int | None = None,
        probe: Probe | None = None,
        max_recoveries: int = 3,
        budget_epochs: int | None = None,
        weight_average: WeightAverage | None = None,
    ):
        self.method = method
        self.seed = seed
        self.probe, self.max_recoveries, self.budget_epochs = probe, max_recoveries, budget_epochs
        self.weight_average = weight_average
        self.guard: Guard | None = None
        self._max_epochs: int | None = None  # as the Trainer was given it (the guard adds the replays)
        self._trainer = None
        self._batches = 0  # training batches done in this epoch: a checkpoint knows if it is mid-epoch
        self._pending: dict | None = None
        self._pending_guard: dict | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer
        if self.seed is None:
            self.seed = torch.initial_seed()  # a resume replaces it with the checkpoint's
        if self.method is None:
            found = [v for v in vars(pl_module).values() if isinstance(v, Method)]
            if len(found) != 1:
                raise ValueError(
                    f"AdversarialTraining() found {len(found)} atas method objects on "
                    f"{type(pl_module).__name__}; keep exactly one (self.atk = atas.ATAS(...)) or pass "
                    "it: AdversarialTraining(method)"
                )
            self.method = found[0]

    def _method(self) -> Method:
        if self.method is None:
            raise RuntimeError("AdversarialTraining has no method object yet: Lightning calls setup() first")
        return self.method

    def _seed(self) -> int:
        return int(torch.initial_seed() if self.seed is None else self.seed)  # setup() fixes it

    def _replayed(self) -> int:
        """Epochs the guard undid so far: Lightning's epoch = the method's epoch + this."""
        rows = self.guard.rows if self.guard is not None else (self._pending_guard or {}).get("rows", [])
        return sum(e["replayed_epochs"] for e in events(rows) if e[EVENT] == "recovery")

    def _start(self, epoch: int) -> None:
        """Seed torch's generators for Lightning's `epoch` (1-based) from (seed, epoch), then start the
        method's epoch (the same number, less the epochs the guard replayed)."""
        torch.manual_seed((self._seed() * 1_000_003 + epoch) % 2**63)
        self._method().start_epoch(epoch - self._replayed())

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._batches = 0
        # not already started by the resume
        if self._method().current_epoch != trainer.current_epoch + 1 - self._replayed():
            self._start(trainer.current_epoch + 1)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """The guard's end of the epoch: probe, verdict, keep or roll back (before the checkpoint is saved)."""
        if self.guard is None:
            return
        result = self.guard.end_epoch(self._method().current_epoch)
        row = next(r for r in reversed(self.guard.rows) if EVENT not in r)
        # the probe's numbers in Lightning's metrics (trainer.callback_metrics, loggers, ModelCheckpoint's monitor)
        pl_module.log_dict({k: float(v) for k, v in row.items() if k.startswith("probe_")}, on_epoch=True)
        event = result["event"]
        if event is not None and event[EVENT] == "recovery":
            trainer.fit_loop.max_epochs = (self._max_epochs or 0) + self._replayed()  # the undone epochs again
        elif event is not None:
            trainer.should_stop = True

    def _build_guard(self, trainer, pl_module) -> None:
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
        if len(trainer.optimizers) != 1 or len(schedulers) > 1:
            raise ValueError(
                "AdversarialTraining(probe=...): the guard keeps and restores one optimizer and at most "
                f"one LR scheduler; this module has {len(trainer.optimizers)} and {len(schedulers)}"
            )
        self._max_epochs = trainer.max_epochs
        budget = self.budget_epochs if self.budget_epochs is not None else max(trainer.max_epochs or 0, 0)
        self.guard = Guard(
            pl_module,
            trainer.optimizers[0],
            self._method(),
            probe=self.probe,
            scheduler=schedulers[0] if schedulers else None,
            max_recoveries=self.max_recoveries,
            budget_epochs=budget,
        )
        if self._pending_guard is not None:
            self.guard.load_state_dict(self._pending_guard)
            self._pending_guard = None
            trainer.fit_loop.max_epochs = (self._max_epochs or 0) + self._replayed()
        elif self._method().current_epoch == 0:  # epoch 0: the target of a run never healthy
            self.guard._keep_state(0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches += 1
        if self.weight_average is not None:  # after the batch's optimizer step
            self.weight_average.update(trainer.current_epoch + 1)

    def state_dict(self) -> dict:
        if self.method is None:
            return {}
        done = self._trainer is not None and self._batches >= self._trainer.num_training_batches
        # The method's own keys (epoch, store, ...), the run's seed and whether the epoch's training is over.
        state = {**self.method.state_dict(), "seed": self._seed(), "epoch_end": bool(done)}
        if self.weight_average is not None:
            state["weight_average"] = self.weight_average.state_dict()
        if self.guard is not None:  # its record and the healthy state it would roll back to
            state["guard"] = self.guard.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self._pending_guard = state_dict.pop("guard", None)
        if self.method is None:
            self._pending = state_dict
            return
        self._resume(state_dict)

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.probe is not None:
            self._build_guard(trainer, pl_module)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._resume(pending)

    def _resume(self, state: dict) -> None:
        if self.weight_average is not None and "weight_average" in state:
            self.weight_average.load_state_dict(state["weight_average"])
        self._method().load_state_dict({k: v for k, v in state.items() if k != "weight_average"})
        if "seed" in state:
            self.seed = int(state["seed"])
        # Mid-epoch (or an older checkpoint without the seed): the method's state only.
        if not (state.get("epoch_end") and "seed" in state and self._trainer is not None):
            return
        nxt = self.method.current_epoch + 1 + self._replayed()  # Lightning's next epoch
        max_epochs = self._trainer.max_epochs  # as given: in the method's epochs
        if max_epochs is not None and 0 <= max_epochs < self.method.current_epoch + 1:
            return  # nothing left to train
        # Lightning creates a resumed epoch's loader iterator (a draw from torch's generator) before
        # on_train_epoch_start; an uninterrupted epoch starts first. Start it now, on the built store,
        # so that the loader and ATAS's prior re-draw take their random numbers in the same order.
        m = self.method
        if m.uses_store and m.store is None and m._pending_store_state is not None:
            delta, meta = m._pending_store_state["delta"], m._pending_store_state["meta"]
            m._build_store(
                (delta.shape[1], int(meta[1]), int(meta[1])),
                m._store_options.get("device", self._trainer.strategy.root_device),
            )
        self._start(nxt)
