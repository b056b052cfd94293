"""Catastrophic-overfitting (CO) monitor, fed by the per-epoch probe.

CO (Wong et al. 2020; Andriushchenko & Flammarion 2020) shows within an epoch or two: PGD accuracy
on held-out data collapses towards 0 while FGSM accuracy rises, often above clean accuracy (the
model has learnt to mask the single-step gradient). The monitor flags an epoch when

    a sharp fall of probe_pgd, either
        relative: probe_pgd < drop_ratio * best probe_pgd so far (and the best was meaningful,
                  >= min_best), or
        absolute: probe_pgd fell by more than abs_drop since the previous epoch (the early-stopping
                  rule of Wong et al. 2020, "Fast is better than free", with their 0.2; they
                  apply it to PGD-5 on a training minibatch, here it is the held-out probe)
    AND (probe_fgsm rose since the previous epoch OR probe_fgsm > probe_clean)
    AND probe_fgsm > probe_pgd  (a model that collapsed to a constant prediction has clean = FGSM =
                                 PGD accuracy: it failed to train, it did not overfit to FGSM)

or when the signature is there outright, whatever came before (CO can strike in epoch 1):

    probe_fgsm > probe_clean  AND  probe_pgd < signature_ratio * probe_clean

It never looks at the test set used for the final evaluation numbers beyond the fixed probe batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class COMonitor:
    drop_ratio: float = 0.5      # PGD accuracy below half its best ...
    min_best: float = 0.05       # ... of a best that was above chance-ish (else nothing to lose)
    abs_drop: float = 0.2        # ... or more than 0.2 below the previous epoch's (Wong et al.)
    signature_ratio: float = 0.5
    best_pgd: float = -1.0
    best_epoch: int = 0
    prev_fgsm: float | None = None
    prev_pgd: float | None = None
    flagged_epochs: list[int] = field(default_factory=list)

    def update(self, row: dict) -> dict:
        """Look at one epoch's metrics row; returns {'co': bool, 'best': bool} and records it."""
        if "probe_pgd" not in row:
            return {"co": False, "best": False}
        pgd, fgsm, clean = row["probe_pgd"], row["probe_fgsm"], row["probe_clean"]
        fgsm_up = self.prev_fgsm is not None and fgsm > self.prev_fgsm
        collapsed = ((self.best_pgd >= self.min_best and pgd < self.drop_ratio * self.best_pgd)
                     or (self.prev_pgd is not None and self.prev_pgd - pgd > self.abs_drop))
        signature = fgsm > clean and pgd < self.signature_ratio * clean
        co = bool((collapsed and (fgsm_up or fgsm > clean) and fgsm > pgd) or signature)
        best = pgd > self.best_pgd
        if best:
            self.best_pgd, self.best_epoch = pgd, row["epoch"]
        if co:
            self.flagged_epochs.append(row["epoch"])
        self.prev_fgsm, self.prev_pgd = fgsm, pgd
        return {"co": co, "best": best}

    def replay(self, rows: list[dict]) -> None:
        """Rebuild the state from logged rows (resume)."""
        for row in rows:
            self.update(row)

    @property
    def co_detected(self) -> bool:
        return bool(self.flagged_epochs)
