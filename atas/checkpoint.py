"""Checkpoints that survive crashes, are checked on load, and never execute code on load.

Saving writes a temporary file in the same folder, fsyncs it and renames it over the target
(os.replace is atomic on POSIX), so a crash or a full disk mid-save leaves the previous
checkpoint intact; a temporary file left by SIGKILL is removed by the next run in that folder
(`atas.rundir`). A training checkpoint also keeps the one before it (`checkpoint.prev.pt`, a
hard link taken just before the save, so it costs no disk while a save is in progress that the
save did not need anyway; README, "Robustness of the run itself").

Loading checks before it trusts: the zip archive torch.save writes carries a CRC-32 of every
member, and all of them are verified (a flipped bit anywhere in the data is found, not evaluated
to a wrong accuracy); every floating-point tensor must be finite (a NaN prior would make a
resumed run diverge). `torch.load(weights_only=True)` then unpickles tensors, numbers, strings
and containers only; a checkpoint holding any other object is refused. Exported models are
safetensors plus a JSON card.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shlex
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from atas.errors import AtasError

FORMAT = "atas-checkpoint-v1"


class CheckpointError(AtasError, RuntimeError):
    """A checkpoint cannot be used; the message says why and what to do."""


class DiskFullError(CheckpointError):
    """No space left while writing `path`; `intact` says what survived (the target is never half-written)."""

    def __init__(self, path: str | Path, intact: str | None = None, then: str = "free space and try again"):
        self.path = Path(path)
        if intact is None:
            intact = "the previous file is intact" if self.path.exists() else "nothing was written"
        super().__init__(f"no space left on device while writing {self.path}; {intact}; {then}")


class _Recorder:
    """A file whose write errors are remembered: torch.save reports a failed write as its own
    RuntimeError ('unexpected pos'), so ENOSPC is recognised from what the file saw, not from the
    message."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def _is_disk_full(e: BaseException | None, recorded: OSError | None) -> bool:
    seen: list[BaseException | None] = [recorded]
    while e is not None and len(seen) < 8:  # the exception and what it was raised from or during
        seen.append(e)
        e = e.__cause__ or e.__context__
    return any(isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT) for x in seen)


class OutputPathError(CheckpointError):
    """An output path cannot be written as asked (a file where a folder must be, a folder where
    a file must be); the message says which path is in the way."""


def check_output(path: str | Path, folder: bool = False, flag: str = "--out") -> Path:
    """Refuse, before any work is done, an output path that cannot be written: a file standing
    where a folder must be (`--out afile/x.json`, `atas export --out afile`) or a folder where
    the file must be. Missing folders are fine: they are created when written."""
    path = Path(path)
    for parent in (path.parent, *path.parent.parents):
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise OutputPathError(
                    f"{flag} {path}: {parent} is a file, not a folder, so nothing can be "
                    "written under it; choose another path"
                )
            break
    if folder and path.exists() and not path.is_dir():
        raise OutputPathError(
            f"{flag} {path} is a file, not a folder: give the folder to write into (created if missing)"
        )
    if not folder and path.is_dir():
        raise OutputPathError(
            f"{flag} {path} is a folder: give the path of the file to write, e.g. {path / 'result.json'}"
        )
    return path


def is_special_file(path: str | Path) -> bool:
    """An existing file that is neither regular nor a folder: a device (/dev/null, /dev/stdout),
    a FIFO, a socket. Renaming a temporary file over it would replace the node itself."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


class UnsafeFileError(OutputPathError):
    """A file atas names and writes itself is a symbolic link or a special file (see check_own_file)."""


def _what_it_is(mode: int, path: Path) -> str | None:
    """How a file atas would write is not a plain regular file (None: it is one, or a folder)."""
    if stat.S_ISLNK(mode):
        try:
            return f"a symbolic link (to {os.readlink(path)})"
        except OSError:
            return "a symbolic link"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return (
        "a FIFO"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "a special file"
    )


def check_own_file(path: str | Path) -> Path:
    """The rule for every file atas names itself (the run folder's lock, config, metrics, checkpoints,
    best.pt, store memmap, evaluation files; an export's files): absent or a regular file, never a
    symbolic link or a device / FIFO / socket. Writing through a link would let a link planted in a
    shared run folder overwrite any file its user can write; writing into a special file would lose
    the data while the console says it was saved. Such a file is refused with one line saying what
    to do (UnsafeFileError, exit 2), never followed and never silently replaced. A path the user
    names (`atas eval --out /dev/stdout`) is theirs: `atomic_write(..., named=True)`."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except OSError:  # absent (or a parent in the way: the write itself says so)
        return path
    what = _what_it_is(mode, path)
    if what is not None:
        raise UnsafeFileError(
            f"{path} is {what}: atas writes its own files only as regular files, never through a link or into "
            f"a device or FIFO (a link in a shared run folder could overwrite any file you can write); remove it "
            f"(`rm {shlex.quote(str(path))}`) and run the command again"
        )
    return path


def is_plain_file(path: str | Path) -> bool:
    """An existing regular file that is not a symbolic link (safe to open without blocking or following)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def temporary_path(path: Path) -> Path:
    """Where `atomic_write` stages `path`: hidden, beside it, named by this process (see rundir)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(
    path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb", *, named: bool = False
) -> None:
    """Write `path` through `write(file)` via temp file + fsync + rename; clean up on any failure.
    Out of space: DiskFullError (a CheckpointError) naming the file, the old file untouched.

    named=False (every file atas names itself): `path` must pass `check_own_file`. named=True (a
    path the user gave, `--out`): a device or FIFO there is written in place, as asked."""
    path = Path(path)
    if named and is_special_file(path):
        _write_in_place(path, write, mode)
        return
    if not named:
        check_own_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    tmp.unlink(missing_ok=True)  # a link planted at the temporary name goes; it is never written through
    recorder = None
    try:
        with open(tmp, mode) as f:
            recorder = _Recorder(f)
            write(recorder)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _is_disk_full(e, recorder.error if recorder else None):
            raise DiskFullError(path) from e
        raise


def _write_in_place(path: Path, write: Callable[[Any], None], mode: str) -> None:
    """A device or FIFO the user named (`--out /dev/stdout`) is written into, not replaced:
    there is no old content to keep intact, and the node must stay what it is."""
    recorder = None
    try:
        with open(path, mode) as f:
            recorder = _Recorder(f)
            write(recorder)
            f.flush()
    except BaseException as e:
        if _is_disk_full(e, recorder.error if recorder else None):
            raise DiskFullError(
                path,
                "it is not a regular file, so it was written in place and holds an incomplete result",
                "free space or choose another --out, and try again",
            ) from e
        raise


def atomic_write_text(path: str | os.PathLike, text: str, *, named: bool = False) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w", named=named)


def previous_path(path: str | Path) -> Path:
    """checkpoint.pt -> checkpoint.prev.pt: the checkpoint one save older."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def healthy_path(path: str | Path) -> Path:
    """checkpoint.pt -> checkpoint.healthy.pt: the last epoch the guard of co_action=recover trusts."""
    path = Path(path)
    return path.with_name(f"{path.stem}.healthy{path.suffix}")


def link_as(path: Path, dest: Path) -> None:
    """`dest` becomes the file `path` is now, by a hard link (no copy, no extra disk while `path`
    exists). The link is staged and renamed, so a crash leaves the old `dest` or the new one."""
    check_own_file(dest)
    staged = temporary_path(dest)
    staged.unlink(missing_ok=True)
    try:
        os.link(path, staged)
    except OSError:  # a filesystem without hard links: copy instead
        import shutil

        try:
            shutil.copyfile(path, staged)
        except BaseException as e:
            staged.unlink(missing_ok=True)
            if _is_disk_full(e, None):
                raise DiskFullError(dest) from e
            raise
    os.replace(staged, dest)


def _keep_previous(path: Path) -> None:
    """previous_path(path) becomes the current file (see link_as)."""
    if path.exists():
        link_as(path, previous_path(path))


def save_checkpoint(path: str | Path, state: dict, keep_previous: bool = False) -> None:
    """Atomically save a training state (dict of tensors / plain values). keep_previous: the file
    it replaces stays as `previous_path(path)`."""
    path = Path(path)
    state = {"format": FORMAT, **state}
    if keep_previous:
        _keep_previous(path)
    atomic_write(path, lambda f: torch.save(state, f))


def _is_whole(path: Path) -> bool:
    """Whether a file the advice would send the user to is itself whole: a complete archive
    whose members all pass their CRC-32 (one read of the file; only on this error path)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (zipfile.BadZipFile, OSError, ValueError, RuntimeError, EOFError):
        return False


def _what_to_do(path: Path) -> str:
    """The next step after `path` was refused; a file it names as the way out was checked first."""
    if path.name == "best.pt":
        ckpt = path.with_name("checkpoint.pt")
        if ckpt.exists() and _is_whole(ckpt):
            return (
                f"best.pt only holds the best-robust weights, for evaluation; the run's {ckpt} is intact: "
                f"evaluate, export or resume the run from it (`atas eval {path.parent}`, `atas train --resume "
                f"{path.parent}`), and delete the damaged file (`rm {path}`): a resumed run rewrites best.pt "
                "when its checkpoint is the best epoch, and at its next best epoch otherwise."
            )
    if ".healthy." in path.name:
        ckpt = path.with_name(path.name.replace(".healthy.", "."))
        if ckpt.exists() and _is_whole(ckpt):
            return (
                f"{path.name} is only the guard's rollback target (train.co_action=recover); the run's {ckpt} is "
                f"intact: delete the damaged file (`rm {shlex.quote(str(path))}`) and resume the run (`atas train "
                f"--resume {shlex.quote(str(path.parent))}`): a rollback then takes the newest checkpoint it "
                "can trust, or the initial weights."
            )
    # A fresh start from the run's own config.yaml (atas.rundir.fresh_start_command; spelled out here,
    # where a run folder's rules are not imported): the damaged checkpoint is a result of the run, so
    # the fresh start needs --overwrite to replace it.
    config = path.parent / "config.yaml"
    recipe = shlex.quote(str(config)) if config.is_file() else "RECIPE"
    again = f"start the run again (`atas train {recipe} --run-dir {shlex.quote(str(path.parent))} --overwrite`)"
    prev = previous_path(path)
    if prev.exists() and prev != path:
        if _is_whole(prev):
            return (
                f"The checkpoint one epoch older is kept as {prev}: move it over the damaged one "
                f"(`mv {prev} {path}`) and resume, or {again}."
            )
        return (
            f"The checkpoint one epoch older, {prev}, is damaged too, so there is none to fall back to: "
            f"restore the run folder from a copy, or {again}."
        )
    return f"Restore the file from a copy, or {again}."


def _verify_archive(path: Path) -> None:
    """Every member's CRC-32 (written by torch.save) against its bytes: a bit flip anywhere in the
    data is found here. One sequential read of the file (about 1 GB/s)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, RuntimeError, EOFError) as e:
        raise CheckpointError(
            f"{path} is truncated or not a checkpoint ({type(e).__name__}: {str(e)[:200]}). " + _what_to_do(path)
        ) from None
    if bad is not None:
        raise CheckpointError(
            f"{path} is corrupt: its member {bad} fails its CRC-32 check (the file changed after it was "
            f"written: a disk, memory or copy error). {_what_to_do(path)}"
        )


def _nonfinite(tree: Any, name: str = "") -> tuple[str, int, int] | None:
    """(dotted name, count, numel) of the first floating tensor holding NaN/inf, else None."""
    if torch.is_tensor(tree):
        if not tree.is_floating_point() or tree.numel() == 0:
            return None
        if bool(torch.isfinite(torch.stack(torch.aminmax(tree))).all()):  # NaN propagates; one fast pass
            return None
        bad = sum(int((~torch.isfinite(part)).sum()) for part in tree.reshape(-1).split(1 << 24))
        return name, bad, tree.numel()
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for key, value in items:
        found = _nonfinite(value, f"{name}.{key}" if name else str(key))
        if found:
            return found
    return None


def check_readable(path: str | Path) -> None:
    """Refuse, in one line, a file or folder this user may not read (a run folder of another user,
    a checkpoint chmod 000): otherwise it surfaces as "truncated" or as a traceback."""
    path = Path(path)
    try:
        if path.is_dir():
            os.listdir(path)
        elif path.exists():
            with open(path, "rb"):
                pass
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM):
            raise
        raise CheckpointError(
            f"cannot read {path}: permission denied; run as a user who may read it "
            f"(ls -ld {path}), or copy it somewhere readable"
        ) from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint without unpickling arbitrary objects; clear errors for bad files:
    truncated, corrupt (CRC), not an atas checkpoint, foreign objects, non-finite values."""
    path = Path(path)
    check_readable(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut-off one has no directory
        raise CheckpointError(
            f"{path} is truncated or not a checkpoint (not a complete torch zip archive). " + _what_to_do(path)
        )
    _verify_archive(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it holds Python objects other than tensors and plain values, "
            "and unpickling them could run arbitrary code. Only load checkpoints written by atas "
            f"(or convert the file yourself from a trusted environment). Detail: {str(e)[:300]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(
            f"{path} is truncated or not a checkpoint ({type(e).__name__}: {str(e)[:200]}). " + _what_to_do(path)
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an atas checkpoint (no '{FORMAT}' marker)")
    bad = _nonfinite({k: v for k, v in state.items() if k != "rng"})
    if bad:
        name, count, numel = bad
        raise CheckpointError(
            f"{path} holds non-finite values: {count} of {numel} entries of {name} are NaN or inf (a run "
            f"resumed from it would diverge, a model evaluated from it is meaningless). {_what_to_do(path)}"
        )
    return state


def save_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
