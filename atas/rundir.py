"""The run folder: one writer at a time, a new run never beside an old run's outputs, no temporary
files left over.

    with RunFolder(run_dir, resume=False, overwrite=False) as folder:
        ...                      # check and build everything; nothing in run_dir is written yet
        folder.start(cfg.to_yaml())   # now: stale outputs go, config.yaml is written

Lock: an exclusive `flock` on RUN/.lock, which holds the writer's PID for the error message. The
kernel drops a flock when its process dies, even by SIGKILL, so a lock file a dead run left behind
is simply taken over; a live writer is named by PID. Without flock (no fcntl, or a filesystem that
refuses it) the PID in the file decides: alive means locked.

A fresh run in a folder that holds another run's results (a checkpoint, best.pt, eval.json,
metrics rows) is refused unless `overwrite`; then, and for every fresh start, all outputs of the
earlier run go before the new config.yaml is written, so no eval.json or best.pt of another model
sits beside the new one. Files `atomic_write` stages (`.NAME.tmp-PID`) whose process is gone
(SIGKILL mid-save) are removed when the folder is taken.
"""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from atas.checkpoint import CheckpointError, atomic_write_text

try:
    import fcntl
except ImportError:  # not POSIX: the PID in the lock file decides
    fcntl = None  # type: ignore[assignment]  # the module, or None where there is none

CHECKPOINT = "checkpoint.pt"
LOCK = ".lock"
# What a run writes into its folder. Results (a fresh run refuses to replace them without
# overwrite) and by-products (config, metrics views, evaluation progress) that go with them.
RESULTS = ("best.pt", "eval.json", "metrics.jsonl")
BY_PRODUCTS = ("config.yaml", "metrics.csv", "eval.state", "diverged.json")
_CHECKPOINT_FILE = re.compile(r"checkpoint(-rank\d+-of\d+)?(\.prev|\.healthy)?\.pt")
_STAGED = re.compile(r"\..+\.tmp-(\d+)")


class RunDirError(CheckpointError):
    """The run folder cannot be used as asked; the message says why and what to do."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def run_outputs(run_dir: Path) -> list[Path]:
    """Every file of an earlier run in run_dir (checkpoints of any world size included)."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir()
                  if p.name in RESULTS + BY_PRODUCTS or _CHECKPOINT_FILE.fullmatch(p.name))


def _is_result(path: Path) -> bool:
    if path.name == "metrics.jsonl":
        return path.stat().st_size > 0
    return path.name in RESULTS or bool(_CHECKPOINT_FILE.fullmatch(path.name))


def clean_staged_files(run_dir: Path, names: tuple[str, ...] | None = None) -> list[Path]:
    """Remove `.NAME.tmp-PID` files of processes that are gone (or of this one: a process that
    just took the folder has no save in flight). names: only those staged for these file names
    (an evaluation cleaning up after itself in a folder that is not its own). Returns what was removed."""
    removed = []
    for p in Path(run_dir).iterdir() if Path(run_dir).is_dir() else ():
        m = _STAGED.fullmatch(p.name)
        if names is not None and (not m or p.name[1:p.name.rindex(".tmp-")] not in names):
            continue
        if m and p.is_file() and (int(m.group(1)) == os.getpid() or not pid_alive(int(m.group(1)))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def live_writer(run_dir: str | Path) -> int | None:
    """The PID of a live process that holds run_dir's lock (training it right now), else None.
    Only looks: the lock is not taken (a PID in a stale lock file that now belongs to another
    process is told apart by probing the flock, which the kernel dropped when the writer died)."""
    lock = RunLock(run_dir)
    pid = lock.holder()
    if pid is None or pid == os.getpid() or not pid_alive(pid):
        return None
    if fcntl is None:
        return pid
    try:
        fd = os.open(lock.path, os.O_RDONLY)
    except OSError:
        return None  # released between the two looks
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return pid if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """Exclusive use of a run folder by this process (see the module docstring)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._fd: int | None = None

    def holder(self) -> int | None:
        """The PID written in the lock file (None: no file or no number)."""
        try:
            return int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _refuse(self, pid: int | None) -> RunDirError:
        who = f"PID {pid}" if pid is not None else "a process whose PID is unknown"
        return RunDirError(
            f"{self.run_dir} is in use by another atas process ({who}, lock file {self.path}): two writers "
            "would overwrite each other's checkpoints. Wait for it to finish, stop it, or use another --run-dir.")

    def acquire(self) -> None:
        while True:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise RunDirError(f"cannot take the run folder {self.run_dir}: {e.strerror} ({self.path}). "
                                  "Use a --run-dir you can write to.") from None
            try:
                locked = self._flock(fd)
            except BaseException:
                os.close(fd)
                raise
            if not locked:  # flock unavailable: the PID in the file decides
                pid = self.holder()
                if pid is not None and pid != os.getpid() and pid_alive(pid):
                    os.close(fd)
                    raise self._refuse(pid)
            try:  # the previous holder may have unlinked the file between our open and flock: retry
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def _flock(self, fd: int) -> bool:
        """True: this process holds the flock. False: flock is not available here."""
        if fcntl is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise self._refuse(self.holder()) from None
            return False  # e.g. ENOLCK: a filesystem without locks
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if self.holder() == os.getpid():
                self.path.unlink(missing_ok=True)  # while still locked: the next writer's stat check sees it
        finally:
            os.close(self._fd)  # drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class RunFolder:
    """A run folder held for one training run: locked, checked, and written only by `start`.

    enabled=False (DDP ranks other than 0) does nothing: rank 0 speaks for the folder."""

    def __init__(self, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False, enabled: bool = True):
        if resume and overwrite:
            raise RunDirError("--overwrite replaces a run and --resume continues it: give one of them")
        self.run_dir, self.resume, self.overwrite, self.enabled = Path(run_dir), resume, overwrite, enabled
        self.lock = RunLock(run_dir)
        self._created: list[Path] = []  # folders this run made (run_dir, then missing parents such as runs/)

    def __enter__(self) -> RunFolder:
        if not self.enabled:
            return self
        self._created = []
        for folder in (self.run_dir, *self.run_dir.parents):
            if folder.exists():
                break
            self._created.append(folder)
        self.lock.acquire()
        try:
            clean_staged_files(self.run_dir)
            if not self.resume:
                self.check_fresh()
        except BaseException:
            self._leave()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._leave()

    def _leave(self) -> None:
        self.lock.release()
        # A run refused before it wrote anything leaves no empty folder behind: neither its own
        # nor a parent it created on the way (`runs/` of the default out_dir).
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:
                break

    def check_fresh(self) -> None:
        """A fresh run may not silently replace another run's results."""
        held = [p.name for p in run_outputs(self.run_dir) if _is_result(p)]
        if held and not self.overwrite:
            raise RunDirError(
                f"{self.run_dir} holds another run ({', '.join(held)}). Resume it with `atas train --resume "
                f"{self.run_dir}`, choose another --run-dir, or pass --overwrite to replace it (its "
                "checkpoints, metrics and evaluation are deleted).")

    def start(self, config_yaml: str) -> None:
        """Everything was checked: now write. A fresh run first removes every output of an earlier
        run, then config.yaml is written."""
        if not self.enabled:
            return
        if not self.resume:
            for p in run_outputs(self.run_dir):
                p.unlink(missing_ok=True)
        (self.run_dir / "diverged.json").unlink(missing_ok=True)  # a resumed run tries again
        atomic_write_text(self.run_dir / "config.yaml", config_yaml)
        self._created = []  # the folder holds a run now
