"""Per-row metadata carried beside the tensors: the source's file names and labels.

A source may know, for each sample, the file it came from and a label (scikit-learn's digits
their target, an image folder the path of each file, a saved data set its ``file_name``/``path``
and ``label`` columns). diffem carries them as plain columns of every data folder that follows
from those samples, next to ``index``: ``file_name`` (a string, the path relative to the image
folder) and ``label`` (an integer, a ``datasets.ClassLabel`` when its class names are known, or a
string). They are metadata, never tensors: channels, methods and metrics never see them, and a
folder without them (written before they existed) reads as before.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from diffem_cli.core.errors import DiffemError

FILE_NAME = "file_name"
"""The column of file names (paths relative to the source folder, POSIX separators)."""
LABEL = "label"
"""The column of labels (integers, possibly a ``datasets.ClassLabel``, or strings)."""
ROW_COLUMNS = (FILE_NAME, LABEL)
"""The per-row metadata columns, in the order they are written."""
NAME_COLUMNS = (FILE_NAME, "file", "path")
"""String columns of a saved data set read as file names, the first present one wins."""
NOT_TENSORS = ("index", *ROW_COLUMNS)
"""Columns of a data folder that are not observation or sample tensors."""

RowColumns = dict[str, list[Any]]
"""Per-row metadata: a column name of :data:`ROW_COLUMNS` to one value per row."""


def tensor_names(names: Iterable[str]) -> list[str]:
    """The column names among ``names`` that hold tensors (not ``index``, file names or labels)."""
    return [n for n in names if n not in NOT_TENSORS]


def _string_feature(feature: Any) -> bool:
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _label_feature(feature: Any) -> bool:
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return True
    return isinstance(feature, datasets.Value) and (
        feature.dtype.startswith(("int", "uint")) or feature.dtype in ("string", "large_string")
    )


def found_columns(ds: Any) -> dict[str, str]:
    """Which column of the ``datasets.Dataset`` ``ds`` gives each row column: ``file_name`` from the
    first string column of :data:`NAME_COLUMNS`, ``label`` from an integer, string or ClassLabel
    column ``label``. Columns of other types are not metadata diffem carries."""
    feats = ds.features
    found = {}
    names = [c for c in NAME_COLUMNS if c in feats and _string_feature(feats[c])]
    if names:
        found[FILE_NAME] = names[0]
    if LABEL in feats and _label_feature(feats[LABEL]):
        found[LABEL] = LABEL
    return found


def read_rows(ds: Any, start: int = 0, stop: int | None = None) -> RowColumns:
    """Rows ``start:stop`` of the row columns ``ds`` holds (see :func:`found_columns`), as lists."""
    found = found_columns(ds)
    if not found:
        return {}
    stop = len(ds) if stop is None else min(stop, len(ds))
    part = ds.select_columns(sorted(set(found.values())))[start:stop]
    return {ours: list(part[theirs]) for ours, theirs in found.items()}


def label_names(ds: Any) -> tuple[str, ...] | None:
    """The class names of ``ds``'s label column when it is a ``datasets.ClassLabel``, else None."""
    import datasets

    found = found_columns(ds)
    feature = ds.features[found[LABEL]] if LABEL in found else None
    return tuple(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def features(rows: Mapping[str, Sequence[Any]], names: Sequence[str] | None = None) -> dict[str, Any]:
    """The ``datasets`` features of row columns: ``file_name`` a string, ``label`` a ClassLabel of
    ``names`` when given (else an int64 or a string, by its values)."""
    import datasets

    out: dict[str, Any] = {}
    if FILE_NAME in rows:
        out[FILE_NAME] = datasets.Value("string")
    if LABEL in rows:
        if names is not None:
            out[LABEL] = datasets.ClassLabel(names=list(names))
        elif any(isinstance(v, str) for v in rows[LABEL]):
            out[LABEL] = datasets.Value("string")
        else:
            out[LABEL] = datasets.Value("int64")
    return out


def check_rows(rows: Mapping[str, Sequence[Any]], n: int, what: str) -> RowColumns:
    """``rows`` checked: only :data:`ROW_COLUMNS`, ``n`` values each, file names non-empty strings,
    labels integers or strings (one kind); None for a row without one. A one-line DiffemError
    naming ``what`` otherwise. Returns them as lists, labels as ``int``, ``str`` or None."""
    out: RowColumns = {}
    for name, values in rows.items():
        if name not in ROW_COLUMNS:
            raise DiffemError(f"{what}: {name!r} is not a row column ({', '.join(ROW_COLUMNS)})")
        values = list(values)
        if len(values) != n:
            raise DiffemError(f"{what}: {len(values)} values of {name!r} for {n} rows")
        if name == FILE_NAME:
            bad = [v for v in values if v is not None and (not isinstance(v, str) or not v)]
            if bad:
                raise DiffemError(f"{what}: file name {bad[0]!r} is not a non-empty string")
        else:
            values = [_label(v, what) for v in values]
            if len({type(v) for v in values if v is not None}) > 1:
                raise DiffemError(f"{what}: labels mix integers and strings")
        out[name] = values
    return out


def _label(v: Any, what: str) -> int | str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, bool):
        raise DiffemError(f"{what}: label {v!r} is neither an integer nor a string")
    try:
        as_int = int(v)
    except (TypeError, ValueError):
        raise DiffemError(f"{what}: label {v!r} is neither an integer nor a string") from None
    if as_int != v:
        raise DiffemError(f"{what}: label {v!r} is not a whole number")
    return as_int


def take(rows: Mapping[str, Sequence[Any]], start: int, stop: int) -> RowColumns:
    """Rows ``start:stop`` of every row column."""
    return {k: list(v[start:stop]) for k, v in rows.items()}


def repeat(rows: Mapping[str, Sequence[Any]], times: int) -> RowColumns:
    """Every row column repeated ``times`` times, end to end (the order of ``reconstruct``'s rows:
    all observations for the first posterior draw, then all for the second, ...)."""
    return {k: list(v) * times for k, v in rows.items()}


def safe_stem(name: str, limit: int = 80) -> str:
    """A file name reduced to a safe PNG stem: the suffix dropped, folders joined by ``-``, every
    character other than letters, digits, ``.``, ``_`` and ``-`` replaced by ``-``, at most
    ``limit`` characters (``cats/Tom 01.jpg`` -> ``cats-Tom-01``)."""
    stem = name.rsplit(".", 1)[0] if "." in name.rsplit("/", 1)[-1] else name
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem.replace("/", "-")).strip("-.")
    return stem[:limit] or "image"
