"""The root of every error `atas` raises on purpose, so a caller catches the package's errors in one place.

    try:
        atas.train(cfg)
    except atas.AtasError as e:      # a bad config, missing data, an unusable checkpoint, ...
        print(e)

Each error class also keeps the built-in base it had before the root existed (ConfigError is a
ValueError, DataNotFoundError a FileNotFoundError, CheckpointError a RuntimeError, EvaluationError an
AssertionError), so an `except ValueError` written against an earlier release still catches it.

A leaf module: it imports nothing of atas.
"""

from __future__ import annotations

__all__ = ["AtasError"]


class AtasError(Exception):
    """An error of `atas` whose message says what went wrong and what to do.

    exit_status: what the `atas` command exits with after printing the message as one line (2: an
    error the user can fix; the CLI's docstring lists the others); None for an error that means a
    bug in atas or in a plugin (an attack that leaves the eps-ball): the CLI shows its traceback."""

    exit_status: int | None = 2
