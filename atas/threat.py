"""The L-inf threat model and the signed-gradient step, written once for every attack.

Pixels live in [0, 1] everywhere in `atas`; eps and step sizes are in the same unit (8/255 is
parsed once, in `atas.config`). Training methods (FGSM-RS, N-FGSM, PGD-AT, ATAS, ...) and the
evaluation attacks (FGSM, PGD-k with restarts) differ only in where they start and how big a
step they take; the ball, the projection and the step below are shared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from atas.values import ConfigError

# The BatchNorm modes an attack may run in (`bn_mode`, every method's option of that name).
BN_MODES = ("eval", "train")


class LinfBall:
    """The set {x' : ||x' - x||_inf <= eps, 0 <= x' <= 1} around a batch of clean images x."""

    def __init__(self, eps: float):
        if not 0.0 < eps <= 1.0:
            raise ValueError(f"eps must lie in (0, 1] (pixels in [0, 1]), got {eps}")
        self.eps = float(eps)

    def uniform(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """A perturbation drawn U(-scale*eps, scale*eps), the shape of x (not yet clipped)."""
        return (torch.rand_like(x) * 2 - 1) * (scale * self.eps)

    def random_start(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """x + U(-scale*eps, scale*eps), clipped to the image range."""
        return (x + self.uniform(x, scale)).clamp_(0.0, 1.0)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Nearest point of the ball: clip to [x - eps, x + eps], then to [0, 1]."""
        return torch.minimum(torch.maximum(x_adv, x - self.eps), x + self.eps).clamp_(0.0, 1.0)


def signed_step(x_adv: torch.Tensor, grad: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """x_adv + alpha * sign(grad); alpha is a float or a per-sample tensor of shape [B]."""
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(x_adv.dtype).view(-1, *([1] * (x_adv.dim() - 1)))
    return x_adv + alpha * grad.sign()


def input_grad(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the SUMMED cross-entropy w.r.t. the input, and the logits.

    The sum makes grad[i] exactly the gradient of sample i's own loss, whatever the batch size;
    a method that wants the official batch-mean scaling divides by B itself, in the open.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, [x], create_graph=create_graph)
    return grad, logits


@contextlib.contextmanager
def bn_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Run the attack with BatchNorm in `mode` ('eval': running statistics, as the official ATAS
    code; 'train': batch statistics, as Wong et al.'s FGSM-RS), then restore the previous mode."""
    if mode not in BN_MODES:
        raise ConfigError(f"bn mode must be 'eval' or 'train', got {mode!r}")
    was_training = model.training
    model.train(mode == "train")
    try:
        yield
    finally:
        model.train(was_training)
