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
undid stay in the log, marked "discarded": true. The option changes live only in these events: a
resumed run re-applies them, so a kill at any point resumes to the same final weights.
"""
from __future__ import annotations

from atas.monitor import COMonitor

EVENT = "event"
LONGER_RAMP = 2     # epochs a restart adds to the eps ramp
GENERIC_RAMP = 3    # the ramp a method without a remedy of its own restarts with, if it had none


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
    return (not verdict["co"] and not monitor.pending
            and row.get("probe_clean", 1.0) >= 2.0 / max(num_classes, 2))


def is_stuck_only(reason: str) -> bool:
    """Whether a monitor's reason (its rules joined by "; ") names only the stuck rule (a constant
    prediction): a run that never learned, not catastrophic overfitting."""
    return all(part.startswith("stuck") for part in reason.split("; "))


class Guard:
    def __init__(self, max_recoveries: int, budget_epochs: int):
        self.max_recoveries, self.budget_epochs = max_recoveries, budget_epochs

    def plan(self, rows: list[dict], epoch: int, reason: str, last_healthy: int, method) -> dict:
        """The event for epoch `epoch`, flagged for `reason`: a recovery (rollback target, option
        changes, what was done) or `gave_up` (why not)."""
        past = [e for e in events(rows) if e[EVENT] == "recovery"]
        replayed = sum(e["replayed_epochs"] for e in past)
        replay = epoch - last_healthy
        base = {"epoch": epoch, "reason": reason}
        if len(past) >= self.max_recoveries:
            return {EVENT: "gave_up", **base,
                    "why": f"{len(past)} recoveries already (train.max_recoveries={self.max_recoveries})"}
        if replayed + replay > self.budget_epochs:
            return {EVENT: "gave_up", **base,
                    "why": f"rolling back to epoch {last_healthy} would replay {replay} epochs, but only "
                           f"{self.budget_epochs - replayed} of the budget of {self.budget_epochs} are left "
                           "(train.recover_budget_epochs)"}
        o = method.opt
        changes = {} if is_stuck_only(reason) or last_healthy == 0 else method.remedy(len(past) + 1)
        if changes:
            remedy = "the method's own: " + ", ".join(f"{k} {getattr(o, k)} -> {v}" for k, v in changes.items())
        elif is_stuck_only(reason) or last_healthy == 0:
            ramp = o.eps_ramp_epochs + LONGER_RAMP
            changes = {"eps_ramp_epochs": ramp, "eps_ramp_start": last_healthy + 1}
            remedy = (f"restart from {'the initial weights' if last_healthy == 0 else f'epoch {last_healthy}'} "
                      f"with a longer eps ramp ({o.eps_ramp_epochs} -> {ramp} epochs)")
        else:
            ramp = o.eps_ramp_epochs or GENERIC_RAMP
            changes = {"eps_ramp_epochs": ramp, "eps_ramp_start": last_healthy + 1}
            remedy = (f"generic (the method has no remedy of its own): a {ramp}-epoch eps ramp from epoch "
                      f"{last_healthy + 1}")
        return {EVENT: "recovery", **base, "attempt": len(past) + 1, "rollback_to": last_healthy,
                "replayed_epochs": replay, "changes": changes, "remedy": remedy}


def describe(event: dict) -> str:
    """One line for the console and the report."""
    if event[EVENT] == "gave_up":
        return f"epoch {event['epoch']}: the guard gave up ({event['why']}); flagged: {event['reason']}"
    return (f"epoch {event['epoch']}: recovery {event['attempt']}: rolled back to epoch {event['rollback_to']} "
            f"({event['replayed_epochs']} epochs replayed); {event['remedy']}; flagged: {event['reason']}")
