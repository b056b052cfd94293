"""What every training method shares: the registry, the per-batch state and the interface."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from atas.config import ConfigError
from atas.store import PerSampleStore
from atas.threat import LinfBall

METHODS: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> type["Method"]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(list_methods())}")
    return METHODS[name]


@dataclass
class BatchState:
    """What a method may look at besides (model, x, y): the batch's dataset indices, the
    1-based epoch, the per-sample store (methods with uses_store) and the batch's prior
    perturbation, already cropped/flipped like x (None for methods without a store)."""

    idx: torch.Tensor
    epoch: int
    store: PerSampleStore | None = None
    prior: torch.Tensor | None = None


class Method:
    """A training method: `perturb` makes x_adv, `loss` is what the optimizer minimises.

    Subclasses set `name`, `Options` (a dataclass whose defaults are the paper's), `cost`
    (forward/backward passes per step) and `uses_store` (True: the trainer gathers each batch's
    prior from the per-sample store and scatters x_adv - x back after the step).
    """

    name: ClassVar[str]
    cost: ClassVar[str] = ""
    uses_store: ClassVar[bool] = False
    # Optimizer steps per minibatch (Free-AT replays each minibatch m times; everyone else 1).
    replays: int = 1

    @dataclass
    class Options:
        pass

    def __init__(self, eps: float, options=None, epochs: int = 1):
        self.eps = float(eps)
        self.ball = LinfBall(eps)
        self.opt = options if options is not None else self.Options()
        if getattr(self.opt, "eps_ramp_epochs", 0) < 0:  # the option of the methods that offer `ball_at`
            raise ConfigError(f"method.eps_ramp_epochs must be >= 0 (0: no ramp), got {self.opt.eps_ramp_epochs}")
        self.epochs = epochs
        # Per-step numbers for the progress bar / logs, kept as tensors (no device sync here).
        self.stats: dict[str, torch.Tensor] = {}

    def state_dict(self) -> dict:
        """Tensors the method carries between steps (Free-AT's delta, FGSM-PGI's momentum), for
        checkpoints. Most methods carry nothing."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def ball_at(self, epoch: int, ramp_epochs: int) -> LinfBall:
        """The ball to train against in `epoch` (1-based): radius eps * min(1, epoch / ramp_epochs),
        a linear eps warm-up by epoch (ramp_epochs 0: the full eps from the start). Methods that
        offer `eps_ramp_epochs` use it for every eps-relative quantity of their step."""
        if ramp_epochs <= 0 or epoch >= ramp_epochs:
            return self.ball
        return LinfBall(self.eps * epoch / ramp_epochs)

    def on_epoch_start(self, epoch: int, store: PerSampleStore | None) -> None:
        """Called before epoch `epoch` (1-based) begins."""

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, state: BatchState) -> torch.Tensor:
        raise NotImplementedError

    def new_prior(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """What the trainer writes back into the store after the step (default: the perturbation)."""
        return x_adv - x

    def loss(self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, x: torch.Tensor,
             state: BatchState) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy on x_adv (model already in train mode); returns (loss, logits)."""
        logits = model(x_adv)
        return F.cross_entropy(logits.float(), y), logits
