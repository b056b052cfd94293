"""Shared test fixtures (helpers that are not fixtures: tests/helpers.py).

one_thread      torch on one intra-op thread (a shared CPU runs several threads 8x slower)
isolated_data   no dataset copy but the test's own: an empty cache, HOME and Debian folder in tmp_path
no_network      any socket connect fails: no test downloads anything
no_debug        ATAS_DEBUG unset, so the CLI prints its one-line errors without a traceback
"""

import socket

import pytest
import torch


@pytest.fixture
def one_thread():
    """On a shared CPU, torch's intra-op threads spin against each other (8x slower here): one is enough."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_debug(monkeypatch):
    monkeypatch.delenv("ATAS_DEBUG", raising=False)


@pytest.fixture
def isolated_data(tmp_path, monkeypatch, no_debug):
    """The data a test sees is only what it writes: the cache ($ATAS_DATA_DIR), HOME and Debian's
    Fashion-MNIST folder all point into tmp_path, where nothing is until the test puts it there."""
    from atas import data

    monkeypatch.setenv("ATAS_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian-package")


@pytest.fixture
def no_network(monkeypatch):
    def connect(*args, **kwargs):
        raise OSError("tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", connect)
