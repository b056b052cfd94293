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

import copy
import csv
import errno
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from atas.checkpoint import CheckpointError, atomic_write, atomic_write_text, check_own_file, is_plain_file
from atas.errors import AtasError

if TYPE_CHECKING:
    from atas.config import Config

try:
    import fcntl
except ImportError:  # not POSIX: the PID in the lock file decides
    fcntl = None  # type: ignore[assignment]  # the module, or None where there is none
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

CHECKPOINT = "checkpoint.pt"
LOCK = ".lock"
# What a run writes into its folder. Results (a fresh run refuses to replace them without
# overwrite) and by-products (config, metrics views, evaluation progress) that go with them.
RESULTS = ("best.pt", "eval.json", "metrics.jsonl")  # (BEST, EVAL, METRICS below)
BY_PRODUCTS = ("config.yaml", "metrics.csv", "eval.state", "diverged.json")
_CHECKPOINT_FILE = re.compile(r"checkpoint(-rank\d+-of\d+)?(\.prev|\.healthy)?\.pt")
_STAGED = re.compile(r"\..+\.tmp-(\d+)")
_EVAL_FILE = re.compile(r"eval-.+\.(json|state)")  # `atas eval RUN`'s results and their progress
OTHER_OUTPUTS = ("val.json", "val.state")  # written beside the run's own outputs


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
    return sorted(p for p in run_dir.iterdir() if p.name in RESULTS + BY_PRODUCTS or _CHECKPOINT_FILE.fullmatch(p.name))


def _is_result(path: Path) -> bool:
    if path.name == "metrics.jsonl":
        return path.stat().st_size > 0
    return path.name in RESULTS or bool(_CHECKPOINT_FILE.fullmatch(path.name))


def fresh_start_command(run_dir: str | Path) -> str:
    """The command that starts the run in run_dir afresh from its own config.yaml (--overwrite when
    the folder holds results a fresh start would otherwise refuse to replace)."""
    import shlex

    run_dir = Path(run_dir)
    overwrite = " --overwrite" if any(_is_result(p) for p in run_outputs(run_dir)) else ""
    recipe = shlex.quote(str(run_dir / "config.yaml")) if (run_dir / "config.yaml").is_file() else "RECIPE"
    return f"atas train {recipe} --run-dir {shlex.quote(str(run_dir))}{overwrite}"


def check_own_files(run_dir: Path) -> None:
    """Every file of run_dir that atas writes passes `check_own_file` (no symbolic link, no device
    or FIFO): checked when the folder is taken, before anything in it is written."""
    for p in sorted(Path(run_dir).iterdir()) if Path(run_dir).is_dir() else ():
        if (
            p.name in RESULTS + BY_PRODUCTS + OTHER_OUTPUTS
            or _CHECKPOINT_FILE.fullmatch(p.name)
            or _EVAL_FILE.fullmatch(p.name)
        ):
            check_own_file(p)


def clean_staged_files(run_dir: Path, names: tuple[str, ...] | None = None) -> list[Path]:
    """Remove `.NAME.tmp-PID` files of processes that are gone (or of this one: a process that
    just took the folder has no save in flight). names: only those staged for these file names
    (an evaluation cleaning up after itself in a folder that is not its own). Returns what was removed."""
    removed = []
    for p in Path(run_dir).iterdir() if Path(run_dir).is_dir() else ():
        m = _STAGED.fullmatch(p.name)
        if names is not None and (not m or p.name[1 : p.name.rindex(".tmp-")] not in names):
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
    pid = lock.holder()  # None for a lock that is not a regular file: opening it could block
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
        """The PID written in the lock file (None: no file, no number, or not a regular file)."""
        if not is_plain_file(self.path):  # a FIFO would block the read; a link is not ours to read
            return None
        try:
            return int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _refuse(self, pid: int | None) -> RunDirError:
        who = f"PID {pid}" if pid is not None else "a process whose PID is unknown"
        return RunDirError(
            f"{self.run_dir} is in use by another atas process ({who}, lock file {self.path}): two writers "
            "would overwrite each other's checkpoints. Wait for it to finish, stop it, or use another --run-dir."
        )

    def acquire(self) -> None:
        while True:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                check_own_file(self.path)  # a link would have the PID written into its target
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:  # became a link between the check and the open
                    check_own_file(self.path)
                raise RunDirError(
                    f"cannot take the run folder {self.run_dir}: {e.strerror} ({self.path}). "
                    "Use a --run-dir you can write to."
                ) from None
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
            check_own_files(self.run_dir)
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
            resumable = any(_CHECKPOINT_FILE.fullmatch(name) and ".prev." not in name for name in held)
            raise RunDirError(
                f"{self.run_dir} holds another run ({', '.join(held)}). "
                + (
                    f"Resume it with `atas train --resume {self.run_dir}`, choose"
                    if resumable
                    else "It holds no checkpoint to resume (killed before its first epoch was saved): choose"
                )
                + " another --run-dir, or pass --overwrite to replace it (its checkpoints, metrics and evaluation "
                "are deleted)."
            )

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


# --------------------------------------------------------------------------------------------
# What a run folder holds, and the rules read from it: one function per rule. The trainer writes
# these files; sweep, export, tune and compare read them through here, never through the trainer.
# --------------------------------------------------------------------------------------------
CONFIG, BEST, EVAL, EVAL_STATE, DIVERGED = "config.yaml", "best.pt", "eval.json", "eval.state", "diverged.json"
METRICS, METRICS_CSV = "metrics.jsonl", "metrics.csv"
# Top-level config keys that only label a run: an edited recipe description must not make a
# finished run look like another experiment.
LABEL_KEYS = ("name", "description", "out_dir")
# Settings a resumed run may change: how it runs, not what it trains (train.epochs may grow; the
# eval section only says how the end-of-run evaluation is done).
RESUME_FREE_KEYS = (
    ("train", "epochs"),
    ("train", "progress"),
    ("train", "device"),
    ("train", "max_steps"),
    ("train", "store_memmap"),
    ("data", "num_workers"),
    ("data", "data_dir"),
    ("eval", None),
)


class MetricsLog:
    """Per-epoch metrics to metrics.jsonl and metrics.csv in the run folder (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.jsonl, self.csv, self.enabled = Path(run_dir) / METRICS, Path(run_dir) / METRICS_CSV, enabled

    def read(self) -> list[dict]:
        if not os.path.lexists(self.jsonl):
            return []
        check_own_file(self.jsonl)  # a FIFO would block the read
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def write_all(self, rows: list[dict]) -> None:
        if not self.enabled:
            return
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in rows))
        keys = list(dict.fromkeys(k for r in rows for k in r))

        def write_csv(f):
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)

        atomic_write(self.csv, write_csv, mode="w")


class TrainingDiverged(AtasError, RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept. epoch, step and loss say where.
    An outcome of the run, not a bug: the CLI says it in one line and exits 3."""

    exit_status = 3

    def __init__(self, message: str, epoch: int | None = None, step: int | None = None, loss: float | None = None):
        super().__init__(message)
        self.epoch, self.step, self.loss = epoch, step, loss

    def record(self) -> dict:
        """What the run folder keeps of it (DIVERGED)."""
        return {"epoch": self.epoch, "step": self.step, "loss": None if self.loss is None else str(self.loss)}


def record_divergence(run_dir: str | Path, error: TrainingDiverged) -> None:
    """The run's outcome, for `atas compare` and its report: "diverged", not "not started"."""
    atomic_write_text(Path(run_dir) / DIVERGED, json.dumps(error.record()) + "\n")


def read_divergence(run_dir: str | Path) -> dict | None:
    """{epoch, step, loss} of a run that diverged (its DIVERGED file), else None."""
    path = Path(run_dir) / DIVERGED
    try:
        return json.loads(path.read_text()) if is_plain_file(path) else None
    except (OSError, ValueError):
        return None


def saved_config(run_dir: str | Path) -> dict | None:
    """The config tree a run folder's config.yaml holds (None: there is none); a file that cannot
    be read or is not a YAML mapping is a CheckpointError saying so, never a traceback."""
    import yaml

    path = Path(run_dir) / CONFIG
    if not os.path.lexists(path):
        return None
    redo = (
        f"restore it from a copy of the run folder, or start the run again (`atas train RECIPE --run-dir "
        f"{run_dir} --overwrite`)"
    )
    try:
        check_own_file(path)
        tree = yaml.safe_load(path.read_text())
    except OSError as e:
        raise CheckpointError(
            f"cannot read {path}: {e.strerror}; make the run folder readable (`chmod -R u+r {run_dir}`) and try again"
        ) from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid YAML ({str(e).splitlines()[0]}); {redo}") from None
    if not isinstance(tree, dict):
        raise CheckpointError(
            f"{path} does not hold a config (a YAML mapping of sections), but "
            f"{type(tree).__name__ if tree is not None else 'nothing'}; {redo}"
        )
    return tree


def load_run_config(run_dir: str | Path) -> Config:
    """The Config a run folder was trained with (its config.yaml)."""
    from atas.checkpoint import check_readable
    from atas.config import ConfigError, config_from_dict

    check_readable(run_dir)  # a folder this user may not read: one line saying so, not "no config.yaml"
    tree = saved_config(run_dir)
    if tree is None:  # lost: every checkpoint carries the config it was trained with
        from atas.checkpoint import load_checkpoint

        saved = [
            p
            for p in (Path(run_dir) / CHECKPOINT, *sorted(Path(run_dir).glob("checkpoint-rank0-of*.pt")))
            if is_plain_file(p)
        ]
        if not saved:
            raise CheckpointError(f"{run_dir} is not a run folder (no {CONFIG})")
        tree = load_checkpoint(saved[0])["config"]
    try:
        return config_from_dict(tree)
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{Path(run_dir) / CONFIG} is not a valid config ({e}); restore it from a copy, or start the run again"
        ) from None


def check_resumable(saved: dict, cfg: Config) -> None:
    """Resuming is only honest with the config the run was started with (RESUME_FREE_KEYS may change)."""
    mine, theirs = cfg.to_dict(), copy.deepcopy(dict(saved))  # the caller's tree stays as it is
    for label in LABEL_KEYS:  # labels, not training settings
        mine.pop(label, None)
        theirs.pop(label, None)
    if isinstance(theirs.get("data"), dict):  # saved before data.val_size existed: it held nothing out
        theirs["data"] = {"val_size": 0, "val_from": "last", **theirs["data"]}
    for section, new in (
        ("train", {"label_smoothing": 0.0, "wa_tau": 0.0, "wa_start_epoch": 1, "select": "auto"}),
        ("optim", {"div_factor": 25.0, "final_div_factor": 1e4}),
    ):
        if isinstance(theirs.get(section), dict):  # saved before these keys existed: their off values
            theirs[section] = {**new, **theirs[section]}
    if isinstance(theirs.get("method"), dict) and isinstance(theirs["method"].get("args"), dict):
        theirs["method"]["args"] = {"label_smoothing": 0.0, **theirs["method"]["args"]}
    for tree in (mine, theirs):  # other methods' options do not matter; method.args holds this one's
        if isinstance(tree.get("method"), dict):
            tree["method"] = {k: v for k, v in tree["method"].items() if k != "per_method"}
    for section, key in RESUME_FREE_KEYS:
        for tree in (mine, theirs):
            if key is None:
                tree.pop(section, None)
            elif isinstance(tree.get(section), dict):
                tree[section].pop(key, None)
    if mine != theirs:
        diff = [
            f"{s}.{k}: checkpoint {theirs.get(s, {}).get(k)!r} vs now {v!r}"
            for s, sec in mine.items()
            if isinstance(sec, dict)
            for k, v in sec.items()
            if not isinstance(theirs.get(s), dict) or theirs[s].get(k) != v
        ]
        diff += [
            f"{s}: checkpoint {theirs.get(s)!r} vs now {v!r}"
            for s, v in mine.items()
            if not isinstance(v, dict) and theirs.get(s) != v
        ]
        raise CheckpointError(
            "cannot resume: the config differs from the one the run was started with ("
            + "; ".join(diff[:6])
            + "). Resume without overrides, or start a new run."
        )


def run_end(rows: list[dict], cfg: Config) -> str | None:
    """Why the run whose metrics (events included) are `rows` has ended under cfg, or None while it
    has epochs to go: it trained its train.epochs, reached train.max_steps, the guard gave up (the
    last thing its log says), or train.co_action=stop ended it at a flagged epoch."""
    from atas import guard

    epochs = guard.epoch_rows(rows)
    if not epochs:
        return None
    last, t = epochs[-1], cfg.train
    if rows[-1].get(guard.EVENT) == "gave_up":
        ends = f"; it ended with the weights of epoch {last['epoch']}" if "rollback_to" in rows[-1] else ""
        return (
            f"the guard gave up at epoch {rows[-1].get('epoch', last['epoch'])} "
            f"({rows[-1].get('why', 'no recovery left')}){ends}"
        )
    if last["epoch"] >= t.epochs:
        return f"it trained its {t.epochs} epochs (train.epochs={t.epochs})"
    if t.max_steps is not None and last.get("step", 0) >= t.max_steps:
        return f"it reached train.max_steps={t.max_steps}"
    if t.co_action == "stop" and last.get("co"):
        return f"train.co_action=stop ended it at epoch {last['epoch']} ({last.get('co_reason', 'flagged')})"
    return None


def ended_for_good(rows: list[dict], saved: Config, cfg: Config) -> str | None:
    """run_end under the config the run was saved with, unless `cfg` raises train.epochs or
    train.max_steps above it: the explicit, documented way to train an ended run on."""
    why = run_end(rows, saved)
    s, t = saved.train, cfg.train
    raised = t.epochs > s.epochs or (s.max_steps is not None and (t.max_steps is None or t.max_steps > s.max_steps))
    return None if raised else why


def run_finished(run_dir: str | Path, cfg: Config) -> bool | None:
    """Whether the run in run_dir has ended (run_end), from its metrics log (cheap: no checkpoint is
    loaded); None when there is no log to tell."""
    try:
        rows = MetricsLog(Path(run_dir)).read()
    except (OSError, ValueError):
        return None
    return run_end(rows, cfg) is not None if rows else None
