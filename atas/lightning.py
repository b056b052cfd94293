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

The callback starts each method epoch with Lightning's (`trainer.current_epoch + 1`, 1-based) and
keeps the method's state (epoch, per-sample store, carried tensors) in Lightning's own checkpoints,
so `trainer.fit(model, ckpt_path=...)` resumes it exactly. Needs `pip install atas[lightning]`.
"""
from __future__ import annotations

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("atas.lightning needs Lightning: pip install 'atas[lightning]' (or pip install lightning)") from e

from atas.methods.base import Method


class AdversarialTraining(pl.Callback):
    """Lightning callback for an atas method object held by the LightningModule.

    method: the object (default: the one Method attribute of the LightningModule, found at setup).
    """

    def __init__(self, method: Method | None = None):
        self.method = method

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.method is None:
            found = [v for v in vars(pl_module).values() if isinstance(v, Method)]
            if len(found) != 1:
                raise ValueError(f"AdversarialTraining() found {len(found)} atas method objects on "
                                 f"{type(pl_module).__name__}; keep exactly one (self.atk = atas.ATAS(...)) or pass "
                                 "it: AdversarialTraining(method)")
            self.method = found[0]

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.method.start_epoch(trainer.current_epoch + 1)

    def state_dict(self) -> dict:
        return self.method.state_dict() if self.method is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.method is None:
            self._pending = state_dict
            return
        self.method.load_state_dict(state_dict)

    def on_fit_start(self, trainer, pl_module) -> None:
        pending = getattr(self, "_pending", None)
        if pending is not None:
            self.method.load_state_dict(pending)
            self._pending = None
