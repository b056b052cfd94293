"""The training loop, one screen of it: gather -> paired augment -> attack -> loss -> step -> scatter -> log.

Everything around the loop (data, model, store, schedule, checkpoints, the per-epoch probe) is
built by small functions above it. The loop is the same for every method; a method only decides
how x_adv is made (and, rarely, its loss).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from atas import distributed as dist, guard
from atas.augment import PairedAugment
from atas.checkpoint import (
    CheckpointError,
    DiskFullError,
    atomic_write,
    atomic_write_text,
    healthy_path,
    link_as,
    load_checkpoint,
    save_checkpoint,
)
from atas.config import Config, ConfigError, config_from_dict, method_options
from atas.data import (
    IndexedImageFolder,
    TestSplit,
    check_subset,
    check_val_size,
    dataset_info,
    image_folder,
    load_tensors,
)
from atas.errors import AtasError
from atas.loaders import FolderLoader, ResidentLoader
from atas.methods import Method, get_method
from atas.models import build_model
from atas.monitor import Probe, probe  # noqa: F401  (the per-epoch probe lives beside the monitor)
from atas.rundir import CHECKPOINT, RunFolder
from atas.store import PerSampleStore
from atas.values import to_plain

BEST = "best.pt"
DIVERGED = "diverged.json"   # written when the loss became NaN/inf: a report says "diverged", not "not started"


class TrainingDiverged(AtasError, RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept. epoch, step and loss say where.
    An outcome of the run, not a bug: the CLI says it in one line and exits 3."""

    exit_status = 3

    def __init__(self, message: str, epoch: int | None = None, step: int | None = None, loss: float | None = None):
        super().__init__(message)
        self.epoch, self.step, self.loss = epoch, step, loss

    def record(self) -> dict:
        """What the run folder keeps of it (DIVERGED)."""
        return {"epoch": self.epoch, "step": self.step, "loss": None if self.loss is None else str(self.loss)}


def read_divergence(run_dir: str | Path) -> dict | None:
    """{epoch, step, loss} of a run that diverged (its DIVERGED file), else None."""
    path = Path(run_dir) / DIVERGED
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA GPU is visible; use train.device=cpu")
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
    return build_model(cfg.model.arch, num_classes=info.num_classes, in_channels=info.channels,
                       mean=info.mean, std=info.std)


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                           nesterov=o.nesterov)


def lr_factor(cfg: Config, steps_per_epoch: int):
    """Per-iteration LR multiplier (the scheduler steps every iteration, as the official code)."""
    o, total = cfg.optim, cfg.train.epochs * steps_per_epoch
    if o.schedule == "multistep":
        bounds = [m * steps_per_epoch for m in o.milestones]
        return lambda it: o.gamma ** sum(it >= b for b in bounds)
    if o.schedule == "cyclic":
        peak = max(1, int(o.pct_start * total))
        return lambda it: it / peak if it <= peak else max(0.0, (total - it) / max(1, total - peak))
    if o.schedule == "cosine":
        return lambda it: 0.5 * (1 + math.cos(math.pi * min(it, total) / total))
    return lambda it: 1.0


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
    loader: ResidentLoader | FolderLoader
    if info.resident:
        x, y = load_tensors(info.name, "train", d.data_dir, d.download)
        n = check_val_size(d.val_size, check_subset(d.subset, len(x)))
        x, y = x[:n], y[:n]
        x_test, y_test = TestSplit(info.name, d.data_dir, d.download).take()
        indices = shard(len(x)) if shard else None
        loader = ResidentLoader(x.to(device), y.to(device), t.batch_size, indices=indices, seed=t.seed,
                                drop_last=t.drop_last)
        augment = PairedAugment(info.image_size, pad=pad, flip=flip)
        num_train = len(x)
    else:
        train_set: IndexedImageFolder | torch.utils.data.Subset = image_folder(info.name, "train", d.data_dir)
        n = check_val_size(d.val_size, check_subset(d.subset, len(train_set)))
        if n < len(train_set):
            train_set = torch.utils.data.Subset(train_set, range(n))
        # Only the images the probe or the evaluation can use are decoded.
        x_test, y_test = TestSplit(info.name, d.data_dir).take(d.test_subset or cfg.eval.n_examples)
        indices = shard(len(train_set)) if shard else None
        loader = FolderLoader(train_set, t.batch_size, device, indices=indices, seed=t.seed,
                              drop_last=t.drop_last, num_workers=d.num_workers)
        augment = PairedAugment(info.image_size, pad=pad, frame=info.frame_size + 2 * pad, flip=flip)
        num_train = len(train_set)
    n = check_subset(d.test_subset, len(x_test), "data.test_subset", "test")
    x_test, y_test = x_test[:n], y_test[:n]
    return TrainData(loader, num_train, augment, (info.channels, augment.frame, augment.frame), x_test, y_test,
                     indices)


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------
class MetricsLog:
    """Per-epoch metrics to metrics.jsonl and metrics.csv in the run folder (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.jsonl, self.csv, self.enabled = run_dir / "metrics.jsonl", run_dir / "metrics.csv", enabled

    def read(self) -> list[dict]:
        if not self.jsonl.exists():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def write_all(self, rows: list[dict]) -> None:
        if not self.enabled:
            return
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in rows))
        keys = list(dict.fromkeys(k for r in rows for k in r))

        def write_csv(f):
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        atomic_write(self.csv, write_csv, mode="w")


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    run_dir: Path
    model: nn.Module
    metrics: list[dict] = field(default_factory=list)
    evaluation: dict | None = None
    store: PerSampleStore | None = None
    method: object = None  # the trained method object (its state_dict continues the run)
    events: list[dict] = field(default_factory=list)  # the guard's recoveries (atas.guard)


def _rng_state(device: torch.device) -> dict:
    numpy_state = cast(tuple, np.random.get_state())  # the legacy tuple: (name, keys, pos, ...)
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": torch.tensor(numpy_state[1].astype(np.int64)),
                             "python": str(random.getstate())}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def check_resumable(saved: dict, cfg: Config) -> None:
    """Resuming is only honest with the config the run was started with (epochs may grow)."""
    mine, theirs = cfg.to_dict(), dict(saved)
    for label in ("name", "description", "out_dir"):  # labels, not training settings
        mine.pop(label, None)
        theirs.pop(label, None)
    if isinstance(theirs.get("data"), dict):  # saved before data.val_size existed: it held nothing out
        theirs["data"] = {"val_size": 0, **theirs["data"]}
    for tree in (mine, theirs):  # other methods' options do not matter; method.args holds this one's
        if isinstance(tree.get("method"), dict):
            tree["method"] = {k: v for k, v in tree["method"].items() if k != "per_method"}
    for section, key in (("train", "epochs"), ("train", "progress"), ("train", "device"), ("train", "max_steps"),
                         ("train", "store_memmap"),
                         ("data", "num_workers"), ("data", "data_dir"), ("eval", None)):
        for tree in (mine, theirs):
            if key is None:
                tree.pop(section, None)
            else:
                tree.get(section, {}).pop(key, None)
    if mine != theirs:
        diff = [f"{s}.{k}: checkpoint {theirs.get(s, {}).get(k)!r} vs now {v!r}"
                for s, sec in mine.items() if isinstance(sec, dict)
                for k, v in sec.items() if theirs.get(s, {}).get(k) != v]
        diff += [f"{s}: checkpoint {theirs.get(s)!r} vs now {v!r}" for s, v in mine.items()
                 if not isinstance(v, dict) and theirs.get(s) != v]
        raise CheckpointError("cannot resume: the config differs from the one the run was started with ("
                              + "; ".join(diff[:6]) + "). Resume without overrides, or start a new run.")


def train(cfg: Config, run_dir: str | Path | None = None, resume: bool = False,
          overwrite: bool = False) -> RunResult:
    """Train `cfg`; checkpoints every epoch to run_dir; `resume=True` continues from its checkpoint.

    The folder is locked for the run (one writer); a fresh run refuses a folder holding another
    run unless `overwrite=True`, which deletes that run's checkpoints, metrics and evaluation."""
    ctx = dist.setup(cfg)
    run_dir = Path(run_dir or Path(cfg.out_dir) / cfg.name)
    with RunFolder(run_dir, resume=resume, overwrite=overwrite, enabled=ctx.is_main) as folder:
        try:
            return _train(cfg, ctx, folder, resume)
        except TrainingDiverged as e:
            if ctx.is_main:  # the run's outcome, for `atas compare` and its report
                atomic_write_text(run_dir / DIVERGED, json.dumps(e.record()) + "\n")
            raise


@dataclass
class _Run:
    """Everything one training run holds, built once by `_build` (and rebuilt in part by a rollback)."""
    cfg: Config
    ctx: dist.DistContext
    device: torch.device
    data: TrainData
    model: nn.Module
    attack_model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    method: Method
    store_options: dict
    ckpt_path: Path
    memory_format: torch.memory_format
    autocast: Callable[[], contextlib.AbstractContextManager]
    num_classes: int = 10
    x_probe: torch.Tensor | None = None
    y_probe: torch.Tensor | None = None


def _build(cfg: Config, ctx, run_dir: Path, ckpt_path: Path) -> _Run:
    """Data, model, optimizer, scheduler and the public method object, exactly as a user's own loop
    builds them (examples/own_loop.py)."""
    device = ctx.device if ctx.enabled else resolve_device(cfg.train.device)
    data = make_data(cfg, device, (lambda n: ctx.shard_indices(cfg, n)) if ctx.enabled else None)
    model = make_model(cfg).to(device)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    # The attack runs on `attack_model` (no DDP: its backward must not all-reduce anything); only
    # the training pass goes through the DDP wrapper. Both share the same parameters.
    attack_model = cast(nn.Module, torch.compile(model)) if cfg.train.compile else model
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp)
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)  # noqa: E731
    store_options = {"storage_size": cfg.train.store_size, "indices": data.indices,
                     "device": "cpu" if cfg.train.store_memmap else device,
                     "memmap_path": (ctx.checkpoint_path(run_dir, cfg.train.store_memmap)
                                     if cfg.train.store_memmap else None)}
    optimizer = make_optimizer(cfg, model)
    method = _new_method(cfg, data, store_options, {})
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, len(data.loader) * method.replays))
    run = _Run(cfg, ctx, device, data, model, attack_model, ctx.wrap(attack_model), optimizer, scheduler,
               torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16"), method, store_options,
               ckpt_path, memory_format, autocast)
    run.num_classes = dataset_info(cfg.data.name).num_classes
    n_probe = min(cfg.train.probe_size, len(data.x_test))
    if n_probe:
        run.x_probe = data.x_test[-n_probe:].to(device).float().div_(255)
        run.y_probe = data.y_test[-n_probe:].to(device)
    return run


def _make_method(run: _Run, changes: dict) -> Method:
    """The public method object, with the guard's option changes so far (atas.guard)."""
    return _new_method(run.cfg, run.data, run.store_options, changes)


def _new_method(cfg: Config, data: TrainData, store_options: dict, changes: dict) -> Method:
    options = method_options(cfg)
    if changes:
        options = dataclasses.replace(options, **changes)
    return get_method(cfg.method.name)(cfg.method.eps, options, cfg.train.epochs, num_samples=data.num_train,
                                       augment=data.augment, store_dtype=cfg.train.store_dtype,
                                       store_options=store_options)


def _restore(run: _Run, state: dict, rows: list[dict]) -> int:
    """Load a checkpoint's training state into the run (resume and rollback); the method object is
    rebuilt with the guard's option changes recorded in `rows`. Returns the step count."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if "scaler" in state:
        run.scaler.load_state_dict(state["scaler"])
    run.method = _make_method(run, guard.option_changes(rows))
    run.method.load_state_dict(state["method"])
    _set_rng_state(state["rng"], run.device)
    return int(state["step"])


def _snapshot(run: _Run, epoch: int, step: int, rows: list[dict]) -> dict:
    """The checkpoint of the end of `epoch`: all a resume (or a rollback) needs."""
    ckpt = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "rng": _rng_state(run.device), "config": run.cfg.to_dict(),
            "epoch": epoch, "step": step, "num_train": run.data.num_train}
    ckpt["method"] = run.method.state_dict()  # epoch, per-sample store, carried tensors
    if run.cfg.train.amp == "fp16":
        ckpt["scaler"] = run.scaler.state_dict()
    ckpt["metrics"] = json.loads(json.dumps(rows))  # plain values; the metrics files are rebuilt from these
    return ckpt


def _train(cfg: Config, ctx, folder: RunFolder, resume: bool) -> RunResult:
    run_dir = folder.run_dir
    ckpt_path = ctx.resume_path(run_dir, CHECKPOINT) if resume else ctx.checkpoint_path(run_dir, CHECKPOINT)
    state = None
    if resume:  # checked before anything is written: a refused resume leaves the folder as it was
        state = load_checkpoint(ckpt_path, map_location="cpu")  # RNG states must stay CPU tensors
        check_resumable(state["config"], cfg)
    seed_everything(cfg.train.seed + ctx.rank, cfg.train.deterministic)
    run = _build(cfg, ctx, run_dir, ckpt_path)
    log = MetricsLog(run_dir, enabled=ctx.is_main)
    rows, start_epoch, step = _start(run, folder, log, state)
    state = None  # the checkpoint's tensors are in the run now: free the copy
    _epochs(run, rows, start_epoch, step, log, run_dir)
    ctx.barrier()
    run.model.eval()  # what a caller does with a trained model is evaluate or deploy it
    return RunResult(run_dir, run.model, guard.epoch_rows(rows), store=run.method.store, method=run.method,
                     events=guard.events(rows))


def _start(run: _Run, folder: RunFolder, log: MetricsLog, state: dict | None) -> tuple[list[dict], int, int]:
    """Restore a resumed run (state: its checkpoint), write the folder, and link epoch 0 as the
    guard's first rollback target. Returns (metrics rows, first epoch to train, step count)."""
    cfg, ctx, run_dir = run.cfg, run.ctx, folder.run_dir
    rows: list[dict] = []
    start_epoch, step = 1, 0
    if state is not None:
        # Every rank reads the checkpoint's rows: the guard's option changes are in them.
        rows = state.get("metrics") or ([r for r in log.read() if r["epoch"] < int(state["epoch"]) + 1]
                                        if ctx.is_main else [])
        step = _restore(run, state, rows)
        start_epoch = int(state["epoch"]) + 1
    if ctx.is_main:  # all checked: only now is the folder written (stale outputs go on a fresh start)
        folder.start(cfg.to_yaml())
        if state is not None:
            log.write_all(rows)  # rebuilt from the checkpoint: an epoch saved but not yet logged is not lost
            _repair_best(run, rows, run_dir)
    if cfg.train.co_action == "recover" and state is None:  # epoch 0: the target of a run never healthy
        link = healthy_path(run.ckpt_path)
        _save_or_explain(lambda: save_checkpoint(link, _snapshot(run, 0, 0, rows)), run.ckpt_path, 0, run_dir)
    return rows, start_epoch, step


def _epochs(run: _Run, rows: list[dict], epoch: int, step: int, log: MetricsLog, run_dir: Path) -> None:
    """The epochs, each judged by the probe and, under co_action=recover, by the guard (which may
    roll the run back and go on from an earlier epoch, or give up): the public atas.Guard, its
    healthy state kept in the run's files (checkpoint.healthy.pt) rather than in memory."""
    cfg, ctx = run.cfg, run.ctx
    recover = cfg.train.co_action == "recover"
    # rank 0 probes; the others follow its verdicts
    probe_ = (Probe(run.x_probe, run.y_probe, cfg.method.eps, cfg.train.probe_steps, cfg.train.probe_restarts)
              if run.x_probe is not None and run.y_probe is not None and ctx.is_main else None)
    sentinel = guard.Guard(run.model, run.optimizer, run.method, scheduler=run.scheduler, rows=rows,
                           probe=probe_,
                           max_recoveries=cfg.train.max_recoveries, num_classes=run.num_classes, verbose=False,
                           budget_epochs=cfg.train.recover_budget_epochs
                           if cfg.train.recover_budget_epochs is not None else cfg.train.epochs)
    while epoch <= cfg.train.epochs:
        if cfg.train.max_steps is not None and step >= cfg.train.max_steps:
            break
        row, step = _train_epoch(run, epoch, step)
        verdict = sentinel.judge(row)
        rows.append(row)
        event = None
        if recover and ctx.broadcast_flag(verdict["co"]):
            event = ctx.broadcast_object(sentinel.plan(epoch, verdict["reason"]) if ctx.is_main else None)
        _end_of_epoch(run, epoch, step, rows, verdict, sentinel.monitor, run_dir, log,
                      healthy=recover and ctx.broadcast_flag(sentinel.healthy(verdict, row)),
                      last_word=event)
        if event is not None and event[guard.EVENT] == "recovery":
            epoch, step = _roll_back(run, event, sentinel, run_dir, log)
            continue
        stop = event is not None or (verdict["co"] and cfg.train.co_action == "stop")
        if ctx.broadcast_flag(stop):  # all ranks stop together
            if ctx.is_main:
                tqdm.write("the guard gave up: ending the run." if event else "train.co_action=stop: ending the run.")
            break
        epoch += 1


def _train_epoch(run: _Run, epoch: int, step: int) -> tuple[dict, int]:
    """One epoch of the loop; returns its metrics row and the step count."""
    cfg, method = run.cfg, run.method
    run.model.train()
    tally = _Tally(method, run.device)
    t0 = time.time()
    batches = method.batches(run.data.loader)  # starts the epoch; paired crop/flip of every batch
    n_batches = len(run.data.loader)
    bar = tqdm(batches, total=n_batches, desc=f"epoch {epoch}/{cfg.train.epochs} {method.name}",
               leave=False, disable=not (cfg.train.progress and run.ctx.is_main), dynamic_ncols=True)
    for i, (x, y, idx) in enumerate(bar):
        loss = _train_step(run, x.contiguous(memory_format=run.memory_format), y, idx)
        step += 1
        tally.add(loss, y, step)                                                  # log (no sync)
        if i % 20 == 0 or i == n_batches - 1:
            _check_finite(tally, epoch, run.ckpt_path)                            # sync point
            bar.set_postfix(tally.postfix())
        if cfg.train.max_steps is not None and step >= cfg.train.max_steps:
            break
    bar.close()
    _check_finite(tally, epoch, run.ckpt_path)
    row = {"epoch": epoch, "step": step, "lr": run.optimizer.param_groups[0]["lr"]}
    row.update(tally.totals(run.ctx))
    row["epoch_time_s"] = time.time() - t0
    eps_t = method.eps_at(epoch)
    if eps_t != method.eps:
        row["train_eps"] = eps_t
    row.update(tally.stat_totals())
    return row, step


def _train_step(run: _Run, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """One minibatch (replayed `method.replays` times, Free-AT): attack -> loss -> step."""
    method = run.method
    for _ in range(method.replays):
        with run.autocast():
            x_adv = method.perturb(run.attack_model, x, y, idx)                   # gather, attack, scatter
        run.model.train()
        with run.autocast():
            loss = method.loss(run.train_model, x_adv, y, x)                      # loss
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()                                         # DDP syncs here
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
    return loss


class _Tally:
    """The epoch's running numbers, kept on the device so that logging never waits for it: loss,
    accuracy, the first non-finite step, and mean/min/max of each stat the method logs
    (`Method.logged_stats`, e.g. ATAS's per-sample step size alpha). One tensor, laid out
    [loss*n, correct, n, k stat sums, k stat mins, k stat maxs], reduced over ranks in one go."""

    def __init__(self, method, device: torch.device):
        self.method, self.keys = method, list(method.logged_stats)
        k = len(self.keys)
        self.sums = torch.zeros(3 + 3 * k, device=device)
        self.sums[3 + k:3 + 2 * k], self.sums[3 + 2 * k:] = float("inf"), float("-inf")
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)   # the first non-finite step
        self.bad_loss = torch.zeros((), device=device)                          # and its loss
        self._reduced: list[float] | None = None

    @torch.no_grad()
    def add(self, loss: torch.Tensor, y: torch.Tensor, step: int) -> None:
        s, k = self.sums, len(self.keys)
        first = (self.bad_step < 0) & ~torch.isfinite(loss)
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_loss = torch.where(first, loss.detach().float(), self.bad_loss)
        s[0] += loss.detach() * len(y)
        s[1] += (self.method.logits.argmax(1) == y).sum()
        s[2] += len(y)
        for i, key in enumerate(self.keys):
            value = self.method.stats.get(key)
            if value is not None:
                s[3 + i] += value.sum()
                s[3 + k + i] = torch.minimum(s[3 + k + i], value.min())
                s[3 + 2 * k + i] = torch.maximum(s[3 + 2 * k + i], value.max())

    def _stats(self, s: list[float]):
        """(key, unit, mean, min, max) of every logged stat that was seen this epoch."""
        k = len(self.keys)
        return [(key, self.method.logged_stats[key], s[3 + i] / s[2], s[3 + k + i], s[3 + 2 * k + i])
                for i, key in enumerate(self.keys) if s[3 + i]]

    def postfix(self) -> dict:
        """The progress bar's numbers (reads the device: call it at a sync point)."""
        s = self.sums.tolist()
        post = {"loss": f"{s[0] / s[2]:.3f}", "acc": f"{s[1] / s[2]:.3f}"}
        for key, unit, mean, lo, hi in self._stats(s):
            post[key] = (f"{mean * 255:.2f}/255 [{lo * 255:.1f},{hi * 255:.1f}]" if unit == "pixels"
                         else f"{mean:.4g} [{lo:.4g},{hi:.4g}]")
        return post

    def totals(self, ctx) -> dict:
        """The epoch's loss and accuracy over every rank (the stats are kept for `stat_totals`)."""
        self._reduced = s = ctx.reduce_sums(self.sums, len(self.keys)).tolist()
        return {"train_loss": s[0] / s[2], "train_adv_acc": s[1] / s[2]}

    def stat_totals(self) -> dict:
        row = {}
        assert self._reduced is not None, "totals() first: it reduces the sums across ranks"
        for key, _, mean, lo, hi in self._stats(self._reduced):
            row.update({f"{key}_mean": mean, f"{key}_min": lo, f"{key}_max": hi})
        return row


def _end_of_epoch(run: _Run, epoch: int, step: int, rows: list[dict], verdict: dict, monitor, run_dir: Path,
                  log: MetricsLog, healthy: bool, last_word: dict | None) -> None:
    """Save what the epoch leaves: best.pt (first: a kill between the two saves then redoes the
    epoch, and best.pt is always the best epoch the checkpoint's metrics name), the checkpoint,
    its healthy link, the metrics; print the row and the verdict."""
    cfg, ctx = run.cfg, run.ctx
    if healthy:
        rows[-1]["healthy"] = True  # the guard's rollback target from now on
    if last_word is not None and last_word[guard.EVENT] == "gave_up":
        rows.append(last_word)
    ckpt = _snapshot(run, epoch, step, rows)
    keep_best = cfg.train.co_action in ("keep_best", "recover") and ctx.is_main
    rolling_back = last_word is not None and last_word[guard.EVENT] == "recovery"
    saved_epoch = epoch - 1

    def save():
        nonlocal saved_epoch
        if verdict["best"] and keep_best:
            # Weights only (no store/optimizer): best.pt is for evaluation, not for resuming.
            save_checkpoint(run_dir / BEST, {k: ckpt[k] for k in ("model", "config", "epoch", "step")})
        if rolling_back:  # the rollback writes the checkpoint; a kill before it redoes this epoch
            return
        if ctx.is_main or ctx.enabled:  # every rank keeps its own file (its store shard, its RNG)
            save_checkpoint(run.ckpt_path, ckpt, keep_previous=True)
            saved_epoch = epoch
            if healthy:
                link_as(run.ckpt_path, healthy_path(run.ckpt_path))
        log.write_all(rows)
    _save_or_explain(save, run.ckpt_path, lambda: saved_epoch, run_dir)
    if ctx.is_main:
        row = rows[-1] if last_word is None or last_word[guard.EVENT] != "gave_up" else rows[-2]
        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if verdict["co"]:
            tqdm.write(guard.flag_line(epoch, verdict["reason"], row, monitor)
                       + (" Best-robust checkpoint: best.pt." if keep_best else ""))
        if last_word is not None:
            tqdm.write("GUARD " + guard.describe(last_word))


def _roll_back(run: _Run, event: dict, sentinel: guard.Guard, run_dir: Path, log: MetricsLog):
    """Undo the epochs after event['rollback_to']: the healthy checkpoint, with the event and the
    discarded rows in its metrics and the remedied options in its method state, becomes the run's
    checkpoint (so a kill from here on resumes into the recovered run), and the run continues from
    it with the remedy applied."""
    target, rows = event["rollback_to"], sentinel.rows
    sentinel.record_rollback(event)
    state = load_checkpoint(healthy_path(run.ckpt_path), map_location="cpu")
    state["metrics"] = json.loads(json.dumps(rows))
    state["method"]["options"] = to_plain(dataclasses.replace(run.method.opt, **event["changes"]))

    def save() -> None:
        save_checkpoint(run.ckpt_path, state, keep_previous=True)
        log.write_all(rows)

    _save_or_explain(save, run.ckpt_path, lambda: target, run_dir)
    step = _restore(run, state, rows)
    sentinel.rolled_back(run.method)
    return target + 1, step


def _repair_best(run: _Run, rows: list[dict], run_dir: Path) -> None:
    """best.pt must hold the best epoch the metrics name. A kill between its save and the
    checkpoint's (older runs saved it second) can leave it behind: the checkpoint being resumed
    from is that epoch, so it is rewritten from there."""
    if run.cfg.train.co_action not in ("keep_best", "recover"):
        return
    scored = [r for r in guard.all_epochs(rows) if "probe_pgd" in r]
    if not scored:
        return
    best = max(scored, key=lambda r: r["probe_pgd"])   # first of equals, as the running max
    path = run_dir / BEST
    try:
        held = int(load_checkpoint(path)["epoch"]) if path.exists() else None
    except CheckpointError:
        held = None
    if held != best["epoch"] and best is scored[-1] and not best.get("discarded"):
        ckpt = _snapshot(run, best["epoch"], best["step"], rows)
        save_checkpoint(path, {k: ckpt[k] for k in ("model", "config", "epoch", "step")})
        tqdm.write(f"best.pt held {'no epoch' if held is None else f'epoch {held}'}, the metrics name epoch "
                   f"{best['epoch']}: rewritten from the checkpoint")


def _save_or_explain(save, ckpt_path: Path, saved_epoch, run_dir: Path) -> None:
    try:
        save()
    except DiskFullError as e:
        epoch = saved_epoch() if callable(saved_epoch) else saved_epoch
        raise _disk_full(e, ckpt_path, epoch, run_dir) from None


def _disk_full(e: DiskFullError, ckpt_path: Path, saved_epoch: int, run_dir: Path) -> DiskFullError:
    """The message a full disk deserves: which file, which checkpoint survived, what to do."""
    if saved_epoch >= 1 and ckpt_path.exists():
        return DiskFullError(e.path, f"the checkpoint of epoch {saved_epoch} is intact ({ckpt_path})",
                             f"free space and resume with `atas train --resume {run_dir}`")
    return DiskFullError(e.path, "no checkpoint was written yet", "free space and start the run again")


def _check_finite(tally: _Tally, epoch: int, ckpt_path: Path) -> None:
    bad = int(tally.bad_step)  # sync point
    if bad >= 0:
        kept = (f"the last good checkpoint {ckpt_path} (end of epoch {epoch - 1}) is kept"
                if ckpt_path.exists() else "no checkpoint had been written yet")
        raise TrainingDiverged(
            f"the training loss became NaN/inf at epoch {epoch}, step {bad}; {kept}. Lower optim.lr, "
            "check the data range (pixels must be in [0, 1]), or resume with `atas train --resume RUN_DIR`.",
            epoch, bad, float(tally.bad_loss))


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise CheckpointError(f"{run_dir} is not a run folder (no config.yaml)")
    import yaml

    return config_from_dict(yaml.safe_load(path.read_text()))
