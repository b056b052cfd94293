"""Every error a user can fix exits with status 2 and one clear line naming the file or key, no
traceback; a diverged run exits with 3; `--debug` / ATAS_DEBUG=1 add the traceback.

Each bad input is built small in tmp_path, in the real on-disk format, and goes through the real
command line (`atas.cli.main`, in process; one test runs `python -m atas` for the real status).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from atas.cli import main as cli
from atas.config import ConfigError, load_config
from atas.data import DataFormatError, check_subset, image_folder, load_tensors
from atas.extras import MissingDependencyError
from atas.models import build_model
from tests.helpers import fmnist_dir, save_png

REPO = Path(__file__).resolve().parents[1]
# Quick, deterministic training settings for runs that must get as far as the first steps.
QUICK = [
    "model.arch=wong_cnn",
    "train.epochs=1",
    "train.batch_size=16",
    "train.probe_size=0",
    "eval.at_end=false",
    "train.progress=false",
]


pytestmark = pytest.mark.usefixtures("isolated_data")


def run_cli(capsys, *argv) -> tuple[int, str]:
    status = cli(list(argv))
    return status, capsys.readouterr().err


def assert_one_line(err: str, *fragments: str) -> None:
    assert "Traceback" not in err
    # warnings are lines of their own (atas.cli.say_warning); the error is the one other line
    lines = [line for line in err.strip().splitlines() if not line.startswith("atas: warning: ")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def train_fmnist(capsys, tmp_path, folder: Path, *extra) -> tuple[int, str]:
    return run_cli(
        capsys, "train", "fmnist", f"data.data_dir={folder}", *QUICK, *extra, "--run-dir", str(tmp_path / "run")
    )


# --------------------------------------------------------------------------------------------
# Dataset files
# --------------------------------------------------------------------------------------------
def test_truncated_idx_file(tmp_path, capsys):
    path = fmnist_dir(tmp_path / "d")["train-images"]
    path.write_bytes(path.read_bytes()[:-5])
    status, err = train_fmnist(capsys, tmp_path, tmp_path / "d")
    assert status == 2
    assert_one_line(err, "atas train: error:", str(path), "truncated", "fetch it again")


def test_truncated_gz_file(tmp_path, capsys):
    path = fmnist_dir(tmp_path / "d", gz=True)["train-images"]
    path.write_bytes(path.read_bytes()[:-8])
    status, err = train_fmnist(capsys, tmp_path, tmp_path / "d")
    assert status == 2
    assert_one_line(err, str(path), "cannot decompress")


def test_corrupt_gz_file(tmp_path, capsys):
    path = fmnist_dir(tmp_path / "d", gz=True)["t10k-labels"]
    raw = bytearray(path.read_bytes())
    raw[12:20] = b"\xff" * 8  # inside the deflate stream
    path.write_bytes(bytes(raw))
    status, err = train_fmnist(capsys, tmp_path, tmp_path / "d")
    assert status == 2
    assert_one_line(err, str(path), "corrupt")


def test_bad_magic_number(tmp_path, capsys):
    files = fmnist_dir(tmp_path / "d")
    images = files["train-images"]
    images.write_bytes((1234).to_bytes(4, "big") + images.read_bytes()[4:])
    status, err = train_fmnist(capsys, tmp_path, tmp_path / "d")
    assert status == 2
    assert_one_line(err, str(images), "magic number 1234, expected 2051")


def test_image_label_count_mismatch(tmp_path, capsys):
    fmnist_dir(tmp_path / "d", n_train=20, n_train_labels=19)
    status, err = train_fmnist(capsys, tmp_path, tmp_path / "d")
    assert status == 2
    assert_one_line(err, "holds 20 images but", "holds 19 labels", "fetch both again")


def test_truncated_cifar_pickle(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    raw = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
    (folder / "test_batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataFormatError, match="test_batch.*cannot unpickle"):
        load_tensors("cifar10", "test", data_dir=tmp_path)


IMAGENET_QUICK = [
    "train.epochs=1",
    "train.batch_size=2",
    "train.probe_size=0",
    "eval.at_end=false",
    "train.progress=false",
    "data.num_workers=0",
    "model.arch=resnet18",
]


@pytest.mark.parametrize("layout", ["class folders without images", "no class folders"])
def test_empty_image_folder(tmp_path, capsys, layout):
    root = tmp_path / "imagenet"
    (root / "train" / ("n01" if layout == "class folders without images" else "")).mkdir(parents=True)
    save_png(root / "val" / "n01" / "a.png")
    status, err = run_cli(
        capsys,
        "train",
        "imagenet-rn18-eps2",
        f"data.data_dir={root}",
        *IMAGENET_QUICK,
        "--run-dir",
        str(tmp_path / "run"),
    )
    assert status == 2
    assert "Traceback" not in err
    assert str(root / "train") in err.splitlines()[0]
    assert "train/<class>/**/<image>" in err  # the expected layout


def test_corrupt_image_names_the_file(tmp_path, capsys):
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        save_png(root / split / "n01" / "a.png", seed=0)
        save_png(root / split / "n02" / "b.png", seed=1)
    bad = root / "val" / "n02" / "b.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really an image")
    status, err = run_cli(
        capsys,
        "train",
        "imagenet-rn18-eps2",
        f"data.data_dir={root}",
        *IMAGENET_QUICK,
        "--run-dir",
        str(tmp_path / "run"),
    )
    assert status == 2
    assert_one_line(err, str(bad), "cannot read this image")


def test_corrupt_image_in_a_dataloader_worker_keeps_one_line(tmp_path):
    """Training images are decoded in DataLoader workers, which re-raise in the main process with
    the worker's whole traceback in the message; the error still reads as one line."""
    root = tmp_path / "imagenet"
    save_png(root / "train" / "n01" / "a.png")
    bad = root / "train" / "n01" / "b.png"
    bad.write_bytes(b"garbage")
    loader = torch.utils.data.DataLoader(image_folder("imagenet", "train", root), batch_size=2, num_workers=1)
    with pytest.raises(DataFormatError) as e:
        next(iter(loader))
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{bad}: cannot read this image")
    assert "Traceback" in e.value.worker_traceback


# --------------------------------------------------------------------------------------------
# Sizes: data.subset
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["data.subset", "data.test_subset"])
@pytest.mark.parametrize("value", [0, -5])
def test_subset_zero_or_negative_is_refused(tmp_path, capsys, key, value):
    with pytest.raises(ConfigError, match=f"{key} must be >= 1.*got {value}"):
        load_config("fmnist", [f"{key}={value}"])
    status, err = train_fmnist(capsys, tmp_path, tmp_path / "nothing-needed", f"{key}={value}")
    assert status == 2
    assert_one_line(err, f"{key} must be >= 1")


def test_subset_larger_than_the_split_is_refused():
    assert check_subset(None, 60000) == 60000
    assert check_subset(4096, 60000) == 4096
    assert check_subset(60000, 60000) == 60000
    with pytest.raises(ConfigError, match=r"data.subset=70000 but the training split has only 60000 images"):
        check_subset(70000, 60000)
    with pytest.raises(ConfigError, match="must be >= 1"):
        check_subset(0, 60000)


# --------------------------------------------------------------------------------------------
# A diverged run
# --------------------------------------------------------------------------------------------
def test_nan_loss_exits_3_with_one_line(tmp_path, capsys):
    fmnist_dir(tmp_path / "d")
    # An absurd learning rate: the first step sends the weights to ~1e30, the second loss is inf/NaN.
    status, err = train_fmnist(capsys, tmp_path, tmp_path / "d", "optim.lr=1e30")
    assert status == 3
    assert_one_line(err, "atas train: error:", "NaN/inf", "Lower optim.lr")


# --------------------------------------------------------------------------------------------
# Exported models
# --------------------------------------------------------------------------------------------
@pytest.fixture
def export_dir(tmp_path):
    cfg = load_config("fmnist", ["model.arch=wong_cnn"])
    model = build_model("wong_cnn", 10, in_channels=1, mean=(0.2860,), std=(0.3530,))
    out = tmp_path / "export"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "card.json").write_text(json.dumps({"config": cfg.to_dict()}))
    return out


def test_export_fixture_loads(export_dir):
    from atas.export import load_model

    model, cfg, _ = load_model(export_dir)
    assert cfg.model.arch == "wong_cnn" and model(torch.rand(1, 1, 28, 28)).shape == (1, 10)


def test_corrupt_card_json(export_dir, capsys):
    card = export_dir / "card.json"
    card.write_text(card.read_text()[:40])
    status, err = run_cli(capsys, "eval", str(export_dir))
    assert status == 2
    assert_one_line(err, "atas eval: error:", str(card), "not valid JSON", "atas export")


def test_card_json_without_config(export_dir, capsys):
    (export_dir / "card.json").write_text("[1, 2]")
    status, err = run_cli(capsys, "eval", str(export_dir))
    assert status == 2
    assert_one_line(err, "cannot rebuild the model")


def test_truncated_safetensors(export_dir, capsys):
    weights = export_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    status, err = run_cli(capsys, "eval", str(export_dir))
    assert status == 2
    assert_one_line(err, str(weights), "truncated or not a safetensors file")


# --------------------------------------------------------------------------------------------
# Optional dependencies
# --------------------------------------------------------------------------------------------
def test_autoattack_without_the_extra_says_which_pip_install(tmp_path, capsys, monkeypatch, export_dir):
    from atas.evaluation import evaluate

    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # `import pyautoattack` now fails
    model = build_model("wong_cnn", 10, in_channels=1).eval()
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    with pytest.raises(MissingDependencyError, match=r"pip install 'atas\[aa\]'"):
        evaluate(model, x, y, 0.1, attacks=["clean", "aa"], progress=False)
    fmnist_dir(tmp_path / "d")
    status, err = run_cli(
        capsys,
        "eval",
        str(export_dir),
        "--attacks",
        "clean,aa",
        "--data-dir",
        str(tmp_path / "d"),
        "--out",
        str(tmp_path / "eval.json"),
        "--no-progress",
    )
    assert status == 2
    assert_one_line(err, "AutoAttack", "pip install 'atas[aa]'")
    # A recipe that ends with AutoAttack is refused before training starts, not after.
    status, err = run_cli(capsys, "train", "cifar10-prn18-eps8", "--run-dir", str(tmp_path / "run"))
    assert status == 2
    assert_one_line(err, "eval.attacks=clean,pgd,aa", "pip install 'atas[aa]'", "eval.attacks=clean,pgd")
    assert not (tmp_path / "run").exists()


def test_report_without_matplotlib_says_so(tmp_path, capsys, monkeypatch):
    from atas.report import build_report

    rows = json.loads((REPO / "docs/results/fmnist-demo/summary.json").read_text())["runs"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    md = build_report(rows, tmp_path / "report", command="atas compare fmnist", machine={})
    assert md.exists() and not list((tmp_path / "report").glob("*.png"))
    assert "pip install 'atas[plots]'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# --debug, --version, a closed pipe
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch, how):
    args = ["train", "fmnist", "data.subset=0"]
    if how == "flag":
        args.append("--debug")
    else:
        monkeypatch.setenv("ATAS_DEBUG", "1")
    status, err = run_cli(capsys, *args)
    assert status == 2
    assert "Traceback (most recent call last)" in err and "ConfigError" in err
    assert err.strip().splitlines()[-1].startswith("atas train: error: data.subset must be >= 1")


def test_version(capsys):
    from atas import __version__

    with pytest.raises(SystemExit) as e:
        cli(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"atas {__version__} (torch {torch.__version__}")


def _atas(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("ATAS_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "atas", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


@pytest.mark.slow
def test_a_closed_pipe_is_no_error():
    """`atas recipes | head -1`: the reader goes away before atas writes. No BrokenPipeError, the
    status a shell reports for `cat big | head` (141), nothing on stderr. Real process, real pipe."""
    proc = _atas("recipes")
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert err == ""
    assert proc.returncode == 141
