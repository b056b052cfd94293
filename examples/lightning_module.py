"""ATAS in an existing LightningModule: a callback and the lines marked `# atas`.

    pip install 'atas[lightning]'
    python examples/lightning_module.py --data ~/data --download --epochs 10

The callback starts each ATAS epoch with Lightning's and keeps the method's state (the per-sample
prior and gradient-norm average) in Lightning's own checkpoints, so `trainer.fit(..., ckpt_path=...)`
resumes it (exactly from an epoch-end checkpoint: the callback seeds each epoch from (seed, epoch)).
Each epoch ends with the probe `atas train` logs (clean, FGSM and PGD-10 accuracy on 512 held-out
test images) and the guard against catastrophic overfitting: a flagged epoch is rolled back to the
last healthy one, the method's remedy applied and the undone epochs replayed (docs/own-code.md).
"""
from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

import atas  # atas
import atas.lightning  # atas


def small_cnn() -> nn.Module:
    return nn.Sequential(transforms.Normalize((0.2860,), (0.3530,)),  # normalisation inside the model: attacks see [0, 1]
                         nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, 10))


class LitClassifier(L.LightningModule):
    def __init__(self, num_samples: int, eps: float = 0.2, epochs: int = 10):
        super().__init__()
        self.net, self.eps, self.epochs, self.history = small_cnn(), eps, epochs, []
        self.atk = atas.ATAS(eps=eps, num_samples=num_samples, epochs=epochs, augment=atas.RandomCropFlip(pad=2), step_numerator="2eps", alpha_unit="eps", alpha_min=0.5, alpha_max=1.75, warmup_epochs=0)  # atas

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, idx = batch  # atas
        x = self.atk.augment_batch(x, idx)  # atas
        x_adv = self.atk.perturb(self, x, y, idx)  # atas
        loss = self.atk.loss(self, x_adv, y, x)  # atas
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def on_train_epoch_end(self):
        m = self.trainer.callback_metrics  # the callback's probe of this epoch, logged before this hook runs
        if "probe_pgd" in m:
            self.history.append({"epoch": self.atk.current_epoch, **{k: float(m[k]) for k in ("probe_clean", "probe_fgsm", "probe_pgd")}})  # atas
            print(self.history[-1])

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        return [opt], [torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[8, 9], gamma=0.1)]


def main(argv=None) -> LitClassifier:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data", help="torchvision root holding FashionMNIST/raw")
    p.add_argument("--download", action="store_true")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--out", default="lightning_runs")
    p.add_argument("--resume", default=None, help="a Lightning checkpoint to continue from")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    L.seed_everything(args.seed, verbose=False)

    train_set = datasets.FashionMNIST(args.data, train=True, download=args.download, transform=transforms.ToTensor())
    if args.subset:
        train_set = Subset(train_set, range(args.subset))
    test_set = datasets.FashionMNIST(args.data, train=False, transform=transforms.ToTensor())
    x_probe, y_probe = next(iter(DataLoader(Subset(test_set, range(len(test_set) - 512, len(test_set))), batch_size=512)))
    model = LitClassifier(len(train_set), epochs=args.epochs)
    loader = DataLoader(atas.IndexedDataset(train_set), batch_size=128, shuffle=True)  # atas
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="auto", devices=1, logger=False, default_root_dir=args.out,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[atas.lightning.AdversarialTraining(probe=atas.Probe(x_probe, y_probe, eps=0.2))])  # atas
    trainer.fit(model, loader, ckpt_path=args.resume)
    return model


if __name__ == "__main__":
    main()
