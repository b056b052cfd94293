"""Training methods: one small file each, registered by name.

A method says how to make x_adv for a batch (and, if it needs one, its own training loss); the
threat model, the signed step, the per-sample store, the augmentation and the training loop are
shared. Adding a method is one file: a `@register` class with an `Options` dataclass, its
`check_options`, and the class attributes the trainer and the report read (label, capabilities,
logged stats); made visible by `--import` or the entry-point group "atas.methods"
(docs/contributing.md).
"""
from atas.methods.base import METHODS, BatchState, Method, get_method, list_methods, method, register

# Importing the modules fills the registry.
from atas.methods import standard, fgsm_rs, pgd, atas, n_fgsm, grad_align, fgsm_pgi, free, elle, gat, nuat, ssat, liet  # noqa: E402,F401

__all__ = ["METHODS", "BatchState", "Method", "get_method", "list_methods", "method", "register"]
