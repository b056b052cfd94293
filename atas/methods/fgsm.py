"""FGSM-AT: adversarial training on the fast gradient sign step taken from x itself (no random start).

Goodfellow, Shlens, Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015.
https://arxiv.org/abs/1412.6572 ; run as the zero-initialised FGSM baseline of Wong, Rice, Kolter,
"Fast is better than free", ICLR 2020 (https://arxiv.org/abs/2001.03994) and as `fgsm_at` of the
FastAT benchmark (fzjcdt/FastAT_Benchmark, fast_at/fgsm_at.py).

Threat model: L-inf ball of radius eps around x, pixels in [0, 1].
One step:
    x_adv = project(x + alpha * sign(grad_x CE(f(x), y))),   alpha = alpha_factor * eps
    loss  = CE(f(x_adv), y)
From x, a step alpha <= eps needs no projection to the ball (only the clip to [0, 1]); alpha > eps
is cut back to eps by the projection, so alpha_factor >= 1 all give the same attack.

Arguments (defaults = the benchmark's fgsm_at, step eps, as Goodfellow et al. and Wong et al.'s
zero-init FGSM):
    alpha_factor (1.0): step alpha = alpha_factor * eps.
    bn_mode ("train"): BatchNorm mode while attacking (the benchmark attacks in train mode).
The benchmark's attack differentiates its training criterion (label smoothing 0.4 there); ours the
plain cross-entropy, as every attack in `atas` (the training loss has the run's label_smoothing).
Catastrophic overfitting is the expected failure (Wong et al. 2020, Fig. 3; FGSM-AT overfits at
CIFAR eps 8/255): this is the baseline the other single-step methods remedy.
Cost: 2 forward + 2 backward per step (attack + training), as FGSM-RS.

Example:
    atas train fmnist method.name=fgsm
    atas train fmnist method.name=fgsm method.alpha_factor=0.8
"""

from __future__ import annotations

from dataclasses import dataclass

from atas.methods.base import register
from atas.methods.fgsm_rs import FGSMRS


@register
class FGSMAT(FGSMRS):
    name = "fgsm"
    label = "FGSM-AT"
    cost = "2 fwd + 2 bwd"
    prone_to_co = True  # the method the whole field's remedies are for

    @dataclass
    class Options(FGSMRS.Options):
        alpha_factor: float = 1.0

    def start(self, x, ball):
        return x  # no random start: the gradient is taken at the clean image

    # remedy (inherited from FGSM-RS): a smaller step, Wong et al.'s remedy for FGSM-type training.
