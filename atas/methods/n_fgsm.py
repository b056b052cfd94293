"""N-FGSM: FGSM from a strongly noised point, without projecting back to the eps ball.

de Jorge, Bibi, Volpi, Sanyal, Torr, Rogez, Dokania, "Make Some Noise: Reliable and Efficient
Single-Step Adversarial Training", NeurIPS 2022. https://arxiv.org/abs/2202.01181

Threat model: trained against the L-inf ball of radius eps around x, pixels in [0, 1]; the
training point itself may lie OUTSIDE the ball (up to (noise_factor + step_factor) * eps away).
One step:
    eta     ~ U(-k eps, k eps),  x_noisy = clip(x + eta, 0, 1)
    x_adv   = clip(x_noisy + alpha * sign(grad at x_noisy), 0, 1)     no projection to the ball
That the perturbation is not clipped is the point of the paper: the noise, not the projection,
keeps the step from overfitting catastrophically.

Arguments (defaults of the paper and of pdejorge/N-FGSM train.py):
    noise_factor (2.0): k, the noise is U(-k eps, k eps). The paper uses 2 (PreActResNet-18) and
        4 for WideResNet-28-10 at eps 16/255.
    step_factor (1.0): step alpha = step_factor * eps (official --alpha 8 at eps 8).
    clip_delta (None): None = no projection (the paper). A number c clips x_adv - x to
        [-c eps, c eps] afterwards, as the official code's optional --clip (c=1: FGSM-RS's ball).
    bn_mode ("train"): BatchNorm mode while attacking; the official code attacks in train mode.
    eps_ramp_epochs (0): train against eps * min(1, epoch / eps_ramp_epochs); noise, step and clip
        scale with it (0: the full eps from the start, the paper's CIFAR protocol). The official
        code ramps eps from 0 over the first 5 epochs on SVHN, per iteration; this ramp is by
        epoch, like `pgd`'s. At Fashion-MNIST eps 0.2+ N-FGSM from scratch can collapse to a
        constant prediction (the noise alone reaches 2 eps = 0.4); a short ramp avoids that.
Cost: 2 forward + 2 backward per step (attack + training), the same as FGSM-RS.

Example:
    atas train fmnist method.name=n_fgsm
    atas train fmnist method.name=n_fgsm method.noise_factor=4
    atas train fmnist method.name=n_fgsm method.eps_ramp_epochs=3
"""

from __future__ import annotations

from dataclasses import dataclass

from atas.methods.base import Method, register
from atas.threat import LinfBall, bn_mode, input_grad, signed_step
from atas.values import ConfigError

MAX_NOISE = 0.5  # the largest noise amplitude the guard's remedy goes to, in pixels


@register
class NFGSM(Method):
    name = "n_fgsm"
    label = "N-FGSM"
    cost = "2 fwd + 2 bwd"

    @dataclass
    class Options(Method.Options):
        noise_factor: float = 2.0
        step_factor: float = 1.0
        clip_delta: float | None = None
        bn_mode: str = "train"

    @classmethod
    def check_options(cls, o) -> None:
        super().check_options(o)
        if o.noise_factor < 0 or o.step_factor <= 0:
            raise ConfigError(
                f"need method.noise_factor >= 0 and method.step_factor > 0, got {o.noise_factor} and {o.step_factor}"
            )
        if o.clip_delta is not None and o.clip_delta <= 0:
            raise ConfigError(f"method.clip_delta must be > 0 (a multiple of eps) or none, got {o.clip_delta}")

    def remedy(self, attempt):
        # de Jorge et al. 2022: stronger noise is what keeps N-FGSM clear of CO as eps (or the
        # model) grows (k = 2 at PRN18, 4 for WRN at eps 16/255): raise it by half. Noise beyond
        # half the pixel range drowns the image (at Fashion-MNIST eps 0.3, k = 3 and 4.5 left the
        # model at chance, docs/results.md): there the step shrinks instead, as for FGSM-RS.
        noise = self.opt.noise_factor * 1.5 if self.opt.noise_factor else 1.0
        if noise * self.eps <= MAX_NOISE:
            return {"noise_factor": round(noise, 6)}
        return {"step_factor": round(self.opt.step_factor * 0.8, 6)}

    def attack(self, model, x, y, state):
        ball = self.ball_at(state.epoch)
        x_noisy = self.start(x, ball)
        with bn_mode(model, self.opt.bn_mode):
            grad, _ = input_grad(model, x_noisy, y)
        return self.step(x_noisy, grad, x, ball)

    # The two halves of the step, shared by the methods built on N-FGSM (n_aaer).
    def start(self, x, ball):
        """Where the gradient is taken: x + U(-k eps, k eps), clipped to the image range."""
        k = self.opt.noise_factor
        return ball.random_start(x, scale=k) if k else x

    def step(self, x_noisy, grad, x, ball):
        """x_adv = clip(x_noisy + alpha * sign(grad), 0, 1), or projected to the clip_delta ball."""
        o = self.opt
        x_adv = signed_step(x_noisy, grad, o.step_factor * ball.eps)
        if o.clip_delta is not None:  # the optional clip is a ball of radius c*eps (at most the pixel range)
            return LinfBall(min(1.0, o.clip_delta * ball.eps)).project(x_adv, x).detach()
        return x_adv.clamp_(0.0, 1.0).detach()  # image range only, deliberately no eps ball
