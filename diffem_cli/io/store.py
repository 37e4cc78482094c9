"""Data sets on disk: Hugging Face ``datasets`` folders with a diffem manifest, written atomically.

Every folder diffem writes (observations, clean data, reconstructions, samples) is a
``datasets.save_to_disk`` folder that ``datasets.load_from_disk`` opens, plus ``diffem.json``
(the manifest: what made it, from what, with which seed). Folders are built under a temporary
name beside the target and renamed into place, so an interrupted write leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffem_channels.base import ChannelError
from diffem_cli import __version__
from diffem_cli.core.errors import DiffemError
from diffem_cli.io.datameta import data_kind
from diffem_cli.io.lock import RUN_FILES
from diffem_cli.io.provenance import KEY as PROVENANCE_KEY
from diffem_cli.io.provenance import describe_folder
from diffem_cli.io.rowmeta import tensor_names

MANIFEST = "diffem.json"
CHECKSUM_KEY = "checksum"
VOLATILE_MANIFEST_KEYS = frozenset({"diffem_version", CHECKSUM_KEY, PROVENANCE_KEY})
"""Manifest entries left out of :func:`fingerprint_dataset`: they change without the data changing
(the checksum is computed over everything else; the provenance records when a folder was made)."""
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})
"""Errors of the file system (full disk, quota, read-only, permissions) reported as one line."""
TRUST_ENV = "DIFFEM_TRUST_UNVERIFIED"
"""Set to 1 to use observation folders and checkpoints that carry no checksum (written by an older
diffem or another tool); files whose checksum disagrees are refused whatever its value."""
RUN_DIRS = ("checkpoints", "recon", "samples", "state")
"""The folders a RUN is created with (``pipeline.runs.Run.prepare``)."""
EXPORT_FORMAT = "diffem-checkpoint"
"""``format`` in the ``diffem.json`` of an exported model (``diffusion.checkpoint.FORMAT``)."""
DATA_ENTRY = re.compile(r"^(?:.+\.arrow|dataset_info\.json|state\.json|diffem\.json)$")
EXPORT_ENTRY = re.compile(
    r"^(?:diffem\.json|README\.md|model_index\.json|unet|scheduler|model\.safetensors|diffem_aux\.safetensors)$"
)
PNG_ENTRY = re.compile(r"^\d+(?:_\d+)?(?:_[A-Za-z0-9._-]+)?\.png$")
"""A PNG of ``--png``: a grid ``FIRST_LAST_drawD.png``, or with ``--png-single`` one image
``INDEX[_DRAW].png``, with ``_STEM`` of its source file name when it has one."""
COMPARE_ENTRY = re.compile(r"^compare(?:-[a-z0-9-]+)?\.(?:json|md|png|pdf|svg)$")


class DiskError(DiffemError, OSError):
    """A write the file system refused (full disk, quota, read-only, permissions): an ``OSError``
    (``errno``, ``filename``) that the CLI reports as one line ``PATH: reason``, exit 2."""

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}" if self.filename is not None else str(self.strerror)


def disk_error(e: OSError, path: Path | str | None = None) -> DiskError:
    """``e`` as a :class:`DiskError` (naming ``path`` when ``e`` names no file)."""
    if isinstance(e, DiskError):
        return e
    name = e.filename if e.filename is not None else (str(path) if path is not None else None)
    return DiskError(e.errno or 0, e.strerror or os.strerror(e.errno or 0), name)


def trust_unverified() -> bool:
    """Whether the user set ``DIFFEM_TRUST_UNVERIFIED=1`` (see :data:`TRUST_ENV`)."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _is_bookkeeping(name: str) -> bool:
    """Temporaries and lock files diffem leaves beside or inside its outputs."""
    return bool(_TEMP.match(name) or _OLD_STYLE_TEMP.match(name) or _LOCK.match(name))


def _manifest_or_none(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` is a RUN folder (it holds ``run.json`` or ``config.yaml``)."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in RUN_FILES)


def is_run_skeleton(path: Path) -> bool:
    """Whether ``path`` holds only the empty folders a RUN starts with (a kill before its
    ``run.json``): nothing but ``checkpoints``, ``recon``, ``samples`` and ``state``, all empty."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    for entry in path.iterdir():
        if _is_bookkeeping(entry.name):
            continue
        if entry.name not in RUN_DIRS or not entry.is_dir() or entry.is_symlink():
            return False
        if any(not _is_bookkeeping(e.name) for e in entry.iterdir()):
            return False
    return True


def _listing(entries: list[str]) -> str:
    more = f", +{len(entries) - 3} more" if len(entries) > 3 else ""
    return ", ".join(entries[:3]) + more


def foreign_output(path: Path, kind: str = "folder") -> str | None:
    """What stands at ``path`` that an output of ``kind`` may not replace, or None when it may.

    ``kind`` "folder": an empty folder, or one diffem wrote (a data folder with its manifest,
    a model export with its ``diffem.json``, a folder of numbered PNGs), holding nothing else;
    "file": a plain file; "compare": a ``compare`` OUT (its summary files and its methods'
    RUN folders). The answer completes "OUT ..." in a refusal, e.g. "is a plain file".
    """
    path = Path(path)
    if path.is_symlink():
        return "is a symbolic link"
    if not path.exists():
        return None
    if kind == "file":
        return None if path.is_file() else "is a folder, not a file"
    if not path.is_dir():
        return "is a plain file, not a folder diffem wrote"
    try:
        names = sorted(e.name for e in path.iterdir() if not _is_bookkeeping(e.name))
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not names:
        return None
    if kind == "compare":
        if is_run_folder(path):
            return "is a RUN folder of em-train or train-uncond, not a compare OUT"
        other = [
            n
            for n in names
            if not COMPARE_ENTRY.match(n) and not is_run_folder(path / n) and not is_run_skeleton(path / n)
        ]
        return f"holds files diffem did not write ({_listing(other)})" if other else None
    if is_run_folder(path):
        return "is a RUN folder (it holds run.json or config.yaml), not an output this command replaces"
    manifest = _manifest_or_none(path)
    if manifest is not None and manifest.get("format") == EXPORT_FORMAT:
        pattern = EXPORT_ENTRY
    elif manifest is not None and "diffem_version" in manifest:
        pattern = DATA_ENTRY
    else:
        pattern = PNG_ENTRY
    other = [n for n in names if not pattern.match(n)]
    return f"holds files diffem did not write ({_listing(other)})" if other else None


def check_apart(out: Path, inputs: Iterable[Path | str | None], what: str = "input") -> None:
    """Refuse an output ``out`` equal to, inside, or containing any of ``inputs`` (with or without
    ``--force``): writing it would replace or delete data the command reads. ``None`` entries and,
    for ``what="input"``, inputs that are not existing local paths (``hf:NAME``, ``manifold``) are
    skipped; other outputs (``what="output"``) are compared whether they exist yet or not."""
    target = Path(out).expanduser().resolve()
    for item in inputs:
        if item is None:
            continue
        src = Path(item).expanduser()
        if what == "input" and not src.exists():
            continue
        src = src.resolve()
        if target == src:
            raise DiffemError(f"output {out} is the {what} {item} itself; write somewhere else")
        if src in target.parents:
            raise DiffemError(f"output {out} lies inside the {what} {item}; write somewhere else")
        if target in src.parents:
            raise DiffemError(f"output {out} contains the {what} {item}; write somewhere else")


def check_output(
    out: Path, force: bool, inputs: Iterable[Path | str | None] = (), kind: str = "folder"
) -> None:
    """Refuse to touch an existing output unless ``force``, and whatever ``force`` one that diffem
    did not write (see :func:`foreign_output`; ``kind`` "folder" or "file"); refuse a missing
    parent folder, and an output that overlaps one of ``inputs`` (see ``check_apart``)."""
    out = Path(out)
    check_apart(out, inputs)
    recover(out)
    if out.exists() or out.is_symlink():
        foreign = foreign_output(out, kind)
        if foreign is not None:
            hint = "--force replaces only what diffem wrote; move it or choose another OUT"
            if force:
                raise DiffemError(f"{out} {foreign}: {hint}")
            raise DiffemError(f"{out} already exists and {foreign} ({hint})")
        if not force:
            raise DiffemError(f"{out} already exists (use --force to overwrite)")
    if not out.parent.exists():
        raise DiffemError(f"folder {out.parent} does not exist")


def temp_dir(out: Path, role: str = "") -> Path:
    """A new empty temporary folder beside ``out`` named ``.NAME.tmp-PID-[ROLE-]XXXX``.

    The PID in the name lets :func:`clean_stale` remove it once its writer is dead.
    """
    out = Path(out)
    prefix = f".{out.name}.tmp-{os.getpid()}-{role + '-' if role else ''}"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))


@contextlib.contextmanager
def atomic_path(out: Path, force: bool = False, kind: str = "folder") -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces ``out``, on failure it is removed.

    ``out`` is checked by :func:`check_output` (``kind`` "folder" or "file") under the lock, so
    ``force`` never replaces what diffem did not write. A full disk is a :class:`DiskError`.

    With ``force`` an existing ``out`` is swapped for the new one in a single atomic exchange
    where the file system allows it (Linux ``renameat2``); elsewhere through two renames, the old
    copy parked as ``.NAME.old-PID`` in between and put back by :func:`recover` if the writer
    dies there. Either way a kill at any moment leaves the old or the new ``out`` under its name.
    Temporaries of dead writers of the same ``out`` are removed first. The lock of ``out``
    (``diffem_cli.io.lock``) is held throughout, and so is the lock of the RUN folder ``out`` lies
    in, if any: a second process writing the same ``out``, or training that RUN, is refused with
    one line while this one lives (nesting inside the caller's own lock is fine).
    """
    from diffem_cli.io.lock import lock_output

    out = Path(out)
    with lock_output(out, "writing"):
        check_output(out, force, kind=kind)
        clean_stale(out.parent, only=out.name, recursive=False)
        tmp = temp_dir(out)
        target = tmp / "payload"
        try:
            yield target
            if not out.exists():
                os.replace(target, out)
            elif not _exchange(target, out):
                old = out.parent / f".{out.name}.old-{os.getpid()}"
                os.replace(out, old)
                os.replace(target, out)
                _remove(old)
            # after an exchange the old copy is ``target``, removed with ``tmp`` below
        except OSError as e:
            if e.errno in DISK_ERRNOS:
                raise disk_error(e, out) from None
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap paths ``a`` and ``b`` (``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file through a temporary file and a rename (nothing left on failure;
    a full disk is a :class:`DiskError`)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in DISK_ERRNOS:
            raise disk_error(e, path) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path`` and flush it to disk.

    A last line without its newline (a write cut short by a kill or a full disk) is a fragment of
    a record that was never complete: it is dropped first, so the new record starts a line of its
    own. A full disk is a :class:`DiskError`, and leaves at most such a fragment.
    """
    path = Path(path)
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    try:
        with open(path, "ab+") as f:
            end = f.seek(0, os.SEEK_END)
            if end:
                f.seek(end - 1)
                if f.read(1) != b"\n":
                    f.truncate(_last_line_end(f, end))
            f.seek(0, os.SEEK_END)
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno in DISK_ERRNOS:
            raise disk_error(e, path) from None
        raise


def _last_line_end(f: Any, end: int) -> int:
    """The offset just after the last newline of the open file ``f`` (size ``end``), or 0."""
    pos = end
    while pos > 0:
        start = max(0, pos - 65536)
        f.seek(start)
        block = f.read(pos - start)
        cut = block.rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        pos = start
    return 0


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-.*)?$")
_OLD_STYLE_TEMP = re.compile(r"^(?:\.(?P<name>.+)\.tmp-|\.cache-)[A-Za-z0-9_]{8}$")
_LOCK = re.compile(r"^\.(?P<name>.+)\.lock(?:\.stale-\d+)?$")


def _writer_gone(pid: int, path: Path) -> bool:
    """Whether the process that made temporary ``path`` is dead (or its PID was reused since)."""
    from diffem_cli.io.lock import pid_alive, started_at

    if pid == os.getpid():
        return False
    if not pid_alive(pid):
        return True
    started = started_at(pid)
    try:
        return started is not None and started > path.lstat().st_mtime + 2.0
    except FileNotFoundError:
        return False


def recover(out: Path) -> Path | None:
    """Put back ``out`` if its writer died between the two renames of an overwrite.

    A ``.NAME.old-PID`` copy whose writer is dead is renamed back to ``out`` when ``out`` is
    missing (the newest such copy wins), and removed otherwise. Returns the restored path.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return None
    olds = []
    for entry in out.parent.iterdir():
        m = _TEMP.match(entry.name)
        if m and m["kind"] == "old" and m["name"] == out.name and _writer_gone(int(m["pid"]), entry):
            olds.append(entry)
    restored = None
    for entry in sorted(olds, key=lambda e: e.lstat().st_mtime, reverse=True):
        if restored is None and not out.exists() and not out.is_symlink():
            os.rename(entry, out)
            restored = out
        else:
            _remove(entry)
    return restored


def _stale_action(entry: Path, locked: bool, only: str | None) -> str | None:
    """What :func:`clean_stale` does with ``entry``: "remove", "restore", "keep" (a temporary
    still in use) or None (not a temporary: descend into it if it is a folder)."""
    from diffem_cli.io import lock

    m = _TEMP.match(entry.name)
    if m is not None:
        if only is not None and m["name"] != only:
            return "keep"
        if not (locked or _writer_gone(int(m["pid"]), entry)):
            return "keep"
        if m["kind"] == "old":
            target = entry.parent / m["name"]
            return "restore" if not target.exists() and not target.is_symlink() else "remove"
        return "remove"
    m = _OLD_STYLE_TEMP.match(entry.name)
    if m is not None:
        return "remove" if locked and (only is None or m["name"] == only) else "keep"
    m = _LOCK.match(entry.name)
    if m is not None and entry.is_file():
        if not locked or (only is not None and m["name"] != only):
            return "keep"
        if not entry.name.endswith(".lock"):  # the grave of a lock being taken over
            return "remove"
        with contextlib.suppress(OSError):
            return "remove" if lock._stale(lock._holder(entry.read_bytes()), entry) else "keep"
        return "keep"
    return None


def clean_stale(
    folder: Path, *, locked: bool = False, only: str | None = None, recursive: bool = True
) -> list[Path]:
    """Remove the temporaries that killed writers left in ``folder``; returns what was removed.

    Temporaries are the ``.NAME.tmp-PID*`` files and folders of :func:`atomic_path`,
    :func:`write_text_atomic`, ``checkpoint.save_tensors`` and ``write_dataset``'s caches, and the
    ``.NAME.old-PID`` copies of an interrupted overwrite (put back as ``NAME`` by
    :func:`recover` when ``NAME`` is missing, not removed). By default only those whose writer
    (the PID in the name) is dead are touched. With ``locked`` the caller holds the lock of
    ``folder``, so that no other writer can be at work in it: every temporary goes, whatever its
    PID, and so do lock files of dead holders. ``only`` restricts the clean-up to temporaries of
    ``NAME == only``; ``recursive`` also cleans every subfolder.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    todo = [folder]
    while todo:
        current = todo.pop()
        try:
            entries = sorted(current.iterdir())
        except OSError:
            continue
        for entry in entries:
            action = _stale_action(entry, locked, only)
            if action == "restore":
                os.rename(entry, current / _TEMP.match(entry.name)["name"])  # type: ignore[index]
                continue
            if action == "remove":
                _remove(entry)
                removed.append(entry)
                continue
            if action == "keep":
                continue
            if recursive and entry.is_dir() and not entry.is_symlink():
                todo.append(entry)
    return removed


def _features(first: dict[str, Any], given: Mapping[str, Any] | None = None) -> Any:
    """The ``datasets`` features of the first chunk: ``given`` ones as they are, arrays by their
    dtype and per-row shape, lists (per-row metadata such as file names) by their values."""
    import datasets

    feats = {}
    for name, arr in first.items():
        if given and name in given:
            feats[name] = given[name]
            continue
        if isinstance(arr, list):
            if all(isinstance(v, str) for v in arr):
                feats[name] = datasets.Value("string")
            elif all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in arr):
                feats[name] = datasets.Value("int64")
            else:
                raise DiffemError(f"column {name!r} holds values other than strings or integers")
            continue
        shape = tuple(arr.shape[1:])
        dtype = str(arr.dtype)
        if len(shape) == 0:
            feats[name] = datasets.Value(dtype)
        elif len(shape) == 1:
            feats[name] = datasets.List(datasets.Value(dtype), length=shape[0])
        elif len(shape) <= 5:
            cls = getattr(datasets, f"Array{len(shape)}D")
            feats[name] = cls(shape=shape, dtype=dtype)
        else:
            raise DiffemError(f"column {name!r} has {len(shape)} dimensions per row; at most 5 are stored")
    return datasets.Features(feats)


def _to_numpy(chunk: dict[str, Any]) -> dict[str, Any]:
    """Tensors and arrays as contiguous numpy arrays; lists (per-row metadata) as they are."""
    out: dict[str, Any] = {}
    for k, v in chunk.items():
        if isinstance(v, list):
            out[k] = v
            continue
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            v = v.float() if v.is_floating_point() else v
            v = v.numpy()
        out[k] = np.ascontiguousarray(v)
    return out


def _compacted(chunk: dict[str, Any], names: Collection[str]) -> dict[str, Any]:
    """The 0/1 columns ``names`` of a numpy chunk as uint8 (a quarter of float32's bytes); a value
    other than 0 or 1 there is a DiffemError (the channel declared the field binary)."""
    out = dict(chunk)
    for name in names:
        arr = out.get(name)
        if arr is None or isinstance(arr, list):
            continue
        if not np.isin(arr, (0, 1)).all():
            raise DiffemError(f"column {name!r} is declared binary but holds values other than 0 and 1")
        out[name] = arr.astype(np.uint8)
    return out


def write_dataset(
    out: Path,
    chunks: Iterable[dict[str, Any]],
    manifest: dict[str, Any],
    force: bool = False,
    features: Mapping[str, Any] | None = None,
    compact: Collection[str] = (),
) -> Path:
    """Write batches of named arrays (leading batch dimension) as a ``datasets`` folder.

    Memory stays bounded by one chunk: rows stream into Arrow files on disk. The same chunks and
    manifest give byte-identical files. A chunk's value may also be a list, one entry per row
    (file names, labels: see :mod:`diffem_cli.io.rowmeta`), stored as a string or int64 column
    unless ``features`` gives its ``datasets`` feature (a ``ClassLabel``, an ``Image``). The
    manifest gains ``num_rows`` and ``checksum`` (see :func:`verify_dataset`). Columns named in
    ``compact`` (0/1 fields, e.g. masks) are stored as uint8 and listed in the manifest's
    ``compact``; :func:`columns` reads them back as float32. A full disk is a :class:`DiskError`
    naming the file or ``out``.
    """
    import datasets

    out = Path(out)
    check_output(out, force)
    iterator = iter(chunks)
    try:
        first = _compacted(_to_numpy(next(iterator)), compact)
    except StopIteration:
        raise DiffemError("nothing to write: the input holds no samples") from None
    feats = _features(first, features)
    manifest = {**manifest, "diffem_version": __version__}
    stored = sorted(n for n in compact if n in first and not isinstance(first[n], list))
    if stored:
        manifest["compact"] = stored
    stable = {k: v for k, v in manifest.items() if k not in VOLATILE_MANIFEST_KEYS}
    fingerprint = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def rows() -> Iterator[dict[str, Any]]:
        for chunk in _prepend(first, (_compacted(_to_numpy(c), compact) for c in iterator)):
            n = len(next(iter(chunk.values())))
            for i in range(n):
                yield {k: v[i] for k, v in chunk.items()}

    with atomic_path(out, force) as target:
        cache = temp_dir(out, "cache")
        was_enabled = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            ds = datasets.Dataset.from_generator(
                rows, features=feats, cache_dir=str(cache), fingerprint=fingerprint
            )
            n_rows = len(ds)
            ds.info.description = describe_folder({**manifest, "num_rows": n_rows})
            ds.save_to_disk(str(target))
            del ds
        except Exception as e:  # datasets wraps a full disk, and errors the rows raise, in its own types
            disk = os_error(e)
            if disk is not None:  # e.g. a write through fsspec names no file: name OUT
                raise disk_error(disk, out) from None
            user = user_error(e)
            if user is not None and user is not e:
                raise user from None
            raise
        finally:
            shutil.rmtree(cache, ignore_errors=True)
            if was_enabled:
                datasets.enable_progress_bars()
        manifest = json.loads(json.dumps({**manifest, "num_rows": n_rows}, default=str))
        manifest[CHECKSUM_KEY] = "sha256:" + _digest(target, manifest)
        (target / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def os_error(e: BaseException) -> OSError | None:
    """The file-system error (full disk, quota, read-only, permission) behind ``e``, if any.

    Libraries such as ``datasets`` wrap the ``OSError`` of a failed write in their own exception
    types; this walks the chain of causes to find it, so the CLI can print it as one line.
    """
    seen: set[int] = set()
    current: BaseException | None = e
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_ERRNOS:
            return current
        current = current.__cause__ or current.__context__
    return None


def user_error(e: BaseException) -> BaseException | None:
    """The one-line error (a ``DiffemError``, or a channel's ``ChannelError``) behind ``e``, if any:
    the rows given to :func:`write_dataset` may raise one, which ``datasets`` wraps."""
    seen: set[int] = set()
    current: BaseException | None = e
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DiffemError | ChannelError):
            return current
        current = current.__cause__ or current.__context__
    return None


def _prepend(first: dict[str, np.ndarray], rest: Iterator[dict[str, Any]]) -> Iterator[dict[str, np.ndarray]]:
    yield first
    yield from rest


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a diffem data folder (empty for a plain ``datasets`` folder)."""
    f = Path(path) / MANIFEST
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise DiffemError(f"{f} is not valid JSON ({e.msg})") from None


def read_dataset(path: Path) -> tuple[Any, dict[str, Any]]:
    """Open a ``datasets`` folder (memory-mapped) and its manifest; one-line errors on bad input."""
    import datasets

    path = Path(path)
    recover(path)
    if not path.exists():
        raise DiffemError(f"{path} does not exist")
    if not path.is_dir():
        raise DiffemError(f"{path} is not a dataset folder")
    check_contained(path)
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for a folder it cannot read
        raise DiffemError(f"{path} is not a readable datasets folder ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DiffemError(f"{path} holds splits {list(ds)}; diffem reads the 'train' split")
        ds = ds["train"]
    return ds, read_manifest(path)


def columns(ds: Any, names: list[str], start: int = 0, stop: int | None = None) -> dict[str, torch.Tensor]:
    """Rows ``start:stop`` of the named columns as float32 (or int64) torch tensors; uint8 columns
    (0/1 fields stored compactly by :func:`write_dataset`) as float32."""
    missing = [n for n in names if n not in ds.column_names]
    if missing:
        raise DiffemError(f"dataset has no column {missing[0]!r} (columns: {', '.join(ds.column_names)})")
    stop = len(ds) if stop is None else min(stop, len(ds))
    part = ds.with_format("numpy", columns=names)[start:stop]
    out = {}
    for n in names:
        arr = np.asarray(part[n])
        if arr.dtype.kind not in "biuf":
            what = "string" if arr.dtype.kind in "USO" else arr.dtype.name
            raise DiffemError(f"column {n!r} holds {what} values, not numbers: it is not a tensor")
        t = torch.from_numpy(np.ascontiguousarray(arr))
        out[n] = t.float() if t.is_floating_point() or _stored_dtype(ds.features[n]) == "uint8" else t
    return out


def _stored_dtype(feature: Any) -> str | None:
    """The element type a ``datasets`` feature stores (``datasets``' numpy format widens integers
    to int64 on reading, so a uint8 column is told by its feature)."""
    inner = getattr(feature, "feature", None)
    return getattr(feature, "dtype", None) if inner is None else _stored_dtype(inner)


def iter_columns(ds: Any, names: list[str], batch_size: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield ``(start, batch)`` over the whole data set in order, ``batch_size`` rows at a time."""
    for start in range(0, len(ds), batch_size):
        yield start, columns(ds, names, start, start + batch_size)


def _json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DiffemError(f"{path} is not readable JSON ({e})") from None


def _inside(root: Path, rel: Any, what: Path) -> Path:
    """``root / rel`` after resolving links, refused (one line) unless it stays inside ``root``."""
    if not isinstance(rel, str) or not rel:
        raise DiffemError(f"{what} names an invalid path {rel!r}")
    base = root.resolve()
    target = (root / rel).resolve()
    if target != base and base not in target.parents:
        raise DiffemError(f"{what} names {rel!r}, which lies outside {root}: refused")
    return target


def _split_folders(path: Path) -> list[Path]:
    """The folders holding Arrow data: ``path`` itself, or each split of a DatasetDict folder."""
    dict_file = path / "dataset_dict.json"
    if not dict_file.exists():
        return [path]
    splits = _json_file(dict_file)
    names = splits.get("splits") if isinstance(splits, dict) else None
    if not isinstance(names, list):
        raise DiffemError(f"{dict_file} lists no splits")
    return [_inside(path, name, dict_file) for name in names]


def _data_files(folder: Path) -> list[Path]:
    """The Arrow files ``datasets`` would load from ``folder``, in its order (from ``state.json``)."""
    state_file = folder / "state.json"
    if not state_file.exists():
        return sorted(folder.glob("*.arrow"))
    state = _json_file(state_file)
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(files, list):
        raise DiffemError(f"{state_file} lists no data files")
    names = [f.get("filename") if isinstance(f, dict) else f for f in files]
    return [_inside(folder, name, state_file) for name in names]


def check_contained(path: Path) -> None:
    """Refuse a data folder whose ``state.json``/``dataset_dict.json`` name files outside it.

    Paths are resolved (``..`` and symbolic links), so neither ``../outside.arrow`` nor a link to
    a file elsewhere gets past. Runs before ``datasets`` opens anything.
    """
    path = Path(path)
    for folder in _split_folders(path):
        _data_files(folder)


def fingerprint_dataset(path: Path) -> str:
    """A short hash of what a data folder means: its manifest, features and Arrow data (the first
    16 hexadecimal digits of the ``checksum`` that ``write_dataset`` records).

    Covered: the manifest (``diffem.json``) except :data:`VOLATILE_MANIFEST_KEYS` (the diffem
    version that wrote it), the features of ``dataset_info.json`` (how the bytes are read), and
    the content of the Arrow files in the order ``state.json`` lists them. Not covered: file
    names, ``datasets``' own bookkeeping (its cache fingerprint, split sizes, descriptions).
    Editing a channel parameter in the manifest or the rows changes the fingerprint; re-saving
    the same rows under other file names, or with another diffem version, does not.
    """
    return _digest(Path(path), read_manifest(path))[:16]


def verify_dataset(path: Path, manifest: dict[str, Any], *, required: bool = False) -> str:
    """Check a data folder against the ``checksum`` of its ``manifest``; returns its fingerprint.

    Flipped bytes in an Arrow file or an edited manifest entry are refused with one line. A folder
    without a checksum (written by an older diffem, or by hand) passes unless ``required``: then it
    is refused unless the user trusts it (``DIFFEM_TRUST_UNVERIFIED=1``).
    """
    path = Path(path)
    digest = _digest(path, manifest)
    expected = manifest.get(CHECKSUM_KEY)
    if expected is None:
        if required and not trust_unverified():
            raise DiffemError(
                f"{path} carries no checksum (written by an older diffem or by hand): write it again "
                f"with 'diffem corrupt', or set {TRUST_ENV}=1 to use it unverified"
            )
    elif expected != "sha256:" + digest:
        raise DiffemError(f"{path}: checksum mismatch (its data or {MANIFEST} were modified or corrupted)")
    return digest[:16]


def _digest(path: Path, manifest: dict[str, Any]) -> str:
    """The SHA-256 (hexadecimal) of a data folder: ``manifest`` less its volatile entries, the
    features, and the Arrow files in the order ``state.json`` lists them."""
    h = hashlib.sha256()
    manifest = {k: v for k, v in manifest.items() if k not in VOLATILE_MANIFEST_KEYS}
    h.update(b"manifest\0" + json.dumps(manifest, sort_keys=True, default=str).encode() + b"\0")
    for folder in _split_folders(path):
        info_file = folder / "dataset_info.json"
        info = _json_file(info_file) if info_file.exists() else {}
        features = info.get("features") if isinstance(info, dict) else None
        h.update(b"features\0" + json.dumps(features, sort_keys=True).encode() + b"\0")
        for f in _data_files(folder):
            h.update(b"file\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def check_finite(tensors: dict[str, torch.Tensor], what: str, start: int = 0) -> None:
    """Refuse NaN or infinite values in the floating-point ``tensors`` with one line.

    ``what`` names the source (e.g. the observations folder); ``start`` is the row number of the
    tensors' first row, so the message points at the row in the whole data set.
    """
    for name, t in tensors.items():
        if not (t.is_floating_point() or t.is_complex()):
            continue
        bad = ~torch.isfinite(t)
        if not bool(bad.any()):
            continue
        count = int(bad.sum())
        row = int(bad.reshape(len(t), -1).any(dim=1).nonzero()[0, 0]) if t.dim() else 0
        raise DiffemError(
            f"{what}: column {name!r} holds {count} non-finite value{'s' if count > 1 else ''} "
            f"(NaN or infinity), the first in row {start + row}; fix or drop those rows"
        )


def check_manifest_columns(ds: Any, manifest: dict[str, Any], path: Path, channel: Any = None) -> None:
    """Refuse a data folder whose manifest disagrees with its columns (one line).

    ``data_shape`` must be a vector ``(n,)`` or image ``(C, H, W)`` shape; a folder of clean data,
    reconstructions or samples must hold an ``x`` column of rows of that shape; an observations
    folder must hold exactly the columns, of the per-row shapes, that its channel (``channel``, or
    the manifest's channel spec) draws from data of that shape. Plain folders (no manifest) pass.
    """
    if not manifest:
        return
    where = f"{path}/{MANIFEST}"
    shape = manifest.get("data_shape")
    if shape is None:
        if manifest.get("kind") == "observations":
            raise DiffemError(f"{where} has no data_shape")
        return
    if (
        not isinstance(shape, list)
        or len(shape) not in (1, 3)
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        raise DiffemError(f"{where}: data_shape {shape!r} is neither a vector (n,) nor an image (C, H, W)")
    kind = manifest.get("data_kind")
    if kind is not None and kind != data_kind(shape):
        raise DiffemError(f"{where}: data_kind {kind!r} disagrees with data_shape {shape}")
    if len(ds) == 0:
        raise DiffemError(f"{path} holds no rows")
    if manifest.get("num_rows") is not None and manifest["num_rows"] != len(ds):
        raise DiffemError(f"{where} says {manifest['num_rows']} rows but the data hold {len(ds)}")
    if manifest.get("kind") != "observations":
        first = columns(ds, ["x"], 0, 1) if "x" in ds.column_names else {}
        if "x" in first and tuple(first["x"].shape[1:]) != tuple(shape):
            raise DiffemError(
                f"{where}: data_shape {shape} disagrees with the column x (rows of shape "
                f"{list(first['x'].shape[1:])})"
            )
        return
    if "index" not in ds.column_names:
        raise DiffemError(f"{path} has no 'index' column: not an observations folder from 'diffem corrupt'")
    first = columns(ds, tensor_names(ds.column_names), 0, 1)  # file names and labels are not observed
    from diffem_channels.base import ChannelError, sample_seeds

    try:
        if channel is None:
            from diffem_cli.io.registry import channel_from_spec

            channel = channel_from_spec(manifest.get("channel") or {})
        channel.check_data(tuple(shape))
        trial = channel.corrupt(torch.zeros(1, *shape), sample_seeds(0, [0]))
    except ChannelError as e:
        raise DiffemError(f"{where}: data_shape {shape} does not fit its channel ({e})") from None
    expected = {k: tuple(v.shape[1:]) for k, v in trial.items()}
    got = {k: tuple(v.shape[1:]) for k, v in first.items()}
    if set(expected) != set(got):
        raise DiffemError(
            f"{where}: channel {channel.name!r} observes columns {sorted(expected)}, "
            f"but the data hold {sorted(got)}"
        )
    for k, want in expected.items():
        if got[k] != want:
            raise DiffemError(
                f"{where}: data_shape {shape} with channel {channel.name!r} gives {k!r} rows of shape "
                f"{list(want)}, but the data hold rows of shape {list(got[k])}"
            )
