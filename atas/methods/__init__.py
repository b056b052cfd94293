"""Training methods: one small file each, registered by name.

A method says how to make x_adv for a batch (and, if it needs one, its own training loss); the
threat model, the signed step, the per-sample store, the augmentation and the training loop are
shared. Adding a method is one file: a `@register` class with an `Options` dataclass, its
`check_options`, and the class attributes the trainer and the report read (label, capabilities,
logged stats); made visible by `--import` or the entry-point group "atas.methods"
(docs/contributing.md).
"""
# Importing the modules fills the registry.
from atas.methods import atas, elle, fgsm_pgi, fgsm_rs, free, grad_align, n_fgsm, pgd, standard  # noqa: F401
from atas.methods.base import METHODS, BatchState, Method, get_method, list_methods, method, register

__all__ = ["METHODS", "BatchState", "Method", "get_method", "list_methods", "method", "register"]
