"""torch.distributed (DDP) in a few lines, launched by torchrun.

Under `torchrun --nproc-per-node N -m atas train ...` every rank owns a fixed, rank-stable
partition of the training indices (index i belongs to rank i % W) and shuffles inside it, so the
per-sample store is sharded with no communication: rank r only ever reads and writes the rows of
its own indices. The attack runs on the unwrapped module (no gradient all-reduce for it); only
the training backward goes through DDP. Without torchrun this is a no-op context.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from atas.config import Config, ConfigError


@dataclass
class DistContext:
    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.enabled:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def shard_indices(self, cfg: Config, num_samples: int) -> torch.Tensor:
        """This rank's indices: i % W == rank, truncated so every rank has the same count (and so
        the same number of steps; DDP ranks must step together). Up to W-1 samples are dropped."""
        per_rank = num_samples // self.world_size
        if per_rank < cfg.train.batch_size:
            raise ConfigError(
                f"{num_samples} training samples over {self.world_size} ranks leaves {per_rank} per rank, "
                f"less than one batch (train.batch_size={cfg.train.batch_size} is per rank). Use fewer "
                "processes or a smaller per-rank batch.")
        return torch.arange(per_rank * self.world_size)[self.rank::self.world_size]

    def checkpoint_name(self, name: str) -> str:
        stem, ext = os.path.splitext(name)
        return f"{stem}-rank{self.rank}-of{self.world_size}{ext}"

    def reduce_sums(self, sums: torch.Tensor) -> torch.Tensor:
        """[loss*n, correct, n, alpha_sum, alpha_min, alpha_max] summed / min'ed / max'ed over ranks."""
        if not self.enabled:
            return sums
        head, lo, hi = sums[:4].clone(), sums[4:5].clone(), sums[5:6].clone()
        dist.all_reduce(head, op=dist.ReduceOp.SUM)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        return torch.cat([head, lo, hi])

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup(cfg: Config) -> DistContext:
    """Join the process group if launched by torchrun (WORLD_SIZE set), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.train.device
    use_cuda = want.startswith("cuda") or (want == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError("train.device asks for CUDA but no GPU is visible on this node; use train.device=cpu "
                              "(gloo) or launch on GPU nodes")
        if torch.cuda.device_count() <= local_rank:
            raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs on this node: "
                              "--nproc-per-node must not exceed the GPU count")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if cfg.train.max_steps is not None:
        warnings.warn("train.max_steps under DDP stops every rank at the same step count")
    return DistContext(True, rank, world, local_rank, device)


def is_main_process() -> bool:
    """Rank 0 under torchrun, True otherwise (logging, reports, evaluation at the end)."""
    return not dist.is_initialized() or dist.get_rank() == 0
