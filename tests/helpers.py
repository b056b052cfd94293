"""What several test files share besides fixtures (those are in conftest.py): the Fashion-MNIST
path and its marker, and writers of small dataset files (IDX, PNG) with random content.

    from tests.helpers import FMNIST, fmnist_dir, needs_fmnist, save_png, write_idx
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

# The end-to-end tests train on Debian's Fashion-MNIST (`apt-get install dataset-fashion-mnist`),
# read in place; without it they are skipped, never downloaded.
FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist")


def write_idx(path: Path, array: np.ndarray, magic: int | None = None, gz: bool = False) -> Path:
    """`array` as one IDX file of unsigned bytes (gzipped: `path`.gz); magic None: the right one
    for its dimensions (2051 images, 2049 labels). Returns the path written."""
    magic = (0x08 << 8) | array.ndim if magic is None else magic
    raw = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path, raw = path.with_name(path.name + ".gz"), gzip.compress(raw)
    path.write_bytes(raw)
    return path


def fmnist_dir(
    folder: Path, n_train: int = 32, n_test: int = 16, gz: bool = False, n_train_labels: int | None = None
) -> dict[str, Path]:
    """The four Fashion-MNIST IDX files with random content (seed 0); returns their paths by name
    ('train-images', 'train-labels', 't10k-images', 't10k-labels')."""
    rng = np.random.default_rng(0)
    files = {}
    for prefix, n, n_labels in (("train", n_train, n_train_labels or n_train), ("t10k", n_test, n_test)):
        files[f"{prefix}-images"] = write_idx(
            folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 2051, gz
        )
        files[f"{prefix}-labels"] = write_idx(
            folder / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n_labels,)), 2049, gz
        )
    return files


def save_png(path: Path, size: tuple[int, int] = (8, 8), seed: int = 0) -> None:
    """A random RGB image of `size` (width, height) as a PNG (or what the suffix says)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
