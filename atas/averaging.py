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
        self._source = model
        self._names = self._tensors(model).keys()

    @staticmethod
    def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
        """Parameters and buffers by name, fetched afresh at every step: `model.to(device)` (Lightning
        moves the module after it is built) replaces buffer tensors, so views taken once would go stale."""
        out = {k: p.data for k, p in model.named_parameters()}
        out.update(model.named_buffers())
        return out

    @torch.no_grad()
    def update(self, epoch: int | None = None, model: nn.Module | None = None) -> None:
        """One step: average (or, before start_epoch, copy) the model's current state."""
        raw = self._tensors(model if model is not None else self._source)
        if raw.keys() != self._names:
            raise ValueError("WeightAverage: the model's parameters and buffers changed since the average was made")
        first = next(iter(raw.values()), None)
        if first is not None and next(self.module.parameters(), first).device != first.device:
            self.module.to(first.device)  # follow the model to its device
        avg = self._tensors(self.module)
        floats = [k for k in raw if raw[k].is_floating_point()]
        a, r = [avg[k] for k in floats], [raw[k] for k in floats]
        if epoch is not None and epoch < self.start_epoch:
            torch._foreach_copy_(a, r)
        else:
            # tau * avg + (1 - tau) * raw, the hand formula, in the tensors' own dtype.
            torch._foreach_mul_(a, self.tau)
            torch._foreach_add_(a, r, alpha=1.0 - self.tau)
            self.num_updates += 1
        for k in raw:
            if not raw[k].is_floating_point():  # num_batches_tracked: a counter, copied
                avg[k].copy_(raw[k])

    def state_dict(self) -> dict:
        return {
            "tau": self.tau,
            "start_epoch": self.start_epoch,
            "num_updates": self.num_updates,
            "model": self.module.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if float(state["tau"]) != self.tau:
            raise ValueError(f"WeightAverage: the saved average used tau={state['tau']}, this one tau={self.tau}")
        self.module.load_state_dict(state["model"])  # in place: the pairs stay valid
        self.num_updates = int(state["num_updates"])
        self.start_epoch = int(state.get("start_epoch", self.start_epoch))

    def __repr__(self) -> str:
        return f"WeightAverage(tau={self.tau}, start_epoch={self.start_epoch}, num_updates={self.num_updates})"
