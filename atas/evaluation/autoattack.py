"""Standard AutoAttack (fra31/auto-attack, the `pyautoattack` package, run through its own
`run_standard_evaluation`) and its first components run alone, as entries of the attack registry.

    "aa"       AutoAttack (standard): APGD-CE, APGD-T, FAB-T, Square, cascaded on still-robust points
    "apgd-ce"  APGD-CE only, configured as inside standard AA (NOT AutoAttack)
    "apgd-t"   APGD-T only, configured as inside standard AA (NOT AutoAttack)

pyautoattack is an optional dependency (`atas[aa]`): only these attacks need it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from atas.evaluation.attacks import Attack, AttackSetup, register_attack
from atas.extras import require
from atas.provenance import version


def build_autoattack(name: str, setup: AttackSetup) -> tuple[dict, Callable]:
    """Standard AutoAttack ("aa") or one of its components run alone, configured as inside it."""
    model, eps, seed, batch_size, n_classes, dev, warn = (
        setup.model,
        setup.eps,
        setup.seed,
        setup.batch_size,
        setup.n_classes,
        setup.device,
        setup.warn,
    )

    # an optional dependency (`atas[aa]`): only AutoAttack evaluations need it
    pyautoattack = require("pyautoattack", f"attack {name!r} (AutoAttack)")

    targeted = name in ("aa", "apgd-t")
    if targeted and n_classes < 4:
        raise ValueError(f"{name} uses the targeted DLR loss, which needs >= 4 classes; the model has {n_classes}")
    if name == "aa":
        aa = pyautoattack.AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=seed, device=dev)
    else:
        aa = pyautoattack.AutoAttack(
            model, norm="Linf", eps=eps, version="custom", seed=seed, device=dev, attacks=[name]
        )
        # configured exactly as inside standard AA, so this is AA's first stage run alone
        aa.apgd.n_restarts = 1
        aa.apgd_targeted.n_restarts = 1
        aa.apgd_targeted.n_target_classes = 9
    if targeted and n_classes - 1 < 9:
        # standard AA targets the 9 most likely wrong classes; with fewer classes that is "all"
        # (pyautoattack would index past the last class and crash)
        warn(
            f"{name}: the model has {n_classes} classes, so APGD-T/FAB-T use {n_classes - 1} "
            "target classes instead of standard AutoAttack's 9"
        )
        aa.apgd_targeted.n_target_classes = n_classes - 1
        aa.fab.n_target_classes = n_classes - 1
    aa.verbose = False
    settings = {
        "norm": "Linf",
        "eps": eps,
        "version": aa.version,
        "attacks": list(aa.attacks_to_run),
        "seed": seed,
        "pyautoattack": version("pyautoattack"),
    }
    if "apgd-ce" in aa.attacks_to_run:
        settings["apgd-ce"] = {
            "n_iter": aa.apgd.n_iter,
            "n_restarts": aa.apgd.n_restarts,
            "rho": aa.apgd.thr_decr,
            "eot_iter": aa.apgd.eot_iter,
        }
    if "apgd-t" in aa.attacks_to_run:
        t = aa.apgd_targeted
        settings["apgd-t"] = {
            "n_iter": t.n_iter,
            "n_restarts": t.n_restarts,
            "n_target_classes": t.n_target_classes,
            "rho": t.thr_decr,
        }
    if "fab-t" in aa.attacks_to_run:
        settings["fab-t"] = {"n_iter": aa.fab.n_iter, "n_restarts": 1, "n_target_classes": aa.fab.n_target_classes}
    if "square" in aa.attacks_to_run:
        settings["square"] = {
            "n_queries": aa.square.n_queries,
            "p_init": aa.square.p_init,
            "n_restarts": aa.square.n_restarts,
        }
    if name != "aa":
        settings["note"] = "one AutoAttack component run alone: NOT AutoAttack"

    def run(x: torch.Tensor, y: torch.Tensor, progress):
        # Progress within the chunk: one line per component run (a restart or a target class).
        for component, attack in (
            ("apgd-ce", aa.apgd),
            ("apgd-t", aa.apgd_targeted),
            ("fab-t", aa.fab),
            ("square", aa.square),
        ):
            _report_runs(attack, component, progress)
        # pyautoattack reports its own checks (randomised / dynamic defence, probabilities,
        # Square beating the gradient attacks) through the "auto-attack" logger: collect them.
        x_adv, y_adv = _with_aa_log(lambda: aa.run_standard_evaluation(x, y, batch_size=batch_size), warn)
        return x_adv.to(x.device), (y_adv.to(y.device) == y)

    return settings, run


def _report_runs(attack: Any, component: str, progress) -> None:
    """Make every attack_single_run of a pyautoattack attack object report its start."""
    single = type(attack).attack_single_run  # the class's, so wrapping twice never nests
    count = [0]

    def wrapped(*args, **kwargs):
        count[0] += 1
        progress.stage(f"{component} run {count[0]}")
        return single(attack, *args, **kwargs)

    attack.attack_single_run = wrapped


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


def _with_aa_log(fn: Callable, warn):
    logger, handler = logging.getLogger("auto-attack"), _ListHandler()
    logger.addHandler(handler)
    try:
        return fn()
    finally:
        logger.removeHandler(handler)
        for msg in handler.records:
            warn(f"pyautoattack: {msg}")


register_attack(
    "aa", Attack("AutoAttack (standard)", build_autoattack, is_autoattack=True, column="AA", requires="pyautoattack")
)
register_attack("apgd-ce", Attack("APGD-CE only (NOT AutoAttack)", build_autoattack, requires="pyautoattack"))
register_attack("apgd-t", Attack("APGD-T only (NOT AutoAttack)", build_autoattack, requires="pyautoattack"))
