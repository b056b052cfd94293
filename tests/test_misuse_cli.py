"""Misuse of the command line and of the files around a run: every case here once ended in a
traceback, a silently wrong file or advice that named a broken file. Each must now give one line
that says what to do, exit 2, and leave nothing wrong behind."""

from __future__ import annotations

import errno
import json
import os
import shlex
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
from tests.helpers import FMNIST, fmnist_dir as write_fmnist, needs_fmnist as needs_data, write_idx

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "model.arch=wong_cnn",
    "data.subset=256",
    "train.batch_size=64",
    "train.probe_size=32",
    "train.probe_steps=1",
    "train.progress=false",
    "eval.at_end=false",
    "eval.attacks=clean",
    "method.atas.warmup_epochs=1",
    "train.deterministic=true",
]
EVAL = ["--attacks", "clean", "--n-examples", "16", "--no-progress"]


pytestmark = pytest.mark.usefixtures("no_debug")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    status = cli([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line(err: str, *fragments: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("atas: warning: ")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def result_file(folder: Path, prefix: str) -> Path:
    """The one evaluation result PREFIX-<digest>.json in folder; its digest names its own request."""
    files = [p for p in folder.glob(f"{prefix}-*.json") if p.name[len(prefix) + 1 : -5].isalnum()]
    assert len(files) == 1, (prefix, sorted(p.name for p in folder.iterdir()))
    assert files[0].name[len(prefix) + 1 : -5] == json.loads(files[0].read_text())["request_sha256"]
    return files[0]


def fmnist_dir(folder: Path, n: int = 32, gz: bool = False) -> dict[str, Path]:
    """The four Fashion-MNIST files, n training and n test images."""
    return write_fmnist(folder, n, n, gz)


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
    status, _, err = run_cli(
        capsys,
        "train",
        "fmnist",
        f"data.data_dir={tmp_path / 'd'}",
        *TINY,
        "data.subset=32",
        "train.epochs=1",
        "--run-dir",
        tmp_path / "run",
    )
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
    status, _, err = run_cli(
        capsys,
        "train",
        "fmnist",
        f"data.data_dir={tmp_path / 'd'}",
        *TINY,
        "data.subset=32",
        "train.epochs=1",
        "--run-dir",
        tmp_path / "run",
    )
    target.chmod(0o644)
    assert status == 2
    assert_one_line(err, f"cannot read {target}", "Permission denied", "chmod a+r")


# ---------------------------------------------------------------- 17. no silent switch to other data
def test_an_explicit_data_dir_without_data_is_an_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    status, _, err = run_cli(
        capsys, "train", "fmnist", f"data.data_dir={empty}", *TINY, "train.epochs=1", "--run-dir", tmp_path / "run"
    )
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


def test_train_says_which_copy_of_the_data_it_reads(tmp_path, capsys, no_system_data):
    fmnist_dir(tmp_path / "d")
    status, out, _ = run_cli(
        capsys,
        "train",
        "fmnist",
        f"data.data_dir={tmp_path / 'd'}",
        *TINY,
        "data.subset=32",
        "train.probe_size=0",
        "train.epochs=1",
        "--run-dir",
        tmp_path / "run",
    )
    assert status == 0 and f"data: fmnist from {tmp_path / 'd'}" in out.splitlines()


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


@needs_data
def test_out_under_a_file_is_one_line(run_copy, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    status, _, err = run_cli(capsys, "export", run_copy, "--out", afile)
    assert status == 2
    assert_one_line(err, f"--out {afile} is a file, not a folder")
    status, _, err = run_cli(capsys, "eval", run_copy, *EVAL, "--out", afile / "x.json")
    assert status == 2
    assert_one_line(err, f"{afile} is a file, not a folder")
    status, _, err = run_cli(capsys, "eval", run_copy, *EVAL, "--out", tmp_path)
    assert status == 2
    assert_one_line(err, f"--out {tmp_path} is a folder")
    assert afile.read_text() == "mine"


# ---------------------------------------------------------------- 8, 9. evaluating the user's own model
USER_MODULE = textwrap.dedent('''
    import torch.nn as nn

    def factory():
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
''')


@pytest.fixture
def module_in_cwd(tmp_path, monkeypatch):
    """A module in the current folder only: not on sys.path, as for a user of the `atas` script."""
    name = f"my_models_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    yield name
    sys.modules.pop(name, None)


def test_model_and_import_find_a_module_in_the_current_folder(module_in_cwd):
    from atas.external import import_plugins, model_from_factory

    assert isinstance(model_from_factory(f"{module_in_cwd}:factory"), torch.nn.Module)
    sys.modules.pop(module_in_cwd)
    assert module_in_cwd in import_plugins([module_in_cwd])


@needs_data
def test_model_eval_files_are_named_by_their_settings(module_in_cwd, tmp_path, capsys):
    base = ["eval", "--model", f"{module_in_cwd}:factory", "--data", "fmnist", "--eps", "0.1", "--no-progress"]
    assert run_cli(capsys, *base, "--attacks", "clean", "--n-examples", "16")[0] == 0
    assert run_cli(capsys, *base, "--attacks", "clean,fgsm", "--n-examples", "16")[0] == 0
    assert run_cli(capsys, *base, "--attacks", "clean", "--n-examples", "32")[0] == 0
    model = f"{module_in_cwd}.factory-fmnist"
    names = sorted(p.name.rsplit("-", 1)[0] for p in tmp_path.glob("eval-*.json"))
    assert names == sorted(
        [f"eval-{model}-clean+fgsm-n16-eps0.1", f"eval-{model}-clean-n16-eps0.1", f"eval-{model}-clean-n32-eps0.1"]
    )
    assert json.loads(result_file(tmp_path, f"eval-{model}-clean-n16-eps0.1").read_text())["n_examples"] == 16


# ---------------------------------------------------------------- 11. a card carries its own weights' scores
@needs_data
def test_export_card_carries_only_the_evaluation_of_its_weights(run_copy, tmp_path, capsys):
    assert run_cli(capsys, "eval", run_copy, *EVAL, "--out", run_copy / "eval.json")[0] == 0  # checkpoint.pt's
    evaluation = json.loads((run_copy / "eval.json").read_text())
    assert evaluation["checkpoint"]["file"] == "checkpoint.pt" and evaluation["checkpoint"]["epoch"] == 2
    assert run_cli(capsys, "export", run_copy, "--out", tmp_path / "final")[0] == 0
    card = json.loads((tmp_path / "final" / "card.json").read_text())
    assert card["evaluation"]["results"] == evaluation["results"] and card["evaluation"]["file"] == "eval.json"

    status, _, err = run_cli(capsys, "export", run_copy / "checkpoint.prev.pt", "--out", tmp_path / "prev")
    assert status == 0 and "carries no evaluation" in err and "atas eval" in err
    card = json.loads((tmp_path / "prev" / "card.json").read_text())
    assert card["evaluation"] is None and "evaluate other weights" in card["evaluation_note"]
    # evaluated on its own, the older checkpoint's card gets its own numbers
    assert run_cli(capsys, "eval", run_copy / "checkpoint.prev.pt", *EVAL)[0] == 0
    assert run_cli(capsys, "export", run_copy / "checkpoint.prev.pt", "--out", tmp_path / "prev")[0] == 0
    card = json.loads((tmp_path / "prev" / "card.json").read_text())
    assert card["evaluation"]["file"] == result_file(run_copy, "eval-clean-n16").name
    assert card["evaluation"]["checkpoint"]["epoch"] == 1

    (run_copy / "eval.json").write_text(json.dumps({"results": {"clean": {"accuracy": 0.99}}}))  # older atas
    for p in run_copy.glob("eval-*.json"):
        p.unlink()
    assert run_cli(capsys, "export", run_copy, "--out", tmp_path / "old")[0] == 0
    card = json.loads((tmp_path / "old" / "card.json").read_text())
    assert card["evaluation"] is None and "records no weights sha256" in card["evaluation_note"]


# ---------------------------------------------------------------- 12, 13. special and full output files
@needs_data
def test_out_onto_a_device_file_writes_into_it(run_copy, tmp_path, capsys):
    import stat

    node = device_copy(tmp_path / "null", 3)
    assert run_cli(capsys, "eval", run_copy, *EVAL, "--out", node)[0] == 0
    assert stat.S_ISCHR(os.stat(node).st_mode)  # still the device, not a regular file renamed over it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null", "run"]  # no .state beside it, no temp


def device_copy(path: Path, minor: int) -> Path:
    """A private copy of /dev/null (minor 3) or /dev/full (7): a bug that replaced the node must
    never replace the machine's own."""
    import stat

    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
    except OSError as e:
        pytest.skip(f"cannot make a device node here ({e})")
    return path


@needs_data
def test_disk_full_during_an_evaluation_is_one_line(run_copy, tmp_path, capsys):
    full = device_copy(tmp_path / "full", 7)
    status, _, err = run_cli(capsys, "eval", run_copy, *EVAL, "--out", full)
    assert status == 2
    assert_one_line(err, f"no space left on device while writing {full}", "choose another --out")
    assert full.is_char_device()


def _full_for(fragment: str):
    """os.fsync that fails with ENOSPC for files whose name holds `fragment` (as a full disk does)."""
    real = os.fsync

    def fsync(fd):
        if fragment in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    return fsync


@needs_data
@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
def test_disk_full_in_the_final_evaluation_of_training_is_one_line(tmp_path, monkeypatch, capsys):
    import atas.checkpoint

    monkeypatch.setattr(atas.checkpoint.os, "fsync", _full_for(".eval."))
    run_dir = tmp_path / "r"
    args = ["train", "fmnist", *TINY, "train.epochs=1", "eval.at_end=true", "eval.n_examples=16", "--run-dir", run_dir]
    status, _, err = run_cli(capsys, *args)
    assert status == 2
    assert_one_line(
        err,
        "no space left on device while writing",
        "training finished",
        f"atas eval {run_dir} --out {run_dir / 'eval.json'}",
    )
    monkeypatch.undo()
    assert not [p for p in run_dir.iterdir() if ".tmp" in p.name]
    status, _, err = run_cli(capsys, "eval", run_dir, "--out", run_dir / "eval.json", "--no-progress")
    assert status == 0 and json.loads((run_dir / "eval.json").read_text())["checkpoint"]["epoch"] == 1


# ---------------------------------------------------------------- 15. advice that names a file checks it first
def flip_byte_in_largest_member(path: Path) -> None:
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x04
    path.write_bytes(bytes(raw))


@needs_data
def test_recovery_advice_never_names_a_broken_file(run_copy):
    from atas.checkpoint import CheckpointError, load_checkpoint

    current, prev = run_copy / "checkpoint.pt", run_copy / "checkpoint.prev.pt"
    flip_byte_in_largest_member(current)
    with pytest.raises(CheckpointError, match=f"mv {prev} {current}"):
        load_checkpoint(current)  # the older one is whole: move it into place
    prev.write_bytes(prev.read_bytes()[:5000])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(current)
    assert "damaged too" in str(e.value) and "mv " not in str(e.value)


@needs_data
def test_a_damaged_best_pt_says_the_checkpoint_is_intact(run_copy):
    from atas.checkpoint import CheckpointError, load_checkpoint

    best = run_copy / "best.pt"
    best.write_bytes((run_copy / "checkpoint.pt").read_bytes()[:5000])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(best)
    message = str(e.value)
    assert f"{run_copy / 'checkpoint.pt'} is intact" in message and f"rm {best}" in message
    assert "--overwrite" not in message


# ---------------------------------------------------------------- 16. temporary files of evaluations
KILLED_WRITE = """
import os, signal, sys
from atas.evaluation import save_result
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # killed mid-write, after the data, before the rename
save_result({"results": {}}, sys.argv[1])
"""


@needs_data
@pytest.mark.slow
def test_a_killed_evaluation_write_leaves_nothing_behind(run_copy, capsys):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITE, str(run_copy / "eval.state")], env=env)
    assert proc.wait() == -9
    left = [p.name for p in run_copy.iterdir() if "tmp" in p.name]
    assert left == [f".eval.state.tmp-{proc.pid}"]  # the one naming of atomic_write
    from atas import rundir

    assert [p.name for p in rundir.clean_staged_files(run_copy)] == left  # the run folder's cleanup takes it
    subprocess.run([sys.executable, "-c", KILLED_WRITE, str(run_copy / "eval.json")], env=env)
    assert run_cli(capsys, "eval", run_copy, *EVAL, "--out", run_copy / "eval.json")[0] == 0
    assert not [p for p in run_copy.iterdir() if "tmp" in p.name]  # and so does the evaluation itself


# ---------------------------------------------------------------- 18. an evaluation says which epoch it measured
HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
time.sleep(120)
"""


@needs_data
def test_an_evaluation_of_a_run_in_training_says_so(run_copy, capsys):
    assert run_cli(capsys, "eval", run_copy, *EVAL)[0] == 0
    result = json.loads(result_file(run_copy, "eval-clean-n16").read_text())
    assert result["checkpoint"]["epoch"] == 2 and result["checkpoint"]["file"] == "checkpoint.pt"
    assert result["mid_run"] is False and Path(result["data"]["folder"]).is_dir()  # which copy of the data
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_copy)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        status, _, err = run_cli(capsys, "eval", run_copy, *EVAL)
    finally:
        holder.kill()
        holder.wait()
    assert status == 0
    assert f"atas: warning: {run_copy} is being trained right now (PID {holder.pid}" in err and "epoch 2 of 2" in err
    result = json.loads(result_file(run_copy, "eval-clean-n16").read_text())
    assert result["mid_run"] is True and result["checkpoint"]["epoch"] == 2
    assert any("being trained right now" in w for w in result["warnings"])


# ---------------------------------------------------------------- 19. small ones
def test_a_refused_run_leaves_no_runs_folder(tmp_path, capsys):
    status, _, err = run_cli(
        capsys, "train", "fmnist", *TINY, f"out_dir={tmp_path / 'runs'}", f"data.data_dir={tmp_path / 'no-data'}"
    )
    assert status == 2 and "not found" in err
    assert list(tmp_path.iterdir()) == []


def test_eval_device_without_a_gpu_names_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, _, err = run_cli(capsys, "eval", tmp_path / "run", "--device", "cuda")
    assert status == 2
    assert_one_line(err, "--device cuda", "--device cpu")
    assert "train.device" not in err


@needs_data
def test_the_card_recipe_of_the_export_docstring_works(run_copy, tmp_path, capsys):
    from safetensors.torch import load_file

    import atas.export
    from atas.export import load_model
    from atas.models import build_model

    assert 'build_model(**card["model"])' in atas.export.__doc__
    assert run_cli(capsys, "export", run_copy, "--out", tmp_path / "e")[0] == 0
    card = json.loads((tmp_path / "e" / "card.json").read_text())
    model = build_model(**card["model"])  # the documented recipe, verbatim
    model.load_state_dict(load_file(str(tmp_path / "e" / "model.safetensors")))
    model.eval()
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(model(x), load_model(run_copy)[0](x))


@needs_data
def test_exporting_the_older_checkpoint_of_a_finished_run_says_what_it_is(run_copy, tmp_path, capsys):
    status, _, err = run_cli(capsys, "export", run_copy / "checkpoint.prev.pt", "--out", tmp_path / "e")
    assert status == 0
    assert "older checkpoint of a finished run (epoch 1 of 2)" in err and "finish it" not in err


@needs_data
def test_nothing_to_resume_says_what_to_do(run_copy, capsys):
    # (a checkpoint.healthy.pt alone is resumed from: tests/test_guard.py)
    for name in ("checkpoint.pt", "checkpoint.prev.pt", "checkpoint.healthy.pt"):
        (run_copy / name).unlink()
    status, _, err = run_cli(capsys, "train", "--resume", run_copy)
    assert status == 2
    command = f"atas train {run_copy / 'config.yaml'} --run-dir {run_copy} --overwrite"
    assert_one_line(err, "nothing to resume", command)
    assert cli(shlex.split(command)[1:]) == 0  # the advice works from this state


# ---------------------------------------------------------------- a run folder's config, read in one place
@pytest.mark.parametrize(
    "text,what",
    [("just a string\n", "str"), ("- a\n- list\n", "list"), ("", "nothing"), ("train: [unclosed\n", "not valid YAML")],
)
@needs_data
def test_an_edited_config_yaml_is_one_line_on_resume(run_copy, capsys, text, what):
    (run_copy / "config.yaml").write_text(text)
    status, _, err = run_cli(capsys, "train", "--resume", run_copy)
    assert status == 2
    assert_one_line(err, str(run_copy / "config.yaml"), what)


@needs_data
def test_a_lost_config_yaml_is_read_from_the_checkpoint(run_copy, capsys):
    (run_copy / "config.yaml").unlink()
    status, out, err = run_cli(capsys, "train", "--resume", run_copy, "train.epochs=3")
    assert status == 0, err
    assert (run_copy / "config.yaml").exists() and "epoch=3" in out


@pytest.mark.parametrize("argv", [["train", "fmnist", "train.device=tpu"], ["eval", "RUN", "--device", "tpu"]])
@needs_data
def test_a_device_atas_cannot_use_is_one_line(run_copy, capsys, argv):
    status, _, err = run_cli(capsys, *[str(run_copy) if a == "RUN" else a for a in argv])
    assert status == 2
    assert_one_line(err, "tpu", "use auto, cpu, cuda or cuda:N")
