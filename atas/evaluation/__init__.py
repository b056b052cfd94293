"""Honest robustness evaluation: clean, FGSM, PGD-k-r and standard AutoAttack, under L-inf.

    attacks     FGSM, PGD (its losses and step schedules), the registry of attacks (ATTACKS)
    autoattack  standard AutoAttack and its components, through pyautoattack
    protocol    `evaluate`: the batch driver, its checks, the resumable state; the table and the file
    run         a trained run's evaluation (`evaluate_run`) and the test set it is measured on

The trainer's per-epoch probe and the monitor import only `attacks`.
"""

from atas.evaluation.attacks import (
    ATTACKS,
    FGSM,
    PGD,
    PGD_DEFAULTS,
    PGD_LOSSES,
    PGD_SCHEDULES,
    Attack,
    AttackSetup,
    EvaluationError,
    EvaluationWarning,
    check_adversarial,
    pgd_step,
    register_attack,
)
from atas.evaluation.protocol import WEAK_PGD_POINTS, attack_names, evaluate, format_table, save_result

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
    "WEAK_PGD_POINTS",
    "attack_names",
    "check_adversarial",
    "evaluate",
    "format_table",
    "pgd_step",
    "register_attack",
    "save_result",
]
