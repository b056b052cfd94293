"""Optional dependencies: the core trains and evaluates without them; a feature that needs one
says which `pip install` brings it.

    pyautoattack  `atas[aa]`     standard AutoAttack (`--attacks aa`, apgd-ce, apgd-t)
    matplotlib    `atas[plots]`  the PNG plots of `atas compare`'s report
    scipy         (pip install scipy)  reading SVHN's .mat files
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from atas.errors import AtasError

# module -> what to install: the package extra where there is one, else the plain package.
INSTALL = {
    "pyautoattack": "pip install 'atas[aa]'  (or: pip install pyautoattack==0.2.0)",
    "matplotlib": "pip install 'atas[plots]'  (or: pip install matplotlib)",
    "scipy": "pip install scipy",
}


class MissingDependencyError(AtasError, ImportError):
    """An optional package a feature needs is not installed; the message says what to install."""


def available(module: str) -> bool:
    """Whether `module` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def require(module: str, feature: str) -> ModuleType:
    """Import `module`, or raise MissingDependencyError naming `feature` and the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{feature} needs the {module} package, which is not installed: "
            f"{INSTALL.get(module, f'pip install {module}')}"
        ) from e
