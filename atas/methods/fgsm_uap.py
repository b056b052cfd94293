"""FGSM-UAP, FGSM-CUAP and FGSM-FUAP: FGSM started from a universal adversarial perturbation.

Qiu et al., "Adversarial Initialization with Universal Adversarial Perturbation: A New
Approach to Fast Adversarial Training", AAAI 2024. https://ojs.aaai.org/index.php/AAAI/article/view/30147
No official code; the reference implementation read here is the FastAT benchmark's
(fzjcdt/FastAT_Benchmark: fast_at/fgsm_uap.py, fgsm_cuap.py, fgsm_fuap.py, configs/cifar10/).

Threat model: L-inf ball of radius eps around x, pixels in [0, 1].
The method keeps S universal perturbations u_1..u_S (image-shaped, shared by every sample that
selects them) and a momentum m_k for each; they persist across batches and epochs. One step:
    s_i     = the slot sample i uses:  0 (`fgsm_uap`, S = 1)  |  y_i (`fgsm_cuap`, S = classes)
              | argmax_k h(phi(x_i + r_i))_k (`fgsm_fuap`, S = num_uaps; see below)
    x_init  = project(x_start + u_{s_i})        x_start = x (FUAP: x + r, r ~ U(-eps, eps))
    g       = grad_x CE(f(x_init), y)
    x_adv   = project(x_init + alpha * sign(g))                     alpha = step_factor * eps
    loss    = CE(f(x_adv), y) + lam * mean((f(x_adv) - f(x_init))^2)
and, for each slot k that this batch's samples selected (n_k of them),
    m_k <- (1 / n_k) sum_{i: s_i = k} g_i / ||g||_1  +  mu * m_k         (||g||_1 over the whole batch)
    u_k <- clip(u_k + uap_eps * sign(m_k), -uap_eps, uap_eps)            uap_eps = uap_factor * eps
Slots no sample selected keep u_k and m_k. The initial u_k are random corners uap_eps * sign(U).
Starting from corners with steps of exactly uap_eps, every entry of u_k stays in
{-uap_eps, 0, uap_eps}; it is stored as its sign v_k in {-1, 0, 1} and used as
uap_factor * eps_t * v_k, so under the shared eps ramp the perturbation follows the current ball
(and project() clips it to that ball: with uap_factor >= 1 the initialisation is eps_t * v_k).
The regulariser is FGSM-PGI's (Jia et al. 2022): the logits at the adversarial point against
those at the initialised point, backpropagated through both (f(x_init) is the attack's own forward).

FUAP: phi(x) are the model's penultimate features (the input of its last nn.Linear, read by a
forward hook during one extra no-grad forward on x + r) and h a small head Linear(F, S) -> ReLU ->
Linear(S, classes) trained alongside, by Adam (lr head_lr) on CE(head output, y); the slot is the
argmax of the head's first layer, taken before this step's head update. The head, its Adam state,
u and m are method state.

Arguments (defaults = the FastAT benchmark's CIFAR-10 configs, ResNet-18, eps 8/255, which follow
the paper's setting):
    lam (10.0): regulariser weight (benchmark lamda).
    momentum_decay (0.3): mu (the benchmark reads momentum_decay but hard-codes 0.3).
    uap_factor (1.25): uap_eps = uap_factor * eps (benchmark uap_eps 10/255 at eps 8/255).
    step_factor (1.0): FGSM step alpha = step_factor * eps (benchmark: eps).
    bn_mode ("train"): BatchNorm mode of the attack forwards (benchmark: train mode throughout).
`fgsm_fuap` also:
    num_uaps (50): S, the number of universal perturbations and the head's width (uap_num).
    head_lr (0.001): Adam learning rate of the head (benchmark: Adam lr 0.001).
The number of classes (CUAP's S, FUAP's head output) is read from the model's logits at the first
batch (one no-grad forward of one image in eval mode for CUAP, the feature forward for FUAP).
Where our version differs, deliberately:
  - u is stored as its sign and scaled by eps_t (the same numbers as the benchmark without a
    ramp; under one the perturbation stays inside the current ball).
  - the attack's gradient (and the momentum it feeds) is of the plain cross-entropy; the
    benchmark also applies its label_smoothing=0.4 there. The training CE and FUAP's head CE use
    `label_smoothing` as the benchmark's criterion does.
  - the per-slot updates are one scatter-add over the batch, not a Python loop over its classes
    or slots (the same numbers up to summation order).
  - DDP: every rank holds the same u, m (and FUAP head): the initial draw is broadcast from rank
    0, each step's per-slot gradient sums and counts (and the head's gradients) are all-reduced,
    so the update uses the mean over the global batch; ||g||_1 stays per rank. One process: no
    communication.
Hyper-parameter search: none (uap_factor and step_factor are in units of eps; lam weighs a logit
MSE as FGSM-PGI's, which needs no search either).
Cost per step: `fgsm_uap` / `fgsm_cuap` 2 forward + 3 backward (attack 1 + 1; training forward 1,
backward through it and the kept attack forward 2), as FGSM-PGI; `fgsm_fuap` one more no-grad
forward for the features (3 + 3; the head's passes are negligible). The benchmark measured
1.34-1.54x FGSM-RS's time on CIFAR-10.

Example:
    atas train fmnist method.name=fgsm_cuap
    atas train fmnist method.name=fgsm_fuap method.num_uaps=20
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from atas.methods.base import Method, register
from atas.threat import LinfBall, bn_mode, signed_step
from atas.values import ConfigError


def _world() -> bool:
    """True under torch.distributed with more than one rank (the shared state is synchronised)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class UniversalInit(Method):
    """FGSM from a universal perturbation chosen per sample (module docstring); a subclass says
    how many slots there are (`num_slots`) and which one each sample takes (`select`)."""

    cost = "2 fwd + 3 bwd"
    passes = (2, 3)
    has_regularizer = True

    @dataclass
    class Options(Method.Options):
        lam: float = 10.0
        momentum_decay: float = 0.3
        uap_factor: float = 1.25
        step_factor: float = 1.0
        bn_mode: str = "train"

    @classmethod
    def check_options(cls, o) -> None:
        super().check_options(o)
        if not o.lam >= 0:
            raise ConfigError(f"method.lam must be >= 0 (0: no regulariser), got {o.lam}")
        if not 0 <= o.momentum_decay <= 1:
            raise ConfigError(f"method.momentum_decay must lie in [0, 1], got {o.momentum_decay}")
        if not o.uap_factor > 0:
            raise ConfigError(f"method.uap_factor must be > 0 (uap_eps = uap_factor * eps), got {o.uap_factor}")
        if not o.step_factor > 0:
            raise ConfigError(f"method.step_factor must be > 0 (alpha = step_factor * eps), got {o.step_factor}")
        if o.bn_mode not in ("train", "eval"):
            raise ConfigError(f"method.bn_mode must be 'train' or 'eval', got {o.bn_mode!r}")

    def __init__(self, eps, options=None, epochs=None, **kwargs):
        super().__init__(eps, options, epochs, **kwargs)
        self.uap_sign: torch.Tensor | None = None  # v: [S, C, H, W] in {-1, 0, 1}
        self.momentum: torch.Tensor | None = None  # m: [S, C, H, W]
        self._loaded: dict = {}  # method state loaded before the first batch
        self._logits_init: torch.Tensor | None = None

    # -- what a variant defines ------------------------------------------------------------
    def num_slots(self, model: nn.Module, x: torch.Tensor) -> int:
        raise NotImplementedError

    def select(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ball: LinfBall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_start, slot index per sample [B] long)."""
        raise NotImplementedError

    # -- the step ----------------------------------------------------------------------------
    def attack(self, model, x, y, state):
        o = self.opt
        ball = self.ball_at(state.epoch)
        self._ensure_state(model, x)
        x_start, slot = self.select(model, x, y, ball)
        uap = (o.uap_factor * ball.eps) * self.uap_sign[slot]
        x_init = ball.project(x_start + uap, x).requires_grad_(True)
        with bn_mode(model, o.bn_mode), torch.enable_grad():
            logits_init = model(x_init)
            (grad,) = torch.autograd.grad(
                F.cross_entropy(logits_init.float(), y, reduction="sum"), [x_init], retain_graph=o.lam > 0
            )
        x_adv = ball.project(signed_step(x_init.detach(), grad, o.step_factor * ball.eps), x)
        self._logits_init = logits_init if o.lam > 0 else None
        self._update(grad, slot)
        return x_adv.detach()

    @torch.no_grad()
    def _update(self, grad: torch.Tensor, slot: torch.Tensor) -> None:
        """m_k <- mean_{s_i = k} g_i / ||g||_1 + mu m_k and v_k <- clip(v_k + sign(m_k), -1, 1) for
        the slots this batch selected: one scatter-add, no loop over slots."""
        assert self.uap_sign is not None and self.momentum is not None  # built at the first batch
        n_slots = len(self.uap_sign)
        unit = grad.float() / grad.float().abs().sum().clamp_min(torch.finfo(torch.float32).tiny)
        sums = torch.zeros_like(self.momentum).index_add_(0, slot, unit)
        counts = torch.bincount(slot, minlength=n_slots).to(sums.dtype)
        if _world():  # the global batch's mean: every rank applies the same update
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        present = (counts > 0).view(-1, *([1] * (sums.dim() - 1)))
        mean = sums / counts.clamp_min(1).view_as(present)
        self.momentum = torch.where(present, mean + self.opt.momentum_decay * self.momentum, self.momentum)
        self.uap_sign = torch.where(present, (self.uap_sign + self.momentum.sign()).clamp_(-1, 1), self.uap_sign)

    def training_loss(self, model, x_adv, y, x, state):
        logits = model(x_adv)
        loss = self.cross_entropy(logits, y)
        if self.opt.lam > 0:
            if self._logits_init is None:
                raise RuntimeError(f"{self.name}: loss() needs the logits made by perturb() for this batch")
            reg = F.mse_loss(logits.float(), self._logits_init.float())
            self._logits_init = None
            self.stats = {"reg": reg.detach()}
            loss = loss + self.opt.lam * reg
        return loss, logits

    def passes_per_step(self):
        fwd, bwd = self.passes
        return (fwd, bwd) if self.opt.lam > 0 else (fwd, bwd - 1)  # no backward through f(x_init)

    def remedy(self, attempt):
        # The regulariser is FGSM-PGI's, which Jia et al. 2022 credit with preventing CO; weigh it
        # twice as much per recovery.
        return {"lam": round(max(self.opt.lam, 1.0) * 2, 6)}

    # -- the carried state -------------------------------------------------------------------
    def _ensure_state(self, model: nn.Module, x: torch.Tensor) -> None:
        """Build v (random corners) and m (zeros) at the first batch, when the image shape is
        known, or take the loaded ones; keep them on the batch's device."""
        if self.uap_sign is None:
            if "uap_sign" in self._loaded:
                self.uap_sign, self.momentum = self._loaded.pop("uap_sign"), self._loaded.pop("momentum")
            else:
                shape = (self.num_slots(model, x), *x.shape[1:])
                self.uap_sign = (torch.rand(shape, device=x.device) * 2 - 1).sign()
                self.momentum = torch.zeros(shape, device=x.device)
                if _world():
                    dist.broadcast(self.uap_sign, src=0)
        if self.uap_sign.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"{self.name}: the universal perturbations are {tuple(self.uap_sign.shape[1:])} but this "
                f"batch's images are {tuple(x.shape[1:])}; every batch of a run must have one image size"
            )
        assert self.momentum is not None
        if self.uap_sign.device != x.device:
            self.uap_sign, self.momentum = self.uap_sign.to(x.device), self.momentum.to(x.device)

    def method_state(self) -> dict:
        if self.uap_sign is None:
            return {k: v.clone() for k, v in self._loaded.items()}
        assert self.momentum is not None
        return {"uap_sign": self.uap_sign.clone(), "momentum": self.momentum.clone()}

    def load_method_state(self, state: dict) -> None:
        if not state:
            return
        if "uap_sign" not in state or "momentum" not in state:
            raise ValueError(
                f"{self.name}: checkpoint lacks the universal perturbations; it was not written by {self.name}"
            )
        self._loaded = {k: v.clone() for k, v in state.items()}
        self.uap_sign = self.momentum = None  # taken (and moved to the device) at the next batch


@register
class FGSMUAP(UniversalInit):
    name = "fgsm_uap"
    label = "FGSM-UAP"

    def num_slots(self, model, x):
        return 1

    def select(self, model, x, y, ball):
        return x, torch.zeros(len(x), dtype=torch.long, device=x.device)


@register
class FGSMCUAP(UniversalInit):
    name = "fgsm_cuap"
    label = "FGSM-CUAP"

    def num_slots(self, model, x):
        # One image through the model in eval mode, without gradients: the number of classes,
        # and nothing else touched (no BatchNorm statistics, no dropout draw).
        with torch.no_grad(), bn_mode(model, "eval"):
            return int(model(x[:1]).shape[1])

    def select(self, model, x, y, ball):
        if y.device.type == "cpu" and len(y) and int(y.max()) >= len(self.uap_sign):  # free on CPU only
            raise ValueError(f"fgsm_cuap: label {int(y.max())} but the model has {len(self.uap_sign)} classes")
        return x, y


def penultimate_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [B, F], logits): the input of the model's last nn.Linear, read by a forward hook."""
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    if last is None:
        raise ValueError(
            "fgsm_fuap selects a perturbation from the penultimate features, the input of the model's "
            "last nn.Linear, and this model has none; use fgsm_uap or fgsm_cuap with it"
        )
    seen: list[torch.Tensor] = []
    handle = last.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return seen[-1].flatten(1), logits


@register
class FGSMFUAP(UniversalInit):
    name = "fgsm_fuap"
    label = "FGSM-FUAP"
    cost = "3 fwd + 3 bwd"
    passes = (3, 3)
    no_compile = "it reads the penultimate features through a forward hook, which a compiled model does not run"

    @dataclass
    class Options(UniversalInit.Options):
        num_uaps: int = 50
        head_lr: float = 0.001

    @classmethod
    def check_options(cls, o) -> None:
        super().check_options(o)
        if int(o.num_uaps) != o.num_uaps or o.num_uaps < 1:
            raise ConfigError(f"method.num_uaps must be a positive integer, got {o.num_uaps}")
        if not o.head_lr > 0:
            raise ConfigError(f"method.head_lr (Adam learning rate of the selection head) must be > 0, got {o.head_lr}")

    def __init__(self, eps, options=None, epochs=None, **kwargs):
        super().__init__(eps, options, epochs, **kwargs)
        self.head: nn.Sequential | None = None
        self.head_opt: torch.optim.Adam | None = None

    def num_slots(self, model, x):
        return int(self.opt.num_uaps)

    def select(self, model, x, y, ball):
        o = self.opt
        x_start = ball.random_start(x)
        with torch.no_grad(), bn_mode(model, o.bn_mode):
            features, logits = penultimate_features(model, x_start)
        self._ensure_head(features.shape[1], logits.shape[1], x.device)
        with torch.enable_grad():
            z = self.head[0](features.float())
            out = self.head[2](self.head[1](z))
            head_loss = self.cross_entropy(out, y)
            self.head_opt.zero_grad(set_to_none=True)
            head_loss.backward()
        slot = z.detach().argmax(1)  # the head before this step's update, as the benchmark
        if _world():
            for p in self.head.parameters():
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        self.head_opt.step()
        return x_start, slot

    def _ensure_head(self, n_features: int, n_classes: int, device) -> None:
        if self.head is not None:
            return
        loaded = {k[len("head.") :]: self._loaded.pop(k) for k in list(self._loaded) if k.startswith("head.")}
        if loaded:
            n_features, n_classes = loaded["0.weight"].shape[1], loaded["2.weight"].shape[0]
        s = int(self.opt.num_uaps)
        # A loaded head must not draw its (overwritten) initial weights: that would shift the RNG
        # stream of the resumed run.
        with torch.random.fork_rng(devices=[], enabled=bool(loaded)):
            self.head = nn.Sequential(nn.Linear(n_features, s), nn.ReLU(), nn.Linear(s, n_classes)).to(device)
        self.head_opt = torch.optim.Adam(self.head.parameters(), lr=self.opt.head_lr)
        if loaded:
            self.head.load_state_dict(loaded)
            adam = {k: self._loaded.pop(k) for k in list(self._loaded) if k.startswith("adam.")}
            if adam:
                state: dict = {}
                for key, value in adam.items():
                    _, i, field = key.split(".")
                    state.setdefault(int(i), {})[field] = value
                self.head_opt.load_state_dict(
                    {"state": state, "param_groups": self.head_opt.state_dict()["param_groups"]}
                )
        elif _world():
            for p in self.head.parameters():
                dist.broadcast(p.data, src=0)

    def options_changed(self):
        if self.head_opt is not None:
            for group in self.head_opt.param_groups:
                group["lr"] = self.opt.head_lr

    def method_state(self) -> dict:
        state = super().method_state()
        if self.head is not None:
            assert self.head_opt is not None  # built with the head
            state.update({f"head.{k}": v.detach().clone() for k, v in self.head.state_dict().items()})
            for i, fields in self.head_opt.state_dict()["state"].items():
                state.update({f"adam.{i}.{field}": torch.as_tensor(v).clone() for field, v in fields.items()})
        return state

    def load_method_state(self, state: dict) -> None:
        super().load_method_state(state)
        if state:
            self.head = self.head_opt = None  # rebuilt from the loaded tensors at the next batch
