"""The guard of `train.co_action=recover`: a CO or stuck verdict rolls the run back and changes course.

The monitor (atas.monitor) says when a run has failed: catastrophic overfitting (the probe's PGD
accuracy collapses or drains behind masked gradients) or stuck (a constant prediction). The guard
acts on it, at the end of the flagged epoch:

  1. the rollback target is the last healthy epoch: one the monitor did not flag and where no rule
     was counting towards a flag (epoch 0, the initial weights, when there is none);
  2. the remedy: a run that never learned (stuck, or no healthy epoch) restarts from there with a
     longer eps ramp (+2 epochs); after CO, the method's own remedy (`Method.remedy`: ATAS a
     smaller step, FGSM-RS a smaller alpha, N-FGSM more noise, GradAlign / FGSM-PGI / ELLE a
     larger regulariser), or, for a method without one, the eps ramp restarted from the rollback
     point;
  3. the trainer restores everything of the healthy epoch (weights, optimizer, scheduler, the
     method's per-sample state, RNG: its `checkpoint.healthy.pt`, a hard link of that epoch's
     checkpoint, so keeping it costs no disk while it is the latest), applies the option changes
     and trains on from the epoch after it.

At most `train.max_recoveries` recoveries and `train.recover_budget_epochs` replayed epochs (default:
train.epochs) per run; past either the run stops with a `gave_up` verdict, its best.pt kept. The
guard's only cost is the epochs it replays.

Every decision is an event row in metrics.jsonl ({"event": "recovery" | "gave_up", "epoch": the
flagged epoch, "reason", "rollback_to", "changes", "remedy", "replayed_epochs"}); the epoch rows it
undid stay in the log, marked "discarded": true. The option changes are in these events and in the
method's state (Method.state_dict holds its options), so a kill at any point resumes to the same
final weights.

`Guard` is the public object: the probe, the monitor, the healthy rule, the plan and the rollback,
the same in `atas train` (which keeps the healthy state in files, `checkpoint.healthy.pt`), in a
user's own loop (in memory, or in a file) and in Lightning (atas.lightning):

    guard = atas.Guard(model, opt, atk, probe=atas.Probe(x_val, y_val, eps=0.2), scheduler=sched)
    for epoch in guard.epochs(30):           # 1-based; after a rollback it goes on from the healthy epoch
        for x, y, idx in atk.batches(loader, device):
            ...
        guard.end_epoch(epoch)               # probe -> verdict -> keep the healthy state, or roll back

Every run ends with one outcome (`outcome`): healthy, recovered (flagged, rolled back, healthy at the
end), gave up, or did not learn (final probe or test clean accuracy within NEAR_CHANCE of chance,
whatever the guard did: a model that learnt nothing is neither healthy nor recovered).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import torch

from atas.monitor import COMonitor, Probe

EVENT = "event"
LONGER_RAMP = 2  # epochs a restart adds to the eps ramp
GENERIC_RAMP = 3  # the ramp a method without a remedy of its own restarts with, if it had none
# A final clean accuracy at most this far above chance (1 / classes): the run did not learn. The
# shrunk recipes' stuck runs sat at 12-25% on ten classes; every run that learnt anything was above 40%.
NEAR_CHANCE = 0.05
OUTCOMES = ("healthy", "recovered", "gave up", "did not learn")


def epoch_rows(rows: list[dict]) -> list[dict]:
    """The epochs the run's weights descend from: no events, no rows a rollback undid."""
    return [r for r in rows if EVENT not in r and not r.get("discarded")]


def all_epochs(rows: list[dict]) -> list[dict]:
    """Every epoch trained, the ones a rollback undid included (best.pt is the best of these)."""
    return [r for r in rows if EVENT not in r]


def events(rows: list[dict]) -> list[dict]:
    return [r for r in rows if EVENT in r]


def option_changes(rows: list[dict]) -> dict:
    """Every option change the guard made so far, merged in order (later ones win)."""
    changes: dict = {}
    for e in events(rows):
        changes.update(e.get("changes", {}))
    return changes


def gave_up(rows: list[dict]) -> bool:
    return any(e[EVENT] == "gave_up" for e in events(rows))


def ramp_end(args: dict, rows: list[dict]) -> int:
    """The last epoch of a run's eps ramp (0: none), from its method options (a config's
    method.args, or an Options object's fields) and the guard's changes in `rows`."""
    args = {**args, **option_changes(rows)}
    ramp = args.get("eps_ramp_epochs", 0) or 0
    return args.get("eps_ramp_start", 1) + ramp - 1 if ramp else 0


def monitor_for(opt, rows: list[dict]) -> COMonitor:
    """A monitor that holds its slow rules through the method's eps ramp, replayed on `rows`."""
    ramp = getattr(opt, "eps_ramp_epochs", 0)
    monitor = COMonitor(hold_until=opt.eps_ramp_start + ramp - 1 if ramp else 0)
    monitor.replay(epoch_rows(rows))
    return monitor


def is_healthy(verdict: dict, monitor: COMonitor, row: dict, num_classes: int) -> bool:
    """An epoch the guard may roll back to: not flagged, no rule counting towards a flag, and a
    model that learned something (probe clean accuracy at least twice chance: a run that sits at a
    constant prediction is not healthy even before the stuck rule has seen it twice)."""
    return not verdict["co"] and not monitor.pending and row.get("probe_clean", 1.0) >= 2.0 / max(num_classes, 2)


def is_stuck_only(reason: str) -> bool:
    """Whether a monitor's reason (its rules joined by "; ") names only the stuck rule (a constant
    prediction): a run that never learned, not catastrophic overfitting."""
    return all(part.startswith("stuck") for part in reason.split("; "))


class Guard:
    """Catastrophic-overfitting protection for a training run: probe, verdict, rollback, remedy, replay.

    At the end of every epoch (`end_epoch`) the probe (atas.Probe: clean, FGSM and PGD-k accuracy on
    held-out images) feeds the monitor (atas.COMonitor, the rules of Wong et al. 2020 and the
    masked-gradient rules of atas.monitor). A healthy epoch's state is kept (model, optimizer,
    scheduler, the method's state with its per-sample store and options, torch's RNG); a flagged
    epoch rolls the run back to the last healthy one, applies the method's remedy (`Method.remedy`)
    or restarts the eps ramp, and `epochs` replays the epochs from there. Past max_recoveries or
    budget_epochs replayed epochs it gives up and `epochs` stops.

    Args:
        model, optimizer, method: the run's model, optimizer and atas method object.
        probe: an atas.Probe on held-out images (None: the trainer probes itself and calls `judge`).
        scheduler: the LR scheduler, if any (its state is kept and restored with the rest).
        max_recoveries (3), budget_epochs (None: the number of epochs of `epochs(n)`): the limits.
        num_classes (None: the model's output size at the first probe): the chance level.
        keep (None): where the healthy state is kept: None in memory (a copy of model, optimizer
            and per-sample store), or a file path (torch.save; loads with weights_only=True).
        rows: the metrics rows (and events) so far, to continue a run (the trainer passes its own).
        verbose (True): print each flagged epoch and the guard's decision.

    Its record: `rows` (one dict per epoch: the probe's numbers, co, co_reason, healthy; plus the
    events), `events` and `outcome` (healthy / recovered / gave up / did not learn). state_dict()
    holds the record and the kept healthy state, for a checkpoint of the run.
    """

    def __init__(
        self,
        model=None,
        optimizer=None,
        method=None,
        probe: Probe | None = None,
        scheduler=None,
        *,
        max_recoveries: int = 3,
        budget_epochs: int | None = None,
        num_classes: int | None = None,
        keep: str | Path | None = None,
        rows: list[dict] | None = None,
        verbose: bool = True,
    ):
        if probe is not None and not callable(probe):
            raise TypeError(f"Guard(probe=...) must be an atas.Probe(x_val, y_val, eps), got {type(probe).__name__}")
        if int(max_recoveries) < 0 or (budget_epochs is not None and int(budget_epochs) < 0):
            raise ValueError(
                f"Guard: max_recoveries and budget_epochs must be >= 0, got {max_recoveries} and {budget_epochs}"
            )
        self.model, self.optimizer, self.method, self.probe = model, optimizer, method, probe
        self.scheduler, self.num_classes, self.keep, self.verbose = scheduler, num_classes, keep, verbose
        self.max_recoveries, self.budget_epochs = int(max_recoveries), budget_epochs
        self.rows: list[dict] = rows if rows is not None else []
        self.monitor = monitor_for(method.opt, self.rows) if method is not None else COMonitor()
        self._healthy: dict | None = None  # the kept state (keep=None)
        self._next: int | None = None  # the epoch `epochs` yields next
        self._open: int | None = None  # the epoch yielded and not yet ended

    # -- the decisions, shared with the trainer ------------------------------------------------
    def judge(self, row: dict) -> dict:
        """The probe's numbers into `row` and the monitor's verdict on them: {co, best, reason}
        (best: the best probe PGD accuracy of every epoch trained, the undone ones included)."""
        verdict = {"co": False, "best": False, "reason": ""}
        if self.probe is None:
            return verdict
        row.update(self.probe(self.model))
        if self.num_classes is None:
            self.num_classes = int(self._num_outputs())
        verdict = self.monitor.update(row)
        verdict["best"] = row["probe_pgd"] > max(
            (r.get("probe_pgd", -1.0) for r in all_epochs(self.rows) if r is not row), default=-1.0
        )
        row["co"] = verdict["co"]
        if verdict["reason"]:
            row["co_reason"] = verdict["reason"]
        return verdict

    def healthy(self, verdict: dict, row: dict) -> bool:
        """Whether the judged epoch may be rolled back to (`is_healthy`)."""
        return is_healthy(verdict, self.monitor, row, self.num_classes or 10)

    def last_healthy(self) -> int:
        """The last epoch marked healthy (0: none, the initial state)."""
        return max((r["epoch"] for r in epoch_rows(self.rows) if r.get("healthy")), default=0)

    def plan(self, epoch: int, reason: str, rollback_to: int | None = None) -> dict:
        """The event for epoch `epoch`, flagged for `reason` (the rows hold it already): a recovery
        (rollback target, option changes, what was done) or `gave_up` (why not). rollback_to: the
        healthy epoch to go back to (default: the last one; the trainer passes the last one whose
        state it can restore, atas.runstate.rollback_target)."""
        past = [e for e in events(self.rows) if e[EVENT] == "recovery"]
        replayed = sum(e["replayed_epochs"] for e in past)
        last_healthy = self.last_healthy() if rollback_to is None else rollback_to
        replay = epoch - last_healthy
        base = {"epoch": epoch, "reason": reason}
        budget = self.budget_epochs if self.budget_epochs is not None else epoch
        # Giving up ends the run at its last healthy epoch (Wong et al. 2020's early stopping: the
        # weights before the collapse), not at the flagged one; a run never healthy keeps its last.
        end = {"rollback_to": last_healthy, "replayed_epochs": 0, "changes": {}} if last_healthy >= 1 else {}
        if len(past) >= self.max_recoveries:
            return {
                EVENT: "gave_up",
                **base,
                **end,
                "why": f"{len(past)} recoveries already (train.max_recoveries={self.max_recoveries})",
            }
        if replayed + replay > budget:
            return {
                EVENT: "gave_up",
                **base,
                **end,
                "why": f"rolling back to epoch {last_healthy} would replay {replay} epochs, but only "
                f"{budget - replayed} of the budget of {budget} are left "
                "(train.recover_budget_epochs)",
            }
        method = self.method
        o = method.opt
        changes = {} if is_stuck_only(reason) or last_healthy == 0 else method.remedy(len(past) + 1)
        if changes:
            remedy = "the method's own: " + ", ".join(f"{k} {getattr(o, k)} -> {v}" for k, v in changes.items())
        elif is_stuck_only(reason) or last_healthy == 0:
            ramp = o.eps_ramp_epochs + LONGER_RAMP
            changes = {"eps_ramp_epochs": ramp, "eps_ramp_start": last_healthy + 1}
            remedy = (
                f"restart from {'the initial weights' if last_healthy == 0 else f'epoch {last_healthy}'} "
                f"with a longer eps ramp ({o.eps_ramp_epochs} -> {ramp} epochs)"
            )
        else:
            ramp = o.eps_ramp_epochs or GENERIC_RAMP
            changes = {"eps_ramp_epochs": ramp, "eps_ramp_start": last_healthy + 1}
            remedy = (
                f"generic (the method has no remedy of its own): a {ramp}-epoch eps ramp from epoch {last_healthy + 1}"
            )
        return {
            EVENT: "recovery",
            **base,
            "attempt": len(past) + 1,
            "rollback_to": last_healthy,
            "replayed_epochs": replay,
            "changes": changes,
            "remedy": remedy,
        }

    def record_rollback(self, event: dict) -> None:
        """Mark the epochs a recovery undoes as discarded and log the event (before the restore)."""
        for r in self.rows:
            if EVENT not in r and r["epoch"] > event["rollback_to"]:
                r["discarded"] = True
        self.rows.append(event)

    def rolled_back(self, method=None) -> None:
        """After a restore: the (possibly rebuilt) method object, and a monitor replayed on the
        epochs the run now descends from."""
        if method is not None:
            self.method = method
        self.monitor = monitor_for(self.method.opt, self.rows)

    # -- the loop -------------------------------------------------------------------------------
    def epochs(self, n: int, start: int = 1) -> Iterator[int]:
        """Epochs start..n (1-based, the method's numbering); after a rollback to epoch k the next is
        k + 1, so the undone epochs are trained again; stops early when the guard gave up. Call
        `end_epoch(epoch)` at the end of each."""
        if self.budget_epochs is None:
            self.budget_epochs = int(n)
        if self._healthy is None and not self._kept_file():  # epoch 0: the target of a run never healthy
            self._keep_state(start - 1)
        self._next = int(start)
        while self._next <= n and not gave_up(self.rows):
            self._open = epoch = self._next
            self._next = epoch + 1  # end_epoch sets it back after a rollback
            yield epoch
            if self._open is not None:
                raise RuntimeError(
                    f"Guard.epochs: epoch {epoch} ended without guard.end_epoch({epoch}); call it "
                    "after the epoch's last optimizer step"
                )

    def end_epoch(self, epoch: int | None = None, row: dict | None = None) -> dict:
        """Judge the epoch just trained: probe, verdict, keep its state if healthy, else roll back
        (or give up). row: numbers of your own to log with it (train loss, ...). Returns
        {co, best, reason, healthy, event} (event: the recovery or gave_up dict, or None)."""
        epoch = int(epoch if epoch is not None else (self._open or self.method.current_epoch))
        if self._open is not None and epoch != self._open:
            raise ValueError(f"Guard.end_epoch({epoch}) but the epoch being trained is {self._open}")
        self._open = None
        row = {"epoch": epoch, **(row or {})}
        verdict = self.judge(row)
        self.rows.append(row)
        healthy = not verdict["co"] and self.healthy(verdict, row)
        if healthy:
            row["healthy"] = True
            self._keep_state(epoch)
        event = self.plan(epoch, verdict["reason"]) if verdict["co"] else None
        if self.verbose and verdict["co"]:
            print(flag_line(epoch, verdict["reason"], row, self.monitor))
        if event is not None:
            if "rollback_to" in event:  # a recovery, or giving up at the last healthy epoch's weights
                self.record_rollback(event)
                self._restore(event)
                self._next = event["rollback_to"] + 1
            else:
                self.rows.append(event)
            if self.verbose:
                print("GUARD " + describe(event))
        return {**verdict, "healthy": healthy, "event": event}

    @property
    def events(self) -> list[dict]:
        return events(self.rows)

    @property
    def outcome(self) -> str:
        """healthy, recovered, gave up or did not learn, from the last epoch's probe."""
        last = epoch_rows(self.rows)[-1:] or [{}]
        chance = 1.0 / self.num_classes if self.num_classes else None
        return outcome(self.rows, last[0].get("probe_clean"), chance)

    # -- the healthy state ------------------------------------------------------------------------
    def _snapshot(self) -> dict:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "rng": torch.get_rng_state(),
        }
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        device = next(self.model.parameters()).device
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(device)
        return state

    def _kept_file(self) -> bool:
        return self.keep is not None and Path(self.keep).exists() and bool(self.rows)

    def _keep_state(self, epoch: int) -> None:
        if self.keep is not None:
            torch.save({**self._snapshot(), "epoch": epoch}, self.keep)
        else:  # copies: training goes on in place
            self._healthy = copy.deepcopy({**self._snapshot(), "epoch": epoch})

    def _kept(self) -> dict | None:
        if self.keep is not None:
            return torch.load(self.keep, map_location="cpu", weights_only=True)
        # a copy: the same state may be the target of a later rollback
        return None if self._healthy is None else copy.deepcopy(self._healthy)

    def _restore(self, event: dict) -> None:
        """Back to the kept healthy state, the options the guard changed so far and this remedy."""
        state = self._kept()
        if state is None or int(state["epoch"]) != event["rollback_to"]:
            raise RuntimeError(f"Guard: no kept state of epoch {event['rollback_to']} to roll back to")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        method_state = {k: v for k, v in state["method"].items() if k != "options"}  # earlier remedies stay
        self.method.load_state_dict(method_state)
        self.method.set_options(**event["changes"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], next(self.model.parameters()).device)
        self.rolled_back()

    def _num_outputs(self) -> int:
        with torch.no_grad():
            was = self.model.training
            self.model.eval()
            assert self.probe is not None, "the guard's probe gives the model's input shape"
            n = self.model(self.probe.x[:1]).shape[-1]
            self.model.train(was)
        return n

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The record (rows, events) and the kept healthy state (keep=None), plain values and tensors."""
        import json

        state = {"rows": json.loads(json.dumps(self.rows)), "num_classes": self.num_classes or 0}
        if self._healthy is not None:
            state["healthy"] = self._healthy
        return state

    def load_state_dict(self, state: dict) -> None:
        self.rows[:] = [dict(r) for r in state.get("rows", [])]
        self.num_classes = int(state.get("num_classes") or 0) or self.num_classes
        if "healthy" in state:
            self._healthy = copy.deepcopy(state["healthy"])
        self.rolled_back()


def outcome(rows: list[dict], final_clean: float | None, chance: float | None) -> str:
    """The run's one guard outcome: 'did not learn' (final clean accuracy within NEAR_CHANCE of
    chance, whatever the guard did), 'gave up', 'recovered' (rolled back at least once, healthy at
    the end) or 'healthy'."""
    if final_clean is not None and chance is not None and final_clean <= chance + NEAR_CHANCE:
        return "did not learn"
    if gave_up(rows):
        return "gave up"
    return "recovered" if any(e[EVENT] == "recovery" for e in events(rows)) else "healthy"


def flag_line(epoch: int, reason: str, row: dict, monitor: COMonitor) -> str:
    """The console line of a flagged epoch."""
    what = "RUN STUCK" if is_stuck_only(reason) else "CATASTROPHIC OVERFITTING"
    return (
        f"{what} at epoch {epoch}: probe PGD accuracy {row['probe_pgd']:.3f} (best {monitor.best_pgd:.3f} at "
        f"epoch {monitor.best_epoch}), FGSM accuracy {row['probe_fgsm']:.3f}, clean {row['probe_clean']:.3f}. "
        f"{reason}."
    )


def describe(event: dict) -> str:
    """One line for the console and the report."""
    if event[EVENT] == "gave_up":
        ends = (
            f"; the run ends with the weights of its last healthy epoch, {event['rollback_to']} (early stopping)"
            if "rollback_to" in event
            else ""
        )
        return f"epoch {event['epoch']}: the guard gave up ({event['why']}){ends}; flagged: {event['reason']}"
    return (
        f"epoch {event['epoch']}: recovery {event['attempt']}: rolled back to epoch {event['rollback_to']} "
        f"({event['replayed_epochs']} epochs replayed); {event['remedy']}; flagged: {event['reason']}"
    )
