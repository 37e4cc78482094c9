"""Import data that are already corrupted into an observations folder like the one ``corrupt`` writes.

The observed images (or arrays) come from an image folder, a saved ``datasets`` folder, a
safetensors file or a Hub data set (``hf:NAME[:SPLIT]``, read as ``corrupt`` reads it); what the
channel needs beyond ``y`` (a mask, a matrix, per-sample parameters) comes from the files the
channel's :meth:`~diffem_channels.Channel.import_fields` allows: mask images named like the
observations, a data set column, a safetensors tensor, or a CSV/JSON table keyed by file name.
Everything is checked against the channel's contract while it streams into a temporary folder, so
a refusal (one line) leaves nothing behind. The folder is the same as ``corrupt``'s (manifest,
checksum, ``index`` column) plus the source's file names (a ``file_name`` column, and ``files`` in
the manifest, row ``i`` from ``files[i]``) and labels (a ``label`` column), so ``em-train``,
``reconstruct`` and ``compare`` take it. Its provenance step records the source (a Hub data set
by its ``hf:NAME:SPLIT``), the channel and the options it was imported with.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffem_channels.base import Channel, ChannelError, ImportField, sample_seeds
from diffem_cli.core.errors import DiffemError
from diffem_cli.io import provenance, rowmeta
from diffem_cli.io.datameta import VECTOR, DataMeta, data_kind
from diffem_cli.io.rowmeta import FILE_NAME, LABEL, RowColumns, check_rows
from diffem_cli.io.sources import (
    IMAGE_RANGE,
    IMAGE_SUFFIXES,
    MANIFOLD_RANGE,
    ImageFolderSource,
    hub_spec,
    load_hub_dataset,
)
from diffem_cli.io.store import check_finite, check_output, read_dataset, read_manifest, write_dataset

GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
"""PIL modes read as one grey channel."""
NOISE_SPAN = 6.0
"""Observed values may exceed the data range by this many noise standard deviations."""

Reader = Callable[[int, int], torch.Tensor]
"""Rows ``start:stop`` of one input as a float tensor with a leading batch dimension."""


@dataclass
class Input:
    """Where one observation tensor is read from: ``rows`` rows through ``read``, named ``what``."""

    what: str
    rows: int
    read: Reader
    shape: tuple[int, ...] | None = None
    """Per-row shape when known before decoding (arrays); None for images (decoded to the field's)."""


def _safe_rows(what: str, read: Callable[[int, int], Any]) -> Reader:
    """``read`` with rows of unequal shapes or unreadable values reported as one line."""

    def wrapped(start: int, stop: int) -> torch.Tensor:
        try:
            arr = np.asarray(read(start, stop))
            if arr.dtype == object:
                raise ValueError("rows of different shapes")
            t = torch.from_numpy(np.ascontiguousarray(arr))
        except (ValueError, TypeError) as e:
            raise DiffemError(f"{what}: cannot read rows {start}..{stop - 1} as one array ({e})") from None
        return t.float() if t.is_floating_point() or t.dtype == torch.bool else t

    return wrapped


def _decode(images: Sequence[Any], mode: str, where: Callable[[int], str]) -> torch.Tensor:
    """PIL images -> uint8-valued float tensor ``(B, C, H, W)``; all must share the first's size."""
    arrays = []
    for i, img in enumerate(images):
        if img.size != images[0].size:
            raise DiffemError(
                f"{where(i)} is {img.size[0]}x{img.size[1]}, not {images[0].size[0]}x{images[0].size[1]} "
                "like the others; all images must have one size"
            )
        arr = np.asarray(img.convert(mode) if img.mode != mode else img, dtype=np.uint8)
        arrays.append(arr[..., None] if arr.ndim == 2 else arr)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()


def _open_images(files: Sequence[Path], mode: str) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    images = []
    for f in files:
        try:
            with Image.open(f) as img:
                img.load()
                images.append(img)
        except (UnidentifiedImageError, OSError) as e:
            raise DiffemError(f"cannot read image {f} ({type(e).__name__})") from None
    return _decode(images, mode, lambda i: f"image {files[i]}")


def _pixels_to(values: tuple[float, float] | None, v: torch.Tensor) -> torch.Tensor:
    """8-bit pixel values ``v`` on a field's value range (as clean images, ``v / 127.5 - 1``, when it
    has none)."""
    if values is None:
        return v / 127.5 - 1.0
    lo, hi = values
    return lo + (hi - lo) * v / 255.0


class ObservedSource:
    """The observed data: ``y`` row by row, the file names (and labels), and same-name inputs it
    carries."""

    spec: str = ""
    names: list[str] | None = None
    labels: list[Any] | None = None
    label_names: tuple[str, ...] | None = None
    value_range: tuple[float, float] | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def y(self) -> Input:
        """How ``y`` is read (on diffem's scale)."""
        raise NotImplementedError

    def carried(self, name: str, field: ImportField | None = None) -> Input | None:
        """The input named ``name`` the source itself holds (a column, a tensor), if any."""
        return None

    def keys(self) -> list[str]:
        """The key of each row in a parameter table: its file name, else its row number."""
        return list(self.names) if self.names is not None else [str(i) for i in range(len(self))]

    def columns(self, start: int, stop: int) -> RowColumns:
        """The per-row metadata of rows ``start:stop`` written beside the observations:
        ``file_name`` and ``label``, those the source has (see :mod:`diffem_cli.io.rowmeta`)."""
        rows: RowColumns = {}
        if self.names is not None:
            rows[FILE_NAME] = self.names[start:stop]
        if self.labels is not None:
            rows[LABEL] = self.labels[start:stop]
        return rows


class FolderSource(ObservedSource):
    """A folder of image files (sorted by relative path), 8-bit pixel ``v`` read as ``v / 127.5 - 1``."""

    def __init__(self, root: Path) -> None:
        self.images = ImageFolderSource(root, str(root))
        self.spec = str(root)
        self.names = [f.relative_to(root).as_posix() for f in self.images.files]
        self.value_range = IMAGE_RANGE

    def __len__(self) -> int:
        return len(self.images)

    def y(self) -> Input:
        return Input(f"images in {self.spec}", len(self), self.images.read, tuple(self.images.shape))


class DatasetObservedSource(ObservedSource):
    """A ``datasets.Dataset`` (a saved folder, or a Hub split): ``y`` from ``column`` (default ``y``,
    else an image column); ``manifest``: a diffem folder's, for its ``value_range``."""

    def __init__(
        self, ds: Any, spec: str, column: str | None, manifest: Mapping[str, Any] | None = None
    ) -> None:
        import datasets

        self.ds = ds
        self.spec = spec
        feats = self.ds.features
        if column is None:
            images = [c for c, f in feats.items() if isinstance(f, datasets.Image)]
            preferred = [c for c in ("y", "image", "img") if c in feats]
            column = (preferred or images or [None])[0]
        if column is None or column not in feats:
            raise DiffemError(
                f"{spec} has no column {column or 'y'!r} of observations (columns: "
                f"{', '.join(self.ds.column_names)}); name it with --column"
            )
        self.column = column
        rows = check_rows(rowmeta.read_rows(self.ds), len(self.ds), spec)
        names = rows.get(FILE_NAME)
        self.names = names if names is not None and None not in names else None  # all, or none
        self.labels = rows.get(LABEL)
        self.label_names = rowmeta.label_names(self.ds) if self.labels is not None else None
        recorded = (manifest or {}).get("value_range")
        self.value_range = tuple(recorded) if recorded else None
        if len(self.ds) == 0:
            raise DiffemError(f"{spec} holds no rows")

    def __len__(self) -> int:
        return len(self.ds)

    def _input(self, column: str, values: tuple[float, float] | None, observation: bool) -> Input:
        import datasets

        what = f"{self.spec} column {column!r}"
        if isinstance(self.ds.features[column], datasets.Image):
            first = self.ds[0][column]
            mode = "L" if first.mode in GRAY_MODES else "RGB"

            def read_images(start: int, stop: int) -> torch.Tensor:
                images = self.ds[start:stop][column]
                v = _decode(images, mode, lambda i: f"{what} row {start + i}")
                return _pixels_to(values, v)

            return Input(what, len(self), read_images)
        read = _safe_rows(what, lambda a, b: self.ds.with_format("numpy", columns=[column])[a:b][column])
        first = read(0, 1)
        if observation and first.dtype == torch.uint8:  # 8-bit pixels stored as arrays

            def read_pixels(start: int, stop: int) -> torch.Tensor:
                return _pixels_to(values, read(start, stop).float())

            return Input(what, len(self), read_pixels, tuple(first.shape[1:]))
        return Input(what, len(self), read, tuple(first.shape[1:]))

    def y(self) -> Input:
        return self._input(self.column, None, True)

    def carried(self, name: str, field: ImportField | None = None) -> Input | None:
        if name not in self.ds.column_names or name == self.column:
            return None
        return self._input(name, field.values if field is not None else None, False)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (one-line error when it cannot be read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as e:
        raise DiffemError(f"cannot read safetensors file {path} ({e})") from None


def _rows(what: str, t: torch.Tensor) -> Input:
    t = t.float() if t.is_floating_point() or t.dtype == torch.bool else t
    return Input(what, len(t), lambda a, b: t[a:b], tuple(t.shape[1:]))


class TensorFileSource(ObservedSource):
    """A safetensors file: ``y`` (or ``column``) and the other inputs as tensors of one row per sample."""

    def __init__(self, path: Path, column: str | None) -> None:
        self.spec = str(path)
        self.tensors = read_tensors(path)
        self.column = column or "y"
        if self.column not in self.tensors:
            raise DiffemError(
                f"{path} holds no tensor {self.column!r} "
                f"(tensors: {', '.join(sorted(self.tensors)) or 'none'})"
            )
        if self.tensors[self.column].dim() < 2:
            raise DiffemError(f"{path}: tensor {self.column!r} must hold one row per sample, (N, ...)")

    def __len__(self) -> int:
        return len(self.tensors[self.column])

    def y(self) -> Input:
        return _rows(f"{self.spec} tensor {self.column!r}", self.tensors[self.column])

    def carried(self, name: str, field: ImportField | None = None) -> Input | None:
        if name not in self.tensors or name == self.column:
            return None
        return _rows(f"{self.spec} tensor {name!r}", self.tensors[name])


def open_observed(source: Path | str, column: str | None = None) -> ObservedSource:
    """Open observed data: an image folder, a saved ``datasets`` folder, a ``.safetensors`` file or a
    Hub data set ``hf:NAME[:SPLIT]`` (read as ``corrupt`` reads it, :func:`load_hub_dataset`)."""
    hub = hub_spec(str(source))
    if hub is not None:
        return DatasetObservedSource(load_hub_dataset(*hub), f"hf:{hub[0]}:{hub[1]}", column)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        return TensorFileSource(path, column)
    if not path.is_dir():
        raise DiffemError(
            f"source {source} not found: give an image folder, a saved dataset, a .safetensors file "
            "or hf:NAME[:SPLIT]"
        )
    if any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        ds, manifest = read_dataset(path)
        return DatasetObservedSource(ds, str(path), column, manifest)
    if column is not None:
        raise DiffemError(f"--column names a data set column, but {source} is a folder of images")
    return FolderSource(path)


def _image_input(folder: Path, field: ImportField, observed: ObservedSource) -> Input:
    """A field from image files named like the observations (any image suffix, same relative stem)."""
    if not folder.is_dir():
        raise DiffemError(f"{field.name} folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    by_stem: dict[str, Path] = {}
    for f in files:
        stem = f.relative_to(folder).with_suffix("").as_posix()
        if stem in by_stem:
            raise DiffemError(f"{field.name} folder {folder} holds both {by_stem[stem].name} and {f.name}")
        by_stem[stem] = f
    if observed.names is None:
        raise DiffemError(f"{field.name} images need file names to pair with; {observed.spec} has none")
    if len(files) != len(observed):
        raise DiffemError(
            f"{field.name} folder {folder} holds {len(files)} images, {observed.spec} {len(observed)}"
        )
    ordered = []
    for name in observed.names:
        f = by_stem.get(Path(name).with_suffix("").as_posix())
        if f is None:
            raise DiffemError(f"{field.name} folder {folder} has no image for {name}")
        ordered.append(f)
    mode = "L" if len(field.shape) == 3 and field.shape[0] == 1 else "RGB"

    def read(start: int, stop: int) -> torch.Tensor:
        return _pixels_to(field.values, _open_images(ordered[start:stop], mode))

    return Input(f"{field.name} images in {folder}", len(ordered), read)


def _tensor_input(path: Path, field: ImportField) -> Input:
    """A field from a safetensors file: its tensor of the field's name, or its only tensor."""
    if not path.is_file():
        raise DiffemError(f"{field.name} file {path} does not exist")
    tensors = read_tensors(path)
    name = field.name if field.name in tensors else None
    if name is None and len(tensors) == 1:
        name = next(iter(tensors))
    if name is None:
        raise DiffemError(f"{path} holds no tensor {field.name!r} (tensors: {', '.join(sorted(tensors))})")
    return _rows(f"{path} tensor {name!r}", tensors[name])


def read_params_table(path: Path) -> dict[str, dict[str, float]]:
    """A CSV (header ``file,NAME,...``) or JSON (``{"FILE": {"NAME": value}}`` or a list of records
    with ``file``) table of per-sample scalars, keyed by file name (row number for a data set)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DiffemError(f"cannot read --params {path} ({e})") from None
    records: list[dict[str, Any]]
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DiffemError(f"--params {path} is not valid JSON ({e.msg})") from None
        if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):
            records = [{"file": k, **v} for k, v in data.items()]
        elif isinstance(data, list) and all(isinstance(r, dict) for r in data):
            records = data
        else:
            raise DiffemError(f"--params {path} must map file names to values, or list records with 'file'")
    elif path.suffix.lower() == ".csv":
        records = list(csv.DictReader(text.splitlines()))
    else:
        raise DiffemError(f"--params {path} must be a .csv or .json file")
    table: dict[str, dict[str, float]] = {}
    for r in records:
        if not isinstance(r.get("file"), str | int) or None in r:
            raise DiffemError(f"--params {path}: every record needs a 'file' and one value per column")
        key = str(r["file"])
        try:
            values = {k: float(v) for k, v in r.items() if k != "file"}
        except (TypeError, ValueError):
            raise DiffemError(f"--params {path}: the values of {key} must be numbers") from None
        if key in table:
            raise DiffemError(f"--params {path} lists {key} twice")
        table[key] = values
    return table


def _params_inputs(
    table: dict[str, dict[str, float]],
    path: Path,
    fields: Mapping[str, ImportField],
    observed: ObservedSource,
) -> dict[str, Input]:
    """The per-sample scalars of a ``--params`` table, one input per field, in the observations' order."""
    names = sorted({n for v in table.values() for n in v})
    takes = [f.name for f in fields.values() if "params" in f.sources]
    for n in names:
        if n not in takes:
            raise DiffemError(
                f"--params {path}: unknown per-sample parameter {n!r} "
                f"(this channel takes {', '.join(takes) or 'none'}; channel-wide values go in -p)"
            )
    keys = observed.keys()
    missing = [k for k in keys if k not in table]
    if missing:
        raise DiffemError(f"--params {path} has no entry for {missing[0]} ({len(missing)} missing)")
    extra = sorted(set(table) - set(keys))
    if extra:
        raise DiffemError(f"--params {path} names {extra[0]}, which is not among the observations")
    out = {}
    for n in names:
        if any(n not in table[k] or not math.isfinite(table[k][n]) for k in keys):
            raise DiffemError(f"--params {path}: parameter {n!r} needs a finite value for every observation")
        column = torch.tensor([table[k][n] for k in keys], dtype=torch.float64)
        out[n] = Input(f"--params {path} column {n!r}", len(keys), lambda a, b, c=column: c[a:b].float(), ())
    return out


def _field_input(spec: str | Path, field: ImportField, observed: ObservedSource) -> Input:
    """One explicit input: ``column:COL``, a folder of images, or a ``.safetensors`` file."""
    text = str(spec)
    if text.startswith("column:"):
        found = observed.carried(text.removeprefix("column:"), field) if "column" in field.sources else None
        if found is None:
            raise DiffemError(f"{field.name}: {observed.spec} has no column {text.removeprefix('column:')!r}")
        return found
    path = Path(text).expanduser()
    if path.is_dir() and "images" in field.sources:
        return _image_input(path, field, observed)
    if path.suffix == ".safetensors" and "safetensors" in field.sources:
        return _tensor_input(path, field)
    allowed = ", ".join(field.sources)
    raise DiffemError(f"{field.name} cannot be read from {text} (the channel reads it from: {allowed})")


def _candidates(y_shape: tuple[int, ...], shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Data shapes to try: ``y``'s own, then the trailing dimension(s) of each input (``A``'s n)."""
    found = [y_shape]
    for s in shapes:
        for tail in (s[-1:], s[-3:]):
            if len(tail) in (1, 3) and tail not in found:
                found.append(tail)
    return found


def resolve_shape(
    channel: Channel,
    y_shape: tuple[int, ...],
    shapes: Mapping[str, tuple[int, ...]],
    data_shape: Sequence[int] | None = None,
) -> tuple[tuple[int, ...], tuple[ImportField, ...]]:
    """The clean data's shape and the channel's fields: the first candidate shape (``data_shape``, or
    ``y``'s and the inputs' trailing dimensions) for which the channel observes exactly ``y_shape``
    and the known input ``shapes``."""
    tries = [tuple(int(s) for s in data_shape)] if data_shape else _candidates(y_shape, list(shapes.values()))
    reasons = []
    for shape in tries:
        try:
            channel.check_data(shape)
            trial = channel.corrupt(torch.zeros(1, *shape), sample_seeds(0, [0]))
        except ChannelError as e:
            reasons.append(f"data of shape {list(shape)}: {e}")
            continue
        try:
            fields = channel.import_fields(shape)
        except ChannelError as e:  # data the channel takes, but whose observations it cannot import
            raise DiffemError(str(e)) from None
        want = tuple(trial["y"].shape[1:])
        if want != y_shape:
            reasons.append(f"data of shape {list(shape)} give y of shape {list(want)}, not {list(y_shape)}")
            continue
        bad = [f for f in fields if f.name in shapes and shapes[f.name] != f.shape]
        if bad:
            f = bad[0]
            reasons.append(
                f"data of shape {list(shape)} need {f.name!r} of shape {list(f.shape)}, "
                f"not {list(shapes[f.name])}"
            )
            continue
        return shape, fields
    raise DiffemError(
        f"channel {channel.name!r} does not fit these observations: {reasons[0]} (check -p, or --data-shape)"
    )


def _check_field(t: torch.Tensor, field: ImportField, what: str, start: int) -> torch.Tensor:
    if tuple(t.shape[1:]) != field.shape:
        raise DiffemError(
            f"{what}: rows from {start} have shape {list(t.shape[1:])}, the channel needs {list(field.shape)}"
        )
    t = t.to(getattr(torch, field.dtype))
    check_finite({field.name: t}, what, start)
    if field.values is not None:
        lo, hi = field.values
        outside = (t < lo) | (t > hi)
        if field.binary:
            outside = (t != lo) & (t != hi)
        if bool(outside.any()):
            row = start + int(outside.reshape(len(t), -1).any(dim=1).nonzero()[0, 0])
            if field.binary:
                raise DiffemError(
                    f"{what}: row {row} holds values other than {lo:g} and {hi:g} (images: black, white)"
                )
            raise DiffemError(f"{what}: row {row} holds values outside [{lo:g}, {hi:g}]")
    if field.check is not None:
        reason = field.check(t)
        if reason:
            raise DiffemError(f"{what}, rows from {start}: {reason}")
    return t


def _row_name(observed: ObservedSource, row: int) -> str:
    return observed.names[row] if observed.names is not None else f"row {row}"


def _check_masked(
    channel: Channel,
    obs: dict[str, torch.Tensor],
    observed: ObservedSource,
    start: int,
    value_range: tuple[float, float],
) -> None:
    """Missing entries must hold the fill: 0 (grey 127 or 128 in an 8-bit image) or the lowest value
    (black); anything else means the mask does not belong to its image. They become exactly 0."""
    lo, hi = value_range
    seen = channel.observation_mask(obs)
    y = obs["y"]
    fill = (y.abs() <= (hi - lo) / 510 + 1e-6) | ((y - lo).abs() <= 1e-6)
    wrong = (seen == 0) & ~fill
    if bool(wrong.any()):
        per_row = wrong.reshape(len(y), -1).sum(dim=1)
        row = int(per_row.nonzero()[0, 0])
        raise DiffemError(
            f"{_row_name(observed, start + row)} holds {int(per_row[row])} values where its mask says "
            "missing (they must be 0, grey or black): is the mask its own, with white = observed?"
        )
    obs["y"] = y * seen


def _y_bound(channel: Channel, value_range: tuple[float, float], same_shape: bool) -> tuple[float, float]:
    """How far observed values may reach: for a ``y`` of the data's shape (masks, blur, noise, JPEG),
    the data range widened by one 8-bit step and a linear channel's noise; else unbounded."""
    lo, hi = value_range
    if not same_shape:
        return -math.inf, math.inf
    noise = 0.0
    if channel.linear:
        try:
            noise = float(channel.noise_std({}))
        except (ChannelError, KeyError, TypeError):
            noise = 0.0
    margin = NOISE_SPAN * noise + (hi - lo) / 255
    return lo - margin, hi + margin


def import_observations(
    source: Path | str,
    channel: Channel,
    out: Path,
    *,
    column: str | None = None,
    inputs: Mapping[str, str | Path] | None = None,
    params_file: Path | None = None,
    data_shape: Sequence[int] | None = None,
    force: bool = False,
    chunk_size: int = 1024,
) -> dict[str, Any]:
    """Write the observations held in ``source`` (seen through ``channel``) as an observations folder;
    ``source``: an image folder, a saved data set, a ``.safetensors`` file or ``hf:NAME[:SPLIT]``.

    ``inputs`` maps a field of the channel (:meth:`Channel.import_fields`, e.g. ``mask``) to
    ``column:COL``, a folder of images named like the observations, or a ``.safetensors`` file;
    fields not given are read from the source's column or tensor of the same name. ``params_file``
    holds per-sample scalars (CSV or JSON keyed by file name). ``data_shape`` overrides the
    inferred clean-data shape. ``force`` replaces an OUT that diffem wrote. Returns the manifest.
    """
    out = Path(out)
    if chunk_size < 1:
        raise DiffemError(f"chunk size must be >= 1, got {chunk_size}")
    inputs = dict(inputs or {})
    given = [Path(str(v)) for v in inputs.values() if not str(v).startswith("column:")]
    local = None if hub_spec(str(source)) else Path(source).expanduser()  # None: a Hub data set
    check_output(out, force, [local, *given, params_file])
    observed = open_observed(source, column)
    y_in = observed.y()
    y_first = y_in.read(0, 1)
    y_shape = tuple(y_first.shape[1:])
    probe = {n: observed.carried(n) for n in observed_names(observed)}
    shapes = {n: i.shape for n, i in probe.items() if i is not None and i.shape is not None}
    for name, spec in inputs.items():
        text = str(spec)
        if text.endswith(".safetensors") and Path(text).expanduser().is_file():
            shapes[name] = tuple(_tensor_input(Path(text).expanduser(), ImportField(name, ())).shape or ())
    shape, fields = resolve_shape(channel, y_shape, shapes, data_shape)
    by_name = {f.name: f for f in fields}
    unknown = sorted(set(inputs) - set(by_name))
    if unknown:
        raise DiffemError(
            f"channel {channel.name!r} reads no {unknown[0]!r} "
            f"(it reads y and {', '.join(by_name) or 'nothing else'})"
        )
    readers: dict[str, Input] = {}
    if params_file is not None:
        readers |= _params_inputs(read_params_table(params_file), Path(params_file), by_name, observed)
    for f in fields:
        if f.name in inputs:
            readers[f.name] = _field_input(inputs[f.name], f, observed)
        elif f.name not in readers:
            carried = observed.carried(f.name, f)
            if carried is None:
                flag = "--mask DIR" if f.name == "mask" else f"--field {f.name}=..."
                raise DiffemError(
                    f"channel {channel.name!r} needs {f.name!r} ({f.help or 'one per observation'}) from "
                    f"{' or '.join(f.sources)}: pass {flag}"
                )
            readers[f.name] = carried
    n = len(observed)
    for name, r in readers.items():
        if r.rows != n:
            raise DiffemError(
                f"{r.what} holds {r.rows} rows, the observations {n}: one {name} per observation"
            )
    meta = DataMeta.from_shape(
        shape, observed.value_range or (MANIFOLD_RANGE if data_kind(shape) == VECTOR else IMAGE_RANGE)
    )
    lo, hi = meta.range_list()
    value_range = (float(lo), float(hi))
    bound = _y_bound(channel, value_range, y_shape == shape)

    def chunks() -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            y = y_in.read(start, stop).float()
            if tuple(y.shape[1:]) != y_shape:
                raise DiffemError(
                    f"{y_in.what}: rows from {start} have shape {list(y.shape[1:])}, "
                    f"the first {list(y_shape)}"
                )
            check_finite({"y": y}, y_in.what, start)
            outside = (y < bound[0]) | (y > bound[1])
            if bool(outside.any()):
                row = start + int(outside.reshape(len(y), -1).any(dim=1).nonzero()[0, 0])
                raise DiffemError(
                    f"{_row_name(observed, row)} holds values outside the data range {list(value_range)} "
                    "(diffem's scale: 8-bit pixel v is v / 127.5 - 1)"
                )
            obs = {"y": y}
            for name, r in readers.items():
                obs[name] = _check_field(r.read(start, stop), by_name[name], r.what, start)
            if channel.masked_observation:
                _check_masked(channel, obs, observed, start, value_range)
            yield {
                **obs,
                "index": torch.arange(start, stop, dtype=torch.int64),
                **observed.columns(start, stop),
            }

    manifest: dict[str, Any] = {
        "kind": "observations",
        "channel": channel.spec(),
        "source": {
            "spec": observed.spec,
            "n": n,
            "shape": list(y_shape),
            "kind": data_kind(shape),
            "range": list(value_range),
            "imported": {name: r.what for name, r in readers.items()},
        },
        **meta.manifest_entries(),
    }
    if observed.names is not None:
        manifest["files"] = observed.names
    options = {
        "column": column,
        "fields": dict(inputs) or None,
        "params_file": str(params_file) if params_file is not None else None,
        "data_shape": list(data_shape) if data_shape else None,
    }
    done = provenance.step(
        "import",
        inputs=[
            provenance.input_ref(local) if local is not None else {"path": observed.spec},
            *(provenance.input_ref(f) for f in (*given, params_file) if f is not None),
        ],
        channel=channel.spec(),
        params={"source": manifest["source"], **{k: v for k, v in options.items() if v is not None}},
    )
    manifest[provenance.KEY] = provenance.extend(provenance.read_chain(local), then=done)
    row_features = rowmeta.features(observed.columns(0, 1), observed.label_names)
    compact = [f.name for f in fields if f.binary]
    write_dataset(out, chunks(), manifest, force=force, features=row_features, compact=compact)
    return read_manifest(out)


def observed_names(observed: ObservedSource) -> list[str]:
    """The names of the tensors or columns a source holds besides ``y`` (candidate inputs)."""
    if isinstance(observed, DatasetObservedSource):
        skip = {observed.column, "index", *rowmeta.NAME_COLUMNS, rowmeta.LABEL}
        return [c for c in observed.ds.column_names if c not in skip]
    if isinstance(observed, TensorFileSource):
        return [k for k in observed.tensors if k != observed.column]
    return []
