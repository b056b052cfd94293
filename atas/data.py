"""Datasets: what each one is (`DatasetInfo`), where its files live, and how to read them.

Every dataset yields `(x, y, idx)`: x float in [0, 1] with shape [C, S, S], y the int label, idx
the int position in the dataset (ATAS keys its per-sample state by idx). Normalisation is NOT
done here: mean/std travel in `DatasetInfo` and are applied inside the model, so attacks and
eps live in pixel units.

Two kinds of dataset:
  * resident (MNIST, Fashion-MNIST, CIFAR-10/100, SVHN): `load_tensors` returns the whole split
    as one uint8 tensor [N, C, H, W], small enough to keep on the device (as airbench does);
  * folder (ImageNet, Tiny-ImageNet): `image_folder` streams JPEGs from disk through a DataLoader.

The random crop + flip is NOT done here: it happens on the device, on whole batches, paired with
the stored ATAS prior (`atas.augment`). The crop window of side `image_size` is taken from the
`frame_size` image zero-padded by `train_pad` on each side, so `atas.augment`'s frame side is
`frame_size + 2 * train_pad` (CIFAR: 32 + 2*4 = 40; ImageNet: 256 + 0 = 256).

Files are looked for in `data_dir` when it is given, and only there (an explicit folder that holds
no data is an error, never a silent switch to another copy); without it, in the cache
`default_data_dir()`, then in system folders (Debian's dataset-fashion-mnist). Only with
`download=True` does torchvision fetch them. `data_source` says which folder a split is read from.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from atas.errors import AtasError
from atas.registry import Registry
from atas.values import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Debian/Ubuntu package `dataset-fashion-mnist` (gzipped IDX files). Module-level so tests can
# point it elsewhere.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

SPLITS = ("train", "test")


# --------------------------------------------------------------------------------------------
# What each dataset is
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset; train_pad and flip are defaults the config may override."""

    name: str
    num_classes: int
    channels: int
    image_size: int  # side of the image fed to the model (train crop and test image)
    train_pad: int  # zero padding around the frame before the paired random crop
    flip: bool  # random horizontal flip during training
    mean: tuple[float, ...]  # per-channel normalisation, applied inside the model
    std: tuple[float, ...]
    resident: bool  # True: one uint8 tensor (load_tensors); False: streamed folder
    frame_size: int  # side of the stored training image the crop is taken from
    # A resident dataset's loader: load(split, data_dir, download) -> (x uint8 [N, C, H, W], y int64
    # [N]); a dataset of your own gives a function, the shipped ones a `FileSource` (their files on
    # disk). It may also have where(split, data_dir) -> the folder it reads (`data_source`).
    load: Callable[[str, Path | None, bool], tuple[torch.Tensor, torch.Tensor]] | None = None
    # A folder dataset (resident=False): the sub-folders of data.data_dir (and of the cache) whose
    # train/ and val/ hold the class folders; () : <name>.
    folders: tuple[str, ...] = ()


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry for `name` (aliases: fashion_mnist -> fmnist); ValueError if unknown."""
    return DATASETS.get(name.lower())


def default_data_dir() -> Path:
    """The cache folder: $ATAS_DATA_DIR, else ~/.cache/atas/data."""
    env = os.environ.get("ATAS_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "atas" / "data"


class DataNotFoundError(AtasError, FileNotFoundError):
    """The dataset's files are not where we looked; the message says how to get them."""


class DataAccessError(AtasError, OSError):
    """A dataset file exists but cannot be read (permissions, I/O error); the message names it."""


class DataFormatError(AtasError, ValueError):
    """A dataset file exists but is truncated, corrupt or not what its name says.

    Raised in a DataLoader worker, it reaches the main process rebuilt from one string that holds
    the worker's whole traceback ("Caught DataFormatError in DataLoader worker process 0. Original
    Traceback ..."); the message is cut back to the original one line, the rest kept in
    `worker_traceback`.
    """

    def __init__(self, message: str = ""):
        self.worker_traceback = None
        marker = f"{type(self).__name__}: "
        if isinstance(message, str) and message.startswith("Caught ") and "Original Traceback" in message:
            self.worker_traceback = message
            message = message.rsplit(marker, 1)[-1].strip() if marker in message else message
        super().__init__(message)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")


# --------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------
IDX_IMAGES_MAGIC = 2051  # 0x0803: unsigned bytes, 3 dims [N, rows, cols]
IDX_LABELS_MAGIC = 2049  # 0x0801: unsigned bytes, 1 dim [N]


def _refetch(path: Path, them: str = "it") -> str:
    """How to replace a damaged dataset file: a file of the Debian package is reinstalled with the
    package (deleting it by hand would only break the package), anything else is fetched again."""
    try:
        Path(path).resolve().relative_to(Path(DEBIAN_FASHION_MNIST_DIR).resolve())
    except ValueError:
        return f"delete {them} and fetch {them} again"
    return (
        "the system package's files are damaged: reinstall the package "
        "(`apt-get install --reinstall dataset-fashion-mnist`)"
    )


def _corrupt(path: Path, what: str) -> DataFormatError:
    return DataFormatError(f"{path}: {what}. The file is truncated or corrupt: {_refetch(path)}.")


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """One IDX file (gzipped or plain, told apart by content) as a uint8 array of its dims."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic
        try:
            raw = gzip.decompress(raw)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise _corrupt(path, f"cannot decompress ({e})") from e
    if len(raw) < 4:
        raise _corrupt(path, f"only {len(raw)} bytes, shorter than the IDX header")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise _corrupt(
            path, f"IDX magic number {got}, expected {magic} ({IDX_IMAGES_MAGIC} images, {IDX_LABELS_MAGIC} labels)"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _corrupt(path, "truncated inside the IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise _corrupt(
            path,
            f"header promises dims {dims} = {expected} bytes, file has {len(raw)} "
            f"({'truncated' if len(raw) < expected else 'trailing bytes'})",
        )
    # copy(): frombuffer over `bytes` is read-only, and torch wants a writable array.
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy()


def _read_idx_pair(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    x = read_idx(paths[0], IDX_IMAGES_MAGIC)
    y = read_idx(paths[1], IDX_LABELS_MAGIC)
    if x.ndim != 3 or y.ndim != 1:
        raise DataFormatError(
            f"{paths[0]} holds an array of shape {x.shape} and {paths[1]} one of shape "
            f"{y.shape}; expected images [N, rows, cols] and labels [N]: "
            f"{_refetch(paths[0], 'both')}."
        )
    if len(x) != len(y):
        raise DataFormatError(
            f"{paths[0]} holds {len(x)} images but {paths[1]} holds {len(y)} labels; the "
            f"two files do not belong together: {_refetch(paths[0], 'both')}."
        )
    return torch.from_numpy(x).unsqueeze(1).contiguous(), torch.from_numpy(y).long()


# --------------------------------------------------------------------------------------------
# CIFAR python pickles, read with an allow-list: a pickle can run any code it names
# --------------------------------------------------------------------------------------------
# Everything a CIFAR batch needs: ndarray reconstruction (numpy 1 and 2 module names; protocol 5
# uses _frombuffer) and _codecs.encode, which Python 3 uses for bytes in protocol <= 2 pickles.
_CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise UnsafePickleError(
                f"refusing global {module}.{name}: a CIFAR batch holds only "
                f"numpy arrays, lists and bytes, so this file is not one (or was "
                f"tampered with); it was not unpickled"
            )
        if module.startswith("numpy.core"):  # numpy 2 renamed it; the old name warns
            try:
                return super().find_class(module.replace("numpy.core", "numpy._core", 1), name)
            except (ImportError, AttributeError):
                pass  # numpy 1: only the old name exists
        return super().find_class(module, name)


class UnsafePickleError(DataFormatError, pickle.UnpicklingError):
    """A CIFAR batch names a global that is not numpy's; it is refused, never run."""


def load_cifar_batch(path: str | Path) -> dict:
    """One CIFAR batch file as its dict (bytes keys), refusing any non-numpy global."""
    with open(path, "rb") as f:
        try:
            batch = _CifarUnpickler(f, encoding="bytes").load()
        except UnsafePickleError:
            raise
        except (
            pickle.UnpicklingError,
            EOFError,
            ValueError,
            TypeError,
            AttributeError,
            IndexError,
            KeyError,
            OverflowError,
            MemoryError,
        ) as e:
            raise _corrupt(Path(path), f"cannot unpickle the CIFAR batch ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(batch, dict) or b"data" not in batch:
        raise DataFormatError(f"{path}: not a CIFAR batch (expected a dict with b'data')")
    return batch


def _read_cifar(paths: list[Path], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    batches = [load_cifar_batch(p) for p in paths]
    data = np.concatenate([np.asarray(b[b"data"]) for b in batches])
    labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    if data.dtype != np.uint8 or data.shape[1:] != (3 * 32 * 32,) or len(data) != len(labels):
        raise DataFormatError(
            f"{paths[0].parent}: CIFAR data {data.dtype} {data.shape} with "
            f"{len(labels)} labels, expected uint8 [N, 3072] and N labels"
        )
    # Each row is 1024 red, 1024 green, 1024 blue values, each plane row-major: already CHW.
    return torch.from_numpy(data.reshape(-1, 3, 32, 32)).contiguous(), torch.from_numpy(labels)


# --------------------------------------------------------------------------------------------
# SVHN .mat files
# --------------------------------------------------------------------------------------------
def _read_svhn(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    from atas.extras import require

    # only SVHN needs scipy, so it is not a dependency
    loadmat = require("scipy.io", "SVHN (stored as MATLAB .mat files)").loadmat
    try:
        mat = loadmat(paths[0])
        x, y = mat["X"], mat["y"].reshape(-1).astype(np.int64)
    except Exception as e:  # scipy's MatReadError, ValueError, KeyError for a .mat without X/y, ...
        raise _corrupt(paths[0], f"cannot read it as SVHN's .mat ({type(e).__name__}: {str(e)[:200]})") from e
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise DataFormatError(f"{paths[0]}: X {x.shape} y {y.shape}, expected [32, 32, 3, N] and [N]")
    x = np.ascontiguousarray(x.transpose(3, 2, 0, 1))  # [H, W, C, N] -> [N, C, H, W]
    y = y % 10  # SVHN stores digit 0 as label 10
    return torch.from_numpy(x.astype(np.uint8, copy=False)), torch.from_numpy(y)


# --------------------------------------------------------------------------------------------
# Where each resident dataset's files live, how to read and how to download them
# --------------------------------------------------------------------------------------------
def _idx_files(split: str) -> tuple[str, str]:
    prefix = "train" if split == "train" else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _torchvision_download(cls_name: str) -> Callable[[Path, str], None]:
    def download(root: Path, split: str) -> None:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        if cls_name == "SVHN":
            cls(str(root), split=split, download=True)
        else:
            cls(str(root), train=split == "train", download=True)

    return download


@dataclass(frozen=True)
class FileSource:
    """The loader of a shipped resident dataset: its files found on disk (data_dir, the cache, a
    system folder) or downloaded by torchvision, read by one of the readers above. It is the
    `load` of the dataset's `DatasetInfo`, called as a dataset of your own's function is."""

    name: str  # the dataset it reads (messages, Debian's fmnist)
    subdirs: tuple[str, ...]  # where, under a root, the files may be
    files: Callable[[str], tuple[str, ...]]  # split -> file names
    gz_ok: bool  # also accept name + ".gz"
    read: Callable[[list[Path]], tuple[torch.Tensor, torch.Tensor]]
    fetch: Callable[[Path, str], None]  # torchvision, writing under root
    title: str

    def __call__(self, split: str, data_dir: Path | None, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
        target, folders = _search_folders(self, data_dir)
        paths = _find_files(self, split, folders)
        if paths is None and download:
            self.fetch(target, split)
            paths = _find_files(self, split, [target / sub for sub in self.subdirs])
        if paths is None:
            raise DataNotFoundError(_how_to_get(self, split, folders, target, explicit=data_dir is not None))
        try:
            x, y = self.read(paths)
        except OSError as e:  # present but unreadable: permissions, an I/O error
            file = e.filename or paths[0]
            fix = (
                f"make it readable (`chmod a+r {file}`, or run as its owner)"
                if isinstance(e, PermissionError)
                else "check the disk, or copy the data elsewhere and point data.data_dir at it"
            )
            raise DataAccessError(f"cannot read {file}: {e.strerror or e}; {fix}") from None
        # Checked here with the files' own names (the labels live in the last IDX file).
        return _checked(
            x,
            y,
            dataset_info(self.name),
            paths[-1] if self.files(split)[-1].endswith("idx1-ubyte") else paths[0],
            self.title,
            paths[0],
        )

    def where(self, split: str, data_dir: Path | None) -> Path:
        """The folder the split is (or would be) read from; DataNotFoundError when there is none."""
        target, folders = _search_folders(self, data_dir)
        paths = _find_files(self, split, folders)
        if paths is None:
            raise DataNotFoundError(_how_to_get(self, split, folders, target, explicit=data_dir is not None))
        return paths[0].parent


def _cifar10_files(split: str) -> tuple[str, ...]:
    return tuple(f"data_batch_{i}" for i in range(1, 6)) if split == "train" else ("test_batch",)


# --------------------------------------------------------------------------------------------
# The one table of datasets: each one's facts and its loader
# --------------------------------------------------------------------------------------------
def _idx_source(name: str, torchvision_name: str, title: str) -> FileSource:
    return FileSource(
        name,
        ("", f"{torchvision_name}/raw"),
        _idx_files,
        True,
        _read_idx_pair,
        _torchvision_download(torchvision_name),
        title,
    )


def _mnist_like(name: str, torchvision_name: str, title: str, **facts: Any) -> DatasetInfo:
    return DatasetInfo(
        name,
        num_classes=10,
        channels=1,
        image_size=28,
        train_pad=2,
        resident=True,
        frame_size=28,
        load=_idx_source(name, torchvision_name, title),
        **facts,
    )


def _cifar_like(name: str, num_classes: int, flip: bool, load: FileSource) -> DatasetInfo:
    return DatasetInfo(
        name,
        num_classes=num_classes,
        channels=3,
        image_size=32,
        train_pad=4,
        flip=flip,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resident=True,
        frame_size=32,
        load=load,
    )


# name -> DatasetInfo. Packages add theirs through the entry-point group "atas.datasets"
# (atas.registry): `register_dataset(DatasetInfo("my_set", ..., load=my_loader))`.
DATASETS = Registry(
    "dataset",
    group="atas.datasets",
    ordered="registration",
    aliases={"fashion_mnist": "fmnist", "fashion-mnist": "fmnist", "tiny-imagenet": "tiny_imagenet"},
)


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    """Add a dataset under `info.name` (a resident one gives its loader, `load`)."""
    if info.resident and info.load is None:
        raise ConfigError(
            f"dataset {info.name!r}: a resident dataset needs its loader, DatasetInfo(..., "
            "load=function(split, data_dir, download) -> (x uint8 [N, C, H, W], y int64 [N]))"
        )
    if len(info.mean) != info.channels or len(info.std) != info.channels or min(info.std) <= 0:
        raise ConfigError(
            f"dataset {info.name!r}: mean and std need one value per channel ({info.channels}), "
            f"std > 0; got mean {info.mean}, std {info.std}"
        )
    return DATASETS.register(info.name, info)


# CIFAR, SVHN and ImageNet use the ImageNet statistics, as the official ATAS code does.
for _info in (
    _mnist_like("fmnist", "FashionMNIST", "Fashion-MNIST", flip=True, mean=(0.2860,), std=(0.3530,)),
    _mnist_like("mnist", "MNIST", "MNIST", flip=False, mean=(0.1307,), std=(0.3081,)),
    _cifar_like(
        "cifar10",
        10,
        True,
        FileSource(
            "cifar10",
            ("cifar-10-batches-py", ""),
            _cifar10_files,
            False,
            lambda paths: _read_cifar(paths, b"labels"),
            _torchvision_download("CIFAR10"),
            "CIFAR-10",
        ),
    ),
    _cifar_like(
        "cifar100",
        100,
        True,
        FileSource(
            "cifar100",
            ("cifar-100-python", ""),
            lambda split: (split,),
            False,
            lambda paths: _read_cifar(paths, b"fine_labels"),
            _torchvision_download("CIFAR100"),
            "CIFAR-100",
        ),
    ),
    # No flip for digits: a mirrored 2 or 5 is not a 2 or 5.
    _cifar_like(
        "svhn",
        10,
        False,
        FileSource(
            "svhn",
            ("", "svhn"),
            lambda split: (f"{split}_32x32.mat",),
            False,
            _read_svhn,
            _torchvision_download("SVHN"),
            "SVHN",
        ),
    ),
    # Official code: train Resize((256, 256)) + RandomCrop(224) + flip; test Resize((256, 256))
    # + CenterCrop(224). The resize happens here, the crop on the device.
    DatasetInfo(
        "imagenet",
        num_classes=1000,
        channels=3,
        image_size=224,
        train_pad=0,
        flip=True,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resident=False,
        frame_size=256,
        folders=("imagenet",),
    ),
    # Our choice (no official recipe): the images are already 64x64, so they are not resized and
    # are cropped as CIFAR is, RandomCrop(64, padding=4) + flip; the test image is the image itself.
    DatasetInfo(
        "tiny_imagenet",
        num_classes=200,
        channels=3,
        image_size=64,
        train_pad=4,
        flip=True,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resident=False,
        frame_size=64,
        folders=("tiny_imagenet", "tiny-imagenet-200"),
    ),
):
    register_dataset(_info)


def _candidate_folders(source: FileSource, roots: list[Path]) -> list[Path]:
    folders = [root / sub for root in roots for sub in source.subdirs]
    if source.name == "fmnist":
        folders.append(DEBIAN_FASHION_MNIST_DIR)
    return folders


def _find_files(source: FileSource, split: str, folders: list[Path]) -> list[Path] | None:
    """The split's files from the first folder holding all of them, or None."""
    for folder in folders:
        found = []
        for file in source.files(split):
            options = [folder / file] + ([folder / f"{file}.gz"] if source.gz_ok else [])
            hit = next((p for p in options if p.is_file()), None)
            if hit is None:
                break
            found.append(hit)
        else:
            return found
    return None


def _how_to_get(source: FileSource, split: str, folders: list[Path], target: Path, explicit: bool = False) -> str:
    name = source.name
    files = ", ".join(f + ("[.gz]" if source.gz_ok else "") for f in source.files(split))
    where = target / source.subdirs[0] if source.subdirs[0] else target
    fixes = []
    if name == "fmnist" and not explicit:
        fixes.append(f"apt-get install dataset-fashion-mnist (Debian/Ubuntu; installs {DEBIAN_FASHION_MNIST_DIR})")
    fixes += [
        f"put {files} in {where}",
        f"pass data.download=true (torchvision downloads under {target}, needs internet)",
    ]
    if explicit:  # the user chose this folder: no other copy is used behind their back
        system = (
            f", or Debian's {DEBIAN_FASHION_MNIST_DIR} after apt-get install dataset-fashion-mnist"
            if name == "fmnist"
            else ""
        )
        fixes.append(f"leave data.data_dir unset to use the cache {default_data_dir()}{system}")
        head = (
            f"{source.title} {split} split not found in data.data_dir={target}: it holds none of the "
            f"layouts atas reads, and no other copy is used when data.data_dir is given. Searched:"
        )
    else:
        head = f"{source.title} {split} split not found. Searched:"
    searched = "\n".join(f"  {f}" for f in folders)
    return f"{head}\n{searched}\nTo fix, do one of:\n" + "\n".join(f"  - {fix}" for fix in fixes)


def _search_folders(source: FileSource, data_dir: str | Path | None) -> tuple[Path, list[Path]]:
    """(where a download goes, the folders searched in order). An explicit data_dir is the only
    place looked in: a folder given on purpose that holds no data must not silently turn into
    training on the cache's or the system's copy."""
    if data_dir is not None:
        target = Path(data_dir).expanduser()
        return target, [target / sub for sub in source.subdirs]
    target = default_data_dir()
    return target, _candidate_folders(source, [target])


def data_source(name: str, split: str = "train", data_dir: str | Path | None = None) -> Path | None:
    """The folder a split is (or would be) read from: the resolved copy, for logs and records.
    DataNotFoundError as `load_tensors` / `image_folder` raise it when there is none. A dataset of
    your own says where through its loader's `where(split, data_dir)`; without one it is data_dir
    (None when that is unset: the loader alone knows)."""
    info = dataset_info(name)
    _check_split(split)
    if not info.resident:
        return _folder_root(info, split, data_dir)
    folder = None if data_dir is None else Path(data_dir).expanduser()
    where = getattr(info.load, "where", None)
    return folder if where is None else where(split, folder)


def _check_labels(y: torch.Tensor, num_classes: int, path: Path, title: str) -> None:
    """Every label must name one of the classes: a stray 77 would otherwise surface mid-run as a
    CUDA assert or `IndexError: Target 77 is out of bounds`, far from the file that holds it."""
    if y.numel() == 0:
        return
    bad = ((y < 0) | (y >= num_classes)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise DataFormatError(
            f"{path}: label {int(y[i])} at position {i} is outside 0..{num_classes - 1} "
            f"({title} has {num_classes} classes; {len(bad)} such label(s)). The file is "
            f"corrupt or of another dataset: {_refetch(path)}."
        )


def load_tensors(
    name: str, split: str, data_dir: str | Path | None = None, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """A resident dataset split: x uint8 [N, C, H, W] (contiguous), y int64 [N].

    Looks in data_dir when given (only there), else in default_data_dir(), then system folders;
    with download=True and nothing found, torchvision downloads into data_dir (or the cache when
    data_dir is None).
    """
    info = dataset_info(name)
    _check_split(split)
    if not info.resident:
        raise ValueError(f"{info.name} is a folder dataset streamed from disk; use image_folder() or load_split()")
    if info.load is None:
        raise ConfigError(
            f"dataset {info.name!r} is resident but has no loader: give its DatasetInfo "
            "load=function(split, data_dir, download) -> (x uint8 [N, C, H, W], y int64 [N])"
        )
    folder = None if data_dir is None else Path(data_dir).expanduser()
    x, y = info.load(split, folder, download)
    return _checked(x, y, info, folder or Path(info.name), info.name)


def _checked(
    x: torch.Tensor, y: torch.Tensor, info: DatasetInfo, label_path: Path, title: str, image_path: Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The split as the dataset's facts say it must be: image shape and labels in range."""
    if x.shape[1:] != (info.channels, info.image_size, info.image_size):
        raise DataFormatError(
            f"{image_path or label_path}: images {tuple(x.shape)}, expected "
            f"[N, {info.channels}, {info.image_size}, {info.image_size}]"
        )
    _check_labels(y, info.num_classes, label_path, title)
    return x, y


def check_subset(subset: int | None, available: int, key: str = "data.subset", split: str = "training") -> int:
    """How many images `key`=subset keeps from a split of `available`: all of them when subset is
    None; ConfigError when subset is < 1 or larger than the split (asking for more images than
    there are must not silently train on fewer)."""

    if subset is None:
        return available
    if subset < 1:
        raise ConfigError(f"{key} must be >= 1 (keep the first N images), got {subset}")
    if subset > available:
        raise ConfigError(
            f"{key}={subset} but the {split} split has only {available} images; use "
            f"{key}<={available}, or leave it out to use all of them"
        )
    return subset


def check_val_size(val_size: int, available: int) -> int:
    """How many training images remain after holding out the last `val_size` of `available` for
    validation (data.val_size); ConfigError unless 0 <= val_size < available."""
    if val_size < 0:
        raise ConfigError(f"data.val_size must be >= 0 (0: no validation split), got {val_size}")
    if val_size >= available:
        raise ConfigError(
            f"data.val_size={val_size} but the training split has only {available} images"
            f" (data.subset applied, if given); give data.val_size < {available} "
            "so that something is left to train on"
        )
    return available - val_size


VAL_FROM = ("last", "stride")


def val_indices(available: int, val_size: int, val_from: str = "last") -> torch.Tensor:
    """Which of `available` training images data.val_size holds out (data.val_from):
    last: the last val_size (a shuffled split, e.g. CIFAR's: the FastAT benchmark's 49,000 / 1,000);
    stride: val_size images evenly spread over the split, floor((i + 1/2) * available / val_size),
    for a split stored class by class (an image folder: the last images would be whole classes)."""
    check_val_size(val_size, available)
    if val_from == "last":
        return torch.arange(available - val_size, available)
    if val_from == "stride":
        return (torch.arange(val_size, dtype=torch.float64).add_(0.5) * available / val_size).long()
    raise ConfigError(f"data.val_from must be one of {', '.join(VAL_FROM)}, got {val_from!r}")


def train_indices(available: int, val_size: int, val_from: str = "last") -> torch.Tensor | None:
    """The images trained on, in order (None: the first available - val_size, a plain slice)."""
    if val_from == "last" or val_size == 0:
        return None
    keep = torch.ones(available, dtype=torch.bool)
    keep[val_indices(available, val_size, val_from)] = False
    return keep.nonzero().flatten()


class IndexedTensorDataset(Dataset):
    """(x uint8 [N, C, H, W], y [N]) -> items (x float in [0, 1], y, idx).

    `x` and `y` stay public so a trainer can move the whole uint8 split to the device at once
    and skip the per-item path entirely."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if x.dtype != torch.uint8 or len(x) != len(y):
            raise ValueError(
                f"expected uint8 images and as many labels, got {x.dtype} {tuple(x.shape)} and {tuple(y.shape)}"
            )
        self.x, self.y = x, y.long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx: int):
        return self.x[idx].float().div_(255), self.y[idx], idx


# --------------------------------------------------------------------------------------------
# Folder datasets (ImageNet, Tiny-ImageNet)
# --------------------------------------------------------------------------------------------
class IndexedImageFolder(Dataset):
    """A list of (path, label) image files; items (transform(image), label, idx)."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], transform: Callable):
        self.samples, self.classes, self.transform = samples, classes, transform
        self.targets = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int):
        from torchvision.datasets.folder import default_loader  # PIL, converted to RGB

        path, label = self.samples[idx]
        try:
            image = default_loader(path)
        except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError, truncated file, ...
            raise DataFormatError(
                f"{path}: cannot read this image ({type(e).__name__}: {str(e)[:200]}). Replace or delete the file."
            ) from e
        return self.transform(image), label, idx


def _folder_layout(name: str) -> str:
    return "train/<class>/**/<image> and val/<class>/**/<image>" + (
        ", or Tiny-ImageNet's val/images/*.JPEG + val/val_annotations.txt" if name == "tiny_imagenet" else ""
    )


def _folder_root(info: DatasetInfo, split: str, data_dir: str | Path | None) -> Path:
    """The root whose train/ or val/ holds the split: data_dir or data_dir/<name> when data_dir is
    given (only there: see `_search_folders`), else the cache's <name> folder."""
    subdir = "train" if split == "train" else "val"
    bases = [Path(data_dir).expanduser()] if data_dir is not None else [default_data_dir()]
    roots = ([bases[0]] if data_dir is not None else []) + [
        b / sub for b in bases for sub in info.folders or (info.name,)
    ]
    root = next((r for r in roots if (r / subdir).is_dir()), None)
    if root is None:
        raise DataNotFoundError(
            f"{info.name} {split} split not found: no {subdir}/ folder in any of "
            f"{', '.join(str(r) for r in roots)}. Expected layout under data.data_dir: "
            f"{_folder_layout(info.name)}. This dataset is not downloaded automatically."
        )
    return root


def image_folder(name: str, split: str, data_dir: str | Path | None = None) -> IndexedImageFolder:
    """A folder dataset split read from `<root>/train` or `<root>/val`, items (x, y, idx).

    root is data_dir itself or data_dir/<name> (None: default_data_dir()/<name>). Train images
    are resized to frame_size (the crop comes later, on the device); test images are resized to
    frame_size and center-cropped to image_size. Labels always follow the sorted train class
    folders (when train/ exists), so a val folder missing a class cannot shift them.
    """
    from torchvision import transforms
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    info = dataset_info(name)
    _check_split(split)
    if info.resident:
        raise ValueError(f"{info.name} is a resident dataset; use load_tensors() or load_split()")
    subdir = "train" if split == "train" else "val"
    root = _folder_root(info, split, data_dir)
    folder, train_folder = root / subdir, root / "train"
    annotations = folder / "val_annotations.txt"
    tiny_val = split == "test" and annotations.is_file() and (folder / "images").is_dir()
    if tiny_val and not train_folder.is_dir():
        raise DataNotFoundError(
            f"{annotations} labels images by class folder name (wnid); the "
            f"train/ folder next to it is needed to number the classes"
        )
    try:
        classes, class_to_idx = find_classes(train_folder if train_folder.is_dir() else folder)
    except FileNotFoundError:  # torchvision: "Couldn't find any class folder in ..."
        raise DataNotFoundError(
            f"no class folders in {train_folder if train_folder.is_dir() else folder}; "
            f"expected layout: {_folder_layout(info.name)}"
        ) from None
    if tiny_val:
        samples = _tiny_imagenet_val(folder, annotations, class_to_idx)
    else:
        samples = make_dataset(folder, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise DataNotFoundError(f"no images found in {folder}; expected layout: {_folder_layout(info.name)}")

    resize = transforms.Resize((info.frame_size, info.frame_size))
    steps = [resize] if split == "train" else [resize, transforms.CenterCrop(info.image_size)]
    return IndexedImageFolder(samples, classes, transforms.Compose(steps + [transforms.ToTensor()]))


def _tiny_imagenet_val(folder: Path, annotations: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """Tiny-ImageNet's original val: images/<file> labelled by lines '<file>\\t<wnid>\\t<bbox>'."""
    samples = []
    for line_no, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        file, wnid = line.split("\t")[:2]
        if wnid not in class_to_idx:
            raise DataFormatError(f"{annotations}:{line_no}: class {wnid!r} is not a train/ class folder")
        samples.append((str(folder / "images" / file), class_to_idx[wnid]))
    return samples


class TestSplit:
    """A dataset's test split, opened once: `len(split)` without decoding a folder dataset's
    images, `split.take(n)` -> the first n unpadded images (uint8 [n, C, H, W]) and labels. The
    one test-set loader of the package: the evaluation, the trainer's probe and `atas compare`'s
    size check all read the test set through it."""

    def __init__(self, name: str, data_dir: str | Path | None = None, download: bool = False):
        self.info = dataset_info(name)
        if self.info.resident:
            self._x, self._y = load_tensors(self.info.name, "test", data_dir, download)
            self._folder = None
        else:
            self._folder = image_folder(self.info.name, "test", data_dir)

    def __len__(self) -> int:
        return len(self._y) if self._folder is None else len(self._folder)

    def take(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self) if n is None else min(n, len(self))
        if self._folder is None:
            return self._x[:n], self._y[:n]
        items = [self._folder[i] for i in range(n)]  # decodes only the n images asked for
        x = torch.stack([it[0] for it in items]).mul(255).round().to(torch.uint8)
        return x, torch.tensor([int(it[1]) for it in items])


def load_split(name: str, split: str, data_dir: str | Path | None = None, download: bool = False) -> Dataset:
    """Any dataset split as a Dataset of (x float in [0, 1], y, idx)."""
    if dataset_info(name).resident:
        return IndexedTensorDataset(*load_tensors(name, split, data_dir, download))
    return image_folder(name, split, data_dir)
