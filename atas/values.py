"""Typed values at the boundary: exact fractions, type-checked dataclasses, one error type.

A leaf module (it imports nothing of atas): the config, every method's Options and the command
line all parse values here, so a method file needs nothing from the config to describe itself.

    parse_fraction("8/255")              # 8/255 exactly as a float, never `eval`
    Frac("8/255")                        # a float that remembers it was written 8/255
    build_dataclass(Options, {"c": "0.02"}, "method.")   # type-checked, errors name the key
    eps_multiple("eps/4")                # 0.25: the one grammar of a number in units of eps
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import math
import re
import types
import typing
from typing import Any

from atas.errors import AtasError

__all__ = [
    "ConfigError",
    "NotFiniteError",
    "Frac",
    "parse_fraction",
    "eps_multiple",
    "coerce",
    "build_dataclass",
    "to_plain",
]


class ConfigError(AtasError, ValueError):
    """A config value is wrong; the message says which key and what to write instead."""


# --------------------------------------------------------------------------------------------
# Exact fractions such as 8/255
# --------------------------------------------------------------------------------------------
_FRACTION = re.compile(r"^\s*([+-]?\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*(?:/\s*(\d+(?:\.\d*)?))?\s*$")


class NotFiniteError(ConfigError):
    """A number that is inf, NaN or too large for a float (1e400): no setting means that."""


def parse_fraction(text: str | float | int) -> float:
    """'8/255' -> 8/255 exactly as a float; '0.3' -> 0.3; 0.3 -> 0.3. Never evaluates code.
    Only finite numbers: 1e400 (an OverflowError deep inside the run otherwise), inf and NaN are
    refused here."""
    if isinstance(text, bool):
        raise ConfigError(f"expected a number such as 0.3 or 8/255, got {text!r}")
    if isinstance(text, (int, float)):
        try:
            value = float(text)
        except OverflowError:  # a huge int
            value = math.inf
    else:
        m = _FRACTION.match(str(text))
        if not m:
            raise ConfigError(f"expected a number such as 0.3 or 8/255, got {text!r}")
        num, den = m.group(1), m.group(2)
        if den is not None and fractions.Fraction(den) == 0:
            raise ConfigError(f"division by zero in {text!r}")
        exact = fractions.Fraction(num) / fractions.Fraction(den) if den else fractions.Fraction(num)
        try:
            value = float(exact)
        except OverflowError:
            value = math.inf
    if not math.isfinite(value):
        raise NotFiniteError(f"expected a finite number, got {text!r} (beyond the float range, about 1.8e308)")
    return value


# A multiple of eps: "eps/4", "0.25eps", "0.25*eps", "2.5*eps/50", "2eps" (no sign: steps and radii are
# positive). The one grammar for numbers in units of eps (the PGD step, ATAS's step numerator).
_NUMBER = r"\d+(?:\.\d*)?(?:e[+-]?\d+)?"
_EPS_MULTIPLE = re.compile(rf"(?:({_NUMBER})\*?)?eps(?:/({_NUMBER}))?")


@functools.lru_cache(maxsize=256)  # read on the training step (ATAS's numerator): parsed once per spelling
def eps_multiple(text: str) -> float | None:
    """The coefficient of eps that `text` writes ("eps/4" -> 0.25, "2eps" -> 2.0, "2.5*eps/50" ->
    0.05, exact fractions rounded once to a float), or None when `text` is not a multiple of eps
    (a plain number, read by `parse_fraction`). Spaces and case are ignored."""
    m = _EPS_MULTIPLE.fullmatch(str(text).replace(" ", "").lower())
    if m is None:
        return None
    num, den = fractions.Fraction(m.group(1) or "1"), fractions.Fraction(m.group(2) or "1")
    if den == 0:
        raise ConfigError(f"division by zero in {text!r}")
    return float(num / den)


class Frac(float):
    """A float that remembers how it was written ('8/255'), for honest reports."""

    text: str

    def __new__(cls, value: str | float | int | Frac) -> Frac:
        if isinstance(value, Frac):
            return value
        obj = super().__new__(cls, parse_fraction(value))
        obj.text = str(value).replace(" ", "") if isinstance(value, str) else repr(float(value))
        return obj

    def __repr__(self) -> str:
        return self.text

    __str__ = __repr__

    def __reduce__(self):  # copy/deepcopy keep the text
        return (Frac, (self.text,))


# --------------------------------------------------------------------------------------------
# Dicts -> typed dataclasses, with errors that name the key
# --------------------------------------------------------------------------------------------
def to_plain(obj: Any) -> Any:
    """Dataclasses, Fracs and containers -> plain YAML/JSON values (a Frac as the text it was written)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Frac):
        return obj.text
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert `value` to the annotated type `tp`; raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in options:
                return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list such as 24,28, got {value!r}")
        return [coerce(v, item_tp, key) for v in value]
    if tp is Frac:
        try:
            return Frac(value)
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return parse_fraction(value)
        except NotFiniteError as e:
            raise ConfigError(f"{key}: {e}") from None
        except ConfigError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, bool):  # `amp: off` in a YAML recipe arrives as False
            return "on" if value else "off"
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def build_dataclass(cls: type, values: dict, prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from a (possibly partial) dict, type-checking every key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + str(k) for k in sorted(unknown, key=str))}; "
            f"valid keys under '{prefix or 'top level'}': {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name}: expected a mapping")
            kwargs[name] = build_dataclass(typing.cast(type, tp), value, f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(value, tp, prefix + name)
    return cls(**kwargs)
