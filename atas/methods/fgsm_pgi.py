"""FGSM-PGI, the FGSM-MEP variant: FGSM from a prior carried over epochs, plus a prior regulariser.

Jia, Zhang, Wei, Wu, Ma, Wang, Cao, "Prior-Guided Adversarial Initialization for Fast Adversarial
Training", ECCV 2022. https://arxiv.org/abs/2207.08859

Threat model: L-inf ball of radius eps around x, pixels in [0, 1].
Per training instance i: eta_i, the initialisation carried from its previous epoch (the per-sample
store's prior, cropped/flipped like x), and m_i, a momentum of its normalised input gradients.
One step (MEP: "momentum of all previous epochs"; jiaxiaojunQAQ/FGSM-PGI FGSM_MEP.py):
    x_init = clip(x + eta_i, 0, 1);   g = grad_x LS-CE(f(x_init), y)
    x_adv  = project(x_init + alpha * sign(g))
    m_i   <- g / ||g||_1 + mu * m_i                 (||g||_1 over the whole batch, as the official code)
    eta_i <- project(x_init + alpha * sign(m_i)) - x      (what `new_prior` hands back to the store)
    loss   = LS-CE(f(x_adv), y) + lam * mean((f(x_adv) - f(x_init))^2)
The regulariser is the mean squared difference of the logits at the adversarial point and at the
prior-initialised point; the official code backpropagates through both (f(x_init) is the attack's
own forward, kept, not recomputed). At the first epoch and every `reset_every` epochs after it,
eta is redrawn as random corners clip(alpha * sign(U(-eps, eps)), -eps, eps) and m is zeroed.
LS-CE: cross-entropy against label-smoothed targets that put ls_factor on the true class and the
rest evenly on the others (official: 0.6), in the attack and in the training loss alike.

Arguments (defaults = the official CIFAR-10 script FGSM_MEP.py: ResNet-18, 110 epochs, lr 0.1
x0.1 at epochs 100 and 105, batch 128, weight decay 5e-4):
    lam (10.0): regulariser weight (--lamda).
    momentum_decay (0.3): mu (--momentum_decay). 0 gives FGSM-EP (the prior is the previous epoch's
        perturbation, eta_i <- x_adv - x) and keeps no momentum buffer.
    alpha_factor (1.0): step alpha = alpha_factor * eps (--alpha 8 at --epsilon 8).
    ls_factor (0.6): true-class probability of the smoothed targets (--factor); 1.0 = plain CE.
    label_smoothing (0.0; train.label_smoothing): a further smoothing s of the training loss's
        targets, composed with ls_factor: true-class probability (1 - s) * ls_factor + s / K
        (the attack keeps ls_factor alone). ls_factor=1 makes it the plain label smoothing s.
    reset_every (40): epochs between resets (--epochs_reset); 0 = only the initial draw.
    bn_mode ("train"): BatchNorm mode of the attack pass, whose logits feed the regulariser
        (official: train mode throughout).
    eps_ramp_epochs (0): train against eps * min(1, epoch / eps_ramp_epochs); every eps-relative
        quantity of the step scales with it (0: the full eps from the start, as the paper). At
        Fashion-MNIST eps 0.2+ from scratch it can otherwise stay at a constant prediction.
Where our version differs, deliberately:
  - eta lives in the per-sample store in the augmentation frame, so it is cropped/flipped with
    the image (the official code adds an uncropped 32x32 prior to the randomly cropped image);
    x_init is clipped to [0, 1] (the official code does not clip it).
  - m is NOT in the store: the store has one image-shaped slot and the method is not shown the
    batch's crop/flip, so m is a method-held [rows, C, H, W] float32 buffer in the crop's own
    coordinates (unaligned across epochs, as both buffers are in the official code). It is not
    checkpointed: after a resume it restarts at 0 and is rebuilt over the next epoch. It costs
    as much memory as the training images in float32 (CIFAR-10: 0.6 GB); momentum_decay=0
    removes it.
Cost: 2 forward + 3 backward per step (the training backward also runs back through the kept
attack forward for the regulariser), about 1.4x FGSM-RS as the paper reports.

Example:
    atas train fmnist method.name=fgsm_pgi method.reset_every=0
    atas train fmnist method.name=fgsm_pgi method.momentum_decay=0      # FGSM-EP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from atas.methods.base import Method, register
from atas.threat import bn_mode, signed_step
from atas.values import ConfigError


def smoothed_ce(logits: torch.Tensor, y: torch.Tensor, true_prob: float, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy against targets with `true_prob` on y and (1 - true_prob)/(K - 1) elsewhere,
    i.e. torch's label_smoothing s = (1 - true_prob) * K / (K - 1)."""
    k = logits.shape[1]
    smoothing = (1.0 - true_prob) * k / (k - 1)
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"method.ls_factor={true_prob} puts less than 1/{k} on the true class")
    return F.cross_entropy(logits.float(), y, label_smoothing=smoothing, reduction=reduction)


@register
class FGSMPGI(Method):
    name = "fgsm_pgi"
    label = "FGSM-PGI"
    cost = "2 fwd + 3 bwd"
    passes = (2, 3)
    uses_store = True
    has_regularizer = True

    @dataclass
    class Options(Method.Options):
        lam: float = 10.0
        momentum_decay: float = 0.3
        alpha_factor: float = 1.0
        ls_factor: float = 0.6
        reset_every: int = 40
        bn_mode: str = "train"

    @classmethod
    def check_options(cls, o) -> None:
        super().check_options(o)
        if o.lam < 0 or o.momentum_decay < 0 or o.alpha_factor <= 0:
            raise ConfigError(
                f"need method.lam >= 0, method.momentum_decay >= 0 and method.alpha_factor > 0, "
                f"got {o.lam}, {o.momentum_decay}, {o.alpha_factor}"
            )
        if not 0 < o.ls_factor <= 1:
            raise ConfigError(f"method.ls_factor (true-class probability) must lie in (0, 1], got {o.ls_factor}")
        if o.reset_every < 0:
            raise ConfigError(f"method.reset_every must be >= 0 (0: never), got {o.reset_every}")

    def __init__(self, eps, options=None, epochs=None, **kwargs):
        super().__init__(eps, options, epochs, **kwargs)
        self.momentum: torch.Tensor | None = None  # [store rows, C, H, W], see the docstring
        self._logits_init: torch.Tensor | None = None  # f(x_init) with its graph, for `loss`
        self._next_prior: torch.Tensor | None = None  # eta for the next epoch, for `new_prior`

    def remedy(self, attempt):
        # Jia et al. 2022: the regulariser between the two adversarial outputs is what prevents
        # CO; weigh it twice as much per recovery.
        return {"lam": round(max(self.opt.lam, 1.0) * 2, 6)}

    def is_reset_epoch(self, epoch: int) -> bool:
        every = self.opt.reset_every
        return epoch == 1 or (every > 0 and (epoch - 1) % every == 0)

    def method_state(self) -> dict:
        return {} if self.momentum is None else {"momentum": self.momentum}

    def load_method_state(self, state: dict) -> None:
        if "momentum" in state:
            self.momentum = state["momentum"].float()

    def on_epoch_start(self, epoch, store):
        if self.is_reset_epoch(epoch):
            if epoch > 1:
                self.reset_store(store)  # U(-eps, eps); made into corners as each batch reads it
            if self.momentum is not None:
                self.momentum.zero_()

    def _momentum_rows(self, state, x: torch.Tensor) -> torch.Tensor:
        """This batch's rows of the momentum buffer (allocated, zero, on first use)."""
        store = state.store
        if self.momentum is None or self.momentum.shape[1:] != x.shape[1:]:
            n_rows = store.num_samples if store.indices is None else len(store.indices)
            try:
                self.momentum = torch.zeros((n_rows, *x.shape[1:]), dtype=torch.float32, device=x.device)
            except (RuntimeError, MemoryError) as e:
                gib = n_rows * x[0].numel() * 4 / 2**30
                raise RuntimeError(
                    f"fgsm_pgi: the momentum buffer ({n_rows} x {tuple(x.shape[1:])} float32, "
                    f"{gib:.1f} GiB) does not fit; method.momentum_decay=0 (FGSM-EP) needs none"
                ) from e
        return store.rows(state.idx).to(x.device)

    def attack(self, model, x, y, state):
        o = self.opt
        # Under eps_ramp_epochs the ball grows by epoch; the stored prior of an earlier epoch lies
        # in a smaller ball, so it is inside this one. Without a ramp this is self.ball.
        ball = self.ball_at(state.epoch)
        alpha = o.alpha_factor * ball.eps
        prior = state.prior
        if self.is_reset_epoch(state.epoch):
            # Each sample is read once per epoch, so in a reset epoch the store still holds the
            # fresh U(-eps, eps) draw: the official init puts it on the corners.
            prior = (alpha * prior.sign()).clamp(-ball.eps, ball.eps)
        x_init = (x + prior).clamp(0.0, 1.0).requires_grad_(True)
        with bn_mode(model, o.bn_mode), torch.enable_grad():
            logits_init = model(x_init)
            (grad,) = torch.autograd.grad(
                smoothed_ce(logits_init, y, o.ls_factor, reduction="sum"), [x_init], retain_graph=o.lam > 0
            )
        x_init = x_init.detach()
        x_adv = ball.project(signed_step(x_init, grad, alpha), x)
        direction = grad
        if o.momentum_decay > 0:
            rows = self._momentum_rows(state, x)
            # Official normalisation: the L1 norm of the WHOLE batch's gradient.
            direction = (
                grad / grad.abs().sum().clamp_min(torch.finfo(grad.dtype).tiny) + o.momentum_decay * self.momentum[rows]
            )
            self.momentum[rows] = direction
        self._next_prior = (ball.project(signed_step(x_init, direction, alpha), x) - x).detach()
        self._logits_init = logits_init if o.lam > 0 else None
        return x_adv.detach()

    def new_prior(self, x_adv, x):
        if self._next_prior is None:
            raise RuntimeError("fgsm_pgi: new_prior() needs the prior made by perturb() for this batch")
        prior, self._next_prior = self._next_prior, None
        return prior

    def training_loss(self, model, x_adv, y, x, state):
        o = self.opt
        logits = model(x_adv)
        # The method's own smoothing (ls_factor, in its attack and its loss, as the official code)
        # composed with the run's label_smoothing s (training loss only): smoothing the already
        # smoothed targets again puts (1 - s) * ls_factor + s / K on the true class, i.e. the
        # true-class probability below. s = 0 leaves the official loss as it was, bit for bit.
        true_prob = (
            o.ls_factor
            if o.label_smoothing == 0
            else (1 - o.label_smoothing) * o.ls_factor + o.label_smoothing / logits.shape[1]
        )
        loss = smoothed_ce(logits, y, true_prob)
        if o.lam > 0:
            if self._logits_init is None:
                raise RuntimeError("fgsm_pgi: loss() needs the logits made by perturb() for this batch")
            reg = F.mse_loss(logits.float(), self._logits_init.float())
            self._logits_init = None
            self.stats = {"reg": reg.detach()}
            loss = loss + o.lam * reg
        return loss, logits
