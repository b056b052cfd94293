"""The evaluation attacks FGSM and PGD (its losses and step schedules), and the attack registry.

An attack is a small object configured once and called per batch, with the model passed in per call
(torchattacks, improved); the threat model (atas.threat.LinfBall) is shared with training. Every
attack `evaluate` can run is an `Attack` entry in ATTACKS, looked up by name like methods and models:

    ATTACKS.register("my_attack", Attack("my attack", build_my_attack))

where build(name, setup) -> (settings, run(x, y, progress) -> (x_adv, robust verdict or None)) is
called once per evaluation (docs/contributing.md). AutoAttack's entries are in atas.evaluation.autoattack.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from atas.errors import AtasError
from atas.registry import Registry
from atas.threat import LinfBall, bn_mode, input_grad, signed_step
from atas.values import ConfigError, eps_multiple, parse_fraction

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackSetup",
    "EvaluationError",
    "EvaluationWarning",
    "FGSM",
    "PGD",
    "PGD_DEFAULTS",
    "PGD_LOSSES",
    "PGD_SCHEDULES",
    "check_adversarial",
    "pgd_step",
    "register_attack",
]

PGD_SCHEDULES = ("constant", "cosine")

PGD_LOSSES = ("ce", "margin")

# The PGD step used when none is given, per threat model: (alpha as a fraction of eps, schedule,
# loss). Chosen by measurement with benchmarks/pgd_step.py (docs/results/pgd-step-cpu/): on
# Fashion-MNIST at eps 0.2-0.3 (4 models), PGD-50-10 with a cosine-decaying step from eps/2 on the
# margin loss was the strongest PGD on every model, up to 7 points stronger than the constant
# eps/4 (ATAS, eps 0.3: 43% vs 50%, AutoAttack 39%); the same on cross-entropy was within one
# image of it; the fixed 0.01 of the MNIST protocol and eps/10 were weaker. What remains between it
# and AutoAttack comes from APGD-T's targeted loss, which no step size of an untargeted PGD recovers: report AutoAttack.
# CIFAR-scale radii keep eps/4 constant (the field's common choice) until measured otherwise.
MNIST_SCALE_EPS = 0.1

PGD_DEFAULTS = {
    "mnist-scale": (0.5, "cosine", "margin"),
    "cifar-scale": (0.25, "constant", "ce"),
}

_TOL = 1e-6  # slack on the eps-ball check: float rounding of x + delta, never a real violation


class EvaluationError(AtasError, AssertionError):
    """An evaluation invariant broke (x_adv outside the eps-ball or [0, 1], NaN, wrong shape).
    This is a bug in an attack, never a property of the model: it is raised, never swallowed (the
    CLI shows its traceback)."""

    exit_status = None


class EvaluationWarning(UserWarning):
    """Something makes the numbers suspicious (train mode, probabilities, inconsistent attacks)."""


# ----------------------------------------------------------------------------------------------
# attacks


class FGSM:
    r"""FGSM, the fast gradient sign method, as an evaluation attack.

    Paper: Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples",
    ICLR 2015, https://arxiv.org/abs/1412.6572

    Threat model: L-inf ball of radius eps around x, intersected with the image box [0, 1].
    x_adv = project(x + eps * sign(grad_x CE(model(x), y))); no random start. The attack is the
    plain single step from x (no worst case with the clean point), so that FGSM accuracy above
    clean accuracy shows catastrophic overfitting instead of being hidden.

    Arguments:
        eps (float): radius in pixel units, e.g. 8/255.

    Shape:
        - model: maps [B, C, H, W] images in [0, 1] to logits [B, K] (normalisation inside).
          It is run with eval() semantics (BatchNorm running statistics, no dropout) and its
          mode is restored afterwards.
        - x: [B, C, H, W] float in [0, 1]; y: [B] int64 labels.
        - returns x_adv: [B, C, H, W] in [0, 1] with ||x_adv - x||_inf <= eps.

    Examples::
        >>> attack = FGSM(eps=8/255)
        >>> x_adv = attack(model, x, y)
    """

    def __init__(self, eps: float):
        self.ball = LinfBall(eps)
        self.eps = self.ball.eps

    def settings(self) -> dict[str, Any]:
        return {"eps": self.eps}

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with bn_mode(model, "eval"):
            grad, _ = input_grad(model, x, y)
            return self.ball.project(signed_step(x, grad, self.eps), x).detach()


class PGD:
    r"""PGD with random restarts, keeping the worst case per sample.

    Paper: Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant to
    Adversarial Attacks", ICLR 2018, https://arxiv.org/abs/1706.06083

    Threat model: L-inf ball of radius eps around x, intersected with [0, 1]. Each restart draws
    its own start x + U(-eps, eps) (clipped), then takes `steps` signed steps of size alpha on the
    cross-entropy, projecting after each. A sample counts as robust only if it is classified
    correctly at x itself and at every iterate of every restart: the first point found that fools
    the model is kept, and the sample is not attacked further (in this restart or later ones).
    This saves time and can only make the attack stronger than "last iterate of each restart".

    Randomness: each restart draws ONE start for the whole batch from torch's global RNG, whether
    or not a sample is still being attacked, so sample i's start depends only on the RNG state
    and its row. Seed with torch.manual_seed (`evaluate` does, per batch); a run with r restarts
    then equals r runs with restarts=1 in a row, AND-ed per sample.

    Arguments:
        eps (float): radius in pixel units, e.g. 8/255.
        steps (int): signed-gradient steps per restart. Default: 50.
        alpha (float): step size in pixel units. Default: None = eps / 4 (reaches the boundary
            of the ball in 4 steps, then moves along it); the ATAS paper's own code used eps / 5,
            and 2.5 * eps / steps is the Madry et al. rule: pass it explicitly. `pgd_step`
            gives the per-threat-model default that `evaluate` uses.
        restarts (int): number of random starts. Default: 10 (PGD-50-10, the field's standard).
        random_start (bool): start at a random point of the ball; False starts at x (then
            restarts > 1 repeat the same deterministic attack). Default: True.
        loss (str): "ce" (cross-entropy, Madry et al.) or "margin" (max_{k != y} z_k - z_y,
            Carlini & Wagner 2017; does not saturate on confident points). Default: "ce".
        schedule (str): "constant" (every step alpha) or "cosine" (step t is
            alpha * (1 + cos(pi t / steps)) / 2: a fixed decay from alpha towards 0, in the spirit
            of APGD's decreasing step, Croce & Hein, ICML 2020, https://arxiv.org/abs/2003.01690,
            without its adaptivity or momentum). Default: "constant".

    Shape:
        - model: maps [B, C, H, W] images in [0, 1] to logits [B, K]; run with eval() semantics.
        - x: [B, C, H, W] float in [0, 1]; y: [B] int64 labels.
        - returns x_adv: [B, C, H, W] in [0, 1], ||x_adv - x||_inf <= eps: a point that fools
          the model where one was found, otherwise the last iterate of the last restart (or x
          itself for a sample misclassified to begin with).

    Examples::
        >>> attack = PGD(eps=8/255, steps=50, restarts=10)
        >>> x_adv = attack(model, x, y)
    """

    def __init__(
        self,
        eps: float,
        steps: int = 50,
        alpha: float | None = None,
        restarts: int = 10,
        random_start: bool = True,
        schedule: str = "constant",
        loss: str = "ce",
    ):
        self.ball = LinfBall(eps)
        self.eps = self.ball.eps
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps}")
        if int(restarts) != restarts or restarts < 1:
            raise ValueError(f"restarts must be a positive integer, got {restarts}")
        self.steps, self.restarts = int(steps), int(restarts)
        self.alpha = self.eps / 4 if alpha is None else float(alpha)
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.schedule, self.loss = _checked_schedule_and_loss(schedule, loss)
        self.random_start = bool(random_start)
        if not self.random_start and self.restarts > 1:
            warnings.warn(
                f"PGD with random_start=False repeats the same attack {self.restarts} times; use restarts=1",
                EvaluationWarning,
                stacklevel=2,
            )

    def step_size(self, t: int) -> float:
        """Step size of step t = 0 .. steps-1: alpha, or alpha * (1 + cos(pi t / steps)) / 2
        ("cosine": large steps explore, the last ones are fine-tuning near a boundary)."""
        if self.schedule == "cosine":
            return self.alpha * 0.5 * (1.0 + math.cos(math.pi * t / self.steps))
        return self.alpha

    def settings(self) -> dict[str, Any]:
        return {
            "eps": self.eps,
            "steps": self.steps,
            "alpha": self.alpha,
            "alpha_over_eps": round(self.alpha / self.eps, 6),
            "schedule": self.schedule,
            "loss": self.loss,
            "restarts": self.restarts,
            "random_start": self.random_start,
        }

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.run(model, x, y)[0]

    def run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, tick: Callable[[int], None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_adv, robust): robust[i] is False as soon as any point tried for sample i fooled
        the model (x itself included). tick(k), if given, is called as steps are done (k steps,
        restarts * steps in all, skipped steps included), for a progress bar."""
        tick = tick or (lambda k: None)
        x = x.detach()
        with bn_mode(model, "eval"):
            with torch.no_grad():
                # x is in the ball too: a misclassified sample is not robust, and is not attacked.
                fooled = model(x).argmax(1) != y
            x_adv = x.clone()
            for r in range(self.restarts):
                if bool(fooled.all()):
                    tick((self.restarts - r) * self.steps)
                    break
                start = self.ball.random_start(x) if self.random_start else x.clone()
                idx = (~fooled).nonzero().squeeze(1)  # samples still being attacked
                x_cur, x_nat, y_nat = start[idx], x[idx], y[idx]
                for step in range(self.steps + 1):
                    if step < self.steps:
                        grad, logits = (
                            input_grad(model, x_cur, y_nat) if self.loss == "ce" else _margin_grad(model, x_cur, y_nat)
                        )
                    else:  # the last iterate gets a forward of its own, no gradient
                        with torch.no_grad():
                            logits = model(x_cur)
                    hit = logits.argmax(1) != y_nat
                    if bool(hit.any()):
                        fooled[idx[hit]] = True
                        x_adv[idx[hit]] = x_cur[hit].detach()
                        keep = ~hit
                        idx, x_cur, x_nat, y_nat = idx[keep], x_cur[keep], x_nat[keep], y_nat[keep]
                        if step < self.steps:
                            grad = grad[keep]
                    if idx.numel() == 0:
                        tick(self.steps - step)
                        break
                    if step < self.steps:
                        x_cur = self.ball.project(signed_step(x_cur, grad, self.step_size(step)), x_nat).detach()
                        tick(1)
                # survivors of this restart: remember where they ended (still correctly classified)
                x_adv[idx] = x_cur.detach()
        return x_adv, ~fooled


def _margin_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the summed margin loss max_{k != y} z_k - z_y (Carlini & Wagner, IEEE S&P 2017,
    https://arxiv.org/abs/1608.04644) w.r.t. the input, and the logits. Unlike cross-entropy it
    does not saturate on confidently classified points."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        z = logits.float()
        true = z.gather(1, y[:, None]).squeeze(1)
        other = z.masked_fill(torch.nn.functional.one_hot(y, z.shape[1]).bool(), float("-inf")).amax(1)
        (grad,) = torch.autograd.grad((other - true).sum(), [x])
    return grad, logits


def pgd_step(
    eps: float, alpha: float | str | None = None, schedule: str | None = None, loss: str | None = None
) -> tuple[float, str, str, str]:
    """(alpha in pixel units, schedule, loss, rule) for PGD at radius eps.

    alpha: None = this threat model's default (PGD_DEFAULTS); a number (0.01, "2/255") in pixel
    units; or a multiple of eps written "eps/4", "0.25eps", "2.5*eps/50". schedule and loss: None
    = the default's when alpha is None too, else "constant" and "ce"; or one of PGD_SCHEDULES /
    PGD_LOSSES. `rule` says where the step came from, for the result's settings."""
    eps = float(eps)
    scale = "mnist-scale" if eps >= MNIST_SCALE_EPS - 1e-12 else "cifar-scale"
    if alpha is None:
        frac, default_schedule, default_loss = PGD_DEFAULTS[scale]
        value = frac * eps
        schedule, loss = schedule or default_schedule, loss or default_loss
        rule = (
            f"default for {scale} eps (eps {'>=' if scale == 'mnist-scale' else '<'} {MNIST_SCALE_EPS:g}): "
            f"eps*{frac:g}, {default_schedule}, {default_loss}"
        )
    else:
        value, rule = _parse_alpha(alpha, eps), f"given: {alpha}"
        schedule, loss = schedule or "constant", loss or "ce"
    schedule, loss = _checked_schedule_and_loss(schedule, loss)
    if not 0 < value <= 2 * eps + 1e-12:
        raise ConfigError(f"PGD step {alpha!r} = {value:.6g} is outside (0, 2 eps] for eps {eps:.6g}")
    return value, schedule, loss, rule


def _checked_schedule_and_loss(schedule: str, loss: str) -> tuple[str, str]:
    """The PGD step schedule and loss, each one of its vocabulary (ConfigError, a ValueError, naming them)."""
    if schedule not in PGD_SCHEDULES:
        raise ConfigError(f"unknown PGD step schedule {schedule!r}; valid: {', '.join(PGD_SCHEDULES)}")
    if loss not in PGD_LOSSES:
        raise ConfigError(f"unknown PGD loss {loss!r}; valid: {', '.join(PGD_LOSSES)}")
    return schedule, loss


def _parse_alpha(alpha: float | str, eps: float) -> float:
    """A PGD step in pixels: a number as is, or a multiple of eps in the one grammar of atas.values."""
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        return float(alpha)
    try:
        coefficient = eps_multiple(str(alpha))
        return coefficient * eps if coefficient is not None else parse_fraction(str(alpha))
    except ConfigError:
        raise ConfigError(
            f"PGD step {alpha!r} is not a step: write a number in pixel units (0.01, 2/255) "
            "or a multiple of eps (eps/4, 0.25eps)"
        ) from None


def check_adversarial(x_adv: torch.Tensor, x: torch.Tensor, eps: float, name: str = "attack") -> None:
    """Raise EvaluationError unless x_adv has x's shape, is finite, lies in [0, 1] and within
    eps (+1e-6 for rounding) of x in L-inf. Called on every adversarial batch of `evaluate`."""
    if x_adv.shape != x.shape:
        raise EvaluationError(f"{name}: x_adv has shape {tuple(x_adv.shape)}, x has {tuple(x.shape)}")
    if not bool(torch.isfinite(x_adv).all()):
        raise EvaluationError(f"{name}: x_adv contains NaN or inf")
    lo, hi = float(x_adv.min()), float(x_adv.max())
    if lo < 0.0 or hi > 1.0:
        raise EvaluationError(f"{name}: x_adv leaves [0, 1] (min {lo:.8g}, max {hi:.8g})")
    dist = float((x_adv.float() - x.float()).abs().max()) if x.numel() else 0.0
    if dist > eps + _TOL:
        raise EvaluationError(f"{name}: max|x_adv - x| = {dist:.8g} exceeds eps = {eps:.8g}")


# ----------------------------------------------------------------------------------------------
# the registry of what `evaluate` runs


@dataclass(frozen=True)
class AttackSetup:
    """What an attack is configured from, once per evaluation: the model (in eval mode), eps, the
    evaluation's seed and batch size, the number of classes (from one clean forward), the device,
    `warn` (records a warning in the result), and the PGD settings of `evaluate`."""

    model: nn.Module
    eps: float
    seed: int
    batch_size: int
    n_classes: int
    device: torch.device
    warn: Callable[[str], None]
    pgd_steps: int = 50
    pgd_restarts: int = 10
    pgd_spec: tuple | None = None  # pgd_step(...): (alpha, schedule, loss, rule)


@dataclass(frozen=True)
class Attack:
    """An entry of ATTACKS. build(name, setup) -> (settings, run(x, y, progress) -> (x_adv, robust
    or None)), where robust is the attack's own per-sample verdict (None: only our recheck counts)
    and `progress` takes .step(k) / .stage(text). label: shown in tables; named(settings): the
    label with its settings (PGD-50-10); units(settings): progress units per batch; is_autoattack:
    standard AutoAttack (the number to report); perturbs: False for clean (no eps-ball check);
    column: the report's column header where it is shorter than the titled label ("AA"; "": the
    titled label); requires: the optional package it runs on ("pyautoattack"; "": none), checked
    before anything trains (atas.config.check_attacks)."""

    label: str
    build: Callable[[str, AttackSetup], tuple[dict, Callable]]
    is_autoattack: bool = False
    perturbs: bool = True
    named: Callable[[dict], str] | None = None
    units: Callable[[dict], int] | None = None
    column: str = ""
    requires: str = ""

    def title(self, settings: dict) -> str:
        return self.named(settings) if self.named else self.label

    def units_per_batch(self, settings: dict) -> int:
        return self.units(settings) if self.units else 1


# Packages add theirs through the entry-point group "atas.attacks" (atas.registry).
ATTACKS = Registry("attack", group="atas.attacks", ordered="registration")


def register_attack(name: str, attack: Attack) -> Attack:
    return ATTACKS.register(name, attack)


def _build_clean(name: str, setup: AttackSetup) -> tuple[dict, Callable]:
    return {}, lambda x, y, progress: (x, None)


def _build_fgsm(name: str, setup: AttackSetup) -> tuple[dict, Callable]:
    fgsm = FGSM(setup.eps)
    return fgsm.settings(), lambda x, y, progress: (fgsm(setup.model, x, y), None)


def _build_pgd(name: str, setup: AttackSetup) -> tuple[dict, Callable]:
    alpha, schedule, loss, rule = setup.pgd_spec or pgd_step(setup.eps)
    pgd = PGD(setup.eps, steps=setup.pgd_steps, alpha=alpha, restarts=setup.pgd_restarts, schedule=schedule, loss=loss)
    settings = {**pgd.settings(), "step_rule": rule}
    return settings, lambda x, y, progress: pgd.run(setup.model, x, y, tick=progress.step)


register_attack("clean", Attack("clean", _build_clean, perturbs=False))
register_attack("fgsm", Attack("FGSM", _build_fgsm))
# PGD counts its steps (steps x restarts per batch) on the progress bar; the others count batches.
register_attack(
    "pgd",
    Attack(
        "PGD",
        _build_pgd,
        named=lambda s: f"PGD-{s['steps']}-{s['restarts']}",
        units=lambda s: s["steps"] * s["restarts"],
    ),
)
