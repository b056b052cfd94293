"""torch.distributed (DDP) in a few lines, launched by torchrun.

Under `torchrun --nproc-per-node N -m atas train ...` every rank owns a fixed, rank-stable
partition of the training indices (index i belongs to rank i % W) and shuffles inside it, so the
per-sample store is sharded with no communication: rank r only ever reads and writes the rows of
its own indices. The attack runs on the unwrapped module (no gradient all-reduce for it); only
the training backward goes through DDP. Without torchrun this is a no-op context.

Every rank writes its own checkpoint (checkpoint-rank{r}-of{W}.pt: its store shard and RNG
state), so a run resumes only with the world size it was started with; `resume_path` refuses any
other with a message that says which. Decisions taken on rank 0 alone (the per-epoch probe and
the catastrophic-overfitting verdict run there only) reach the other ranks through
`broadcast_flag`, so every rank stops at the same epoch.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from atas.checkpoint import CheckpointError
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
                "processes or a smaller per-rank batch."
            )
        return torch.arange(per_rank * self.world_size)[self.rank :: self.world_size]

    def checkpoint_name(self, name: str) -> str:
        stem, ext = os.path.splitext(name)
        return f"{stem}-rank{self.rank}-of{self.world_size}{ext}"

    def checkpoint_path(self, run_dir: str | Path, name: str) -> Path:
        """This rank's file: run_dir/name alone, run_dir/<stem>-rank{r}-of{W}<ext> under DDP."""
        return Path(run_dir) / (self.checkpoint_name(name) if self.enabled else name)

    def resume_path(self, run_dir: str | Path, name: str) -> Path:
        """This rank's checkpoint to resume from; CheckpointError naming the world size the run was
        saved with when it differs from this launch's (the store shards would not line up)."""
        path = self.checkpoint_path(run_dir, name)
        if path.exists():
            return path
        saved = saved_world_sizes(run_dir, name)
        if saved and self.world_size not in saved:
            sizes = " and ".join(str(w) for w in sorted(saved))
            how = "; ".join(
                f"`torchrun --nproc-per-node {w} -m atas train --resume {run_dir}`"
                if w > 1
                else f"`atas train --resume {run_dir}` (one process, no torchrun)"
                for w in sorted(saved)
            )
            files = sorted(p.name for p in Path(run_dir).iterdir() if p.name == name or _rank_of(p.name, name))
            raise CheckpointError(
                f"cannot resume {run_dir} with world size {self.world_size}: its checkpoints were written with world "
                f"size {sizes} ({', '.join(files)}). "
                "Each rank saves its own shard of the per-sample store (index i lives on rank i % world size), so "
                f"a run resumes only with the world size it was started with: {how}."
            )
        if saved:
            raise CheckpointError(
                f"cannot resume rank {self.rank}: {path} is missing although the run has checkpoints "
                f"for world size {self.world_size} (a rank crashed before its save?). Resume from "
                "an earlier copy of the run folder or start a new run."
            )
        from atas.rundir import fresh_start_command

        raise CheckpointError(
            f"nothing to resume: {path} does not exist (the run never finished an epoch, or this "
            f"is not its folder). Check the folder name, or start the run afresh: "
            f"`{fresh_start_command(run_dir)}`."
        )

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's `flag` on every rank (sync point). For decisions taken on rank 0 alone, e.g.
        the CO monitor's stop: a rank that broke out of the loop alone would leave the others
        hanging in DDP's all-reduce. Every rank must call it, with any value off rank 0."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.long, device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def broadcast_object(self, obj):
        """Rank 0's picklable `obj` on every rank (the guard's decision; sync point)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def reduce_sums(self, sums: torch.Tensor, n_stats: int = 1) -> torch.Tensor:
        """The epoch's tally over ranks: [loss*n, correct, n, k stat sums, k stat mins, k stat maxs]
        (k = n_stats: the stats the method logs), the sums summed, the mins min'ed, the maxs max'ed."""
        if not self.enabled:
            return sums
        k = 3 + n_stats
        head, lo, hi = sums[:k].clone(), sums[k : k + n_stats].clone(), sums[k + n_stats :].clone()
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
    from atas.factories import resolve_device

    use_cuda = resolve_device(cfg.train.device).type == "cuda"  # the one check of train.device
    if use_cuda:
        if torch.cuda.device_count() <= local_rank:
            raise ConfigError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs on this node: "
                "--nproc-per-node must not exceed the GPU count"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if cfg.train.max_steps is not None:
        warnings.warn("train.max_steps under DDP stops every rank at the same step count", stacklevel=2)
    return DistContext(True, rank, world, local_rank, device)


def is_main_process() -> bool:
    """Rank 0 under torchrun, True otherwise (logging, reports, evaluation at the end).

    Falls back on torchrun's RANK variable, so the answer holds after `cleanup()` too."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def cleanup() -> None:
    """Leave the process group (end of a torchrun job); a no-op without one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _rank_of(filename: str, name: str) -> tuple[int, int] | None:
    """'checkpoint-rank1-of2.pt' -> (1, 2) for name 'checkpoint.pt'; None for other files."""
    stem, ext = os.path.splitext(name)
    m = re.fullmatch(re.escape(stem) + r"-rank(\d+)-of(\d+)" + re.escape(ext), filename)
    return (int(m.group(1)), int(m.group(2))) if m else None


def saved_world_sizes(run_dir: str | Path, name: str) -> set[int]:
    """World sizes that left a checkpoint `name` in run_dir (1: the plain file, W: per-rank files)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return set()
    sizes = {1} if (run_dir / name).exists() else set()
    for p in run_dir.iterdir():
        found = _rank_of(p.name, name)
        if found:
            sizes.add(found[1])
    return sizes
