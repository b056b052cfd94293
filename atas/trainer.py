"""The training loop, one screen of it: gather -> paired augment -> attack -> loss -> step -> scatter -> log.

Around the loop: what a run is built from (atas.factories), its state on disk and what the end of
an epoch saves (atas.runstate), the run folder's files and rules (atas.rundir), the guard
(atas.guard), the per-epoch probe (below). The loop is the same for every method; a method only
decides how x_adv is made (and, rarely, its loss).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn as nn
from tqdm import tqdm

from atas import distributed as dist, guard, runstate
from atas.checkpoint import healthy_path, load_checkpoint, save_checkpoint
from atas.config import Config, config_from_dict
from atas.data import dataset_info
from atas.factories import (  # noqa: F401
    TrainData,
    lr_factor,
    make_data,
    make_method,
    make_model,
    make_optimizer,
    resolve_device,
    seed_everything,
)
from atas.methods import Method
from atas.monitor import Probe, probe  # noqa: F401  (the per-epoch probe lives beside the monitor)
from atas.rundir import (  # noqa: F401
    CHECKPOINT,
    MetricsLog,
    RunFolder,
    TrainingDiverged,
    check_resumable,
    ended_for_good,
    load_run_config,
    read_divergence,
    record_divergence,
)
from atas.store import PerSampleStore
from atas.tally import EpochTally, check_finite
from atas.techniques import Techniques

# (factories' and rundir's public names stay importable from here for existing callers)


@dataclass
class RunResult:
    run_dir: Path
    model: nn.Module
    metrics: list[dict] = field(default_factory=list)
    evaluation: dict | None = None  # the end-of-training evaluation (eval.json), when it ran
    store: PerSampleStore | None = None
    method: Any = None  # the trained method object (its state_dict continues the run)
    events: list[dict] = field(default_factory=list)  # the guard's recoveries (atas.guard)
    validation: dict | None = None  # the held-out training images' evaluation (val.json), when it ran
    trained: bool = True  # False: a resumed run that had ended trained nothing
    # `model` is the run's selected weights (train.select, atas.selection); `weights` says which
    # ({"weights": "raw" | "averaged", "rule", "epoch"?}); `raw_model` is the last raw weights and
    # `averaged_model` the weight average (None with train.wa_tau=0).
    weights: dict = field(default_factory=lambda: {"weights": "raw", "rule": "raw"})
    raw_model: nn.Module | None = None
    averaged_model: nn.Module | None = None


def train(
    cfg: Config,
    run_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    evaluate: bool | None = None,
) -> RunResult:
    """Train `cfg`; checkpoints every epoch to run_dir; `resume=True` continues from its checkpoint.
    Then (evaluate, default cfg.eval.at_end) the end-of-training evaluation: eval.json, and val.json
    when data.val_size holds images out, exactly as `atas train` writes them.

    The folder is locked for the run (one writer); a fresh run refuses a folder holding another
    run unless `overwrite=True`, which deletes that run's checkpoints, metrics and evaluation. A run
    that ended (atas.rundir.run_end) trains nothing on resume unless cfg raises train.epochs."""
    from atas.evaluation.run import check_final_eval_extras, evaluate_trained

    evaluate = cfg.eval.at_end if evaluate is None else evaluate
    if evaluate:
        check_final_eval_extras(cfg)
    joined = torch.distributed.is_available() and torch.distributed.is_initialized()
    ctx = dist.setup(cfg)
    run_dir = Path(run_dir or Path(cfg.out_dir) / cfg.name)
    if ctx.is_main:
        import warnings

        from atas.config import training_warnings

        for note in training_warnings(cfg):  # settings that train, but not as one would expect
            warnings.warn(note, stacklevel=2)
    with RunFolder(run_dir, resume=resume, overwrite=overwrite, enabled=ctx.is_main) as folder:
        try:
            result = _train(cfg, ctx, folder, resume)
        except TrainingDiverged as e:
            if ctx.is_main:
                record_divergence(run_dir, e)
            raise
    if ctx.enabled and not joined:
        # Leave the process group this call joined before the evaluation (rank 0 only): a rank that
        # exits with gloo's threads still running aborts the torchrun job.
        dist.cleanup()
    if evaluate and ctx.is_main:
        evaluate_trained(result, cfg)
    return result


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
    tech: Techniques  # weight average, selection, cost (atas.techniques)
    num_classes: int = 10
    x_probe: torch.Tensor | None = None
    y_probe: torch.Tensor | None = None
    initial_state: Callable[[], dict] | None = None  # the epoch-0 state, rebuilt (a rollback's last resort)


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
    store_options = {
        "storage_size": cfg.train.store_size,
        "indices": data.indices,
        "device": "cpu" if cfg.train.store_memmap else device,
        "memmap_path": (ctx.checkpoint_path(run_dir, cfg.train.store_memmap) if cfg.train.store_memmap else None),
    }
    optimizer = make_optimizer(cfg, model)
    method = make_method(cfg, data, store_options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, len(data.loader) * method.replays))
    run = _Run(
        cfg,
        ctx,
        device,
        data,
        model,
        attack_model,
        ctx.wrap(attack_model),
        optimizer,
        scheduler,
        torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16"),
        method,
        store_options,
        ckpt_path,
        memory_format,
        autocast,
        Techniques(cfg, model, device, ctx.is_main),
    )
    run.num_classes = dataset_info(cfg.data.name).num_classes
    n_probe = min(cfg.train.probe_size, len(data.x_test))
    if n_probe:
        run.x_probe = data.x_test[-n_probe:].to(device).float().div_(255)
        run.y_probe = data.y_test[-n_probe:].to(device)
    run.initial_state = lambda: _initial_state(cfg, ctx, run_dir, ckpt_path)
    return run


def _initial_state(cfg: Config, ctx, run_dir: Path, ckpt_path: Path) -> dict:
    """The state the run started from (its epoch-0 snapshot), rebuilt: the same seed and the same
    build give the same weights, store and RNG state. Copied: a memmap store's file is rebuilt next."""
    seed_everything(cfg.train.seed + ctx.rank, cfg.train.deterministic)
    return copy.deepcopy(runstate.snapshot(_build(cfg, ctx, run_dir, ckpt_path), 0, 0, []))


def _train(cfg: Config, ctx, folder: RunFolder, resume: bool) -> RunResult:
    run_dir = folder.run_dir
    ckpt_path = ctx.checkpoint_path(run_dir, CHECKPOINT)
    state = None
    if resume:  # checked before anything is written: a refused resume leaves the folder as it was
        state = load_checkpoint(runstate.resume_source(ctx, run_dir, CHECKPOINT), map_location="cpu")
        check_resumable(state["config"], cfg)
    seed_everything(cfg.train.seed + ctx.rank, cfg.train.deterministic)
    run = _build(cfg, ctx, run_dir, ckpt_path)
    log = MetricsLog(run_dir, enabled=ctx.is_main)
    rows, start_epoch, step = _start(run, folder, log, state)
    ended = state is not None and ended_for_good(rows, config_from_dict(state["config"]), cfg)
    state = None  # the checkpoint's tensors are in the run now: free the copy
    if ended:
        more = (
            f"train.max_steps={step + len(run.data.loader)}"
            if "train.max_steps" in ended
            else f"train.epochs={max(cfg.train.epochs, start_epoch - 1) + 1}"
        )
        if ctx.is_main:
            tqdm.write(
                f"{run_dir} has ended: {ended}. Nothing to train. To train on, raise {more.split('=')[0]}: "
                f"`atas train --resume {run_dir} {more}`"
            )
    else:
        _epochs(run, rows, start_epoch, step, log, run_dir)
    ctx.barrier()
    run.model.eval()  # what a caller does with a trained model is evaluate or deploy it
    model, weights = run.tech.final(run.model, run_dir if ctx.is_main else None, guard.all_epochs(rows))
    return RunResult(
        run_dir,
        model,
        guard.epoch_rows(rows),
        store=run.method.store,
        method=run.method,
        events=guard.events(rows),
        trained=not ended,
        weights=weights,
        raw_model=run.model,
        averaged_model=run.tech.wa.module if run.tech.wa is not None else None,
    )


def _start(run: _Run, folder: RunFolder, log: MetricsLog, state: dict | None) -> tuple[list[dict], int, int]:
    """Restore a resumed run (state: its checkpoint), write the folder, and link epoch 0 as the
    guard's first rollback target. Returns (metrics rows, first epoch to train, step count)."""
    cfg, ctx, run_dir = run.cfg, run.ctx, folder.run_dir
    rows: list[dict] = []
    start_epoch, step = 1, 0
    if state is not None:
        # Every rank reads the checkpoint's rows: the guard's option changes are in them.
        rows = state.get("metrics") or (
            [r for r in log.read() if r["epoch"] < int(state["epoch"]) + 1] if ctx.is_main else []
        )
        step = runstate.restore(run, state, rows)
        start_epoch = int(state["epoch"]) + 1
    if ctx.is_main:  # all checked: only now is the folder written (stale outputs go on a fresh start)
        folder.start(cfg.to_yaml())
        if state is not None:
            log.write_all(rows)  # rebuilt from the checkpoint: an epoch saved but not yet logged is not lost
            runstate.repair_best(run, rows, run_dir)
    if cfg.train.co_action == "recover" and state is None:  # epoch 0: the target of a run never healthy
        link = healthy_path(run.ckpt_path)
        runstate.save_or_explain(
            lambda: save_checkpoint(link, runstate.snapshot(run, 0, 0, rows)), run.ckpt_path, 0, run_dir
        )
    return rows, start_epoch, step


def _epochs(run: _Run, rows: list[dict], epoch: int, step: int, log: MetricsLog, run_dir: Path) -> None:
    """The epochs, each judged by the probe and, under co_action=recover, by the guard (which may
    roll the run back and go on from an earlier epoch, or give up): the public atas.Guard, its
    healthy state kept in the run's files (checkpoint.healthy.pt) rather than in memory."""
    cfg, ctx = run.cfg, run.ctx
    recover = cfg.train.co_action == "recover"
    # rank 0 probes; the others follow its verdicts
    probe_ = (
        Probe(run.x_probe, run.y_probe, cfg.method.eps, cfg.train.probe_steps, cfg.train.probe_restarts)
        if run.x_probe is not None and run.y_probe is not None and ctx.is_main
        else None
    )
    sentinel = guard.Guard(
        run.model,
        run.optimizer,
        run.method,
        scheduler=run.scheduler,
        rows=rows,
        probe=probe_,
        max_recoveries=cfg.train.max_recoveries,
        num_classes=run.num_classes,
        verbose=False,
        budget_epochs=cfg.train.recover_budget_epochs
        if cfg.train.recover_budget_epochs is not None
        else cfg.train.epochs,
    )
    while epoch <= cfg.train.epochs:
        if cfg.train.max_steps is not None and step >= cfg.train.max_steps:
            break
        row, step = _train_epoch(run, epoch, step)
        verdict = sentinel.judge(row)  # the CO monitor judges the raw weights (docs/algorithm.md, section 5)
        row.update(run.tech.validate(run.model, epoch, step, run_dir))  # raw vs averaged (train.select=val)
        rows.append(row)
        event = None
        if recover and ctx.broadcast_flag(verdict["co"]):
            event = ctx.broadcast_object(
                sentinel.plan(epoch, verdict["reason"], runstate.rollback_target(run, rows)) if ctx.is_main else None
            )
        runstate.end_of_epoch(
            run,
            epoch,
            step,
            rows,
            verdict,
            sentinel.monitor,
            run_dir,
            log,
            healthy=recover and ctx.broadcast_flag(sentinel.healthy(verdict, row)),
            last_word=event,
        )
        if event is not None and "rollback_to" in event:  # a recovery, or the end at the last healthy epoch
            epoch, step = runstate.roll_back(run, event, sentinel, run_dir, log)
            if event[guard.EVENT] == "recovery":
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
    tally = EpochTally(method, run.device)
    run.tech.epoch_start()
    t0 = time.time()
    batches = method.batches(run.data.loader)  # starts the epoch; paired crop/flip of every batch
    n_batches = len(run.data.loader)
    bar = tqdm(
        batches,
        total=n_batches,
        desc=f"epoch {epoch}/{cfg.train.epochs} {method.name}",
        leave=False,
        disable=not (cfg.train.progress and run.ctx.is_main),
        dynamic_ncols=True,
    )
    for i, (x, y, idx) in enumerate(bar):
        loss = _train_step(run, x.contiguous(memory_format=run.memory_format), y, idx)
        step += 1
        tally.add(loss, y, step)  # log (no sync)
        if i % 20 == 0 or i == n_batches - 1:
            check_finite(tally, epoch, run.ckpt_path)  # sync point
            bar.set_postfix(tally.postfix())
        if cfg.train.max_steps is not None and step >= cfg.train.max_steps:
            break
    bar.close()
    check_finite(tally, epoch, run.ckpt_path)
    row = {"epoch": epoch, "step": step, "lr": run.optimizer.param_groups[0]["lr"]}
    row.update(tally.totals(run.ctx))
    row["epoch_time_s"] = time.time() - t0
    row.update(run.tech.epoch_end(method))  # peak memory, passes per step (atas.cost)
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
            x_adv = method.perturb(run.attack_model, x, y, idx)  # gather, attack, scatter
        run.model.train()
        with run.autocast():
            loss = method.loss(run.train_model, x_adv, y, x)  # loss
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()  # DDP syncs here
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        run.tech.after_step(method.current_epoch)  # weight average
    return loss
