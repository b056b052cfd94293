"""atas.data: tiny files in the real on-disk formats, read through the real loaders.

Every test runs with ATAS_DATA_DIR and HOME pointed into tmp_path, the Debian Fashion-MNIST
folder pointed at an empty path (unless a test says otherwise) and sockets refusing to connect,
so nothing touches the real cache or the network.
"""

from __future__ import annotations

import os
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from atas import data
from atas.data import (
    DATASETS,
    DataFormatError,
    DataNotFoundError,
    IndexedTensorDataset,
    dataset_info,
    default_data_dir,
    image_folder,
    load_split,
    load_tensors,
)
from tests.helpers import save_png, write_idx

REAL_FASHION_MNIST = data.DEBIAN_FASHION_MNIST_DIR


pytestmark = pytest.mark.usefixtures("isolated_data", "no_network")


def rng(seed=0):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
def test_registry_covers_the_paper_datasets():
    assert set(DATASETS) == {"fmnist", "mnist", "cifar10", "cifar100", "svhn", "imagenet", "tiny_imagenet"}
    assert dataset_info("fashion_mnist") is DATASETS["fmnist"]
    cifar = dataset_info("cifar10")
    assert (cifar.image_size, cifar.train_pad, cifar.flip, cifar.resident) == (32, 4, True, True)
    assert cifar.mean == (0.485, 0.456, 0.406) and cifar.std == (0.229, 0.224, 0.225)
    assert dataset_info("mnist").flip is False and dataset_info("svhn").flip is False
    imagenet = dataset_info("imagenet")
    assert (imagenet.frame_size, imagenet.image_size, imagenet.train_pad) == (256, 224, 0)
    for info in DATASETS.values():
        assert len(info.mean) == len(info.std) == info.channels
        assert info.frame_size + 2 * info.train_pad >= info.image_size


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError) as e:
        dataset_info("cifar11")
    for name in DATASETS:
        assert name in str(e.value)


def test_unknown_split_and_wrong_kind():
    with pytest.raises(ValueError, match="train, test"):
        load_tensors("mnist", "validation")
    with pytest.raises(ValueError, match="folder dataset"):
        load_tensors("imagenet", "train")


def test_default_data_dir(monkeypatch, tmp_path):
    assert default_data_dir() == tmp_path / "cache"
    monkeypatch.delenv("ATAS_DATA_DIR")
    assert default_data_dir() == tmp_path / "home" / ".cache" / "atas" / "data"


# --------------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST)
# --------------------------------------------------------------------------------------------
def write_idx_split(folder: Path, split: str, n: int, gz: bool, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    x = rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    y = rng(seed + 1).integers(0, 10, n, dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    for kind, array in (("images-idx3", x), ("labels-idx1", y)):
        write_idx(folder / f"{prefix}-{kind}-ubyte", array, gz=gz)
    return x, y


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["", "MNIST/raw"])
def test_idx_round_trip(tmp_path, gz, layout):
    x, y = write_idx_split(tmp_path / "d" / layout, "test", 7, gz)
    xt, yt = load_tensors("mnist", "test", data_dir=tmp_path / "d")
    assert xt.shape == (7, 1, 28, 28) and xt.dtype == torch.uint8 and xt.is_contiguous()
    assert yt.dtype == torch.int64
    assert torch.equal(xt[:, 0], torch.from_numpy(x)) and torch.equal(yt, torch.from_numpy(y).long())


def test_idx_truncated_plain_file(tmp_path):
    folder = tmp_path / "d"
    write_idx_split(folder, "train", 3, gz=False)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataFormatError, match="truncated") as e:
        load_tensors("mnist", "train", data_dir=folder)
    assert str(path) in str(e.value)


def test_idx_truncated_gzip_file(tmp_path):
    folder = tmp_path / "d"
    write_idx_split(folder, "train", 3, gz=True)
    path = folder / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DataFormatError, match="decompress"):
        load_tensors("mnist", "train", data_dir=folder)


def test_idx_wrong_magic(tmp_path):
    folder = tmp_path / "d"
    write_idx_split(folder, "train", 3, gz=False)
    # Swap images and labels: each file now carries the other's magic number.
    images, labels = folder / "train-images-idx3-ubyte", folder / "train-labels-idx1-ubyte"
    a, b = images.read_bytes(), labels.read_bytes()
    images.write_bytes(b), labels.write_bytes(a)
    with pytest.raises(DataFormatError, match="2049, expected 2051"):
        load_tensors("mnist", "train", data_dir=folder)


def test_fmnist_search_order(tmp_path, monkeypatch):
    given, cache, debian = tmp_path / "given", tmp_path / "cache", tmp_path / "debian"
    x_given, _ = write_idx_split(given, "test", 2, gz=True, seed=1)
    x_cache, _ = write_idx_split(cache / "FashionMNIST/raw", "test", 3, gz=False, seed=2)
    x_debian, _ = write_idx_split(debian, "test", 4, gz=True, seed=3)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", debian)

    assert torch.equal(load_tensors("fmnist", "test", data_dir=given)[0][:, 0], torch.from_numpy(x_given))
    assert torch.equal(load_tensors("fmnist", "test")[0][:, 0], torch.from_numpy(x_cache))
    # An explicit data_dir is the only place looked in: without the files it is an error, never a
    # silent switch to the cache's or the system's copy (that fallback is for data_dir unset).
    with pytest.raises(DataNotFoundError, match=rf"not found in data.data_dir={tmp_path / 'empty'}"):
        load_tensors("fmnist", "test", data_dir=tmp_path / "empty")
    for f in (cache / "FashionMNIST/raw").iterdir():
        f.unlink()
    assert torch.equal(load_tensors("fashion_mnist", "test")[0][:, 0], torch.from_numpy(x_debian))


def test_missing_fmnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_tensors("fmnist", "train", data_dir=tmp_path / "mine")
    message = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "data.download=true" in message
    assert str(tmp_path / "mine") in message and "train-images-idx3-ubyte" in message


def test_download_uses_torchvision_then_reads_the_idx_files(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    calls = []

    class FakeFashionMNIST:  # writes what torchvision would, without the network
        def __init__(self, root, train=True, download=False):
            calls.append((Path(root), train, download))
            write_idx_split(Path(root) / "FashionMNIST/raw", "train" if train else "test", 5, gz=False)

    monkeypatch.setattr(tvd, "FashionMNIST", FakeFashionMNIST)
    with pytest.raises(DataNotFoundError):
        load_tensors("fmnist", "test")  # download=False never calls torchvision
    assert not calls
    x, y = load_tensors("fmnist", "test", download=True)
    assert calls == [(tmp_path / "cache", False, True)] and x.shape == (5, 1, 28, 28)


def test_real_fashion_mnist_from_debian_package(monkeypatch):
    if not REAL_FASHION_MNIST.is_dir():
        pytest.skip(f"{REAL_FASHION_MNIST} absent (apt-get install dataset-fashion-mnist)")
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", REAL_FASHION_MNIST)
    x, y = load_tensors("fmnist", "train")
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8 and y.shape == (60000,)
    assert set(y.unique().tolist()) == set(range(10))
    x, y = load_tensors("fmnist", "test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)


# --------------------------------------------------------------------------------------------
# CIFAR pickles
# --------------------------------------------------------------------------------------------
def write_cifar10(folder: Path, n: int = 2, protocol: int = pickle.DEFAULT_PROTOCOL):
    folder.mkdir(parents=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batch = {
            b"batch_label": name.encode(),
            b"data": rng(i).integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng(i + 10).integers(0, 10, n)],
            b"filenames": [b"img%d.png" % j for j in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        batches[name] = batch
    return batches


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_round_trip(tmp_path, protocol):
    batches = write_cifar10(tmp_path / "cifar-10-batches-py", protocol=protocol)
    x, y = load_tensors("cifar10", "train", data_dir=tmp_path)
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.uint8 and x.is_contiguous()
    data_rows = np.concatenate([batches[f"data_batch_{k}"][b"data"] for k in range(1, 6)])
    assert torch.equal(x.reshape(10, -1), torch.from_numpy(data_rows))
    assert y.tolist() == sum((batches[f"data_batch_{k}"][b"labels"] for k in range(1, 6)), [])
    # CHW: a row is 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    assert x[3, 1, 5, 7] == data_rows[3, 1024 + 5 * 32 + 7]
    assert x[3, 2, 31, 0] == data_rows[3, 2048 + 31 * 32]

    xt, yt = load_tensors("cifar10", "test", data_dir=tmp_path)
    assert torch.equal(xt.reshape(2, -1), torch.from_numpy(batches["test_batch"][b"data"]))
    assert yt.dtype == torch.int64 and yt.tolist() == batches["test_batch"][b"labels"]


def test_cifar_pickle_with_numpy1_module_names(tmp_path):
    # The real CIFAR files were written by numpy 1 (numpy.core.multiarray._reconstruct); numpy 2
    # renamed the module, and loading must neither fail nor warn.
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    pixels = rng().integers(0, 256, (2, 3072), dtype=np.uint8)
    raw = pickle.dumps({b"data": pixels, b"fine_labels": [3, 4]}, protocol=2)
    (folder / "test").write_bytes(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    assert b"numpy.core.multiarray" in (folder / "test").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, y = load_tensors("cifar100", "test", data_dir=tmp_path)
    assert torch.equal(x.reshape(2, -1), torch.from_numpy(pixels)) and y.tolist() == [3, 4]


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    pixels = rng().integers(0, 256, (4, 3072), dtype=np.uint8)
    with open(folder / "test", "wb") as f:
        pickle.dump({b"data": pixels, b"fine_labels": [99, 0, 42, 7], b"coarse_labels": [19, 0, 1, 2]}, f)
    x, y = load_tensors("cifar100", "test", data_dir=tmp_path)
    assert x.shape == (4, 3, 32, 32) and torch.equal(x.reshape(4, -1), torch.from_numpy(pixels))
    assert y.tolist() == [99, 0, 42, 7]


class Evil:
    marker: Path

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_cifar_pickle_is_refused_and_not_run(tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-py")
    marker = tmp_path / "pwned"
    Evil.marker = marker
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        load_tensors("cifar10", "test", data_dir=tmp_path)
    assert not marker.exists()


def test_cifar_pickle_with_wrong_shape(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    with open(folder / "train", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]}, f)
    with pytest.raises(DataFormatError, match="3072"):
        load_tensors("cifar100", "train", data_dir=tmp_path)


def test_missing_cifar_names_the_folder(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_tensors("cifar10", "train", data_dir=tmp_path / "mine")
    assert str(tmp_path / "mine" / "cifar-10-batches-py") in str(e.value)
    assert "data_batch_1" in str(e.value) and "data.download=true" in str(e.value)


# --------------------------------------------------------------------------------------------
# SVHN
# --------------------------------------------------------------------------------------------
def test_svhn_mat(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    x_hwcn = rng().integers(0, 256, (32, 32, 3, 3), dtype=np.uint8)
    scipy_io.savemat(tmp_path / "test_32x32.mat", {"X": x_hwcn, "y": np.array([[10], [1], [9]], np.uint8)})
    x, y = load_tensors("svhn", "test", data_dir=tmp_path)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.uint8 and x.is_contiguous()
    assert y.tolist() == [0, 1, 9] and y.dtype == torch.int64
    assert x[2, 1, 4, 6] == x_hwcn[4, 6, 1, 2]


def test_svhn_without_scipy_says_pip_install(tmp_path, monkeypatch):
    (tmp_path / "train_32x32.mat").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "scipy", None)  # makes `import scipy...` raise ImportError
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(ImportError, match="pip install scipy"):
        load_tensors("svhn", "train", data_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# Datasets yielding (x, y, idx)
# --------------------------------------------------------------------------------------------
def test_indexed_tensor_dataset():
    x = torch.tensor([[[[0, 255], [51, 102]]], [[[255, 0], [0, 0]]], [[[1, 2], [3, 4]]]], dtype=torch.uint8)
    ds = IndexedTensorDataset(x, torch.tensor([2, 0, 1]))
    xi, yi, idx = ds[0]
    assert xi.dtype == torch.float32 and torch.allclose(xi, torch.tensor([[[0.0, 1.0], [0.2, 0.4]]]))
    assert (int(yi), idx) == (2, 0) and ds.x.dtype == torch.uint8  # the stored tensor is untouched
    xb, yb, idxb = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert xb.shape == (3, 1, 2, 2) and yb.tolist() == [2, 0, 1] and idxb.tolist() == [0, 1, 2]


def test_load_split_resident(tmp_path):
    write_idx_split(tmp_path, "train", 4, gz=True)
    ds = load_split("mnist", "train", data_dir=tmp_path)
    x, y, idx = ds[3]
    assert len(ds) == 4 and x.shape == (1, 28, 28) and 0 <= x.min() and x.max() <= 1 and idx == 3


def test_imagenet_folder(tmp_path):
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        save_png(root / split / "n01" / "a.png", (300, 280), 0)
        save_png(root / split / "n02" / "b.png", (260, 300), 1)
        save_png(root / split / "n02" / "c.png", (257, 257), 2)
    train = image_folder("imagenet", "train", root)
    assert len(train) == 3 and train.classes == ["n01", "n02"]
    x, y, idx = train[2]
    assert x.shape == (3, 256, 256) and x.dtype == torch.float32 and (y, idx) == (1, 2)
    assert 0 <= x.min() and x.max() <= 1
    test = load_split("imagenet", "test", data_dir=tmp_path)  # finds <data_dir>/imagenet
    x, y, idx = test[0]
    assert x.shape == (3, 224, 224) and (y, idx) == (0, 0)


def test_val_labels_follow_train_classes(tmp_path):
    for cls in ("n01", "n02", "n03"):
        save_png(tmp_path / "train" / cls / "a.png", (8, 8), 0)
    save_png(tmp_path / "val" / "n03" / "z.png", (8, 8), 0)  # val holds only the last class
    assert image_folder("imagenet", "test", tmp_path)[0][1] == 2


def test_tiny_imagenet_original_val_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    for i, wnid in enumerate(["n001", "n002", "n003"]):
        save_png(root / "train" / wnid / "images" / f"{wnid}_0.JPEG", (64, 64), i)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored\n")
    save_png(root / "val" / "images" / "val_0.JPEG", (64, 64), 5)
    save_png(root / "val" / "images" / "val_1.JPEG", (64, 64), 6)
    (root / "val" / "val_annotations.txt").write_text(
        "val_0.JPEG\tn003\t0\t0\t10\t10\nval_1.JPEG\tn001\t1\t2\t30\t40\n"
    )
    train = load_split("tiny_imagenet", "train", data_dir=tmp_path)
    assert len(train) == 3 and train[1][0].shape == (3, 64, 64) and train[1][1:] == (1, 1)
    val = load_split("tiny_imagenet", "test", data_dir=tmp_path)
    assert len(val) == 2 and [val[i][1:] for i in range(2)] == [(2, 0), (0, 1)]
    x = val[0][0]
    expected = np.array(Image.open(root / "val" / "images" / "val_0.JPEG").convert("RGB"))
    assert torch.allclose(x, torch.from_numpy(expected).permute(2, 0, 1).float() / 255)

    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn999\t0\t0\t1\t1\n")
    with pytest.raises(DataFormatError, match="n999"):
        load_split("tiny_imagenet", "test", data_dir=tmp_path)


def test_missing_folder_names_the_layout(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"train/<class>/\*\*/<image>"):
        load_split("imagenet", "train", data_dir=tmp_path / "nothing")
    (tmp_path / "empty" / "val" / "n01").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="no images found"):
        image_folder("imagenet", "test", tmp_path / "empty")
