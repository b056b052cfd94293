"""Shared test fixtures and data paths.

The end-to-end tests train on Debian's Fashion-MNIST (`apt-get install dataset-fashion-mnist`),
read in place from FMNIST; without it they are skipped, never downloaded.
"""
from pathlib import Path

import pytest
import torch

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist")


@pytest.fixture
def one_thread():
    """On a shared CPU, torch's intra-op threads spin against each other (8x slower here): one is enough."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
