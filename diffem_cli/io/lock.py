"""One writer per folder: a lock file holding the writer's PID, host and start time.

Every command that writes a RUN or an OUT folder holds its lock for the whole write. The lock
file is created atomically (``O_CREAT | O_EXCL``); a second process is refused with one line while
the holder lives, and takes the lock over once the holder is dead (its PID no longer runs on this
host). The lock is released on exit, exceptions included; a kill -9 leaves the file behind, which
the next writer recognises as stale and takes over (and removes when it is done).

The lock of ``folder`` is ``.<name>.lock`` beside it, whether the folder exists yet or not: the
same file guards a RUN before and after its creation and an OUT before and after a ``--force``
overwrite renames a new folder into place. Only when the parent folder is not writable is the
lock ``<folder>/.diffem.lock`` inside an existing folder instead. Whoever locks a folder inside
a RUN (``RUN/recon/lap_009``, ``RUN/uncond``) also holds the RUN's lock.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from diffem_cli.core.errors import DiffemError

INNER_LOCK = ".diffem.lock"
RUN_FILES = ("run.json", "config.yaml")
"""The files every RUN folder (``em-train``, ``train-uncond``) holds from its creation on."""
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
P = ParamSpec("P")
R = TypeVar("R")
_held: dict[Path, int] = {}
"""Lock files this process holds, with how many nested ``hold_lock`` blocks hold each."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a PID we may not signal counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def started_at(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from ``/proc``; None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        lines = Path("/proc/stat").read_text().splitlines()
        boot = next(float(line.split()[1]) for line in lines if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def lock_path(folder: Path) -> Path:
    """The lock file of ``folder``: ``.<name>.lock`` beside it (an absolute path)."""
    folder = Path(os.path.abspath(folder))
    return folder.parent / f".{folder.name}.lock"


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _holder(raw: bytes) -> dict[str, Any]:
    try:
        info = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def _is_mine(info: dict[str, Any]) -> bool:
    return info.get("pid") == os.getpid() and info.get("host") == socket.gethostname()


def _stale(info: dict[str, Any], path: Path) -> bool:
    """Whether the holder ``info`` of lock file ``path`` is certainly dead.

    A lock from another host is never stale (its PID means nothing here). A lock file that cannot
    be parsed (its writer killed between creating and filling it) is stale once a few seconds old,
    so that a live writer's half-written file is never taken.
    """
    pid = info.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool):
        try:
            return time.time() - path.stat().st_mtime > 5.0
        except FileNotFoundError:
            return True
    if info.get("host") != socket.gethostname():
        return False
    if pid == os.getpid():
        # our own PID: a lock we hold, or one left by a dead process whose PID we got again
        return path not in _held
    if not pid_alive(pid):
        return True
    # a live process with that PID that started after the lock was written got a reused PID
    started, recorded = started_at(pid), info.get("started")
    return started is not None and isinstance(recorded, int | float) and started > recorded + 2.0


def _refusal(folder: Path, info: dict[str, Any], path: Path) -> str:
    pid = info.get("pid", "?")
    started = info.get("started")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
        if isinstance(started, int | float)
        else "at an unknown time"
    )
    host = info.get("host")
    what = f", {info['what']}" if info.get("what") else ""
    if host and host != socket.gethostname():
        return (
            f"{folder} is in use by diffem process {pid} on host {host} (started {when}{what}); a lock from "
            f"another host never expires: once that process has ended, delete the lock file {path}"
        )
    return (
        f"{folder} is in use by diffem process {pid} (started {when}{what}); wait for it or kill it "
        f"(lock file {path})"
    )


def _create(path: Path, record: bytes) -> bool:
    """Create lock file ``path`` holding ``record``; False when it already exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, record)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return True


def _acquire_at(path: Path, folder: Path, what: str) -> None:
    record = json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "what": what}
    ).encode()
    for _ in range(50):
        if _create(path, record):
            return
        if path.is_dir() and not path.is_symlink():
            raise DiffemError(f"the lock file {path} of {folder} is a folder; remove it and try again")
        raw = _read(path)
        if raw is None:  # released between our attempt and the read: try again
            continue
        info = _holder(raw)
        if not _stale(info, path):
            raise DiffemError(_refusal(folder, info, path))
        # Take over a dead holder's lock: rename it away first, so that of several processes
        # finding the same stale lock only one succeeds (the others' renames find nothing).
        grave = path.parent / f"{path.name}.stale-{os.getpid()}"
        try:
            os.rename(path, grave)
        except FileNotFoundError:
            continue
        taken = _read(grave)
        if taken is not None and taken != raw:
            # Another process took the stale lock over and created a fresh one after our read:
            # give it back (link fails if a third one already created another: it then holds it).
            with contextlib.suppress(OSError):
                os.link(grave, path)
        grave.unlink(missing_ok=True)
    raise DiffemError(f"cannot take the lock {path}: it keeps changing hands; try again")


def acquire(folder: Path, what: str = "") -> Path:
    """Take the lock of ``folder`` (see the module docstring) and return the lock file.

    Prefer :func:`hold_lock`, which also releases it and allows nesting.
    Raises a one-line ``DiffemError`` while a live process holds it, when the folder's parent
    does not exist, when the lock file is a folder, or when it cannot be created (a full disk).
    """
    folder = Path(folder)
    if not folder.parent.is_dir():
        raise DiffemError(f"folder {folder.parent} does not exist")
    path = lock_path(folder)
    try:
        _acquire_at(path, folder, what)
    except OSError as e:
        if e.errno not in _UNWRITABLE or not folder.is_dir():
            raise DiffemError(f"cannot create the lock file {path} ({e.strerror or e})") from None
        path = Path(os.path.abspath(folder)) / INNER_LOCK
        try:
            _acquire_at(path, folder, what)
        except OSError as e2:
            raise DiffemError(f"cannot create the lock file {path} ({e2.strerror or e2})") from None
    return path


def release(path: Path) -> None:
    """Remove lock file ``path`` if this process holds it."""
    raw = _read(path)
    if raw is not None and _is_mine(_holder(raw)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def hold_lock(folder: Path, what: str = "") -> Iterator[Path]:
    """Hold the lock of ``folder`` (a RUN or any folder, existing or not) for the ``with`` block.

    The lock of the RUN folder that ``folder`` lies in (:func:`enclosing_run`), if any, is held
    too: nothing writes inside a RUN while another process trains it, and nothing trains a RUN
    while another process writes inside it. ``what`` (e.g. ``"em-train"``) appears in the
    refusal another process gets. Released on exceptions too. Yields the lock file.
    """
    run = enclosing_run(folder)
    with hold_lock(run, what) if run is not None else contextlib.nullcontext():
        path = lock_path(Path(folder))
        inner = Path(os.path.abspath(folder)) / INNER_LOCK
        if path not in _held and inner in _held:
            path = inner
        if path in _held:  # nested: this process already holds it
            _held[path] += 1
        else:
            path = acquire(folder, what)
            _held[path] = 1
        try:
            yield path
        finally:
            _held[path] -= 1
            if not _held[path]:
                del _held[path]
                release(path)


def enclosing_run(path: Path) -> Path | None:
    """The nearest RUN folder strictly above ``path`` (both of :data:`RUN_FILES` present), or None."""
    for parent in Path(os.path.abspath(path)).parents:
        if all((parent / name).is_file() for name in RUN_FILES):
            return parent
    return None


def holding(param: str, what: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a function to hold the lock of its folder argument ``param`` (see
    :func:`hold_lock`) while it runs; a missing parent folder is left to the function to refuse."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            folder = Path(signature.bind(*args, **kwargs).arguments[param])
            if not folder.parent.is_dir():
                return fn(*args, **kwargs)
            with hold_lock(folder, what):
                return fn(*args, **kwargs)

        return run

    return decorate


def lock_output(out: Path, what: str = "") -> contextlib.AbstractContextManager[Path]:
    """Hold the lock of the OUT folder ``out`` (which need not exist) for the ``with`` block."""
    return hold_lock(out, what)


def holder(folder: Path) -> dict[str, Any] | None:
    """The live process holding the lock of ``folder`` (its recorded pid, host, started, what), or None."""
    folder = Path(folder)
    for path in (lock_path(folder), folder / INNER_LOCK):
        raw = _read(path)
        if raw is not None:
            info = _holder(raw)
            if not _stale(info, path):
                return info
    return None
