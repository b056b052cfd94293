"""Weight averaging: an exponential moving average of a model's weights AND its BatchNorm buffers.

Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization", UAI 2018
(https://arxiv.org/abs/1803.05407); the exponential form used for adversarial training by Gowal et
al., "Uncovering the Limits of Adversarial Training against Norm-Bounded Adversarial Examples", 2020
(https://arxiv.org/abs/2010.03593), and by the FastAT benchmark (arXiv 2604.22853) for every method,
tau = 0.9995.

After every optimizer step, for every floating-point entry of the model's state_dict (parameters and
the BatchNorm running mean / running variance alike):

    theta_avg <- tau * theta_avg + (1 - tau) * theta

Integer buffers (BatchNorm's num_batches_tracked) are copied, not averaged: a counter has no mean
(the benchmark float-averages it and casts it back on load, which gives the same count up to rounding).
The average starts at the model's weights when the object is made and keeps copying them, step for
step, until `start_epoch`: from its first step on, the average is an average of weights trained from
start_epoch on (start_epoch=1, the default, averages from the first step, as the benchmark).
No warm-up of tau (the benchmark has none).

The averaged model is a deep copy of the model (`wa.module`), in eval mode, without gradients: it is
evaluated, attacked and exported like any model. state_dict()/load_state_dict() resume it bit for bit.

Example (docs/own-code.md):
    wa = atas.WeightAverage(model, tau=0.9995)
    for epoch in range(1, epochs + 1):
        for x, y, idx in atk.batches(loader, device):
            ...; optimizer.step()
            wa.update(epoch)
    atas.benchmark(wa.module, "cifar10", eps=8/255)
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from atas.values import ConfigError


def check_tau(tau: float, key: str = "train.wa_tau") -> None:
    """tau is the weight of the old average: in (0, 1); 0 (or off) is the caller's business."""
    if not 0.0 < float(tau) < 1.0:
        raise ConfigError(f"{key} must lie in (0, 1) (the benchmark's 0.9995; 0 turns weight averaging off), got {tau}")


class WeightAverage:
    """Exponential moving average of `model`'s state (weights and BatchNorm buffers).

    Arguments:
        model (nn.Module): the model being trained (unwrapped: not the DDP or compiled wrapper).
        tau (float): decay in (0, 1). Default 0.9995 (FastAT benchmark).
        start_epoch (int): first epoch whose steps are averaged (1-based); before it the average
            copies the weights. Default 1.
    Attributes: module (the averaged model), num_updates (averaged steps so far).
    """

    def __init__(self, model: nn.Module, tau: float = 0.9995, start_epoch: int = 1):
        check_tau(tau, "tau")
        if int(start_epoch) < 1:
            raise ConfigError(f"start_epoch must be >= 1 (1-based epochs), got {start_epoch}")
        self.tau, self.start_epoch = float(tau), int(start_epoch)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.num_updates = 0
        self._pair(model)

    def _pair(self, model: nn.Module) -> None:
        """The (average, model) tensor pairs, found once: the state_dict views share the storage."""
        mine, theirs = self.module.state_dict(), model.state_dict()
        if mine.keys() != theirs.keys():
            raise ValueError("WeightAverage: the model's state_dict keys changed since the average was made")
        self._source = model
        floats = [k for k in mine if mine[k].is_floating_point()]
        self._avg = [mine[k] for k in floats]
        self._raw = [theirs[k] for k in floats]
        self._avg_int = [mine[k] for k in mine if not mine[k].is_floating_point()]
        self._raw_int = [theirs[k] for k in mine if not mine[k].is_floating_point()]

    @torch.no_grad()
    def update(self, epoch: int | None = None, model: nn.Module | None = None) -> None:
        """One step: average (or, before start_epoch, copy) the model's current state."""
        if model is not None and model is not self._source:
            self._pair(model)
        if epoch is not None and epoch < self.start_epoch:
            torch._foreach_copy_(self._avg, self._raw)
        else:
            # tau * avg + (1 - tau) * raw, the hand formula, in the tensors' own dtype.
            torch._foreach_mul_(self._avg, self.tau)
            torch._foreach_add_(self._avg, self._raw, alpha=1.0 - self.tau)
            self.num_updates += 1
        for a, r in zip(self._avg_int, self._raw_int):
            a.copy_(r)

    def state_dict(self) -> dict:
        return {"tau": self.tau, "start_epoch": self.start_epoch, "num_updates": self.num_updates,
                "model": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if float(state["tau"]) != self.tau:
            raise ValueError(f"WeightAverage: the saved average used tau={state['tau']}, this one tau={self.tau}")
        self.module.load_state_dict(state["model"])  # in place: the pairs stay valid
        self.num_updates = int(state["num_updates"])
        self.start_epoch = int(state.get("start_epoch", self.start_epoch))

    def __repr__(self) -> str:
        return f"WeightAverage(tau={self.tau}, start_epoch={self.start_epoch}, num_updates={self.num_updates})"
