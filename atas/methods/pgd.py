"""PGD adversarial training (PGD-AT).

Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to Adversarial
Attacks", ICLR 2018. https://arxiv.org/abs/1706.06083

Threat model: L-inf ball of radius eps around x, pixels in [0, 1].
K steps: x_adv <- project(x_adv + alpha * sign(grad)), from a uniform random start.

Arguments (defaults as the robust-overfitting baseline of Rice et al. 2020):
    steps (10): K.
    alpha_factor (0.25): step alpha = alpha_factor * eps (2/255 at eps 8/255).
    random_start (True).
    bn_mode ("train"): BatchNorm mode while attacking.
    eps_ramp_epochs (0): train against eps * min(1, epoch / eps_ramp_epochs) (0: the full eps from
        the start, as the paper). At large eps (Fashion-MNIST 0.2+) PGD-AT from scratch can collapse
        to a constant prediction and never leave it; a short linear ramp avoids that.
Cost: K+1 forward + K+1 backward per step.

Example:
    atas train fmnist method.name=pgd method.steps=10
"""

from __future__ import annotations

from dataclasses import dataclass

from atas.methods.base import Method, register
from atas.threat import bn_mode, input_grad, signed_step
from atas.values import ConfigError


@register
class PGDAT(Method):
    name = "pgd"
    label = "PGD-AT"
    cost = "K+1 fwd + K+1 bwd"
    reference = True  # the robust baseline the report times and measures the others against

    @dataclass
    class Options(Method.Options):
        steps: int = 10
        alpha_factor: float = 0.25
        random_start: bool = True
        bn_mode: str = "train"

    @classmethod
    def check_options(cls, o) -> None:
        super().check_options(o)
        if o.steps < 1:
            raise ConfigError(f"method.steps must be >= 1, got {o.steps}")

    def passes_per_step(self):
        return (self.opt.steps + 1, self.opt.steps + 1)

    def attack(self, model, x, y, state):
        ball = self.ball_at(state.epoch)
        x_adv = ball.random_start(x) if self.opt.random_start else x.clone()
        alpha = self.opt.alpha_factor * ball.eps
        with bn_mode(model, self.opt.bn_mode):
            for _ in range(self.opt.steps):
                grad, _ = input_grad(model, x_adv, y)
                x_adv = ball.project(signed_step(x_adv, grad, alpha), x).detach()
        return x_adv
