"""FGSM with a random start (FGSM-RS).

Wong, Rice, Kolter, "Fast is better than free: Revisiting adversarial training", ICLR 2020.
https://arxiv.org/abs/2001.03994

Threat model: L-inf ball of radius eps around x, pixels in [0, 1].
One step: delta ~ U(-eps, eps); x_adv = project(x + delta + alpha * sign(grad at x + delta)).

Arguments (paper defaults):
    alpha_factor (1.25): step alpha = alpha_factor * eps.
    bn_mode ("train"): BatchNorm mode while attacking; Wong et al. attack in train mode.
Cost: 2 forward + 2 backward per step (attack + training).

Example:
    atas train fmnist method.name=fgsm_rs
"""
from __future__ import annotations

from dataclasses import dataclass

from atas.methods.base import Method, register
from atas.threat import bn_mode, input_grad, signed_step


@register
class FGSMRS(Method):
    name = "fgsm_rs"
    label = "FGSM-RS"
    cost = "2 fwd + 2 bwd"
    prone_to_co = True   # Wong et al.: CO as alpha grows past ~1.25 eps

    @dataclass
    class Options(Method.Options):
        alpha_factor: float = 1.25
        bn_mode: str = "train"

    def attack(self, model, x, y, state):
        ball = self.ball_at(state.epoch)
        x_start = ball.random_start(x)
        with bn_mode(model, self.opt.bn_mode):
            grad, _ = input_grad(model, x_start, y)
        return ball.project(signed_step(x_start, grad, self.opt.alpha_factor * ball.eps), x).detach()

    def remedy(self, attempt):
        # Wong et al. 2020 (Fig. 3): CO sets in as alpha grows past ~1.25 eps; a smaller step
        # delays it (at CIFAR eps 12/255 they needed alpha 13/255, about 1.08 eps).
        return {"alpha_factor": round(self.opt.alpha_factor * 0.8, 6)}
