"""ATAS: single-step adversarial training with a per-instance adaptive step size.

Huang, Fan, Liu, Zhang, Zhang, Salzmann, Süsstrunk, Wang, "Fast Adversarial Training With
Adaptive Step Size", IEEE TIP 32:6102-6114, 2023. https://arxiv.org/abs/2206.02417

Threat model: L-inf ball of radius eps around x, pixels in [0, 1].
Per instance i the store keeps a prior perturbation delta_i and v_i, an EMA of its squared
input-gradient norm. One step (docs/algorithm.md, section 3):
    x_start = clip(x + delta_i, 0, 1)                  (delta_i cropped/flipped like x)
    g_i     = grad of the CE at x_start (BN in eval mode)
    warm-up (epoch <= warmup_epochs): alpha_i = eps, v_i untouched
    after:  v_i <- beta v_i + (1 - beta) ||g_i||^2;  alpha_i = clamp(N / (1 + sqrt(v_i)/c), alpha_min, alpha_max)
    x_adv   = project(x_start + alpha_i sign(g_i));   delta_i <- x_adv - x   (written back by the trainer)
    delta is re-drawn U(-eps, eps) before every `reset_every`-th epoch except the last.

Arguments (defaults = the official code's CIFAR settings, commit 674b195):
    c (0.01), beta (0.5), alpha_min (4/255), alpha_max (14/255), warmup_epochs (5),
    reset_every (10; 0 = never), bn_mode ("eval").
    step_numerator ("official"): N = 16/255 whatever eps is, as the official code hard-codes
        (defect 1); "2eps": N = 2*eps, the natural generalisation to other eps (any multiple
        of eps, written as the PGD step is: "2eps", "1.5*eps", "eps/2").
    grad_norm ("batch_mean"): as the official code, ||g_i|| is the norm of the gradient of the
        batch-MEAN loss, i.e. the per-sample gradient / B (B = this batch's size, so a last partial
        batch is scaled differently: defect 8). "per_sample": ||per-sample gradient|| / ref_batch,
        independent of the batch size; with ref_batch=128 it equals the official default at B=128
        (equivalently, a per-sample c of c * ref_batch).
    ref_batch (128).
    step_scale (1.0): multiplies the numerator and both clamp bounds (and the warm-up step): every
        step shrinks by this factor. 1.0 is the official step, bitwise; the guard of
        `train.co_action=recover` lowers it after catastrophic overfitting (`remedy`).
    eps_ramp_epochs, eps_ramp_start: the training-eps schedule every method shares
        (atas.methods.base). Under a ramp the prior is clipped to the epoch's ball and the
        quantities written in units of eps (numerator 2eps, bounds with alpha_unit=eps, the
        warm-up step) follow eps_t; the absolute official ones (16/255, 4/255, 14/255) do not.
    alpha_unit ("absolute"): alpha_min/alpha_max in pixels, as the official code; "eps": as
        multiples of eps (the official bounds are 0.5 eps and 1.75 eps at 8/255), so one recipe
        can sweep eps.
Cost: 2 forward + 2 backward per step, the same as FGSM-RS.

Example:
    atas train cifar10-prn18-eps8            # the paper's CIFAR-10 PreActResNet-18 row
    atas train fmnist method.c=0.02
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from atas.methods.base import Method, register
from atas.threat import bn_mode, input_grad, signed_step
from atas.values import ConfigError, Frac, eps_multiple

OFFICIAL_NUMERATOR = 16 / 255


def _factor(step_numerator: str) -> float:
    """The coefficient of eps of a step numerator other than "official" (checked by check_options)."""
    factor = eps_multiple(step_numerator)
    if factor is None:
        raise ConfigError(f"method.step_numerator {step_numerator!r} is not a multiple of eps")
    return factor


@register
class ATAS(Method):
    name = "atas"
    label = "ATAS"
    cost = "2 fwd + 2 bwd"
    uses_store = True
    logged_stats = {"alpha": "pixels"}  # the per-sample step size, the point of the method
    prone_to_co = True
    claims_reference_robustness = True  # the paper: within a few points of PGD-AT, much faster

    @dataclass
    class Options(Method.Options):
        c: float = 0.01
        beta: float = 0.5
        alpha_min: Frac = field(default_factory=lambda: Frac("4/255"))
        alpha_max: Frac = field(default_factory=lambda: Frac("14/255"))
        alpha_unit: str = "absolute"
        warmup_epochs: int = 5
        reset_every: int = 10
        step_numerator: str = "official"
        grad_norm: str = "batch_mean"
        ref_batch: int = 128
        bn_mode: str = "eval"
        step_scale: float = 1.0

    # relative=True: the official step ratios at 8/255 (16/255 = 2 eps, 4/255 = 0.5 eps, 14/255 = 1.75 eps)
    # for any eps, as the fmnist recipes spell out.
    RELATIVE = {"step_numerator": "2eps", "alpha_unit": "eps", "alpha_min": 0.5, "alpha_max": 1.75}

    def __init__(self, eps, options=None, epochs=None, *, relative: bool = False, **kwargs):
        if relative:
            if options is not None:
                raise TypeError(
                    "ATAS(relative=True) sets step_numerator, alpha_unit, alpha_min and alpha_max: give "
                    "the other options as keywords, not options="
                )
            kwargs = {**self.RELATIVE, **kwargs}  # an option given by name still wins
        super().__init__(eps, options, epochs, **kwargs)
        self._warn_if_it_cannot_adapt()
        self._batch_checked = False  # the batch-size check of the first batch (`_check_batch_size`)
        self._epochs_checked = False  # the epochs= check of the first batch

    @classmethod
    def check_options(cls, o) -> None:
        super().check_options(o)
        if o.step_numerator != "official" and not (eps_multiple(o.step_numerator) or 0) > 0:
            raise ConfigError(
                f"method.step_numerator must be 'official' (16/255) or a multiple of eps such as '2eps', "
                f"got {o.step_numerator!r}"
            )
        if o.grad_norm not in ("batch_mean", "per_sample"):
            raise ConfigError(f"method.grad_norm must be 'batch_mean' or 'per_sample', got {o.grad_norm!r}")
        if o.alpha_unit not in ("absolute", "eps"):
            raise ConfigError(f"method.alpha_unit must be 'absolute' or 'eps', got {o.alpha_unit!r}")
        if not 0 < o.alpha_min <= o.alpha_max:
            raise ConfigError(f"need 0 < method.alpha_min <= method.alpha_max, got {o.alpha_min!r}, {o.alpha_max!r}")
        if o.c <= 0 or not 0 <= o.beta < 1:
            raise ConfigError(f"need method.c > 0 and 0 <= method.beta < 1, got c={o.c}, beta={o.beta}")
        for key, zero in (("warmup_epochs", "no warm-up"), ("reset_every", "never")):
            if getattr(o, key) < 0:
                raise ConfigError(f"method.{key} must be >= 0 (0: {zero}), got {getattr(o, key)}")
        if o.ref_batch < 1:
            raise ConfigError(
                f"method.ref_batch (the batch size grad_norm=per_sample matches) must be >= 1, got {o.ref_batch}"
            )
        if not 0 < o.step_scale <= 1:
            raise ConfigError(f"method.step_scale must lie in (0, 1], got {o.step_scale}")

    def step_rule(self, eps_t: float) -> tuple[float, float, float]:
        """(numerator, alpha_min, alpha_max) at training radius eps_t: the quantities written in
        units of eps (numerator 2eps, bounds with alpha_unit=eps) follow eps_t; all three are
        scaled by step_scale (1: the official step, bitwise)."""
        o = self.opt
        unit = eps_t if o.alpha_unit == "eps" else 1.0
        # "2eps" is read by the one grammar of numbers in units of eps (atas.values): 2.0 * eps_t, the
        # same float as 2 * eps_t.
        numerator = OFFICIAL_NUMERATOR if o.step_numerator == "official" else _factor(o.step_numerator) * eps_t
        scale = o.step_scale
        return numerator * scale, float(o.alpha_min) * unit * scale, float(o.alpha_max) * unit * scale

    def _warn_if_it_cannot_adapt(self) -> None:
        """The faithful defaults are the official CIFAR settings for eps 8/255 and a 30-epoch run; say so
        when they leave nothing to adapt (kept, not changed: the shipped recipes reproduce the paper)."""
        o = self.opt
        if self.epochs is not None and o.warmup_epochs >= self.epochs:
            warnings.warn(
                f"atas: warmup_epochs={o.warmup_epochs} covers the whole run (epochs={self.epochs}): every "
                "step is alpha = eps and the adaptive step size never starts. Set warmup_epochs below "
                "epochs (method.warmup_epochs=0 in a config), or train longer.",
                UserWarning,
                stacklevel=3,
            )
        # The largest step the rule can take (a zero gradient): the numerator, clamped to the bounds.
        numerator, alpha_min, alpha_max = self.step_rule(self.eps)
        largest = min(max(numerator, alpha_min), alpha_max)
        if largest < self.eps * (1 - 1e-6):
            warnings.warn(
                f"atas: the largest step this configuration can take is {largest * 255:.3g}/255 (alpha_max="
                f"{o.alpha_max}, alpha_unit={o.alpha_unit!r}, step_numerator={o.step_numerator!r}), below "
                f"eps = {self.eps * 255:.3g}/255, so no single step can reach the ball's edge. The defaults "
                "are the official code's constants for eps 8/255; for steps that scale with eps use "
                "atas.ATAS(eps, relative=True) (in a config: method.step_numerator=2eps "
                "method.alpha_unit=eps method.alpha_min=0.5 method.alpha_max=1.75).",
                UserWarning,
                stacklevel=3,
            )

    def _check_epochs(self) -> None:
        """Without epochs= (a loop of one's own), the warm-up check above is skipped: a run of
        warmup_epochs epochs or fewer would step alpha = eps throughout, silently. Said at the first
        batch (where the object is used to train, not merely built)."""
        self._epochs_checked = True
        o = self.opt
        if self.epochs is None and o.warmup_epochs > 0:
            warnings.warn(
                f"atas: epochs was not given (atas.ATAS(eps, ..., epochs=N)), so the warm-up is not "
                f"checked against the run's length: the first warmup_epochs={o.warmup_epochs} epochs step "
                f"with alpha = eps and the adaptive step starts at epoch {o.warmup_epochs + 1}, so a run of "
                f"{o.warmup_epochs} epochs or fewer never adapts; the prior reset before the last epoch is "
                "not skipped either. Pass epochs=<the number of epochs you train> (and warmup_epochs "
                "below it for a short run).",
                UserWarning,
                stacklevel=4,
            )

    def _check_batch_size(self, grad: torch.Tensor, eps_t: float) -> None:
        """grad_norm="batch_mean" (the official rule) divides every gradient norm by the batch size
        B, so c, tuned at batch ref_batch, acts as c * B / ref_batch at any other B: the steps move
        toward alpha_max above ref_batch (few samples adapt) and toward alpha_min below it. Said
        once, at the first batch, with the factor and this batch's mean step under both scalings."""
        self._batch_checked = True
        o, b = self.opt, len(grad)
        if o.grad_norm != "batch_mean" or b == o.ref_batch:
            return
        numerator, alpha_min, alpha_max = self.step_rule(eps_t)
        with torch.no_grad():  # the first update of v from 0: sqrt(v) = sqrt(1 - beta) * ||g|| * scale
            norm = grad.flatten(1).float().pow(2).sum(1).sqrt() * (1 - o.beta) ** 0.5

            def mean_alpha(scale: float) -> float:
                return float((numerator / (1 + norm * scale / o.c)).clamp(alpha_min, alpha_max).mean()) / eps_t

            here, reference = mean_alpha(1 / b), mean_alpha(1 / o.ref_batch)
        warnings.warn(
            f"atas: grad_norm='batch_mean' (the official rule) at batch size {b}, not the "
            f"ref_batch={o.ref_batch} its c={o.c:g} was tuned at: every gradient norm in alpha = N / (1 + "
            f"||g|| / c) is {o.ref_batch}/{b} = {o.ref_batch / b:.3g}x the reference's, as if c were "
            f"{o.c * b / o.ref_batch:.3g}; on this first batch the mean step after the warm-up would be "
            f"{here:.3g} eps instead of {reference:.3g} eps at batch {o.ref_batch} (steps move toward "
            f"{'alpha_max: fewer samples adapt' if b > o.ref_batch else 'alpha_min'}). Set "
            "method.grad_norm=per_sample (atas.ATAS(..., grad_norm='per_sample')) for a step that does "
            f"not depend on the batch size (the official one at batch {o.ref_batch}); see "
            "docs/own-code.md.",
            UserWarning,
            stacklevel=4,
        )

    @property
    def last_step_sizes(self) -> torch.Tensor | None:
        """Per-sample step size alpha of the last perturb() batch, in pixels (eps during the warm-up):
        a detached copy, None before the first batch."""
        alpha = self.stats.get("alpha")
        return None if alpha is None else alpha.detach().clone()

    # The step rule at the full eps (read-only; under an eps ramp, step_rule(eps_at(epoch)) is the epoch's).
    numerator = property(lambda self: self.step_rule(self.eps)[0])
    alpha_min = property(lambda self: self.step_rule(self.eps)[1])
    alpha_max = property(lambda self: self.step_rule(self.eps)[2])

    def on_epoch_start(self, epoch, store):
        every = self.opt.reset_every
        if every and epoch % every == 0 and epoch != self.epochs:
            self.reset_store(store)

    def step_size(
        self, grad: torch.Tensor, grad_sq_ema: torch.Tensor, eps_t: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha [B], new v [B]) from the per-sample gradients of the summed loss, at training
        radius eps_t (default: eps)."""
        o = self.opt
        numerator, alpha_min, alpha_max = self.step_rule(self.eps if eps_t is None else eps_t)
        scale = 1.0 / (len(grad) if o.grad_norm == "batch_mean" else o.ref_batch)
        grad_sq = grad.flatten(1).float().pow(2).sum(1) * scale**2  # fp32 even under AMP
        v = o.beta * grad_sq_ema + (1 - o.beta) * grad_sq
        alpha = (numerator / (1 + v.sqrt() / o.c)).clamp(alpha_min, alpha_max)
        return alpha, v

    def remedy(self, attempt):
        # Huang et al.: CO comes from instances whose step is too large for their gradient norm;
        # the remedy shrinks every step (numerator and clamp) by a quarter per recovery.
        return {"step_scale": round(self.opt.step_scale * 0.75, 6)}

    def attack(self, model, x, y, state):
        ball = self.ball_at(state.epoch)
        prior = state.prior
        if ball.eps < self.eps:  # an eps ramp: a prior from a larger ball is brought into this one
            prior = prior.clamp(-ball.eps, ball.eps)
        x_start = (x + prior).clamp(0.0, 1.0)
        with bn_mode(model, self.opt.bn_mode):
            grad, _ = input_grad(model, x_start, y)
        if not self._batch_checked:
            self._check_batch_size(grad, ball.eps)
        if not self._epochs_checked:
            self._check_epochs()
        if state.epoch <= self.opt.warmup_epochs:
            alpha = torch.full((len(x),), ball.eps * self.opt.step_scale, device=x.device)
        else:
            alpha, v = self.step_size(grad, state.store.gather_grad_sq_ema(state.idx), ball.eps)
            state.store.scatter_grad_sq_ema(state.idx, v)
        self.stats = {"alpha": alpha.detach()}
        return ball.project(signed_step(x_start, grad, alpha), x).detach()
