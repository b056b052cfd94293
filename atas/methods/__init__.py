"""Training methods: one small file each, registered by name.

A method says how to make x_adv for a batch (and, if it needs one, its own training loss); the
threat model, the signed step, the per-sample store, the augmentation and the training loop are
shared. Adding a method is one file: a `@register` class with an `Options` dataclass, its
`check_options`, and the class attributes the trainer and the report read (label, capabilities,
logged stats); made visible by `--import` or the entry-point group "atas.methods"
(docs/contributing.md).
"""

# Importing the modules fills the registry.
from atas.methods import (  # noqa: F401
    aaer,
    atas,
    converge_smooth,
    elle,
    fgsm,
    fgsm_pco,
    fgsm_pgi,
    fgsm_rs,
    fgsm_uap,
    free,
    gat,
    grad_align,
    liet,
    n_fgsm,
    nuat,
    pgd,
    ssat,
    standard,
    zerograd,
)
from atas.methods.base import METHODS, BatchState, Method, get_method, list_methods, method, register

__all__ = ["METHODS", "BatchState", "Method", "get_method", "list_methods", "method", "register"]
