"""The epoch's running numbers of the training loop (atas.trainer): loss, accuracy, the first
non-finite step, and the stats a method logs, kept on the device so that logging never waits.
"""

from __future__ import annotations

from pathlib import Path

import torch

from atas.rundir import TrainingDiverged


class EpochTally:
    """The epoch's running numbers, kept on the device so that logging never waits for it: loss,
    accuracy, the first non-finite step, and mean/min/max of each stat the method logs
    (`Method.logged_stats`, e.g. ATAS's per-sample step size alpha). One tensor, laid out
    [loss*n, correct, n, k stat sums, k stat mins, k stat maxs], reduced over ranks in one go."""

    def __init__(self, method, device: torch.device):
        self.method, self.keys = method, list(method.logged_stats)
        k = len(self.keys)
        self.sums = torch.zeros(3 + 3 * k, device=device)
        self.sums[3 + k : 3 + 2 * k], self.sums[3 + 2 * k :] = float("inf"), float("-inf")
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)  # the first non-finite step
        self.bad_loss = torch.zeros((), device=device)  # and its loss
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
        return [
            (key, self.method.logged_stats[key], s[3 + i] / s[2], s[3 + k + i], s[3 + 2 * k + i])
            for i, key in enumerate(self.keys)
            if s[3 + i]
        ]

    def postfix(self) -> dict:
        """The progress bar's numbers (reads the device: call it at a sync point)."""
        s = self.sums.tolist()
        post = {"loss": f"{s[0] / s[2]:.3f}", "acc": f"{s[1] / s[2]:.3f}"}
        for key, unit, mean, lo, hi in self._stats(s):
            post[key] = (
                f"{mean * 255:.2f}/255 [{lo * 255:.1f},{hi * 255:.1f}]"
                if unit == "pixels"
                else f"{mean:.4g} [{lo:.4g},{hi:.4g}]"
            )
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


def check_finite(tally: EpochTally, epoch: int, ckpt_path: Path) -> None:
    bad = int(tally.bad_step)  # sync point
    if bad >= 0:
        kept = (
            f"the last good checkpoint {ckpt_path} (end of epoch {epoch - 1}) is kept"
            if ckpt_path.exists()
            else "no checkpoint had been written yet"
        )
        raise TrainingDiverged(
            f"the training loss became NaN/inf at epoch {epoch}, step {bad}; {kept}. Lower optim.lr, "
            "check the data range (pixels must be in [0, 1]), or resume with `atas train --resume RUN_DIR`.",
            epoch,
            bad,
            float(tally.bad_loss),
        )
