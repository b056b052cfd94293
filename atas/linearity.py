"""The local-linearity error E_lin of a loss on the L-inf ball: ELLE's penalty and the CO probe's measure.

Abad Rocamora, Liu, Chrysos, Olmos, Cevher, "Efficient local linearity regularization to overcome
catastrophic overfitting", ICLR 2024. https://arxiv.org/abs/2401.11618

    x_a, x_b ~ clip(x + U(-eps, eps), 0, 1),   t ~ U(0, 1) per sample,   x_c = (1 - t) x_a + t x_b
    E_lin    = mean_i [CE(x_c) - ((1 - t) CE(x_a) + t CE(x_b))]^2

A loss that is affine on the ball has E_lin = 0; catastrophic overfitting bends it inside the ball.
Neutral ground: the ELLE methods (atas.methods.elle) train on it, the per-epoch probe
(atas.monitor.Probe) logs it, and neither imports the other.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from atas.threat import LinfBall


def triplet(x: torch.Tensor, ball: LinfBall) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_abc, t): x_abc = [x_a; x_b; x_c] of shape [3B, ...] with x_a, x_b uniform in the ball
    and x_c = (1 - t) x_a + t x_b, t ~ U(0, 1) of shape [B] (one per sample)."""
    x_ab = ball.random_start(torch.cat([x, x]))
    x_a, x_b = x_ab.chunk(2)
    t = torch.rand(len(x), device=x.device, dtype=x.dtype)
    t_ = t.view(-1, *([1] * (x.dim() - 1)))
    return torch.cat([x_ab, (1 - t_) * x_a + t_ * x_b]), t


def linearity_error(losses: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """mean_i [l_c - ((1 - t) l_a + t l_b)]^2 from the per-sample losses [l_a; l_b; l_c] ([3B]):
    0 for a loss that is affine along every segment x_a -> x_b."""
    dtype = torch.promote_types(losses.dtype, torch.float32)  # half precision is too coarse for a square
    l_a, l_b, l_c = losses.to(dtype).chunk(3)
    t = t.to(dtype)
    return (l_c - ((1 - t) * l_a + t * l_b)).square().mean()


def local_linearity_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ball: LinfBall) -> torch.Tensor:
    """E_lin of the cross-entropy of `model` at (x, y) for one random triplet per sample: one
    forward of 3B images (differentiable; call under no_grad to only measure it)."""
    x_abc, t = triplet(x, ball)
    logits = model(x_abc)
    losses = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y.repeat(3), reduction="none")
    return linearity_error(losses, t)
