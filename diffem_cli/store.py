"""Data sets on disk: Hugging Face ``datasets`` folders with a diffem manifest, written atomically.

Every folder diffem writes (observations, clean data, reconstructions, samples) is a
``datasets.save_to_disk`` folder that ``datasets.load_from_disk`` opens, plus ``diffem.json``
(the manifest: what made it, from what, with which seed). Folders are built under a temporary
name beside the target and renamed into place, so an interrupted write leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffem_cli import __version__
from diffem_cli.errors import DiffemError

MANIFEST = "diffem.json"


def check_output(out: Path, force: bool) -> None:
    """Refuse to touch an existing output unless ``force``; refuse a missing parent folder."""
    out = Path(out)
    if out.exists() and not force:
        raise DiffemError(f"{out} already exists (use --force to overwrite)")
    if not out.parent.exists():
        raise DiffemError(f"folder {out.parent} does not exist")


@contextlib.contextmanager
def atomic_path(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces ``out``, on failure it is removed."""
    out = Path(out)
    check_output(out, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    target = tmp / "payload"
    try:
        yield target
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(target, out)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            os.replace(target, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file through a temporary file and a rename."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, path)


def _features(first: dict[str, np.ndarray]) -> Any:
    import datasets

    feats = {}
    for name, arr in first.items():
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


def _to_numpy(chunk: dict[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in chunk.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            v = v.float() if v.is_floating_point() else v
            v = v.numpy()
        out[k] = np.ascontiguousarray(v)
    return out


def write_dataset(
    out: Path, chunks: Iterable[dict[str, Any]], manifest: dict[str, Any], force: bool = False
) -> Path:
    """Write batches of named arrays (leading batch dimension) as a ``datasets`` folder.

    Memory stays bounded by one chunk: rows stream into Arrow files on disk. The same chunks and
    manifest give byte-identical files.
    """
    import datasets

    out = Path(out)
    check_output(out, force)
    iterator = iter(chunks)
    try:
        first = _to_numpy(next(iterator))
    except StopIteration:
        raise DiffemError("nothing to write: the input holds no samples") from None
    features = _features(first)
    manifest = {**manifest, "diffem_version": __version__}
    fingerprint = hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def rows() -> Iterator[dict[str, Any]]:
        for chunk in _prepend(first, iterator):
            n = len(next(iter(chunk.values())))
            for i in range(n):
                yield {k: v[i] for k, v in chunk.items()}

    with (
        atomic_path(out, force) as target,
        tempfile.TemporaryDirectory(dir=out.parent, prefix=".cache-") as cache,
    ):
        was_enabled = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            ds = datasets.Dataset.from_generator(
                rows, features=features, cache_dir=cache, fingerprint=fingerprint
            )
            n_rows = len(ds)
            ds.save_to_disk(str(target))
            del ds
        finally:
            if was_enabled:
                datasets.enable_progress_bars()
        manifest["num_rows"] = n_rows
        (target / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return out


def _prepend(first: dict[str, np.ndarray], rest: Iterator[dict[str, Any]]) -> Iterator[dict[str, np.ndarray]]:
    yield first
    for chunk in rest:
        yield _to_numpy(chunk)


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
    if not path.exists():
        raise DiffemError(f"{path} does not exist")
    if not path.is_dir():
        raise DiffemError(f"{path} is not a dataset folder")
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
    """Rows ``start:stop`` of the named columns as float32 (or int64) torch tensors."""
    missing = [n for n in names if n not in ds.column_names]
    if missing:
        raise DiffemError(f"dataset has no column {missing[0]!r} (columns: {', '.join(ds.column_names)})")
    stop = len(ds) if stop is None else min(stop, len(ds))
    part = ds.with_format("numpy", columns=names)[start:stop]
    out = {}
    for n in names:
        arr = np.asarray(part[n])
        t = torch.from_numpy(np.ascontiguousarray(arr))
        out[n] = t.float() if t.is_floating_point() else t
    return out


def iter_columns(ds: Any, names: list[str], batch_size: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield ``(start, batch)`` over the whole data set in order, ``batch_size`` rows at a time."""
    for start in range(0, len(ds), batch_size):
        yield start, columns(ds, names, start, start + batch_size)


def fingerprint_dataset(path: Path) -> str:
    """A short content hash of a data folder's Arrow files, recorded in checkpoints."""
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.arrow")):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]
