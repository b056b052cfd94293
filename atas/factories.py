"""What a training run is built from: the device, the seeds, the model, the optimizer and its
schedule, the data, the method object. Each is a small public function a user's own loop calls
the same way the trainer does (examples/own_loop.py; timm's habit of building from a config).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from atas.augment import PairedAugment
from atas.config import Config, ConfigError, method_options
from atas.data import (
    IndexedImageFolder,
    TestSplit,
    check_subset,
    check_val_size,
    dataset_info,
    image_folder,
    load_tensors,
    train_indices,
)
from atas.loaders import FolderLoader, ResidentLoader
from atas.methods import get_method
from atas.models import build_model


def resolve_device(name: str, option: str = "train.device") -> torch.device:
    """'auto' (the GPU when one is visible, else the CPU), 'cpu', 'cuda' or 'cuda:N'. `option` is
    what the user wrote it as (train.device, --device), named in the one-line refusal."""
    sep = " " if option.startswith("-") else "="  # --device cuda, train.device=cuda: as the user wrote it
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(
            f"{option}{sep}{name}: not a device ({str(e).splitlines()[0]}); use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{option}{sep}{name}: atas runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{option}{sep}{name} but no CUDA GPU is visible; use {option}{sep}cpu (or auto: the GPU when there is one)"
        )
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def make_model(cfg: Config) -> nn.Module:
    info = dataset_info(cfg.data.name)
    return build_model(
        cfg.model.arch, num_classes=info.num_classes, in_channels=info.channels, mean=info.mean, std=info.std
    )


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov
    )


def lr_factor(cfg: Config, steps_per_epoch: int):
    """Per-iteration LR multiplier (the scheduler steps every iteration, as the official code)."""
    o, total = cfg.optim, cfg.train.epochs * steps_per_epoch
    if o.schedule == "multistep":
        bounds = [m * steps_per_epoch for m in o.milestones]
        return lambda it: o.gamma ** sum(it >= b for b in bounds)
    if o.schedule == "cyclic":
        peak = max(1, int(o.pct_start * total))
        return lambda it: it / peak if it <= peak else max(0.0, (total - it) / max(1, total - peak))
    if o.schedule == "onecycle":
        return onecycle_factor(total, o.pct_start, o.div_factor, o.final_div_factor)
    if o.schedule == "cosine":
        return lambda it: 0.5 * (1 + math.cos(math.pi * min(it, total) / total))
    return lambda it: 1.0


def onecycle_factor(total: int, pct_start: float, div_factor: float, final_div_factor: float):
    """torch.optim.lr_scheduler.OneCycleLR's lr curve (two phases, cosine annealing), as a multiple
    of the peak lr, per iteration: from 1/div_factor up to 1 over the first pct_start of the `total`
    steps, then down to 1/(div_factor * final_div_factor) at the last one. Smith & Topin 2019,
    "Super-Convergence", https://arxiv.org/abs/1708.07120. The momentum is not cycled (docs/algorithm.md)."""
    start, end = 1.0 / div_factor, 1.0 / (div_factor * final_div_factor)
    peak = float(pct_start * total) - 1  # torch's phase boundary, in steps

    def anneal(a: float, b: float, pct: float) -> float:
        return b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1)

    def factor(it: int) -> float:
        it = min(it, total - 1)
        if it <= peak:
            return anneal(start, 1.0, it / peak) if peak > 0 else 1.0
        return anneal(1.0, end, (it - peak) / max(total - 1 - peak, 1e-12))

    return factor


@dataclass
class TrainData:
    loader: ResidentLoader | FolderLoader
    num_train: int
    augment: PairedAugment
    frame_shape: tuple[int, int, int]
    x_test: torch.Tensor
    y_test: torch.Tensor
    indices: torch.Tensor | None  # this rank's training indices (None: all)


def make_data(cfg: Config, device: torch.device, shard=None) -> TrainData:
    """Train loader + test tensors. `shard(num_train) -> indices` restricts training to one rank's part.

    data.val_size=V keeps the last V images of the (subset of the) training split out of training:
    the loader, the per-sample store and the DDP shards see only the first len-V, indexed 0..len-V-1
    (atas.evaluation.run.load_val_set reads the held-out ones). V = 0 slices nothing off."""
    info = dataset_info(cfg.data.name)
    d, t = cfg.data, cfg.train
    pad = info.train_pad if d.train_pad is None else d.train_pad
    flip = info.flip if d.flip is None else d.flip
    if info.resident:
        x, y = load_tensors(info.name, "train", d.data_dir, d.download)
        n = check_val_size(d.val_size, check_subset(d.subset, len(x)))
        keep = train_indices(check_subset(d.subset, len(x)), d.val_size, d.val_from)  # data.val_from
        x, y = (x[:n], y[:n]) if keep is None else (x[keep], y[keep])
        x_test, y_test = TestSplit(info.name, d.data_dir, d.download).take()
        indices = shard(len(x)) if shard else None
        loader: ResidentLoader | FolderLoader = ResidentLoader(
            x.to(device), y.to(device), t.batch_size, indices=indices, seed=t.seed, drop_last=t.drop_last
        )
        augment = PairedAugment(info.image_size, pad=pad, flip=flip)
        num_train = len(x)
    else:
        train_set: IndexedImageFolder | torch.utils.data.Subset = image_folder(info.name, "train", d.data_dir)
        n = check_val_size(d.val_size, check_subset(d.subset, len(train_set)))
        keep = train_indices(check_subset(d.subset, len(train_set)), d.val_size, d.val_from)  # data.val_from
        if n < len(train_set):
            train_set = torch.utils.data.Subset(train_set, range(n) if keep is None else keep.tolist())
        # Only the images the probe or the evaluation can use are decoded.
        x_test, y_test = TestSplit(info.name, d.data_dir).take(d.test_subset or cfg.eval.n_examples)
        indices = shard(len(train_set)) if shard else None
        loader = FolderLoader(
            train_set,
            t.batch_size,
            device,
            indices=indices,
            seed=t.seed,
            drop_last=t.drop_last,
            num_workers=d.num_workers,
        )
        augment = PairedAugment(info.image_size, pad=pad, frame=info.frame_size + 2 * pad, flip=flip)
        num_train = len(train_set)
    n = check_subset(d.test_subset, len(x_test), "data.test_subset", "test")
    x_test, y_test = x_test[:n], y_test[:n]
    return TrainData(loader, num_train, augment, (info.channels, augment.frame, augment.frame), x_test, y_test, indices)


def make_method(cfg: Config, data: TrainData, store_options: dict, changes: dict | None = None):
    """The public method object of cfg, with the guard's option changes so far (atas.guard)."""
    options = method_options(cfg)
    if changes:
        options = dataclasses.replace(options, **changes)
    return get_method(cfg.method.name)(
        cfg.method.eps,
        options,
        cfg.train.epochs,
        num_samples=data.num_train,
        augment=data.augment,
        store_dtype=cfg.train.store_dtype,
        store_options=store_options,
    )
