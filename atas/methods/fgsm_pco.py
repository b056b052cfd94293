"""FGSM-PCO: FGSM from the sample's previous perturbation, fused with it by an adaptive weight.

Wang, Wang, Tian, Jin, "Preventing Catastrophic Overfitting in Fast Adversarial Training: A
Bi-level Optimization Perspective", ECCV 2024. https://arxiv.org/abs/2407.12443
Official code: https://github.com/HandingWangXDGroup/FGSM-PCO (FGSM-PCO.py).

Threat model: L-inf ball of radius eps around x, pixels in [0, 1]; the training input x_new may
lie up to beta * eps from x (1.5 eps at the defaults), as in the official code.
Per training instance i: delta_i, its perturbation of the previous epoch (the per-sample store's
prior, cropped/flipped like x; in the first epoch random corners alpha * sign(U(-eps, eps))).
One step:
    x_0     = clip(x + delta, 0, 1);       g = grad_x LS-CE(f(x_0), y)
    c       = clip(1 - softmax(f(x_0))_y, 0, 1)                    per sample: the fusion weight
    d_fgsm  = project(x + delta + alpha * sign(g)) - x             FGSM from the prior, in the ball
    x_new   = clip(c * x_0 + (1 - c) * (x + beta * d_fgsm), 0, 1)  the fused adversarial example
    delta  <- d_fgsm                                               (written back to the store)
    loss    = LS-CE(f(x_new), y) + lam * | MSE(f(x + d_fgsm), f(x_0)) - MSE(f(x + d_fgsm), f(x_new)) |
A sample the model still classifies well at its prior (c near 0) trains on the stronger
beta-scaled FGSM point; one the prior already fools (c near 1) trains on the prior itself, so the
inner maximisation never collapses to a point the model has learned to ignore (the paper's
"collapse of the inner optimisation" behind catastrophic overfitting). The MSE terms keep the
logits at x_new as far from those at the current FGSM point as the prior's are. As in the official
code, c keeps its graph: the training gradient also flows through c into f(x_0) (an ordinary
backward through the attack's kept forward; no double backprop).
LS-CE: cross-entropy against targets with ls_factor on the true class and the rest spread evenly
(official: 0.6, in the attack and the training loss alike); `label_smoothing` smooths those
targets once more in the training loss (the benchmark's CrossEntropyLoss(label_smoothing=0.4) on
the 0.6 targets).

Arguments (defaults = the official CIFAR-10 script: ResNet-18, 110 epochs, lr 0.1 x0.1 at 100 and
105, batch 128; the FastAT benchmark uses the same method values):
    lam (10.0): weight of the |MSE - MSE| term (hard-coded 10 in the official code; benchmark lamda).
    beta (1.5): scale of the FGSM perturbation in the fused example (hard-coded 1.5; benchmark beta).
    alpha_factor (1.0): step alpha = alpha_factor * eps (official --alpha 8 at --epsilon 8).
    ls_factor (0.6): true-class probability of the smoothed targets (--factor); 1.0 = plain CE.
    delta_init ("random"): the first epoch's prior, "random" corners or "zero" (--delta-init).
    bn_mode ("train"): BatchNorm mode of the attack forward, whose logits feed c and the loss
        (official: train mode throughout).
    eps_ramp_epochs (0): the shared eps ramp; alpha, the ball and the prior's clip follow eps_t.
Where our version differs, deliberately:
  - the prior lives in the per-sample store in the augmentation frame, so it is cropped/flipped with
    the image (the official code adds an uncropped 32x32 prior to the cropped image; the benchmark
    indexes it by sample with the loader's augmentation unseen); x_0 and x_new are clipped to
    [0, 1] (the code feeds x + delta and the fused point unclipped); the prior is clipped into the
    current eps_t ball before use (it only matters when a guard restarts the eps ramp).
  - the attack's gradient is taken of the LS-CE with ls_factor alone: the benchmark also applies its
    label_smoothing=0.4 there (only the gradient's sign is used).
Hyper-parameter search: none (beta, alpha and the prior's clip are in units of eps; lam weighs a
difference of two logit MSEs whose scale does not grow with eps the way ELLE's does).
Cost: 3 forward + 4 backward passes per step: the attack (1 + 1) and the training forwards on
x_new and x + d_fgsm (2), whose backward also runs back through the kept attack forward (3).
The benchmark measured 1.58x FGSM-RS's time on CIFAR-10.

Example:
    atas train fmnist method.name=fgsm_pco
    atas train fmnist method.name=fgsm_pco method.lam=20
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from atas.methods.base import Method, register
from atas.threat import bn_mode, signed_step
from atas.values import ConfigError


def smoothed_targets(y: torch.Tensor, num_classes: int, true_prob: float) -> torch.Tensor:
    """[B, K] targets with `true_prob` on y and (1 - true_prob) / (K - 1) on every other class."""
    rest = (1.0 - true_prob) / (num_classes - 1)
    targets = torch.full((len(y), num_classes), rest, dtype=torch.float32, device=y.device)
    return targets.scatter_(1, y.view(-1, 1), true_prob)


@register
class FGSMPCO(Method):
    name = "fgsm_pco"
    label = "FGSM-PCO"
    cost = "3 fwd + 4 bwd"
    passes = (3, 4)
    uses_store = True
    has_regularizer = True
    logged_stats = {"weight": "fraction"}  # c, the per-sample fusion weight of the prior

    @dataclass
    class Options(Method.Options):
        lam: float = 10.0
        beta: float = 1.5
        alpha_factor: float = 1.0
        ls_factor: float = 0.6
        delta_init: str = "random"
        bn_mode: str = "train"

    @classmethod
    def check_options(cls, o) -> None:
        super().check_options(o)
        if not o.lam >= 0:
            raise ConfigError(f"method.lam must be >= 0 (0: no regulariser), got {o.lam}")
        if not o.beta > 0:
            raise ConfigError(f"method.beta (scale of the FGSM perturbation in x_new) must be > 0, got {o.beta}")
        if not o.alpha_factor > 0:
            raise ConfigError(f"method.alpha_factor must be > 0 (alpha = alpha_factor * eps), got {o.alpha_factor}")
        if not 0 < o.ls_factor <= 1:
            raise ConfigError(f"method.ls_factor (true-class probability) must lie in (0, 1], got {o.ls_factor}")
        if o.delta_init not in ("random", "zero"):
            raise ConfigError(f"method.delta_init must be 'random' or 'zero', got {o.delta_init!r}")
        if o.bn_mode not in ("train", "eval"):
            raise ConfigError(f"method.bn_mode must be 'train' or 'eval', got {o.bn_mode!r}")

    def __init__(self, eps, options=None, epochs=None, **kwargs):
        super().__init__(eps, options, epochs, **kwargs)
        self._pending: dict | None = None  # what `training_loss` needs from this batch's attack

    def remedy(self, attempt):
        # Wang et al. 2024 give no option change against CO: the adaptive fusion itself is their
        # remedy (they report it recovers an overfitted model). The guard restarts the eps ramp.
        return {}

    def attack(self, model, x, y, state):
        o = self.opt
        ball = self.ball_at(state.epoch)
        alpha = o.alpha_factor * ball.eps
        # The store is drawn U(-eps, eps) and each sample is read once per epoch, so in epoch 1 it
        # still holds that draw: the official init puts it on the corners (or at 0).
        if state.epoch == 1:
            prior = torch.zeros_like(x) if o.delta_init == "zero" else alpha * state.prior.sign()
        else:
            prior = state.prior
        prior = prior.clamp(-ball.eps, ball.eps)
        x0 = (x + prior).clamp(0.0, 1.0).requires_grad_(True)
        with bn_mode(model, o.bn_mode), torch.enable_grad():
            logits0 = model(x0)
            ce = F.cross_entropy(logits0.float(), smoothed_targets(y, logits0.shape[1], o.ls_factor), reduction="sum")
            (grad,) = torch.autograd.grad(ce, [x0], retain_graph=True)
            weight = (1 - logits0.float().softmax(1).gather(1, y.view(-1, 1)).squeeze(1)).clamp(0.0, 1.0)
        x0 = x0.detach()
        d_fgsm = ball.project(signed_step(x + prior, grad, alpha), x) - x
        w = weight.detach().view(-1, *([1] * (x.dim() - 1)))
        fused = w * x0 + (1 - w) * (x + o.beta * d_fgsm)
        x_new = fused.clamp(0.0, 1.0)
        # d x_new / d c where the clip lets it through: training_loss re-attaches c's graph with it.
        dx_dc = (x0 - (x + o.beta * d_fgsm)) * (fused == x_new)
        self._pending = {"logits0": logits0, "weight": weight, "dx_dc": dx_dc, "d_fgsm": d_fgsm.detach()}
        self.stats = {"weight": weight.detach()}
        return x_new.detach()

    def new_prior(self, x_adv, x):
        if self._pending is None:
            raise RuntimeError("fgsm_pco: new_prior() needs the perturbation made by perturb() for this batch")
        return self._pending["d_fgsm"]

    def training_loss(self, model, x_adv, y, x, state):
        o, pending = self.opt, self._pending
        if pending is None:
            raise RuntimeError("fgsm_pco: loss() needs the attack made by perturb() for this batch")
        self._pending = None
        weight = pending["weight"].view(-1, *([1] * (x.dim() - 1)))
        # Same value as x_adv (the added term is exactly 0), with the official gradient through c.
        x_new = x_adv + (weight - weight.detach()) * pending["dx_dc"]
        logits = model(x_new)
        targets = smoothed_targets(y, logits.shape[1], o.ls_factor)
        loss = self.cross_entropy(logits, targets)
        if o.lam > 0:
            logits_fgsm = model(x + pending["d_fgsm"]).float()
            reg = (F.mse_loss(logits_fgsm, pending["logits0"].float()) - F.mse_loss(logits_fgsm, logits.float())).abs()
            self.stats["reg"] = reg.detach()
            loss = loss + o.lam * reg
        return loss, logits

    def passes_per_step(self):
        # lam = 0 drops the forward on x + d_fgsm; c still sends the backward through the attack's.
        return self.passes if self.opt.lam > 0 else (2, 3)
