"""The run folder: who owns it, what it holds, and writing into it without losing a file."""

from __future__ import annotations

import datetime
import errno
import json
import os
import secrets
import shutil
import socket
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from trainloop.errors import UsageError

LOCK_NAME = ".trainloop.lock"
CONFIG_NAME = "config.json"
ENVIRONMENT_ERRNOS = {  # a write failed because of the user's machine, not a bug
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EFBIG: "the file is larger than this system allows",
}


class RunFileError(UsageError):
    """A file of the run could not be written because of the machine (disk full, ...).

    The command line reports it as one line and exits with status 2, like other input
    a user can fix.
    """


def write_error(path: str | Path, error: OSError, last_good: str | None = None) -> RunFileError:
    """The one-line error for an ``OSError`` raised while writing ``path``."""
    cause = ENVIRONMENT_ERRNOS.get(error.errno or 0) or error.strerror or str(error)
    message = f"cannot write {path}: {cause} ({error.strerror or error})"
    if last_good:
        message += f"; {last_good}"
    return RunFileError(message)


def is_environment_error(error: BaseException) -> bool:
    """Whether ``error`` is an ``OSError`` caused by the machine (full disk, permissions)."""
    return isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS


def new_run_dir(recipe_path: str | Path, root: str | Path = "runs") -> Path:
    """Create and return a new, empty ``runs/<recipe>/<timestamp>`` folder.

    The folder is made here, with ``mkdir`` that fails when it exists, so two runs started
    in the same second by different processes get different folders (``<timestamp>-2``
    for the second). Remove it with :func:`remove_if_unused` when the run never starts.
    """
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    parent = Path(root) / Path(recipe_path).stem
    parent.mkdir(parents=True, exist_ok=True)
    number = 1
    while True:
        candidate = parent / (stamp if number == 1 else f"{stamp}-{number}")
        try:
            candidate.mkdir()
        except FileExistsError:
            number += 1
            continue
        return candidate


def remove_if_unused(run_dir: Path, made_parents: Iterable[Path] = ()) -> None:
    """Remove ``run_dir`` if it holds nothing but, at most, its lock file; then the
    folders of ``made_parents`` (made for it, deepest first) that are left empty."""
    try:
        entries = {entry.name for entry in run_dir.iterdir()}
    except OSError:
        return
    if entries <= {LOCK_NAME}:
        (run_dir / LOCK_NAME).unlink(missing_ok=True)
        for folder in (run_dir, *made_parents):
            try:
                folder.rmdir()
            except OSError:  # not empty: another run uses it
                return


def run_contents(run_dir: Path) -> list[str]:
    """The names in ``run_dir`` other than the lock file (empty when it does not exist)."""
    if not run_dir.is_dir():
        return []
    return sorted(entry.name for entry in run_dir.iterdir() if entry.name != LOCK_NAME)


class RunLock:
    """An exclusive lock on a run folder, held while a run writes into it.

    The lock is a POSIX record lock on ``RUN_DIR/.trainloop.lock`` (``fcntl.lockf``): the
    kernel drops it when the process ends, however it ends, so a lock left by a run that
    was killed is stale by construction and the next run takes it. The file holds the
    owner's pid, host and start time, to name it in the error of a second run. The file
    itself stays (deleting a lock file races with a process about to lock it).
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`~trainloop.UsageError` naming the live owner."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise write_error(self.path, error) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UsageError(
                f"{self.path.parent} is in use by another run ({self._owner()}); wait for it to "
                "finish, or give another --out"
            ) from None
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": sys.argv,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let go of the lock (closing the file releases it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _owner(self) -> str:
        try:
            owner = json.loads(self.path.read_text())
            return f"pid {owner['pid']} on {owner['host']}, started {owner['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "its owner is unknown"


def move_aside(run_dir: Path) -> Path:
    """Move everything in ``run_dir`` but its lock into a new sibling folder; return it.

    ``--overwrite`` uses this: the replaced run is kept until the new run has written its
    first checkpoint (then :func:`shutil.rmtree` removes it), so a new run that fails early
    loses nothing.
    """
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = run_dir.parent / f"{run_dir.name}.replaced-{stamp}"
    number = 2
    while True:
        try:
            aside.mkdir()
            break
        except FileExistsError:
            aside = run_dir.parent / f"{run_dir.name}.replaced-{stamp}-{number}"
            number += 1
    for name in run_contents(run_dir):
        os.replace(run_dir / name, aside / name)
    return aside


def remove_aside(aside: Path) -> None:
    """Delete a folder made by :func:`move_aside`."""
    shutil.rmtree(aside, ignore_errors=True)


def write_json_atomic(path: Path, document: Any) -> None:
    """Write ``document`` as indented JSON to ``path`` through a temporary file and a rename."""
    atomic_write_text(path, json.dumps(document, indent=2, default=str) + "\n")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that ``path`` is always complete: the old or the new.

    A full disk or a permission problem raises :class:`RunFileError` naming the file.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        if is_environment_error(error):
            raise write_error(path, error) from None
        raise
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def read_jsonl(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of a JSON-lines file such as ``metrics.jsonl``, and what was skipped.

    A line that is not a JSON object (a last line cut off by a full disk or a kill
    during the append) is skipped; the second list says which, one message each.
    """
    records: list[dict[str, Any]] = []
    skipped: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                torn = "" if line.endswith("\n") else ", cut off"
                skipped.append(f"{path}: line {number} is not a JSON record{torn}: skipped")
    return records, skipped


# --- writing whole files ---------------------------------------------------------------


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` so that ``path`` is always a complete file.

    The data goes to a temporary file in the same folder, which is flushed and fsynced
    and then renamed over ``path`` (``os.replace`` is atomic); the folder is fsynced
    last so that the rename survives a power cut. If anything fails, ``path`` keeps
    its previous content and the temporary file is removed. A full disk or a missing
    permission raises :class:`~trainloop.run_folder.RunFileError`, one line naming the
    file and the cause.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary, file = _open_temp(path.name, path.parent)
    except OSError as error:
        raise _environment(error, path) from None
    import torch  # here: the command line reads run folders without waiting for torch

    try:
        with file:
            try:
                torch.save(obj, file)
            except RuntimeError as error:  # torch's zip writer hides the OSError it hit
                if isinstance(error.__context__, OSError):
                    raise error.__context__ from None
                raise
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise _environment(error, path) from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def _environment(error: OSError, path: Path) -> OSError:
    """A full disk or a permission problem as a one-line :class:`RunFileError`; else ``error``."""
    return write_error(path, error) if is_environment_error(error) else error


def atomic_copy(source: str | Path, destination: str | Path) -> None:
    """Copy ``source`` to ``destination`` with the same guarantee as :func:`atomic_save`."""
    destination = Path(destination)
    temporary = copy_to_temp(Path(source), destination.parent)
    try:
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(destination.parent)


def copy_to_temp(source: Path, directory: Path) -> Path:
    """A complete, fsynced copy of ``source`` under a hidden temporary name in ``directory``:
    rename it to its final name with ``os.replace``."""
    temporary, file = _open_temp(source.name, directory)
    try:
        with file, open(source, "rb") as original:
            shutil.copyfileobj(original, file, 1 << 20)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return temporary


def _open_temp(name: str, directory: Path) -> tuple[Path, BinaryIO]:
    """A new hidden ``.<name>.<random>.tmp`` in ``directory``, open for writing.

    Not ``tempfile.mkstemp``: its files are private (mode 0600), these get the
    permissions of the user's umask like any other file of the run.
    """
    while True:
        temporary = directory / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            return temporary, open(temporary, "xb")
        except FileExistsError:
            continue


def fsync_directory(directory: str | Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
