"""A run's training state on disk: what a checkpoint holds (the snapshot of an epoch and its
restore), what the end of an epoch saves (best.pt, the checkpoint, its healthy link, the metrics),
the guard's rollback and where it finds a state it can trust, and the messages of a full disk.

The trainer (atas.trainer) calls these with its `_Run`; nothing here imports the trainer.

The rollback target of `train.co_action=recover` is `checkpoint.healthy.pt`, a hard link of the
last healthy epoch's checkpoint. When that file is missing or damaged, the rollback takes the
state it can trust instead: `checkpoint.pt` or `checkpoint.prev.pt` when one of them is that
epoch of this very run (its metrics up to that epoch are the run's), else an older healthy epoch
one of them holds, else the initial weights (epoch 0, rebuilt exactly from the run's seed).
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm import tqdm

from atas import guard
from atas.checkpoint import (
    CheckpointError,
    DiskFullError,
    healthy_path,
    link_as,
    load_checkpoint,
    previous_path,
    save_checkpoint,
)
from atas.factories import make_method
from atas.rundir import BEST, MetricsLog
from atas.values import to_plain


# --------------------------------------------------------------------------------------------
# What a checkpoint holds
# --------------------------------------------------------------------------------------------
def rng_state(device: torch.device) -> dict:
    numpy_state = cast(tuple, np.random.get_state())  # the legacy tuple: (name, keys, pos, ...)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": torch.tensor(numpy_state[1].astype(np.int64)),
        "python": str(random.getstate()),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def snapshot(run, epoch: int, step: int, rows: list[dict]) -> dict:
    """The checkpoint of the end of `epoch`: all a resume (or a rollback) needs."""
    ckpt = {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng": rng_state(run.device),
        "config": run.cfg.to_dict(),
        "epoch": epoch,
        "step": step,
        "num_train": run.data.num_train,
    }
    ckpt["method"] = run.method.state_dict()  # epoch, per-sample store, carried tensors
    if getattr(run, "tech", None) is not None:
        ckpt.update(run.tech.state_dict())  # the weight average ("wa") and the selection's best
    if run.cfg.train.amp == "fp16":
        ckpt["scaler"] = run.scaler.state_dict()
    ckpt["metrics"] = json.loads(json.dumps(rows))  # plain values; the metrics files are rebuilt from these
    return ckpt


def restore(run, state: dict, rows: list[dict]) -> int:
    """Load a checkpoint's training state into the run (resume and rollback); the method object is
    rebuilt with the guard's option changes recorded in `rows`. Returns the step count."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if "scaler" in state:
        run.scaler.load_state_dict(state["scaler"])
    run.method = make_method(run.cfg, run.data, run.store_options, guard.option_changes(rows))
    run.method.load_state_dict(state["method"])
    if getattr(run, "tech", None) is not None:
        run.tech.load_state_dict(state)
    set_rng_state(state["rng"], run.device)
    return int(state["step"])


def resume_source(ctx, run_dir: Path, name: str) -> Path:
    """The checkpoint `--resume` continues from: this rank's `name`, or, when a run was killed in its
    first epoch after its epoch-0 snapshot (co_action=recover), that snapshot: the run resumes from
    its initial weights, exactly as it started (a fresh start would refuse the folder)."""
    path = ctx.checkpoint_path(run_dir, name)
    if not path.exists() and healthy_path(path).exists():
        if ctx.is_main:
            tqdm.write(f"{path} is missing: resuming from {healthy_path(path).name}, the last healthy epoch")
        return healthy_path(path)
    return ctx.resume_path(run_dir, name)


# --------------------------------------------------------------------------------------------
# The end of an epoch
# --------------------------------------------------------------------------------------------
def end_of_epoch(
    run,
    epoch: int,
    step: int,
    rows: list[dict],
    verdict: dict,
    monitor,
    run_dir: Path,
    log: MetricsLog,
    healthy: bool,
    last_word: dict | None,
) -> None:
    """Save what the epoch leaves: best.pt (first: a kill between the two saves then redoes the
    epoch, and best.pt is always the best epoch the checkpoint's metrics name), the checkpoint,
    its healthy link, the metrics; print the row and the verdict."""
    cfg, ctx = run.cfg, run.ctx
    if healthy:
        rows[-1]["healthy"] = True  # the guard's rollback target from now on
    # A recovery, and giving up at the last healthy epoch, roll back (roll_back writes the checkpoint
    # and logs the event); giving up with no healthy epoch ends here, the event in this checkpoint.
    rolling_back = last_word is not None and "rollback_to" in last_word
    if last_word is not None and not rolling_back:
        rows.append(last_word)
    ckpt = snapshot(run, epoch, step, rows)
    keep_best = cfg.train.co_action in ("keep_best", "recover") and ctx.is_main
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

    save_or_explain(save, run.ckpt_path, lambda: saved_epoch, run_dir)
    if ctx.is_main:
        row = rows[-1] if last_word is None or rolling_back else rows[-2]
        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if verdict["co"]:
            tqdm.write(
                guard.flag_line(epoch, verdict["reason"], row, monitor)
                + (" Best-robust checkpoint: best.pt." if keep_best else "")
            )
        if last_word is not None:
            tqdm.write("GUARD " + guard.describe(last_word))


def repair_best(run, rows: list[dict], run_dir: Path) -> None:
    """best.pt must hold the best epoch the metrics name. A kill between its save and the
    checkpoint's (older runs saved it second) can leave it behind: the checkpoint being resumed
    from is that epoch, so it is rewritten from there."""
    if run.cfg.train.co_action not in ("keep_best", "recover"):
        return
    scored = [r for r in guard.all_epochs(rows) if "probe_pgd" in r]
    if not scored:
        return
    best = max(scored, key=lambda r: r["probe_pgd"])  # first of equals, as the running max
    path = run_dir / BEST
    try:
        held = int(load_checkpoint(path)["epoch"]) if path.exists() else None
    except CheckpointError:
        held = None
    if held != best["epoch"] and best is scored[-1] and not best.get("discarded"):
        ckpt = snapshot(run, best["epoch"], best["step"], rows)
        save_checkpoint(path, {k: ckpt[k] for k in ("model", "config", "epoch", "step")})
        tqdm.write(
            f"best.pt held {'no epoch' if held is None else f'epoch {held}'}, the metrics name epoch "
            f"{best['epoch']}: rewritten from the checkpoint"
        )


# --------------------------------------------------------------------------------------------
# The guard's rollback, and the state it can trust
# --------------------------------------------------------------------------------------------
def last_healthy(rows: list[dict]) -> int:
    """The last epoch the guard linked as healthy (0: none, the initial weights)."""
    return max((r["epoch"] for r in guard.epoch_rows(rows) if r.get("healthy")), default=0)


def _lineage(rows: list[dict], epoch: int) -> str:
    return json.dumps([r for r in guard.epoch_rows(rows) if r["epoch"] <= epoch], sort_keys=True)


def _saved_states(run):
    """(file, its state or why it cannot be used) of each checkpoint a rollback may take from, in
    the order it prefers them; loaded one at a time, as they are asked for."""
    for path in (healthy_path(run.ckpt_path), run.ckpt_path, previous_path(run.ckpt_path)):
        try:
            yield path, load_checkpoint(path, map_location="cpu")
        except CheckpointError as e:
            yield path, "missing" if not path.exists() else f"damaged ({str(e).split('. ')[0]})"


def trusted_state(run, rows: list[dict], epoch: int) -> tuple[dict, str] | None:
    """(the state of the end of `epoch` of this run, where it came from), or None when no file
    holds it: a checkpoint counts only if it is that epoch and its metrics up to it are this run's
    (a file from an epoch a rollback undid does not). Epoch 0 is always there: rebuilt if need be."""
    for path, state in _saved_states(run):
        if (
            isinstance(state, dict)
            and int(state["epoch"]) == epoch
            and _lineage(state.get("metrics") or [], epoch) == _lineage(rows, epoch)
        ):
            return state, path.name
    if epoch == 0:
        return run.initial_state(), "the initial weights, rebuilt from the run's seed"
    return None


def rollback_target(run, rows: list[dict]) -> int:
    """The epoch a recovery rolls back to: the last healthy one when its state can be trusted
    (normally its checkpoint.healthy.pt), else the newest older healthy epoch a checkpoint holds,
    else 0 (the initial weights). A fallback is said on the console."""
    target = last_healthy(rows)
    if target == 0 or trusted_state(run, rows, target) is not None:
        return target
    older = [r["epoch"] for r in guard.epoch_rows(rows) if r.get("healthy") and r["epoch"] < target]
    fallback = next((e for e in sorted(older, reverse=True) if trusted_state(run, rows, e) is not None), 0)
    why = "; ".join(
        f"{p.name} "
        + (
            s
            if isinstance(s, str)
            else f"holds epoch {s['epoch']} of another lineage"
            if int(s["epoch"]) == target
            else f"holds epoch {s['epoch']}"
        )
        for p, s in _saved_states(run)
    )
    tqdm.write(
        f"GUARD the last healthy epoch {target} cannot be restored ({why}): rolling back to "
        f"{f'epoch {fallback}' if fallback else 'the initial weights (epoch 0)'} instead"
    )
    return fallback


def roll_back(run, event: dict, sentinel, run_dir: Path, log: MetricsLog) -> tuple[int, int]:
    """Undo the epochs after event['rollback_to']: the state of that epoch (trusted_state), with
    the event and the discarded rows in its metrics and the remedied options in its method state,
    becomes the run's checkpoint (so a kill from here on resumes into the recovered run), and the
    run continues from it with the remedy applied. sentinel: the run's atas.Guard."""
    target, rows = event["rollback_to"], sentinel.rows
    found = trusted_state(run, rows, target)
    if found is None:
        raise CheckpointError(
            f"the guard's rollback to epoch {target} found no checkpoint of that epoch; resume "
            f"the run (`atas train --resume {run_dir}`): it rolls back to what it can trust"
        )
    state, source = found
    sentinel.record_rollback(event)
    state["metrics"] = json.loads(json.dumps(rows))
    state["method"]["options"] = to_plain(dataclasses.replace(run.method.opt, **event["changes"]))

    def save():
        save_checkpoint(run.ckpt_path, state, keep_previous=True)
        if source != healthy_path(run.ckpt_path).name:  # the healthy link is that epoch again
            link_as(run.ckpt_path, healthy_path(run.ckpt_path))
        log.write_all(rows)

    save_or_explain(save, run.ckpt_path, lambda: target, run_dir)
    step = restore(run, state, rows)
    sentinel.rolled_back(run.method)
    return target + 1, step


# --------------------------------------------------------------------------------------------
# A full disk
# --------------------------------------------------------------------------------------------
def save_or_explain(save, ckpt_path: Path, saved_epoch, run_dir: Path) -> None:
    try:
        save()
    except DiskFullError as e:
        epoch = saved_epoch() if callable(saved_epoch) else saved_epoch
        raise disk_full(e, ckpt_path, epoch, run_dir) from None


def disk_full(e: DiskFullError, ckpt_path: Path, saved_epoch: int, run_dir: Path) -> DiskFullError:
    """The message a full disk deserves: which file, which checkpoint survived, what to do."""
    if saved_epoch >= 1 and ckpt_path.exists():
        return DiskFullError(
            e.path,
            f"the checkpoint of epoch {saved_epoch} is intact ({ckpt_path})",
            f"free space and resume with `atas train --resume {run_dir}`",
        )
    return DiskFullError(e.path, "no checkpoint was written yet", "free space and start the run again")
