"""Free adversarial training (Free-AT): every minibatch replayed m times, one pass per replay.

Shafahi, Najibi, Ghiasi, Xu, Dickerson, Studer, Davis, Taylor, Goldstein, "Adversarial Training for
Free!", NeurIPS 2019. https://arxiv.org/abs/1904.12843

Threat model: L-inf ball of radius eps around x, pixels in [0, 1].
One perturbation delta (the shape of a batch, zero at the start) is carried over from replay to
replay AND from minibatch to minibatch. Each replay:
    x_adv = clip(x + delta, 0, 1)                         (delta a leaf that requires grad)
    one backward of CE(f(x_adv), y) gives the parameter gradient (optimizer step) and grad_delta
    delta <- clip(delta + step * sign(grad_delta), -eps, eps)
The single backward is the trainer's: `loss` builds x_adv from the delta leaf and keeps a handle
on it; the next `perturb` reads the leaf's .grad, which that backward filled, and takes the
step. (Under DDP this is still each rank's own input gradient: DDP's hooks all-reduce parameter
gradients only, never the input's.) A smaller batch (the last partial one) uses and updates the
first B rows of delta and leaves the others for the next full batch, as the official code does.

Arguments (defaults = the paper's CIFAR-10 setting, Free-8; the official ImageNet code uses m=4):
    m (8): replays per minibatch; the trainer takes m optimizer steps per minibatch and counts
        them in the learning-rate schedule.
    step_factor (1.0): step = step_factor * eps (official fgsm_step = clip_eps).
Epochs: a paper's epoch count is in *effective* passes (m optimizer steps per minibatch count as
m); divide it by m for train.epochs, as the official code does (epochs = ceil(epochs / m)).
delta is not checkpointed: a resumed run restarts it at zero.
Cost: 1 forward + 1 backward per replay, so m of each per minibatch (m=8: 4x FGSM-RS's cost per
pass over the data, half of it per optimizer step).

Example:
    atas train fmnist method.name=free train.epochs=2       # 2 passes x 8 replays
    atas train fmnist method.name=free method.m=4 train.epochs=3
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from atas.methods.base import Method, _same_tensor, register
from atas.values import ConfigError


@register
class Free(Method):
    name = "free"
    label = "Free-AT"
    cost = "m fwd + m bwd (1 + 1 per replay)"
    passes = (1, 1)  # per optimizer step (each replay is one)

    @dataclass
    class Options(Method.Options):
        m: int = 8
        step_factor: float = 1.0

    @classmethod
    def check_options(cls, o) -> None:
        super().check_options(o)
        if o.m < 1 or o.step_factor <= 0:
            raise ConfigError(f"need method.m >= 1 and method.step_factor > 0, got {o.m}, {o.step_factor}")

    def __init__(self, eps, options=None, epochs=None, **kwargs):
        super().__init__(eps, options, epochs, **kwargs)
        self.replays = self.opt.m
        self.delta: torch.Tensor | None = None  # [rows >= B, C, H, W], carried across batches
        self._delta_leaf: torch.Tensor | None = None  # the leaf the last `loss` trained on
        self._replay_x: torch.Tensor | None = None  # the minibatch being replayed (kept: its address stays ours)
        self._replays_done = 0
        self._warned_replays = False

    def _take_pending_step(self) -> None:
        """delta <- clip(delta + step * sign(grad), -eps, eps) with the grad of the last backward."""
        leaf, self._delta_leaf = self._delta_leaf, None
        if leaf is None or leaf.grad is None:  # no backward since the last `loss` (or none yet)
            return
        grad = leaf.grad
        # A non-finite gradient (fp16 GradScaler overflow: that optimizer step is skipped too)
        # leaves delta as it was instead of poisoning it with NaN.
        eps_t = self.eps_at(self.current_epoch)
        stepped = (leaf.detach() + self.opt.step_factor * eps_t * grad.sign()).clamp_(-eps_t, eps_t)
        assert self.delta is not None  # the leaf is a view of it
        self.delta[: len(leaf)] = torch.where(torch.isfinite(grad), stepped, leaf.detach())

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """The first B rows of delta, (re)allocating it when the image shape or device changes or
        the batch outgrows it (new rows start at zero)."""
        if self.delta is None or self.delta.shape[1:] != x.shape[1:] or self.delta.device != x.device:
            self.delta = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        elif len(x) > len(self.delta):
            extra = self.delta.new_zeros((len(x) - len(self.delta), *x.shape[1:]))
            self.delta = torch.cat([self.delta, extra])
        return self.delta[: len(x)]

    def method_state(self) -> dict:
        if self.delta is None:
            return {}
        self._take_pending_step()  # the step the next perturb() would take; same result, now saved
        return {"delta": self.delta}

    def load_method_state(self, state: dict) -> None:
        if "delta" in state:
            self.delta = state["delta"].float()

    def _count_replay(self, x: torch.Tensor) -> None:
        """Warn once when a new minibatch comes before the last one had its m replays: a loop that
        ignores atk.replays trains one pass per minibatch, which is not Free-AT."""
        if self._warned_replays:
            return
        prev = self._replay_x
        new = prev is None or not _same_tensor(prev, x)
        if new and prev is not None and self._replays_done < self.replays:
            # Only here compare values (one sync): the same batch may come as a fresh copy per replay.
            new = not (prev.shape == x.shape and prev.device == x.device and torch.equal(prev, x))
            if new:
                self._warned_replays, self._replay_x = True, None
                warnings.warn(
                    f"free: a new minibatch came after {self._replays_done} perturb() call(s) on the last "
                    f"one, but Free-AT replays each minibatch m={self.replays} times. Put the per-batch "
                    "lines in `for _ in range(atk.replays):`, or this trains one pass per minibatch "
                    "(not Free-AT).",
                    UserWarning,
                    stacklevel=4,
                )
                return
        self._replays_done = 1 if new else self._replays_done + 1
        self._replay_x = x

    def attack(self, model, x, y, state):
        self._count_replay(x)
        if self.delta is not None:
            self._take_pending_step()
        eps_t = self.eps_at(state.epoch)
        rows = self._rows(x)
        if eps_t < self.eps:  # a ramp (re)started: the carried delta may lie outside this epoch's ball
            rows.clamp_(-eps_t, eps_t)
        return (x + rows).clamp(0.0, 1.0)

    def training_loss(self, model, x_adv, y, x, state):
        # Rebuild x_adv from a fresh leaf so the trainer's backward also fills grad_delta.
        self._delta_leaf = self._rows(x).clone().requires_grad_(True)
        return super().training_loss(model, (x + self._delta_leaf).clamp(0.0, 1.0), y, x, state)
