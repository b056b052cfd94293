"""Batches of (x, y, idx) for training, from a resident tensor or from a folder dataset.

Both loaders draw from a fixed set of dataset indices (all of them, or one rank's shard under
DDP) and shuffle inside it with a generator seeded by (seed, epoch). The order therefore needs no
state of its own: a resumed run replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler


def epoch_permutation(indices: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return indices[torch.randperm(len(indices), generator=g)]


class ResidentLoader:
    """A small dataset held as one uint8 tensor on the training device (airbench style).

    Every batch is one index_select on the device: no workers, no host-to-device copies."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        indices: torch.Tensor | None = None,
        seed: int = 0,
        drop_last: bool = False,
    ):
        self.x, self.y = x, y
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.indices = torch.arange(len(x)) if indices is None else indices.cpu()
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        order = epoch_permutation(self.indices, self.seed, self.epoch).to(self.x.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.x[idx].float().div_(255), self.y[idx], idx


class ShardSampler(Sampler[int]):
    """Yields a fixed index set in a (seed, epoch)-seeded order; for folder datasets."""

    def __init__(self, indices: torch.Tensor, seed: int = 0):
        self.indices, self.seed, self.epoch = indices.cpu(), seed, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(epoch_permutation(self.indices, self.seed, self.epoch).tolist())


class FolderLoader:
    """DataLoader over a folder dataset (ImageNet-scale): workers decode and resize, pinned memory,
    non-blocking copies; the paired crop/flip then happens on the device like for resident data."""

    def __init__(
        self,
        dataset,
        batch_size: int,
        device: torch.device,
        *,
        indices: torch.Tensor | None = None,
        seed: int = 0,
        drop_last: bool = False,
        num_workers: int = 4,
    ):
        self.sampler = ShardSampler(torch.arange(len(dataset)) if indices is None else indices, seed)
        self.device = device
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            drop_last=drop_last,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
        )

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y, idx in self.loader:
            yield (
                x.to(self.device, non_blocking=True),
                y.to(self.device, non_blocking=True),
                idx.to(self.device, non_blocking=True),
            )
