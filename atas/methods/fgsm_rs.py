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
from atas.values import ConfigError


def check_bn_mode(o) -> None:
    """method.bn_mode is the BatchNorm mode of the attack's passes: "train" or "eval"."""
    if o.bn_mode not in ("train", "eval"):
        raise ConfigError(f"method.bn_mode must be 'train' or 'eval', got {o.bn_mode!r}")


@register
class FGSMRS(Method):
    name = "fgsm_rs"
    label = "FGSM-RS"
    cost = "2 fwd + 2 bwd"
    prone_to_co = True  # Wong et al.: CO as alpha grows past ~1.25 eps

    @dataclass
    class Options(Method.Options):
        alpha_factor: float = 1.25
        bn_mode: str = "train"

    @classmethod
    def check_options(cls, o) -> None:
        super().check_options(o)
        if not o.alpha_factor > 0:
            raise ConfigError(f"method.alpha_factor must be > 0 (the step in units of eps), got {o.alpha_factor}")
        check_bn_mode(o)

    def attack(self, model, x, y, state):
        ball = self.ball_at(state.epoch)
        x_start = self.start(x, ball)
        with bn_mode(model, self.opt.bn_mode):
            grad, _ = input_grad(model, x_start, y)
        return self.step(x_start, grad, x, ball)

    # The two halves of the step, shared by the methods built on FGSM-RS (fgsm, zerograd, rs_aaer, ...).
    def start(self, x, ball):
        """Where the gradient is taken: x + U(-eps, eps), clipped to the image range."""
        return ball.random_start(x)

    def step(self, x_start, grad, x, ball):
        """x_adv = project(x_start + alpha * sign(grad)) onto the ball around x (detached)."""
        return ball.project(signed_step(x_start, grad, self.opt.alpha_factor * ball.eps), x).detach()

    def remedy(self, attempt):
        # Wong et al. 2020 (Fig. 3): CO sets in as alpha grows past ~1.25 eps; a smaller step
        # delays it (at CIFAR eps 12/255 they needed alpha 13/255, about 1.08 eps).
        return {"alpha_factor": round(self.opt.alpha_factor * 0.8, 6)}
