"""NuAT: single-step adversarial training with a nuclear-norm regulariser on the batch's logits.

Sriramanan, Addepalli, Baburaj, Babu, "Towards Efficient and Effective Adversarial Training",
NeurIPS 2021. https://openreview.net/forum?id=kuK2VARZGnI
Official code: https://github.com/val-iisc/NuAT (CIFAR10/NuAT_cifar10.py).

Threat model: L-inf ball of radius eps around x, pixels in [0, 1].
With F(.) the B x K matrix of the batch's logits (pre-softmax, one row per image), ||.||_* the
nuclear norm (sum of singular values) and t the step counter of the epoch (0, 1, 2, ...):
    X_0   = clip(X + init_factor * eps * S, 0, 1),   S ~ Bernoulli(+-1) per pixel
    G     = grad_X [ CE(F(X_0), Y) + a_t * lam_e * ||F(X_0) - F(X)||_* / B ]
            a_t = t mod 2 (the nuclear-norm term on every other step) or 1 (alternate=false)
    X_adv = project(X_0 + step_factor * eps * sign(G))
    loss  = CE(F(X), Y) + lam_e * ||F(X_adv) - F(X)||_* / B
The nuclear norm couples the batch: it penalises the joint (low-rank) structure of the logit
changes, not each image on its own. As in GAT (atas/methods/gat.py, whose attack and loss this
shares), the cross-entropy is on the clean images, F(X) is a constant in the attack and is
differentiated in the loss, and the clean forward is made once, in train mode, and kept.
lam_e ramps linearly from 0: lam_e = lam * min(1, (e - 1) / (lam_ramp * epochs)) for 1-based
epoch e (official: Nuc_reg += Nuc_max / (epochs - 10) after each epoch, i.e. 0 in the first
epoch and lam from epoch 91 of 100 on: lam_ramp 0.9). A run of unknown length (epochs=None) uses
lam from the start. While lam_e = 0 the regulariser (and its SVD) is skipped.

Arguments (defaults = the official CIFAR-10 script: ResNet-18, 100 epochs, batch 64, cyclic lr
0 -> 0.1 -> 0 over 90 epochs, then /10 twice):
    lam (4.5): the ramp's final weight (Nuc_max).
    lam_ramp (0.9): fraction of the run's epochs over which lam_e ramps up; 0 = lam from the start.
    alternate (True): the nuclear-norm term in the attack on every other step (official alt).
    init_factor (0.5): Bernoulli start of +-init_factor * eps (official -B_val 4 at eps 8).
    step_factor (1.0): attack step = step_factor * eps (-Feps 8 at eps 8).
    bn_mode ("eval"): BatchNorm mode of the attack (the official code attacks in eval mode).
    eps_ramp_epochs (0): the shared eps schedule; start, step and projection scale with eps_t.
Where the sources differ: the README writes the norm without the 1/B; the code divides by its
fixed batch size 64 (also for a smaller last batch); here by the batch's own size B, as the FastAT
benchmark (fast_at/nu_at.py). The norm of a B x K matrix of rank <= K grows like sqrt(B), so lam
is tied to the batch size: lam 4.5 at batch 64 is about 4.5 * sqrt(64/128) = 3.2 at batch 128.
The benchmark (configs/cifar10/nu_at.yaml, batch 128) uses lam 4.0, ramped over the whole run
(lam_ramp 1.0, reaching 3.96 in the last epoch), computes the clean logits for the attack in
train mode and attacks in train mode, and smooths the labels (0.4) in the attack too; the default
here follows the official code. The two-step NuAT2 and the hybrid NuAT-H are not implemented.
Cost: 3 forward + 3 backward passes per step (as GAT), plus two SVDs of a B x K matrix (tiny);
the benchmark measured 1.54x FGSM-RS's time.

Example:
    atas train fmnist method.name=nuat
    atas train fmnist method.name=nuat method.lam=4 method.lam_ramp=1
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from atas.methods.base import Method, register
from atas.methods.gat import GAT
from atas.values import ConfigError


def nuclear_distance(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """||a - b||_* / B for the B x K logit matrices, in float32 (the SVD has no half kernels)."""
    return torch.linalg.matrix_norm(logits_a.float() - logits_b.float(), ord="nuc") / len(logits_a)


@register
class NuAT(GAT):
    name = "nuat"
    label = "NuAT"
    # The guard's remedy (GAT's: double lam) goes up to 4 x the paper's 4.5: the nuclear-norm term
    # is what keeps the single-step training from catastrophic overfitting.
    remedy_cap = 18.0

    @dataclass
    class Options(Method.Options):
        lam: float = 4.5
        lam_ramp: float = 0.9
        alternate: bool = True
        init_factor: float = 0.5
        step_factor: float = 1.0
        bn_mode: str = "eval"

    @classmethod
    def check_options(cls, o) -> None:
        super(GAT, cls).check_options(o)  # the base checks, not GAT's boost options
        if not (o.lam >= 0 and math.isfinite(o.lam)):
            raise ConfigError(f"method.lam must be a finite number >= 0, got {o.lam}")
        if not 0 <= o.lam_ramp <= 1:
            raise ConfigError(
                f"method.lam_ramp must lie in [0, 1] (a fraction of the epochs; 0: no ramp), got {o.lam_ramp}"
            )
        cls.check_attack(o)

    def lam_at(self, epoch: int) -> float:
        o = self.opt
        if o.lam_ramp == 0 or self.epochs is None:
            return o.lam
        return o.lam * min(1.0, (epoch - 1) / (o.lam_ramp * self.epochs))

    def distance(self, logits_clean, logits_adv):
        return nuclear_distance(logits_clean, logits_adv)
