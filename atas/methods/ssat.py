"""SSAT: FGSM-RS whose perturbation is cut, per sample, at the first point along it that fools the model.

Kim, Lee, Lee, "Understanding Catastrophic Overfitting in Single-step Adversarial Training",
AAAI 2021. https://arxiv.org/abs/2010.01799
Official code: https://github.com/Harry24k/catastrophic-overfitting (defenses/trainers/co_adv_trainer.py).

Threat model: L-inf ball of radius eps around x, pixels in [0, 1].
One step, with c checkpoints:
    x_0    = clip(x + U(-eps, eps), 0, 1);       g = grad_x CE(f(x_0), y)
    delta  = project(x_0 + alpha * sign(g)) - x                          FGSM-RS's perturbation
    k_i    = 0                                     if f(x_0,i) misclassifies (train on the clean x_i)
             min{k in 1..c-1 : f(x_i + k/c delta_i) != y_i}, else c
    x_adv  = x + (k_i / c) delta_i      (k_i = c: the FGSM-RS point itself)
    loss   = CE(f(x_adv), y)
Catastrophic overfitting comes with a distorted decision boundary: the full FGSM step can jump
over the region where the model is wrong and land where it is right again, so training on it
teaches nothing. Checking the checkpoints x + k/c delta and keeping the first one that is already
misclassified takes, per sample, the smallest step that is adversarial. The c - 1 checkpoints
are classified as one batch of (c - 1) B images, in eval mode, without gradients, and the choice
is one argmax over the checkpoints: no per-sample loop, no host sync.

Arguments (defaults = the official train.py: PreActResNet-18, CIFAR-10, eps 8, --alpha 10, --c 3):
    alpha_factor (1.25): FGSM step alpha = alpha_factor * eps (official 10/255 at eps 8/255).
    c (3): number of checkpoints (an integer >= 2; the perturbation is cut at k/c).
    bn_mode ("eval"): BatchNorm mode of the FGSM attack (the official code attacks through
        torchattacks, which puts the model in eval mode). The checkpoints are always classified
        in eval mode (official), so that each image's verdict is its own.
    eps_ramp_epochs (0): the shared eps schedule; the start, alpha and the ball scale with eps_t.
Where the sources differ: the official code classifies only the checkpoints of samples still
undecided, in chunks of --inf-batch images (fewer forward passes when many are decided early);
here all (c - 1) B at once (the worst case of the official count, and no host sync). The FastAT
benchmark (fast_at/ssat.py, configs/cifar10/ssat.yaml: alpha 10/255, c 3) attacks in train mode and
smooths the labels (0.4) in both the attack and the loss; the default here attacks in eval mode,
as the official code, and smooths only the training loss (label_smoothing).
Cost: (c + 1) forward + 2 backward passes per step: the attack (1 + 1), the checkpoints (c - 1
forward of B images, no backward) and the training step (1 + 1); 4 forward + 2 backward at c = 3.

Example:
    atas train fmnist method.name=ssat
    atas train fmnist method.name=ssat method.c=4
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atas.methods.base import Method, register
from atas.threat import bn_mode, input_grad, signed_step
from atas.values import ConfigError


def first_fooling_checkpoint(correct_start: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """k_i in 0..c per sample: 0 where the start is misclassified, else the first k in 1..c-1 whose
    checkpoint is misclassified (wrong[k-1, i], shape [c - 1, B]), else c."""
    c = wrong.shape[0] + 1
    # A row of True for k = c, so that argmax (the first maximum) finds c when nothing earlier fools.
    hits = torch.cat([wrong, torch.ones_like(wrong[:1])]).to(torch.uint8)
    k = hits.argmax(0) + 1
    return torch.where(correct_start, k, torch.zeros_like(k)).clamp_(max=c)


@register
class SSAT(Method):
    name = "ssat"
    label = "SSAT"
    cost = "(c+1) fwd + 2 bwd (4 + 2 at c=3)"
    passes = (4, 2)
    # The per-sample size of the perturbation trained on, max_j |x_adv - x|: 0 for samples trained
    # on the clean image, eps for the full step (the official code records its mean as "Eps").
    logged_stats = {"delta": "pixels"}

    @dataclass
    class Options(Method.Options):
        alpha_factor: float = 1.25
        c: int = 3
        bn_mode: str = "eval"

    @classmethod
    def check_options(cls, o) -> None:
        super().check_options(o)
        if not 0 < o.alpha_factor <= 4:
            raise ConfigError(f"method.alpha_factor must lie in (0, 4] (a multiple of eps), got {o.alpha_factor}")
        if isinstance(o.c, bool) or not isinstance(o.c, int) or o.c < 2:
            raise ConfigError(f"method.c (the number of checkpoints) must be an integer >= 2, got {o.c!r}")
        if o.bn_mode not in ("eval", "train"):
            raise ConfigError(f"method.bn_mode must be 'eval' or 'train', got {o.bn_mode!r}")

    def passes_per_step(self):
        return (float(self.opt.c + 1), 2.0)

    def attack(self, model, x, y, state):
        o = self.opt
        ball = self.ball_at(state.epoch)
        x_start = ball.random_start(x)
        with bn_mode(model, o.bn_mode):
            grad, logits_start = input_grad(model, x_start, y)
        x_fgsm = ball.project(signed_step(x_start, grad, o.alpha_factor * ball.eps), x)
        delta = x_fgsm - x
        c = o.c
        # Checkpoints x + k * (delta / c), k = 1..c-1, as one batch [(c - 1) B, ...] (k-major).
        ks = torch.arange(1, c, device=x.device, dtype=x.dtype).view(-1, 1, *([1] * (x.dim() - 1)))
        checkpoints = (x.unsqueeze(0) + ks * (delta / c).unsqueeze(0)).flatten(0, 1)
        with bn_mode(model, "eval"), torch.no_grad():
            wrong = (model(checkpoints).argmax(1) != y.repeat(c - 1)).view(c - 1, len(x))
        k = first_fooling_checkpoint(logits_start.detach().argmax(1) == y, wrong)
        # Candidates [x, checkpoints..., x_fgsm] by k; the full step is x_fgsm itself (no rounding).
        candidates = torch.cat([x.unsqueeze(0), checkpoints.view(c - 1, *x.shape), x_fgsm.unsqueeze(0)])
        pick = k.view(1, -1, *([1] * (x.dim() - 1))).expand(1, *x.shape)
        x_adv = candidates.gather(0, pick).squeeze(0)
        self.stats = {"delta": (x_adv - x).abs().flatten(1).amax(1)}
        return x_adv.detach()
