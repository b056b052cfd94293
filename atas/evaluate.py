"""The evaluation, by its first name: `atas.evaluate` re-exports the atas.evaluation package
(attacks, autoattack, protocol), where the code lives."""
from atas.evaluation.attacks import (ATTACKS, PGD, PGD_DEFAULTS, PGD_LOSSES, PGD_SCHEDULES, FGSM,  # noqa: F401
                                     EvaluationError, EvaluationWarning, check_adversarial, pgd_step)
from atas.evaluation.protocol import (WEAK_PGD_POINTS, _sanity_across_attacks, evaluate,  # noqa: F401
                                      fingerprint_model, format_table, save_result)

__all__ = ["ATTACKS", "EvaluationError", "EvaluationWarning", "FGSM", "PGD", "PGD_DEFAULTS", "PGD_LOSSES",
           "PGD_SCHEDULES", "WEAK_PGD_POINTS", "check_adversarial", "evaluate", "format_table", "pgd_step",
           "save_result"]
