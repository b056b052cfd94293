"""LIET: FGSM from a start that carries (then partly erases) label information, plus a JS consistency term.

Pan, Tang, Qing, Yao, "Mitigating Catastrophic Overfitting in Fast Adversarial Training via Label
Information Elimination", ICCV 2025. https://iccv.thecvf.com/virtual/2025/poster/1081
Official code: https://github.com/fzjcdt/LIET (main.py, configs/configs.yaml).

Threat model: L-inf ball of radius eps around x, pixels in [0, 1].
Label-indicative perturbations (LI), one per class k, refreshed every `li_every` batches of an
epoch from a gray image g = 0.5 (K images, eval mode):
    LI_k   = eps * sign(grad_g LCE(f(g), k))
One step (LCE: the method's cross-entropy below):
    delta  = LI_{y_i}, with each pixel replaced, with probability r, by U(-n eps, n eps) noise;
             r ~ U(min_mask_ratio, max_mask_ratio), one draw per batch
    x_0    = clip(x + s delta, 0, 1),   s = +-1, one coin per batch
    x_adv  = project(x_0 + eps * sign(grad_x LCE(f(x_0), y)))    (only clipped to [0, 1] when project=false)
    loss   = LCE(f(x_adv), y) + lam_e * JS(softmax f(x_0), softmax f(x_adv))
    JS(p, q) = [KL(p || m) + KL(q || m)] / 2,  m = (p + q) / 2,  each KL averaged over the batch
Starting FGSM from a perturbation that "indicates" the true class (the model's own gradient for
that class at a blank image), randomly masked and sign-flipped, removes the label information a
single-step attack otherwise leaks into the perturbation, which the paper identifies as the cause
of catastrophic overfitting; the JS term keeps the outputs at the start and at x_adv consistent.
f(x_0) is the attack's own forward in train mode, kept (not recomputed) and differentiated by the
loss, as in the official code. lam_e ramps linearly: lam * min(1, e / (lam_ramp * epochs)) for
1-based epoch e (official: cur_lambda += lambda / epochs before each epoch); a run of unknown
length uses lam from the start.
LCE, the paper's non-uniform label smoothing: the targets put 1 - ls on the true class and spread
ls over the other classes with random weights (uniform draws, normalised, drawn anew at every
call; random_smoothing=false: evenly); the attack, the LI and the loss all use it, as the official
code. Being its own smoothing, LIET takes no `label_smoothing` (train.label_smoothing does not
reach it; method.label_smoothing > 0 is refused: set method.liet.ls).

Arguments (defaults = the official configs.yaml, cifar10: ResNet-18, eps 8, 100 epochs, OneCycle
lr 0.1, batch 128, weight averaging 0.9995):
    lam (100.0): the JS weight the ramp reaches (cifar10 100; cifar100 200; eps 16 and 12: 20).
    lam_ramp (1.0): fraction of the run's epochs over which lam_e ramps up; 0 = lam from the start.
    ls (0.6): the mass moved off the true class (official ls 0.6; 0.4 at eps 16); 0 = plain CE.
    random_smoothing (True): spread it over the other classes at random (official), else evenly.
    min_mask_ratio, max_mask_ratio (0.1, 0.5): range of r (eps 16: 0.0, 1.0).
    noise_factor (None): n; None = 1 for eps <= 8/255 and 2 above (the official switch).
    project (None): project x_adv back to the eps ball; None = for eps <= 8/255 only (official).
    li_every (10): batches between LI refreshes (cifar10 10; cifar100 / tiny-imagenet 20).
    eps_ramp_epochs (0): the shared eps schedule; LI, noise, step and ball all scale with eps_t.
Hyper-parameter search (`atas compare --tune`; `search` below): lam over (20, 100, 200), the values
the official configs themselves switch between (20 at eps 12-16/255, 100 on CIFAR-10 and
Tiny-ImageNet at 8/255, 200 on CIFAR-100 at 8/255): the authors retuned it for every eps and
dataset, so at another eps (Fashion-MNIST 0.1-0.3) none of them is known to hold.
Where the sources differ: the FastAT benchmark (fast_at/liet.py, configs/cifar10/liet.yaml) follows
the official code except li_update 20 (official cifar10: 10). Ours: the eps switch of noise_factor
and project compares the configured eps with 8/255 (the same switch), and all magnitudes use the
ramped eps_t; the LI is kept as its sign (scaled by eps_t when used), with the batch counter, in
the method's state, so a resumed run is bit-exact. The class count K is read from the model's
output on one gray image (the official config states it).
Cost: 2 forward + 3 backward passes per step (the attack's forward and input backward, the
training forward, and the training backward through both forwards), plus K images forward and
backward every li_every batches; the benchmark measured 1.37x FGSM-RS's time.

Example:
    atas train fmnist method.name=liet
    atas train fmnist method.name=liet method.lam=20 method.noise_factor=2 method.project=false
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from atas.methods.base import Method, register
from atas.threat import bn_mode
from atas.values import ConfigError

# The official code switches to its large-eps variant (noise 2 eps, no projection) above 8/255.
LARGE_EPS = 8 / 255


def random_smoothed_ce(logits: torch.Tensor, y: torch.Tensor, smoothing: float, random: bool = True) -> torch.Tensor:
    """Mean cross-entropy against targets with 1 - smoothing on y and `smoothing` spread over the
    other classes in proportion to U(0, 1) draws (new ones at every call), or evenly (random=False)."""
    logits = logits.float()
    onehot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    if smoothing == 0:
        return F.cross_entropy(logits, y)
    weights = (torch.rand_like(logits) if random else torch.ones_like(logits)) * (1 - onehot)
    targets = onehot * (1 - smoothing) + weights / weights.sum(1, keepdim=True) * smoothing
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


def js_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """[KL(p || m) + KL(q || m)] / 2 with p, q the softmax outputs and m their mean; each KL summed
    over classes and averaged over the batch."""
    p, q = F.softmax(logits_p.float(), dim=1), F.softmax(logits_q.float(), dim=1)
    log_m = ((p + q) / 2).clamp(0, 1).log()
    return (F.kl_div(log_m, p, reduction="batchmean") + F.kl_div(log_m, q, reduction="batchmean")) / 2


@register
class LIET(Method):
    name = "liet"
    label = "LIET"
    cost = "2 fwd + 3 bwd"
    passes = (2, 3)
    has_regularizer = True
    supports_label_smoothing = False  # its own, non-uniform smoothing: option `ls`
    search = {"lam": (20.0, 100.0, 200.0)}  # retuned per eps and dataset by the authors: module docstring

    @dataclass
    class Options(Method.Options):
        lam: float = 100.0
        lam_ramp: float = 1.0
        ls: float = 0.6
        random_smoothing: bool = True
        min_mask_ratio: float = 0.1
        max_mask_ratio: float = 0.5
        noise_factor: float | None = None
        project: bool | None = None
        li_every: int = 10

    @classmethod
    def check_options(cls, o) -> None:
        if o.label_smoothing > 0:
            raise ConfigError(
                f"method.label_smoothing: liet smooths its labels its own way (the paper's non-uniform "
                f"smoothing); set label_smoothing=0 and method.liet.ls (now {o.ls}) instead"
            )
        super().check_options(o)
        if not 0 <= o.ls < 1:
            raise ConfigError(f"method.ls (the mass moved off the true class) must lie in [0, 1), got {o.ls}")
        if not (o.lam >= 0 and math.isfinite(o.lam)):
            raise ConfigError(f"method.lam must be a finite number >= 0, got {o.lam}")
        if not 0 <= o.lam_ramp <= 1:
            raise ConfigError(
                f"method.lam_ramp must lie in [0, 1] (a fraction of the epochs; 0: no ramp), got {o.lam_ramp}"
            )
        if not 0 <= o.min_mask_ratio <= o.max_mask_ratio <= 1:
            raise ConfigError(
                f"need 0 <= method.min_mask_ratio <= method.max_mask_ratio <= 1, got "
                f"{o.min_mask_ratio} and {o.max_mask_ratio}"
            )
        if o.noise_factor is not None and not 0 <= o.noise_factor <= 4:
            raise ConfigError(
                f"method.noise_factor must lie in [0, 4] (a multiple of eps) or none, got {o.noise_factor}"
            )
        if isinstance(o.li_every, bool) or not isinstance(o.li_every, int) or o.li_every < 1:
            raise ConfigError(
                f"method.li_every must be an integer >= 1 (batches between refreshes), got {o.li_every!r}"
            )

    def __init__(self, eps, options=None, epochs=None, **kwargs):
        super().__init__(eps, options, epochs, **kwargs)
        self.step_in_epoch = 0  # batches of this epoch so far (the LI refresh)
        self.li_sign: torch.Tensor | None = None  # sign of the LI, [K, C, H, W] float32
        self._logits_start: torch.Tensor | None = None

    def remedy(self, attempt):
        # Pan et al. 2025: at the radii where CO threatens (eps 12-16/255) the official configs
        # erase more label information: masks over the whole [0, 1] range and noise of 2 eps.
        change = {"min_mask_ratio": 0.0, "max_mask_ratio": 1.0, "noise_factor": 2.0}
        return {} if all(getattr(self.opt, k) == v for k, v in change.items()) else change

    def lam_at(self, epoch: int) -> float:
        o = self.opt
        if o.lam_ramp == 0 or self.epochs is None:
            return o.lam
        return o.lam * min(1.0, epoch / (o.lam_ramp * self.epochs))

    def criterion(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return random_smoothed_ce(logits, y, self.opt.ls, self.opt.random_smoothing)

    # -- carried state: the batch counter and the LI ------------------------------------------
    def on_epoch_start(self, epoch, store):
        self.step_in_epoch = 0

    def method_state(self) -> dict:
        state = {"step_in_epoch": self.step_in_epoch}
        if self.li_sign is not None:
            state["li_sign"] = self.li_sign.clone()
        return state

    def load_method_state(self, state: dict) -> None:
        self.step_in_epoch = int(state.get("step_in_epoch", 0))
        self.li_sign = state["li_sign"].float().clone() if "li_sign" in state else None

    def refresh_li(self, model, x: torch.Tensor) -> None:
        """sign(grad_g LCE(f(g), k)) for the gray image g = 0.5 and every class k (eval mode)."""
        with bn_mode(model, "eval"):
            gray = torch.full((1, *x.shape[1:]), 0.5, dtype=x.dtype, device=x.device)
            with torch.no_grad():
                num_classes = model(gray).shape[1]
            gray = gray.expand(num_classes, *x.shape[1:]).clone().requires_grad_(True)
            with torch.enable_grad():
                loss = self.criterion(model(gray), torch.arange(num_classes, device=x.device))
                (grad,) = torch.autograd.grad(loss, [gray])
        self.li_sign = grad.sign().float()

    def attack(self, model, x, y, state):
        o = self.opt
        ball = self.ball_at(state.epoch)
        eps = ball.eps
        if self.step_in_epoch % o.li_every == 0 or self.li_sign is None or self.li_sign.device != x.device:
            self.refresh_li(model, x)
        self.step_in_epoch += 1
        large = self.eps > LARGE_EPS + 1e-12
        noise_factor = o.noise_factor if o.noise_factor is not None else (2.0 if large else 1.0)
        project = o.project if o.project is not None else not large

        delta = eps * self.li_sign[y].to(x.dtype)
        ratio = o.min_mask_ratio + torch.rand((), device=x.device) * (o.max_mask_ratio - o.min_mask_ratio)
        noise = ball.uniform(x, noise_factor)
        delta = torch.where(torch.rand_like(x) < ratio, noise, delta)
        sign = torch.where(torch.rand((), device=x.device) < 0.5, -1.0, 1.0).to(x.dtype)
        x_start = (x + sign * delta).clamp(0.0, 1.0).requires_grad_(True)
        with torch.enable_grad():
            # In the model's own (training) mode: this forward is kept for the JS term.
            logits_start = model(x_start)
            (grad,) = torch.autograd.grad(self.criterion(logits_start, y), [x_start], retain_graph=o.lam > 0)
        x_adv = x_start.detach() + eps * grad.sign()
        x_adv = ball.project(x_adv, x) if project else x_adv.clamp_(0.0, 1.0)
        self._logits_start = logits_start if o.lam > 0 else None
        return x_adv.detach()

    def training_loss(self, model, x_adv, y, x, state):
        logits = model(x_adv)
        loss = self.criterion(logits, y)
        lam = self.lam_at(state.epoch)
        if self.opt.lam > 0:
            if self._logits_start is None:
                raise RuntimeError("liet: loss() needs the logits made by perturb() for this batch")
            logits_start, self._logits_start = self._logits_start, None
            if lam > 0:
                reg = js_divergence(logits_start, logits)
                self.stats = {"reg": reg.detach()}
                loss = loss + lam * reg
        return loss, logits
