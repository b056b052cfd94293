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
    cost = "2 fwd + 2 bwd"

    @dataclass
    class Options:
        alpha_factor: float = 1.25
        bn_mode: str = "train"

    def attack(self, model, x, y, state):
        x_start = self.ball.random_start(x)
        with bn_mode(model, self.opt.bn_mode):
            grad, _ = input_grad(model, x_start, y)
        return self.ball.project(signed_step(x_start, grad, self.opt.alpha_factor * self.eps), x).detach()
