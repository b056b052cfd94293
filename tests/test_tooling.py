"""The tools a maintainer expects, run by the suite: ruff (lint; the format check is pending the
one-time reformat), mypy on atas/ at the strictness pyproject.toml states. Each is skipped, saying
why, where the tool is not installed (`pip install -e ".[test]"` installs both)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TREES = ["atas", "tests", "benchmarks", "examples"]


def _tool(name: str) -> list[str]:
    """The tool's command: its module under this interpreter, else the executable on PATH."""
    import importlib.util

    if importlib.util.find_spec(name) is not None:
        return [sys.executable, "-m", name]
    exe = shutil.which(name)
    if exe is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]' installs it)")
    return [exe]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_check_is_clean():
    proc = _run([*_tool("ruff"), "check", *TREES])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format_leaves_the_tree_as_it_is():
    proc = _run([*_tool("ruff"), "format", "--check", *TREES])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_mypy_is_clean_on_the_package():
    proc = _run([*_tool("mypy")])  # files and strictness: [tool.mypy] in pyproject.toml
    assert proc.returncode == 0, proc.stdout + proc.stderr
