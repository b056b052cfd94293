"""The run folder under faults: a refused resume changes nothing, a damaged checkpoint is refused
(and the one before it is kept), metrics survive a kill between save and log, one writer per
folder, a full disk says so, and files a killed save left behind are cleaned up."""

from __future__ import annotations

import errno
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import atas.checkpoint
from atas import rundir
from atas.checkpoint import CheckpointError, DiskFullError, load_checkpoint, previous_path, save_checkpoint
from atas.cli import main as cli
from atas.config import load_config
from atas.rundir import CHECKPOINT, MetricsLog, RunDirError, RunLock
from atas.trainer import train
from tests.helpers import needs_fmnist as needs_data

TINY = [
    "model.arch=wong_cnn",
    "train.co_action=keep_best",
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


def tiny(tmp_path, *extra):
    return load_config("fmnist", TINY + [f"out_dir={tmp_path}"] + list(extra))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def epochs_logged(run_dir: Path) -> list[int]:
    jsonl = [r["epoch"] for r in MetricsLog(run_dir).read()]
    csv_rows = (run_dir / "metrics.csv").read_text().splitlines()[1:]
    assert [int(line.split(",")[0]) for line in csv_rows] == jsonl  # the two views agree
    return jsonl


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def flip_byte_in_largest_member(path: Path) -> None:
    """One bit of tensor data changes, the archive's structure does not (as a disk error would)."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.file_size // 2] ^= 0x04
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-epoch run, trained once; tests work on copies (`run_copy`)."""
    root = tmp_path_factory.mktemp("finished")
    train(tiny(root, "train.epochs=2"), run_dir=root / "run")
    return root / "run"


@pytest.fixture
def run_copy(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "run")
    return tmp_path / "run"


# ---------------------------------------------------------------- 1. a refused resume changes nothing
@needs_data
def test_refused_resume_changes_nothing(run_copy, capsys):
    before = snapshot(run_copy)
    assert cli(["train", "--resume", str(run_copy), "method.eps=0.1"]) == 2
    assert "method.eps" in capsys.readouterr().err
    assert snapshot(run_copy) == before  # config.yaml included: the plain resume below still works
    flip_byte_in_largest_member(run_copy / CHECKPOINT)  # refused for another reason: still nothing written
    before = snapshot(run_copy)
    assert cli(["train", "--resume", str(run_copy), "train.epochs=3"]) == 2
    assert snapshot(run_copy) == before


@needs_data
def test_plain_resume_after_a_refused_one_works(run_copy):
    assert cli(["train", "--resume", str(run_copy), "method.eps=0.1"]) == 2
    assert cli(["train", "--resume", str(run_copy), "train.epochs=3"]) == 0
    assert load_checkpoint(run_copy / CHECKPOINT)["epoch"] == 3 and epochs_logged(run_copy) == [1, 2, 3]


# ---------------------------------------------------------------- 2. checkpoint integrity
def test_bit_flip_is_found_by_the_crc(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"model": {"w": torch.randn(64, 64)}, "epoch": 1})
    flip_byte_in_largest_member(path)
    with pytest.raises(CheckpointError, match=rf"{path}.*corrupt.*CRC"):
        load_checkpoint(path)


def test_non_finite_values_are_refused(tmp_path):
    path = tmp_path / "ck.pt"
    delta = torch.zeros(10, 1, 4, 4)
    delta[3, 0, 1, 2] = float("nan")
    delta[4, 0, 0, 0] = float("inf")
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "store": {"delta": delta}, "epoch": 1})
    with pytest.raises(CheckpointError, match=rf"{path} holds non-finite values: 2 of 160 entries of store.delta"):
        load_checkpoint(path)


@needs_data
def test_corrupt_checkpoint_refused_by_eval_and_resume_names_the_older_one(run_copy, capsys):
    flip_byte_in_largest_member(run_copy / CHECKPOINT)
    assert cli(["eval", str(run_copy), "--attacks", "clean", "--n-examples", "16", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{run_copy / CHECKPOINT} is corrupt" in err and "Traceback" not in err
    assert not (run_copy / "eval.json").exists()
    prev = previous_path(run_copy / CHECKPOINT)
    with pytest.raises(CheckpointError, match=rf"CRC.*kept as {prev}.*mv {prev} {run_copy / CHECKPOINT}"):
        train(tiny(run_copy.parent, "train.epochs=2"), run_dir=run_copy, resume=True)
    # doing what the message says: one epoch is lost, nothing else; the metrics follow the checkpoint
    os.replace(prev, run_copy / CHECKPOINT)
    run = train(tiny(run_copy.parent, "train.epochs=2"), run_dir=run_copy, resume=True)
    assert [r["epoch"] for r in run.metrics] == [1, 2] and epochs_logged(run_copy) == [1, 2]


@needs_data
def test_previous_checkpoint_is_kept_one_epoch_older(finished_run):
    current = load_checkpoint(finished_run / CHECKPOINT)
    prev = load_checkpoint(previous_path(finished_run / CHECKPOINT))
    assert (current["epoch"], prev["epoch"]) == (2, 1)
    assert [r["epoch"] for r in prev["metrics"]] == [1]


@needs_data
def test_nan_in_stored_prior_refuses_resume(run_copy):
    state = load_checkpoint(run_copy / CHECKPOINT)
    state.pop("format")
    state["method"]["store"]["delta"][7] = float("nan")
    save_checkpoint(run_copy / CHECKPOINT, state)  # a valid archive: the CRC is right, the values are not
    with pytest.raises(CheckpointError, match=r"non-finite values: \d+ of \d+ entries of method.store.delta"):
        train(tiny(run_copy.parent, "train.epochs=3"), run_dir=run_copy, resume=True)


# ---------------------------------------------------------------- 3. metrics are never lost
@needs_data
def test_kill_between_save_and_log_loses_no_row(tmp_path, monkeypatch):
    original = MetricsLog.write_all

    def killed_at_epoch_2(self, rows):
        if rows[-1]["epoch"] == 2:
            raise KeyboardInterrupt  # SIGINT/SIGKILL right after the epoch-2 checkpoint was saved
        original(self, rows)

    monkeypatch.setattr(MetricsLog, "write_all", killed_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path, "train.epochs=3"), run_dir=tmp_path / "r")
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "r" / CHECKPOINT)["epoch"] == 2 and epochs_logged(tmp_path / "r") == [1]
    run = train(tiny(tmp_path, "train.epochs=3"), run_dir=tmp_path / "r", resume=True)
    assert epochs_logged(tmp_path / "r") == [1, 2, 3]
    assert [r["epoch"] for r in run.metrics] == [1, 2, 3]  # the CO monitor replayed epoch 2 too


# ---------------------------------------------------------------- 4. one writer per run folder
# Another writer, as RunLock does it (flock on RUN/.lock, its PID inside), without importing torch.
HOLD_LOCK = """
import fcntl, os, sys, time
os.makedirs(sys.argv[1], exist_ok=True)
fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
time.sleep(120)
"""


@needs_data
@pytest.mark.skipif(rundir.fcntl is None, reason="flock is POSIX")
def test_live_second_writer_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = ["train", "fmnist", *TINY, "train.epochs=1", "--run-dir", str(run_dir)]
        assert cli(args) == 2
        err = capsys.readouterr().err
        assert f"in use by another atas process (PID {holder.pid}" in err and "Traceback" not in err
        assert [p.name for p in run_dir.iterdir()] == [".lock"]  # the refused writer wrote nothing
    finally:
        holder.kill()
        holder.wait()
    assert RunLock(run_dir).holder() == holder.pid  # SIGKILL left the lock file behind: stale now
    assert cli(args) == 0
    assert load_checkpoint(run_dir / CHECKPOINT)["epoch"] == 1 and not (run_dir / ".lock").exists()


def test_pid_file_decides_where_flock_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "fcntl", None)
    tmp_path.joinpath(".lock").write_text(f"{os.getppid()}\n")  # a live process
    with pytest.raises(RunDirError, match=rf"PID {os.getppid()}"):
        RunLock(tmp_path).acquire()
    tmp_path.joinpath(".lock").write_text(f"{dead_pid()}\n")
    with RunLock(tmp_path) as lock:
        assert lock.holder() == os.getpid()
    assert not tmp_path.joinpath(".lock").exists()


@needs_data
def test_fresh_run_refuses_a_folder_holding_another_run(run_copy, capsys):
    (run_copy / "eval.json").write_text("{}")  # an evaluation of the old model
    before = snapshot(run_copy)
    args = ["train", "fmnist", *TINY, "train.epochs=1", "method.eps=0.1", "--run-dir", str(run_copy)]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "holds another run" in err and "--overwrite" in err and "--resume" in err
    assert snapshot(run_copy) == before
    assert cli(args + ["--overwrite"]) == 0
    assert not (run_copy / "eval.json").exists()
    for name in (CHECKPOINT, "best.pt"):  # what is there now belongs to the new run
        assert load_checkpoint(run_copy / name)["config"]["method"]["eps"] == "0.1"
    assert not previous_path(run_copy / CHECKPOINT).exists()  # the old run's epoch 1 is not the new one's
    assert load_checkpoint(run_copy / CHECKPOINT)["config"]["method"]["eps"] == "0.1"
    assert epochs_logged(run_copy) == [1]
    assert cli(["train", "--resume", str(run_copy), "--overwrite"]) == 2


def test_run_that_cannot_start_writes_nothing(tmp_path):
    from atas.data import DataNotFoundError

    cfg = load_config("fmnist", TINY + ["data.name=cifar10", f"data.data_dir={tmp_path / 'nothing'}"])
    with pytest.raises(DataNotFoundError):
        train(cfg, run_dir=tmp_path / "new")
    assert not (tmp_path / "new").exists()  # no config.yaml of a run that never ran, no empty folder


# ---------------------------------------------------------------- 5. a full disk says so
@needs_data
def test_disk_full_at_epoch_2_names_the_file_and_the_intact_epoch(tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def fills_up_at_epoch_2(obj, f, *a, **k):
        if obj.get("epoch") == 2 and "optimizer" in obj:  # the checkpoint (best.pt, saved first, fits)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", fills_up_at_epoch_2)
    run_dir = tmp_path / "r"
    assert cli(["train", "fmnist", *TINY, "train.epochs=3", "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert (
        f"no space left on device while writing {run_dir / CHECKPOINT}; the checkpoint of epoch 1 is intact" in err
    ) and f"free space and resume with `atas train --resume {run_dir}`" in err
    assert "Traceback" not in err
    monkeypatch.undo()
    assert load_checkpoint(run_dir / CHECKPOINT)["epoch"] == 1
    assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name] and not (run_dir / ".lock").exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_disk_full_as_torch_reports_it_is_recognised(tmp_path, monkeypatch):
    """torch.save turns a failed write into its own RuntimeError ('unexpected pos'); the file saw ENOSPC."""
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"epoch": 1})
    monkeypatch.setattr(atas.checkpoint, "open", lambda p, mode: open("/dev/full", mode + ""), raising=False)

    def save_like_torch(obj, f, *a, **k):
        try:
            f.write(b"\0" * (1 << 20))  # larger than the buffer: the write reaches the full device
        except OSError:
            pass  # swallowed by the C++ writer
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", save_like_torch)
    with pytest.raises(DiskFullError, match=rf"no space left on device while writing {path}; the previous file is"):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1


@needs_data
def test_files_of_a_killed_save_are_cleaned_on_resume(run_copy, tmp_path):
    pid = dead_pid()
    stale = [run_copy / f".{CHECKPOINT}.tmp-{pid}", run_copy / f".metrics.jsonl.tmp-{pid}"]
    for p in stale:
        p.write_bytes(b"\0" * 4096)  # what SIGKILL mid-save leaves
    live = run_copy / f".export.json.tmp-{os.getppid()}"  # a live process's file is not ours to remove
    live.write_text("{}")
    train(tiny(run_copy.parent, "train.epochs=2"), run_dir=run_copy, resume=True)  # nothing left to train
    assert not any(p.exists() for p in stale) and live.exists()


# ------------------------------------------------ 9. nothing written through a link or into a special file
PRECIOUS = "precious\n"


def plant(path: Path, kind: str, outside: Path) -> None:
    """What an attacker with write access to a shared run folder leaves there."""
    path.unlink(missing_ok=True)
    if kind == "link":
        path.symlink_to(outside)
    elif kind == "fifo":
        os.mkfifo(path)
    else:  # a link to a device
        path.symlink_to("/dev/null")


def folder_state(folder: Path) -> dict:
    """Every entry as it is (a link by its target, a special file by its kind): nothing is opened
    that could block or follow."""
    state = {}
    for p in sorted(folder.iterdir()):
        state[p.name] = ("link", os.readlink(p)) if p.is_symlink() else p.read_bytes() if p.is_file() else "special"
    return state


def refused_in_one_line(capsys, argv, *fragments) -> str:
    status = cli([str(a) for a in argv])
    err = capsys.readouterr().err
    assert status == 2, err
    lines = [
        line for line in err.strip().splitlines() if "WARNING" not in line and not line.startswith("atas: warning: ")
    ]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    "name,kind",
    [
        (".lock", "link"),
        ("metrics.jsonl", "link"),
        ("metrics.jsonl", "device"),
        ("metrics.csv", "link"),
        ("metrics.csv", "fifo"),
        ("best.pt", "link"),
        ("best.pt", "device"),
        ("checkpoint.pt", "link"),
        ("checkpoint.prev.pt", "link"),
        ("checkpoint.healthy.pt", "link"),
        ("config.yaml", "link"),
        ("eval.json", "link"),
        ("eval.state", "fifo"),
        ("diverged.json", "link"),
        ("val.json", "link"),
    ],
)
@needs_data
def test_no_file_of_a_run_folder_is_written_through_a_link_or_into_a_special_file(
    run_copy, tmp_path, capsys, name, kind
):
    outside = tmp_path / "outside.txt"
    outside.write_text(PRECIOUS)
    plant(run_copy / name, kind, outside)
    before = folder_state(run_copy)
    what = {"link": "symbolic link", "device": "symbolic link", "fifo": "FIFO"}[kind]
    for argv in (
        ["train", "--resume", run_copy, "train.epochs=3"],
        ["train", "fmnist", *TINY, "train.epochs=1", "--run-dir", run_copy, "--overwrite"],
    ):
        refused_in_one_line(capsys, argv, f"{run_copy / name} is a {what}", f"rm {run_copy / name}")
        assert outside.read_text() == PRECIOUS
        assert folder_state(run_copy) == before  # refused before anything was written
    (run_copy / name).unlink()  # the advice: remove it and run the command again
    if cli(["train", "--resume", str(run_copy), "train.epochs=3"]) != 0:  # checkpoint.pt removed: what now?
        advice = re.findall(r"`(atas train [^`]+)`", capsys.readouterr().err)
        assert advice and cli(shlex.split(advice[-1])[1:]) == 0, advice  # the next advice works too


@needs_data
def test_the_store_memmap_is_never_written_through_a_link(tmp_path, capsys):
    run_dir = tmp_path / "r"
    train(tiny(tmp_path, "train.epochs=1", "train.store_memmap=store.bin"), run_dir=run_dir)
    outside = tmp_path / "outside.txt"
    outside.write_text(PRECIOUS)
    plant(run_dir / "store.bin", "link", outside)
    refused_in_one_line(
        capsys, ["train", "--resume", run_dir, "train.epochs=2"], f"{run_dir / 'store.bin'} is a symbolic link"
    )
    assert outside.read_text() == PRECIOUS


@pytest.mark.parametrize("suffix", [".json", ".state"])
@needs_data
def test_atas_eval_never_writes_its_result_through_a_link(run_copy, tmp_path, capsys, suffix):
    from atas.evaluation.run import request_file_name
    from atas.export import load_model

    model, cfg, _ = load_model(run_copy)
    cfg.eval.n_examples = 16
    target = run_copy / Path(request_file_name(model, cfg)).with_suffix(suffix).name
    outside = tmp_path / "outside.txt"
    outside.write_text(PRECIOUS)
    plant(target, "link", outside)
    refused_in_one_line(
        capsys, ["eval", run_copy, "--n-examples", "16", "--no-progress"], f"{target} is a symbolic link"
    )
    assert outside.read_text() == PRECIOUS


@pytest.mark.parametrize("name", ["model.safetensors", "card.json"])
@needs_data
def test_an_export_is_never_written_through_a_link(run_copy, tmp_path, capsys, name):
    out = tmp_path / "export"
    out.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text(PRECIOUS)
    plant(out / name, "link", outside)
    refused_in_one_line(capsys, ["export", run_copy, "--out", out], f"{out / name} is a symbolic link")
    assert outside.read_text() == PRECIOUS and os.listdir(out) == [name]


def test_the_atomic_writer_refuses_a_link_and_never_writes_through_its_temporary_name(tmp_path):
    from atas.checkpoint import UnsafeFileError, atomic_write_text, temporary_path

    outside = tmp_path / "outside.txt"
    outside.write_text(PRECIOUS)
    mine = tmp_path / "summary.json"  # any file atas names: summary.json, report.md, ...
    plant(mine, "link", outside)
    with pytest.raises(UnsafeFileError, match="summary.json is a symbolic link"):
        atomic_write_text(mine, "{}")
    mine.unlink()
    plant(temporary_path(mine), "link", outside)  # a link planted where the writer stages the file
    atomic_write_text(mine, "{}")
    assert mine.read_text() == "{}" and not mine.is_symlink() and outside.read_text() == PRECIOUS
    fifo = tmp_path / "named.fifo"
    plant(fifo, "fifo", outside)
    with pytest.raises(UnsafeFileError, match="is a FIFO"):
        atomic_write_text(fifo, "x")  # atas's own name: refused; a --out the user names is written in place
