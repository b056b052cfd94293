"""Catastrophic-overfitting (CO) monitor, fed by the per-epoch probe.

CO (Wong et al. 2020; Andriushchenko & Flammarion 2020) shows within an epoch or two: PGD accuracy
on held-out data collapses towards 0 while FGSM accuracy rises, often above clean accuracy (the
model has learnt to mask the single-step gradient). The monitor flags an epoch, with a reason, when

  collapse:  a sharp fall of probe_pgd, either
        relative: probe_pgd < drop_ratio * best probe_pgd so far (and the best was meaningful,
                  >= min_best), or
        absolute: probe_pgd fell by more than abs_drop since the previous epoch (the early-stopping
                  rule of Wong et al. 2020, "Fast is better than free", with their 0.2; they
                  apply it to PGD-5 on a training minibatch, here it is the held-out probe)
        AND (probe_fgsm rose since the previous epoch OR probe_fgsm > probe_clean)
        AND probe_fgsm > probe_pgd  (a model that collapsed to a constant prediction has clean =
                                     FGSM = PGD accuracy: it failed to train, it did not overfit)
  signature: the CO signature outright, whatever came before (CO can strike in epoch 1):
        probe_fgsm > probe_clean  AND  probe_pgd < signature_ratio * probe_clean
  stuck:     not CO but a failed run all the same: clean = FGSM = PGD probe accuracy (within
        stuck_tol) at most stuck_max, for `patience` epochs from the first (a model that collapsed
        to a constant prediction; reported apart from CO, flagged so nobody trusts it). A run that
        never learned is flagged at the end of its second epoch: no healthy run of the sweep had a
        constant prediction after an epoch, and every stuck one had it from the first.

CO can also come slowly, and hide behind masked gradients: at Fashion-MNIST eps 0.2 FGSM-RS ends
at half of PGD-AT's AutoAttack accuracy while the PGD-10 probe stays within 0.1 of its best
(docs/results.md, section 2). Two rules see it; they read the probe's stronger number, probe_pgd_worst
(a sample counts as robust only if neither the cross-entropy PGD-k nor a margin-loss PGD-k fools
it), and apply only to rows that have it (runs logged before it replay by the rules above alone):

  masked:  probe_pgd_worst < mask_ratio * probe_fgsm for `patience` epochs in a row, after
           the first `warmup_epochs` and after `hold_until` (the end of the run's eps ramp: early
           epochs of a healthy run, and epochs trained at a smaller eps, are not robust yet and
           look the same)
  decline: probe_pgd_worst < decline_ratio * its best so far (best >= min_best) for `patience`
           epochs in a row, while probe_fgsm stayed at least at its value at that best: robustness
           drains while the single-step attack keeps failing (an LR spike hurts both); also held
           until `hold_until`

The worst-case probe is the per-sample AND of a cross-entropy PGD-k (step eps/4) and a margin-loss
PGD-k with the evaluation's measured step rule (atas.evaluation.pgd_step: a cosine step from eps/2
at eps >= 0.1) and `train.probe_restarts` restarts: the step rule that brought PGD-50-10 within
about a point of AutoAttack on the sweep's models, at the probe's cost. Runs logged before it
(a margin PGD at a constant eps/4) replay with their own, weaker, numbers.

Cost: the whole probe, these additions included (margin PGD-k, one 3 x 512-image forward for the
local-linearity error logged as probe_lin_err), took 5.2-5.9% of a training epoch (wong_cnn,
Fashion-MNIST, 512 probe images, PGD-10, 2 CPU cores; benchmarks/probe_cost.py).
The thresholds were set from the sweep of docs/results.md section 2: at its end PGD-50-10 / FGSM
accuracy was >= 0.63 for every ATAS and PGD-AT run and <= 0.51 for every run whose AutoAttack
accuracy fell below half of PGD-AT's (constant-prediction runs aside), so mask_ratio 0.6 sits in
the gap; the probe's worst case is weaker than PGD-50-10, so the sweep re-run with the new keys is
what confirms it.

It never looks at the test set used for the final evaluation numbers beyond the fixed probe batch.

The probe itself is `Probe` (and the function `probe`) below: `atas train` and a user's own loop
(atas.Guard, docs/own-code.md) run the same one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from atas.evaluation.attacks import FGSM, PGD, pgd_step
from atas.linearity import local_linearity_error
from atas.threat import LinfBall


# --------------------------------------------------------------------------------------------
# The per-epoch probe
# --------------------------------------------------------------------------------------------
def probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, restarts: int = 1) -> dict:
    """Clean / FGSM / PGD-k accuracy on a fixed held-out batch: catastrophic overfitting shows as
    PGD accuracy collapsing while FGSM accuracy climbs (often above clean). Also a margin-loss
    PGD-k and the per-sample worst case of the two (masked cross-entropy gradients that fool the
    plain probe do not fool both), and the local-linearity error of the loss on the batch (Abad
    Rocamora et al. 2024, atas.linearity). The probe runs on its own fixed-seed RNG: it never
    shifts the training's random stream, and it attacks the same way every epoch, so its curves
    move only with the model."""
    was_training = model.training
    model.eval()
    out = {}
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(0)
        with torch.no_grad():
            out["probe_clean"] = (model(x).argmax(1) == y).float().mean().item()
            x_adv = FGSM(eps)(model, x, y)
            out["probe_fgsm"] = (model(x_adv).argmax(1) == y).float().mean().item()
        _, robust_ce = PGD(eps, steps=steps, restarts=1).run(model, x, y)
        # The margin loss with the evaluation's measured step rule (a cosine step from eps/2 at
        # eps >= 0.1, atas.evaluation.PGD_DEFAULTS): the probe's stronger half; see the module docstring.
        alpha, schedule, _, _ = pgd_step(eps)
        _, robust_margin = PGD(eps, steps=steps, alpha=alpha, schedule=schedule, loss="margin", restarts=restarts).run(
            model, x, y
        )
        with torch.no_grad():
            lin_err = local_linearity_error(model, x, y, LinfBall(eps))
    out["probe_pgd"] = robust_ce.float().mean().item()
    out["probe_pgd_margin"] = robust_margin.float().mean().item()
    out["probe_pgd_worst"] = (robust_ce & robust_margin).float().mean().item()
    out["probe_lin_err"] = lin_err.item()
    model.train(was_training)
    return out


class Probe:
    """The per-epoch probe on fixed held-out images, what the monitor reads (`probe` above).

    Args:
        x: held-out images [N, C, H, W], float in [0, 1] or uint8 (divided by 255); never training
            images (a probe on them cannot see the model overfit). A few hundred suffice: 512 cost
            about 5% of a Fashion-MNIST epoch (module docstring).
        y: their labels [N].
        eps: the L-inf radius the run trains for, in pixels ([0, 1] units; a fraction string works).
        steps (10): PGD steps; restarts (1): restarts of the margin-loss PGD.
        device: where to keep the batch (default: the model's, moved at the first call).
    Returns, called on a model: {probe_clean, probe_fgsm, probe_pgd, probe_pgd_margin,
    probe_pgd_worst, probe_lin_err} (accuracies as fractions), the keys `COMonitor.update` reads.

        probe = atas.Probe(x_val, y_val, eps=0.2)
        row = probe(model)      # {'probe_clean': 0.81, 'probe_fgsm': 0.62, 'probe_pgd': 0.55, ...}
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        eps,
        steps: int = 10,
        restarts: int = 1,
        device: torch.device | str | None = None,
    ):
        from atas.values import parse_fraction

        x, y = torch.as_tensor(x), torch.as_tensor(y)
        if x.dim() != 4 or y.dim() != 1 or len(x) != len(y) or not len(x):
            raise ValueError(
                f"Probe(x, y, eps): x must be images [N, C, H, W] and y their N labels, got x of shape "
                f"{tuple(x.shape)} and y of shape {tuple(y.shape)}"
            )
        if int(steps) < 1 or int(restarts) < 1:
            raise ValueError(f"Probe: steps and restarts must be >= 1, got steps={steps}, restarts={restarts}")
        self.x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
        if float(self.x.min()) < 0 or float(self.x.max()) > 1:
            raise ValueError(
                "Probe: images must be pixels in [0, 1] (or uint8); normalise inside the model, as "
                "atas.NormalizedModel does"
            )
        self.y = y.long()
        self.eps = parse_fraction(eps) if isinstance(eps, str) else float(eps)
        self.steps, self.restarts = int(steps), int(restarts)
        if device is not None:
            self.x, self.y = self.x.to(device), self.y.to(device)

    def __call__(self, model: nn.Module) -> dict:
        device = next(model.parameters()).device
        if self.x.device != device:
            self.x, self.y = self.x.to(device), self.y.to(device)
        return probe(model, self.x, self.y, self.eps, self.steps, self.restarts)

    def __repr__(self) -> str:
        return f"atas.Probe({len(self.x)} images, eps={self.eps:.6g}, steps={self.steps}, restarts={self.restarts})"


# --------------------------------------------------------------------------------------------
# The monitor
# --------------------------------------------------------------------------------------------


@dataclass
class COMonitor:
    drop_ratio: float = 0.5  # PGD accuracy below half its best ...
    min_best: float = 0.05  # ... of a best that was above chance-ish (else nothing to lose)
    abs_drop: float = 0.2  # ... or more than 0.2 below the previous epoch's (Wong et al.)
    signature_ratio: float = 0.5
    mask_ratio: float = 0.6  # masked: worst-case probe below 0.6 x FGSM accuracy ...
    decline_ratio: float = 0.8  # decline: worst-case probe below 0.8 x its best ...
    patience: int = 2  # ... for 2 epochs in a row
    warmup_epochs: int = 3  # the masked rule starts after epoch 3 ...
    hold_until: int = 0  # ... and after this epoch (the end of the eps ramp; set by the trainer)
    stuck_tol: float = 0.01  # stuck: clean, FGSM and PGD probe accuracies within 0.01 of each other
    stuck_max: float = 0.25  # ... and clean accuracy at most 0.25: a constant prediction
    stuck_run: int = 0
    best_pgd: float = -1.0
    best_epoch: int = 0
    prev_fgsm: float | None = None
    prev_pgd: float | None = None
    best_worst: float = -1.0
    fgsm_at_best_worst: float = 0.0
    masked_run: int = 0
    decline_run: int = 0
    flagged_epochs: list[int] = field(default_factory=list)
    reasons: dict[int, str] = field(default_factory=dict)

    def update(self, row: dict) -> dict:
        """Look at one epoch's metrics row; returns {'co': bool, 'best': bool, 'reason': str} and
        records it ('reason' is '' when not flagged, else why, with the numbers)."""
        if "probe_pgd" not in row:
            return {"co": False, "best": False, "reason": ""}
        pgd, fgsm, clean = row["probe_pgd"], row["probe_fgsm"], row["probe_clean"]
        reasons = []
        fgsm_up = self.prev_fgsm is not None and fgsm > self.prev_fgsm
        relative = self.best_pgd >= self.min_best and pgd < self.drop_ratio * self.best_pgd
        absolute = self.prev_pgd is not None and self.prev_pgd - pgd > self.abs_drop
        if (relative or absolute) and (fgsm_up or fgsm > clean) and fgsm > pgd:
            what = (
                f"below {self.drop_ratio:g} x its best {self.best_pgd:.3f} (epoch {self.best_epoch})"
                if relative
                else f"down {self.prev_pgd - pgd:.3f} in one epoch"
            )
            reasons.append(f"collapse: probe PGD {pgd:.3f} {what}, FGSM {fgsm:.3f}")
        if fgsm > clean and pgd < self.signature_ratio * clean:
            reasons.append(f"signature: FGSM {fgsm:.3f} > clean {clean:.3f}, PGD {pgd:.3f}")
        worst = row.get("probe_pgd_worst")
        if worst is not None:
            reasons += self._slow_rules(row["epoch"], worst, fgsm)
        stuck = clean <= self.stuck_max and max(clean, fgsm, pgd) - min(clean, fgsm, pgd) <= self.stuck_tol
        self.stuck_run = self.stuck_run + 1 if stuck else 0
        if self.stuck_run >= self.patience:
            reasons.append(
                f"stuck: clean {clean:.3f} = FGSM {fgsm:.3f} = PGD {pgd:.3f} for {self.stuck_run} "
                "epochs, a constant prediction (the run is not learning, not CO)"
            )
        best = pgd > self.best_pgd
        if best:
            self.best_pgd, self.best_epoch = pgd, row["epoch"]
        reason = "; ".join(reasons)
        if reason:
            self.flagged_epochs.append(row["epoch"])
            self.reasons[row["epoch"]] = reason
        self.prev_fgsm, self.prev_pgd = fgsm, pgd
        return {"co": bool(reason), "best": best, "reason": reason}

    def _slow_rules(self, epoch: int, worst: float, fgsm: float) -> list[str]:
        reasons = []
        held = epoch <= max(self.warmup_epochs, self.hold_until)
        masked = not held and worst < self.mask_ratio * fgsm
        self.masked_run = self.masked_run + 1 if masked else 0
        if self.masked_run >= self.patience:
            reasons.append(
                f"masked: worst-case probe {worst:.3f} < {self.mask_ratio:g} x FGSM {fgsm:.3f} "
                f"for {self.masked_run} epochs"
            )
        declined = (
            epoch > self.hold_until
            and self.best_worst >= self.min_best
            and worst < self.decline_ratio * self.best_worst
            and fgsm >= self.fgsm_at_best_worst
        )
        self.decline_run = self.decline_run + 1 if declined else 0
        if self.decline_run >= self.patience:
            reasons.append(
                f"decline: worst-case probe {worst:.3f} < {self.decline_ratio:g} x its best "
                f"{self.best_worst:.3f} for {self.decline_run} epochs, FGSM {fgsm:.3f} did not fall"
            )
        if worst > self.best_worst:
            self.best_worst, self.fgsm_at_best_worst = worst, fgsm
        return reasons

    def replay(self, rows: list[dict]) -> None:
        """Rebuild the state from logged rows (resume)."""
        for row in rows:
            self.update(row)

    @property
    def pending(self) -> bool:
        """A rule is counting towards a flag (the epoch is not clearly healthy)."""
        return bool(self.stuck_run or self.masked_run or self.decline_run)

    @property
    def co_detected(self) -> bool:
        return bool(self.flagged_epochs)


# --------------------------------------------------------------------------------------------
# Verdicts of a finished run (atas compare, its report)
# --------------------------------------------------------------------------------------------
# Robust accuracy below this fraction of clean accuracy at the final evaluation is a collapse: a
# robustly trained model keeps far more (PGD-AT: ~0.6 at CIFAR eps 8/255, ~0.55 at Fashion-MNIST eps
# 0.3, ~0.4 at CIFAR eps 16/255).
ROBUST_COLLAPSE = 0.1


def co_verdict(
    metrics: list[dict], accuracy: dict[str, float], hold_until: int = 0
) -> tuple[bool, list[int], bool | None]:
    """(CO detected, epochs the probe monitor flagged, final-evaluation signature or None when it
    could not be read). The signature: FGSM accuracy above clean accuracy, or the worst robust
    accuracy (PGD, AutoAttack) below ROBUST_COLLAPSE x clean accuracy (a model that kept its clean
    accuracy and lost all robustness after the probe's last look: SSAT on Fashion-MNIST at eps 0.3
    ended at clean 82%, PGD 0.6% with no probe flag at its last epoch). Either sign counts as CO.

    The monitor is replayed on the logged probe curve rather than read from the `co` column, so
    every run of a report is judged by the same (current) rule, whichever version trained it.
    hold_until: the end of the run's eps ramp, as the training monitor had it (atas.guard)."""
    monitor = COMonitor(hold_until=hold_until)
    monitor.replay(metrics)
    epochs = list(monitor.flagged_epochs)
    signature = accuracy["fgsm"] > accuracy["clean"] if "fgsm" in accuracy and "clean" in accuracy else None
    robust = [accuracy[k] for k in ("pgd", "aa") if accuracy.get(k) is not None]
    if robust and "clean" in accuracy and min(robust) < ROBUST_COLLAPSE * accuracy["clean"]:
        signature = True
    return bool(epochs) or bool(signature), epochs, signature


def co_reasons(metrics: list[dict], hold_until: int = 0) -> list[str]:
    """The monitor's reason per epoch ('' where it did not flag), replayed like `co_verdict`."""
    monitor = COMonitor(hold_until=hold_until)
    return [monitor.update(r)["reason"] for r in metrics]
