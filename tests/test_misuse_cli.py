"""Misuse of the command line and of the files around a run: every case here once ended in a
traceback, a silently wrong file or advice that named a broken file. Each must now give one line
that says what to do, exit 2, and leave nothing wrong behind."""
from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from atas import data
from atas.cli import main as cli
from atas.config import ConfigError, load_config

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_data = pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist")
REPO = Path(__file__).resolve().parents[1]

TINY = ["model.arch=wong_cnn", "data.subset=256", "train.batch_size=64", "train.probe_size=32",
        "train.probe_steps=1", "train.progress=false", "eval.at_end=false", "eval.attacks=clean",
        "method.atas.warmup_epochs=1", "train.deterministic=true"]
EVAL = ["--attacks", "clean", "--n-examples", "16", "--no-progress"]


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("ATAS_DEBUG", raising=False)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    status = cli([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line(err: str, *fragments: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if "WARNING" not in line]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def write_idx(path: Path, array: np.ndarray, magic: int, gz: bool = False) -> Path:
    raw = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path, raw = path.with_name(path.name + ".gz"), gzip.compress(raw)
    path.write_bytes(raw)
    return path


def fmnist_dir(folder: Path, n: int = 32, gz: bool = False) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    files = {}
    for prefix in ("train", "t10k"):
        files[f"{prefix}-images"] = write_idx(folder / f"{prefix}-images-idx3-ubyte",
                                              rng.integers(0, 256, (n, 28, 28)), 2051, gz)
        files[f"{prefix}-labels"] = write_idx(folder / f"{prefix}-labels-idx1-ubyte",
                                              rng.integers(0, 10, (n,)), 2049, gz)
    return files


@pytest.fixture
def no_system_data(tmp_path, monkeypatch):
    """No cache and no Debian copy: only what a test puts in place."""
    monkeypatch.setenv("ATAS_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian-package")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-epoch run, trained once; tests work on copies (`run_copy`)."""
    from atas.trainer import train

    if not FMNIST.exists():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    root = tmp_path_factory.mktemp("finished")
    train(load_config("fmnist", TINY + [f"out_dir={root}", "train.epochs=2"]), run_dir=root / "run")
    return root / "run"


@pytest.fixture
def run_copy(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "run")
    return tmp_path / "run"


# ---------------------------------------------------------------- 14. tracebacks that were user errors
@pytest.mark.parametrize("override", ["method.eps=1e400", "optim.lr=1e400", "method.c=1e400", "method.eps=1e400/255"])
def test_overflowing_numbers_are_refused_naming_the_key(override, capsys, tmp_path):
    status, _, err = run_cli(capsys, "train", "fmnist", override, "--run-dir", tmp_path / "r")
    assert status == 2
    assert_one_line(err, override.split("=")[0], "finite number", "1e400")
    with pytest.raises(ConfigError, match="optim.lr: expected a finite number"):
        load_config("fmnist", ["optim.lr=.inf"])
    assert not (tmp_path / "r").exists()


def test_a_label_beyond_the_classes_is_refused_naming_the_file(tmp_path, capsys, no_system_data):
    files = fmnist_dir(tmp_path / "d")
    labels = np.zeros(32, np.uint8)
    labels[5] = 77
    write_idx(files["train-labels"], labels, 2049)
    status, _, err = run_cli(capsys, "train", "fmnist", f"data.data_dir={tmp_path / 'd'}", *TINY, "data.subset=32",
                             "train.epochs=1", "--run-dir", tmp_path / "run")
    assert status == 2
    assert_one_line(err, str(files["train-labels"]), "label 77 at position 5", "outside 0..9")
    assert not (tmp_path / "run").exists()  # refused before config.yaml was written


def test_an_unreadable_data_file_is_one_line(tmp_path, capsys, monkeypatch, no_system_data):
    files = fmnist_dir(tmp_path / "d")
    target = files["train-images"]
    if os.geteuid() != 0:
        target.chmod(0)
    else:  # root reads anything: the permission error is simulated where the file is opened
        real = Path.read_bytes

        def read_bytes(self):
            if self == target:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
    status, _, err = run_cli(capsys, "train", "fmnist", f"data.data_dir={tmp_path / 'd'}", *TINY, "data.subset=32",
                             "train.epochs=1", "--run-dir", tmp_path / "run")
    target.chmod(0o644)
    assert status == 2
    assert_one_line(err, f"cannot read {target}", "Permission denied", "chmod a+r")


# ---------------------------------------------------------------- 17. no silent switch to other data
def test_an_explicit_data_dir_without_data_is_an_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    status, _, err = run_cli(capsys, "train", "fmnist", f"data.data_dir={empty}", *TINY, "train.epochs=1",
                             "--run-dir", tmp_path / "run")
    assert status == 2 and "Traceback" not in err
    assert f"not found in data.data_dir={empty}" in err and "train-images-idx3-ubyte" in err
    assert "leave data.data_dir unset" in err
    assert not (tmp_path / "run").exists()


def test_data_source_names_the_copy_used(tmp_path, monkeypatch):
    from atas.data import DataNotFoundError, data_source

    fmnist_dir(tmp_path / "mine")
    assert data_source("fmnist", "train", tmp_path / "mine") == tmp_path / "mine"
    monkeypatch.setenv("ATAS_DATA_DIR", str(tmp_path / "cache"))
    debian = tmp_path / "debian"
    fmnist_dir(debian, gz=True)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", debian)
    assert data_source("fmnist", "test") == debian  # data_dir unset: the system copy, and it says so
    with pytest.raises(DataNotFoundError, match="data.data_dir="):
        data_source("fmnist", "test", tmp_path / "nothing")


# ---------------------------------------------------------------- 19. smaller misleading messages
def test_a_damaged_system_copy_says_reinstall_the_package(tmp_path, monkeypatch):
    from atas.data import DataFormatError, load_tensors

    debian = tmp_path / "debian"
    files = fmnist_dir(debian, gz=True)
    files["train-images"].write_bytes(files["train-images"].read_bytes()[:100])  # truncated
    monkeypatch.setenv("ATAS_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", debian)
    with pytest.raises(DataFormatError) as e:
        load_tensors("fmnist", "train")
    assert "apt-get install --reinstall dataset-fashion-mnist" in str(e.value) and "delete it" not in str(e.value)
    own = fmnist_dir(tmp_path / "own")["train-images"]
    own.write_bytes(own.read_bytes()[:100])
    with pytest.raises(DataFormatError, match="delete it and fetch it again"):
        load_tensors("fmnist", "train", tmp_path / "own")
