"""The package metadata says what the code needs and what the repository ships."""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_license_file_matches_pyproject():
    assert PROJECT["license"] == "MIT" and PROJECT["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text


def test_python_classifiers_start_at_requires_python():
    low = re.fullmatch(r">=3\.(\d+)", PROJECT["requires-python"]).group(1)
    minors = sorted(
        int(c.rsplit(".", 1)[1])
        for c in PROJECT["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    )
    assert minors[0] == int(low) and minors == list(range(minors[0], minors[-1] + 1))


def test_optional_packages_are_extras_and_the_test_extra_pulls_them():
    core = " ".join(PROJECT["dependencies"])
    extras = PROJECT["optional-dependencies"]
    assert "pyautoattack" not in core and "matplotlib" not in core
    assert extras["aa"] == ["pyautoattack==0.2.0"] and extras["plots"][0].startswith("matplotlib")
    assert extras["lightning"][0].startswith("lightning")
    assert "atas[aa,plots,lightning]" in extras["all"] and "atas[aa,plots,lightning]" in extras["test"]
    # torch.amp.GradScaler(device), used by the trainer, exists from torch 2.3 on.
    assert "torch>=2.3" in PROJECT["dependencies"] and "torchvision>=0.18" in PROJECT["dependencies"]
