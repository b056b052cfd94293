"""FGSM-RS-CS and FGSM-MEP-CS: ConvergeSmooth's constraint on the loss change between epochs.

Zhao, Zhang, Kong, Yin, "Fast Adversarial Training with Smooth Convergence", ICCV 2023.
https://openaccess.thecvf.com/content/ICCV2023/html/Zhao_Fast_Adversarial_Training_with_Smooth_Convergence_ICCV_2023_paper.html
Official code: github.com/FAT-CS/ConvergeSmooth (FGSM_RS_CS.py, FGSM_MEP_CS.py).

Threat model: L-inf ball of radius eps around x, pixels in [0, 1] (FGSM-RS-CS, as its official
code, steps eps from the random start without projecting back: x_adv may lie up to 2 eps away).
The paper's observation: catastrophic overfitting comes with outliers in the loss from one epoch
to the next; ConvergeSmooth keeps the loss of each batch within a band around the previous epoch's
mean. With l_t the "normal" loss of the batch (below), L_{e-1} the mean of l over the previous epoch
and beta = L_{e-1} - L_{e-2} the last change between epochs:
    tau  = clip(beta, gamma / ratio, gamma)                        the allowed change
    loss = LS-CE(f(x_adv), y) + [|l_t - L_{e-1}| > tau] * w2 * sign(l_t - L_{e-1}) * l_t
A batch whose normal loss jumped up (under-fitting) is pushed down, one whose loss fell too fast
(over-fitting) is pushed back up. The constraint is on in the epochs e (1-based) with
stride + 1 < e <= E - stride (E: the planned epochs; None: no end), and L, beta start at 0, as
the official code does with its epoch counter (it also pauses around its learning-rate drops, which
a method does not see here: see below).
`fgsm_rs_cs`: FGSM-RS's attack (atas/methods/fgsm_rs.py) from x_0 = clip(x + U(-eps, eps), 0, 1),
    x_adv = clip(x_0 + alpha * sign(grad_x CE(f(x_0), y)), 0, 1), and l_t = LS-CE(f(x_0), y), a
    fresh forward at the random start (the official code's `benign_output = model(data)`).
`fgsm_mep_cs`: FGSM-MEP's attack, the momentum-of-epochs prior of `fgsm_pgi`
    (atas/methods/fgsm_pgi.py, which IS the official FGSM_MEP.py of Jia et al.: this class
    subclasses it and adds only the constraint), with l_t = LS-CE(f(x), y) on the clean image (the
    official MEP-CS's `model(X)`). The official MEP-CS leaves the prior regulariser of FGSM-PGI
    off (its --reg-single flag): lam defaults to 0 here; lam = 10 gives FGSM-PGI + CS.
LS-CE: cross-entropy against targets with ls_factor on the true class and the rest spread evenly
(official --factor 0.6), in the training term and in l_t.

Arguments (defaults = the official scripts and the benchmark's fgsm_rs_cs.yaml / fgsm_mep_cs.yaml,
CIFAR-10 eps 8/255):
    gamma (0.03): gamma_max, the largest allowed change of l between epochs (--gamma).
    ratio (1.0): gamma_max / gamma_min (--ratio; 1: the band is exactly gamma).
    w2 (1.0): weight of the constraint term (--w2).
    stride (1): epochs kept free of the constraint at the start and end of the run (--stride,
        read by the official code but not declared by its parser; the benchmark sets 1).
    ls_factor (0.6): true-class probability of the smoothed targets (--factor).
  fgsm_rs_cs also: alpha_factor (1.0): step alpha = alpha_factor * eps (official --alpha =
    --epsilon); project (False): True projects x_adv to the eps ball (FGSM-RS proper; the official
    code and the benchmark do not); bn_mode ("train").
  fgsm_mep_cs also: lam (0.0), momentum_decay (0.3), alpha_factor (1.0), reset_every (40), bn_mode
    ("train"): as fgsm_pgi's (the official MEP-CS: --momentum_decay 0.3, --epochs_reset 40).
The constraint's state (L_{e-1}, beta, the running sum and count of l in this epoch, the epoch it
belongs to) is in state_dict(), so a resumed run continues exactly; it is updated without a host
sync (the test above is a torch.where).
Nothing is searched: gamma is a change of a cross-entropy between epochs, the same quantity on
every dataset; the paper keeps one value across its datasets and budgets.
Where ours differs from the official code: (1) its learning-rate schedule is fixed in the script
(drops at epochs 100 and 105 of 110) and the constraint pauses `stride` epochs around each drop;
a method does not see the schedule, so ours pauses only at the run's start and end (the
benchmark's 100-epoch OneCycle run has exactly this window). (2) The regularisers behind its
--reg-single / --reg-multi flags (off in every official and benchmark setting) and the paper's
weight centralization are not implemented, except reg-single in fgsm_mep_cs, which is fgsm_pgi's
lam. (3) Its --initialize flag (l_t taken from the attack's own forward) backpropagates through
a freed graph in the official code; not offered. (4) fgsm_rs_cs's training term takes the run's
label_smoothing on top of ls_factor (the benchmark's composition: its criterion smooths 0.4 on
top of the 0.6 targets); fgsm_mep_cs's term is fgsm_pgi's and refuses label_smoothing > 0.
Cost: fgsm_rs_cs 3 forward + 3 backward (attack, training forward on x_adv and on x_0, one backward
through both); fgsm_mep_cs the same, plus one backward with lam > 0 (fgsm_pgi's regulariser).

Example:
    atas train fmnist method.name=fgsm_rs_cs
    atas train fmnist method.name=fgsm_mep_cs method.lam=10
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from atas.methods.base import Method, register
from atas.methods.fgsm_pgi import FGSMPGI, smoothed_ce
from atas.methods.fgsm_rs import FGSMRS
from atas.values import ConfigError

_STATE_KEYS = ("prev_mean", "beta", "sum", "count", "epoch")


def soft_targets(y: torch.Tensor, num_classes: int, true_prob: float) -> torch.Tensor:
    """[B, K] targets with true_prob on y and (1 - true_prob) / (K - 1) on every other class."""
    rest = (1.0 - true_prob) / (num_classes - 1)
    return torch.full((len(y), num_classes), rest, device=y.device).scatter_(1, y[:, None], true_prob)


def smoothness_term(
    normal_loss: torch.Tensor, prev_mean: torch.Tensor, beta: torch.Tensor, gamma: float, ratio: float, w2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(w2 * sign(l - L) * l where |l - L| > clip(beta, gamma / ratio, gamma), else 0; fired) for the
    batch's normal loss l (with its graph) and the previous epoch's mean L."""
    diff = normal_loss.detach() - prev_mean
    fired = diff.abs() > beta.clamp(min=gamma / ratio, max=gamma)
    term = w2 * diff.sign() * normal_loss
    return torch.where(fired, term, torch.zeros_like(term)), fired


class ConvergeSmoothMixin(Method):
    """The constraint, its per-epoch state and its checkpoint, on top of a single-step method."""

    has_regularizer = True
    prone_to_co = False
    logged_stats = {"cs_active": "fraction"}  # the fraction of steps on which the constraint fired

    @classmethod
    def check_options(cls, o) -> None:
        super().check_options(o)
        if not (o.gamma > 0 and math.isfinite(o.gamma)):
            raise ConfigError(f"method.gamma (the allowed loss change between epochs) must be > 0, got {o.gamma}")
        if not o.ratio >= 1:
            raise ConfigError(f"method.ratio (gamma_max / gamma_min) must be >= 1, got {o.ratio}")
        if not (o.w2 >= 0 and math.isfinite(o.w2)):
            raise ConfigError(f"method.w2 must be a finite number >= 0, got {o.w2}")
        if not (isinstance(o.stride, int) and o.stride >= 0):
            raise ConfigError(f"method.stride must be an integer >= 0 (epochs), got {o.stride!r}")
        if not 0 < o.ls_factor <= 1:
            raise ConfigError(f"method.ls_factor (true-class probability) must lie in (0, 1], got {o.ls_factor}")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # L_{e-1}, beta (float32, as the official tensors), this epoch's sum of l * B and count
        # (float64, as its Python floats) and the epoch they are summed for.
        self._cs = {
            "prev_mean": torch.zeros(()),
            "beta": torch.zeros(()),
            "sum": torch.zeros((), dtype=torch.float64),
            "count": torch.zeros((), dtype=torch.float64),
            "epoch": 0,
        }

    def on_epoch_start(self, epoch, store):
        super().on_epoch_start(epoch, store)
        s = self._cs
        if epoch <= s["epoch"]:
            return  # the same epoch again (a resumed epoch): keep summing
        if s["epoch"] > 0:  # close the epoch that was summed: L and beta move on
            mean = (s["sum"] / s["count"].clamp_min(1)).to(s["prev_mean"].dtype)
            s["beta"], s["prev_mean"] = mean - s["prev_mean"], mean
            s["sum"], s["count"] = torch.zeros_like(s["sum"]), torch.zeros_like(s["count"])
        s["epoch"] = epoch

    def constraint_active(self, epoch: int) -> bool:
        """Whether epoch (1-based) lies in the window stride + 1 < epoch <= E - stride."""
        stride = self.opt.stride
        return epoch - 1 > stride and (self.epochs is None or epoch - 1 < self.epochs - stride)

    def smoothness(self, normal_loss: torch.Tensor, batch: int, epoch: int) -> torch.Tensor:
        """The constraint's term for the batch (0 outside the window); sums l for the epoch's mean."""
        s, o = self._cs, self.opt
        if s["sum"].device != normal_loss.device:
            for key in _STATE_KEYS[:4]:
                s[key] = s[key].to(normal_loss.device)
        s["sum"] = s["sum"] + normal_loss.detach().double() * batch
        s["count"] = s["count"] + batch
        if not self.constraint_active(epoch):
            self.stats = {**self.stats, "cs_active": torch.zeros(batch, device=normal_loss.device)}
            return torch.zeros((), device=normal_loss.device)
        term, fired = smoothness_term(normal_loss.float(), s["prev_mean"], s["beta"], o.gamma, o.ratio, o.w2)
        self.stats = {**self.stats, "cs_active": fired.float().expand(batch)}
        return term

    def method_state(self) -> dict:
        state = dict(super().method_state())
        state.update({f"cs_{k}": (v.clone() if torch.is_tensor(v) else v) for k, v in self._cs.items()})
        return state

    def load_method_state(self, state: dict) -> None:
        super().load_method_state(state)
        missing = [f"cs_{k}" for k in _STATE_KEYS if f"cs_{k}" not in state]
        if missing:
            raise ValueError(f"{self.name}: checkpoint lacks {missing}; it was not written by {self.name}")
        self._cs = {k: (state[f"cs_{k}"].clone() if k != "epoch" else int(state[f"cs_{k}"])) for k in _STATE_KEYS}

    def remedy(self, attempt):
        # Zhao et al. 2023: CO shows as an outlier in the loss between epochs; a narrower band
        # constrains more of them. Halve gamma per recovery.
        return {"gamma": round(self.opt.gamma / 2, 6)}


@register
class FGSMRSCS(ConvergeSmoothMixin, FGSMRS):
    name = "fgsm_rs_cs"
    label = "FGSM-RS-CS"
    cost = "3 fwd + 3 bwd"
    passes = (3, 3)

    @dataclass
    class Options(FGSMRS.Options):
        alpha_factor: float = 1.0
        project: bool = False
        gamma: float = 0.03
        ratio: float = 1.0
        w2: float = 1.0
        stride: int = 1
        ls_factor: float = 0.6

    def start(self, x, ball):
        self._x_start = x_start = super().start(x, ball)
        return x_start

    def step(self, x_start, grad, x, ball):
        if self.opt.project:
            return super().step(x_start, grad, x, ball)
        # The official step: from the random start, clipped to the image only (up to 2 eps from x).
        return (x_start + self.opt.alpha_factor * ball.eps * grad.sign()).clamp_(0.0, 1.0).detach()

    def training_loss(self, model, x_adv, y, x, state):
        x_start = getattr(self, "_x_start", None)
        if x_start is None:
            raise RuntimeError("fgsm_rs_cs: loss() needs the random start made by perturb() for this batch")
        self._x_start = None
        logits = model(x_adv)
        targets = soft_targets(y, logits.shape[1], self.opt.ls_factor)
        loss = self.cross_entropy(logits, targets)
        self.stats = {}
        normal = self.cross_entropy(model(x_start), targets)  # l_t at the random start, a fresh forward
        return loss + self.smoothness(normal, len(y), state.epoch), logits


@register
class FGSMMEPCS(ConvergeSmoothMixin, FGSMPGI):
    name = "fgsm_mep_cs"
    label = "FGSM-MEP-CS"
    cost = "3 fwd + 3 bwd (+1 bwd with lam > 0)"
    passes = (3, 3)

    @dataclass
    class Options(FGSMPGI.Options):
        lam: float = 0.0
        gamma: float = 0.03
        ratio: float = 1.0
        w2: float = 1.0
        stride: int = 1

    def passes_per_step(self):
        return (3, 4) if self.opt.lam > 0 else (3, 3)

    def training_loss(self, model, x_adv, y, x, state):
        self.stats = {}
        loss, logits = super().training_loss(model, x_adv, y, x, state)  # fgsm_pgi's: LS-CE (+ lam * reg)
        normal = smoothed_ce(model(x), y, self.opt.ls_factor)  # l_t on the clean image
        return loss + self.smoothness(normal, len(y), state.epoch), logits
