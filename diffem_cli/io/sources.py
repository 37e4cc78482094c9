"""Clean-data sources: built-in sets (manifold, digits), image folders, saved and Hub data sets.

A source yields float32 batches in a fixed order with bounded memory, already on diffem's one
scale: images ``(C, H, W)`` in [-1, 1], manifold vectors ``(n,)`` in [-2, 2]. ``corrupt`` reads
a source once to write observations; evaluation reads one for the clean reference. A source may
also know each sample's file name and label (:meth:`Source.columns`), which ``corrupt`` writes
beside the observations.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffem_cli.core.errors import DiffemError
from diffem_cli.io import rowmeta
from diffem_cli.io.datameta import VECTOR, data_kind
from diffem_cli.io.rowmeta import FILE_NAME, LABEL, RowColumns, check_rows, read_rows, take

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IMAGE_RANGE = (-1.0, 1.0)
MANIFOLD_RANGE = (-2.0, 2.0)
MANIFOLD_DEFAULTS = {"samples": 16384, "n": 5, "seed": 0}
MANIFOLD_TERMS = 10
MANIFOLD_GRID = 10_001
HUB_ENDPOINT = "https://huggingface.co"
HUB_TIMEOUT_S = 3.0  # one connection attempt before any download: offline fails in seconds, not minutes
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


class Source:
    """Clean samples of one shape, read in order, a batch at a time."""

    spec: str = ""
    shape: tuple[int, ...] = ()
    value_range: tuple[float, float] = IMAGE_RANGE
    path: Path | None = None  # the local folder it reads, if any (outputs must stay clear of it)
    label_names: tuple[str, ...] | None = None
    """The class names of integer labels (written as a ``datasets.ClassLabel``), when known."""
    first: int = 0
    """The position of sample 0 in the source it was cut from (:class:`RowRange`): written
    ``index`` columns count from here, so a split keeps each sample's index and seeds."""

    @property
    def kind(self) -> str:
        """``"image"`` for ``(C, H, W)`` samples, ``"vector"`` for ``(n,)``."""
        return data_kind(self.shape)

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Samples ``start:stop`` as one float32 tensor ``(stop - start, *shape)``."""
        raise NotImplementedError

    def columns(self, start: int, stop: int) -> RowColumns:
        """Per-row metadata of samples ``start:stop``: ``file_name`` (str) and ``label`` (int or
        str), each a list of ``stop - start`` values, for the sources that know them; ``{}`` (the
        default) when a source has none. The same keys for every range. See
        :mod:`diffem_cli.io.rowmeta`."""
        return {}

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """All samples in order, ``batch_size`` at a time (the last batch may be smaller)."""
        if batch_size < 1:
            raise DiffemError(f"batch size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield self.read(start, min(start + batch_size, len(self)))

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary recorded in manifests: spec, sample count, shape, kind, value range."""
        return {
            "spec": self.spec,
            "n": len(self),
            "shape": list(self.shape),
            "kind": self.kind,
            "range": list(self.value_range),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, n={len(self)}, shape={self.shape})"


class TensorSource(Source):
    """A source over a tensor already in memory (tests, benchmarks, library use)."""

    def __init__(
        self,
        x: torch.Tensor,
        spec: str = "tensor",
        value_range: tuple[float, float] | None = None,
        *,
        rows: RowColumns | None = None,
        label_names: Sequence[str] | None = None,
    ) -> None:
        self.x = x.detach().float().cpu()
        self.spec = spec
        self.shape = tuple(self.x.shape[1:])
        self.value_range = value_range or (MANIFOLD_RANGE if self.kind == VECTOR else IMAGE_RANGE)
        self.rows = check_rows(rows or {}, len(self.x), f"source {spec}")
        self.label_names = tuple(label_names) if label_names is not None else None

    def __len__(self) -> int:
        return len(self.x)

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.x[start:stop].clone()

    def columns(self, start: int, stop: int) -> RowColumns:
        return take(self.rows, start, stop)


# --- the manifold ------------------------------------------------------------------------------


def manifold_curve(n: int = 5, seed: int = 0) -> Callable[[Any], torch.Tensor]:
    """The random smooth curve ``z in [0, 1] -> x in [-2, 2]^n`` fixed by ``seed`` (randman style).

    ``x_j(z) = sum_k a_jk / k^3 sin(2 pi (k b_jk z + c_jk))`` with ``a, b, c ~ U[0, 1]`` of shape
    ``(n, 10)`` drawn once from ``seed``; each coordinate is min-max scaled to [-2, 2] using its
    extremes on a grid of 10,001 values of ``z``, so the scaling does not depend on the samples.
    """
    if n < 1:
        raise DiffemError(f"manifold dimension n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    a, b, c = (rng.random((n, MANIFOLD_TERMS)) for _ in range(3))
    k = np.arange(1, MANIFOLD_TERMS + 1, dtype=np.float64)

    def raw(z: np.ndarray) -> np.ndarray:
        phase = 2 * math.pi * (k * b[None] * z[:, None, None] + c[None])
        return (a[None] / k**3 * np.sin(phase)).sum(-1)

    grid = raw(np.linspace(0.0, 1.0, MANIFOLD_GRID))
    lo, hi = grid.min(0), grid.max(0)
    scale = np.where(hi > lo, hi - lo, 1.0)

    def curve(z: Any) -> torch.Tensor:
        z = np.asarray(z.detach().cpu().numpy() if isinstance(z, torch.Tensor) else z, dtype=np.float64)
        x = -2.0 + 4.0 * (raw(z.reshape(-1)) - lo) / scale
        return torch.from_numpy(np.clip(x, -2.0, 2.0).astype(np.float32))

    return curve


def sample_manifold(samples: int, n: int = 5, seed: int = 0, draw_seed: int | None = None) -> torch.Tensor:
    """``samples`` points of the curve fixed by ``seed``, at ``z ~ U[0, 1]`` drawn from ``draw_seed``.

    ``draw_seed`` defaults to ``seed + 1``. Held-out clean points of the same curve: same ``seed``,
    another ``draw_seed``. The first ``m`` points never depend on ``samples``.
    """
    draw_seed = seed + 1 if draw_seed is None else draw_seed
    z = np.random.default_rng(draw_seed).random(samples)
    return manifold_curve(n, seed)(z)


class ManifoldSource(Source):
    """The synthetic manifold benchmark's clean points, generated batch by batch."""

    def __init__(self, samples: int, n: int, seed: int, draw_seed: int, spec: str) -> None:
        self.samples, self.n, self.seed, self.draw_seed = samples, n, seed, draw_seed
        self.spec = spec
        self.shape = (n,)
        self.value_range = MANIFOLD_RANGE
        self._curve = manifold_curve(n, seed)
        self._z = np.random.default_rng(draw_seed).random(samples)

    def __len__(self) -> int:
        return self.samples

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self._curve(self._z[start:stop])

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "curve_seed": self.seed, "draw_seed": self.draw_seed}


def _parse_options(text: str, name: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise DiffemError(f"{name} option {item!r} must be written key=value")
        try:
            out[key] = int(value)
        except ValueError:
            raise DiffemError(f"{name} option {key!r} must be an integer, got {value.strip()!r}") from None
    return out


def _manifold(options: str) -> ManifoldSource:
    opts = _parse_options(options, "manifold")
    known = {*MANIFOLD_DEFAULTS, "draw_seed"}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise DiffemError(f"manifold has no option {unknown[0]!r} (options: samples, n, seed, draw_seed)")
    cfg = {**MANIFOLD_DEFAULTS, **opts}
    cfg.setdefault("draw_seed", cfg["seed"] + 1)
    if cfg["samples"] < 1 or cfg["n"] < 1:
        raise DiffemError("manifold options samples and n must be >= 1")
    if cfg["seed"] < 0 or cfg["draw_seed"] < 0:
        raise DiffemError("manifold seeds must be >= 0")
    spec = "manifold:" + ",".join(f"{k}={cfg[k]}" for k in ("samples", "n", "seed", "draw_seed"))
    return ManifoldSource(cfg["samples"], cfg["n"], cfg["seed"], cfg["draw_seed"], spec)


# --- digits ------------------------------------------------------------------------------------


def _digits() -> TensorSource:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.from_numpy(digits.data.astype(np.float32))  # 0..16
    return TensorSource(
        (pixels / 8.0 - 1.0).reshape(-1, 1, 8, 8),
        spec="digits",
        value_range=IMAGE_RANGE,
        rows={LABEL: [int(t) for t in digits.target]},
        label_names=[str(int(t)) for t in digits.target_names],
    )


# --- natural-image patches ---------------------------------------------------------------------

PATCHES_DEFAULTS = {"size": 16, "n": 4096, "seed": 0, "scale": 4}
PATCH_PHOTOS = ("china.jpg", "flower.jpg")  # the photographs scikit-learn ships (load_sample_images)


def _photos(scale: int) -> list[torch.Tensor]:
    """scikit-learn's sample photographs as ``(3, H, W)`` tensors in [-1, 1], each side shrunk
    ``scale`` times by averaging ``scale x scale`` blocks."""
    from sklearn.datasets import load_sample_images

    photos = []
    for image in load_sample_images().images:
        x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
        if scale > 1:
            x = torch.nn.functional.avg_pool2d(x[None], scale)[0]
        photos.append(x.contiguous())
    return photos


def _patches(options: str) -> TensorSource:
    """``patches[:size=16,n=4096,seed=0,scale=4]``: square RGB crops of natural photographs, at
    uniformly drawn positions (photograph, then corner) from a generator seeded by ``seed``."""
    opts = _parse_options(options, "patches")
    unknown = sorted(set(opts) - set(PATCHES_DEFAULTS))
    if unknown:
        raise DiffemError(f"patches has no option {unknown[0]!r} (options: {', '.join(PATCHES_DEFAULTS)})")
    cfg = {**PATCHES_DEFAULTS, **opts}
    if cfg["n"] < 1 or cfg["scale"] < 1 or cfg["seed"] < 0:
        raise DiffemError("patches options n and scale must be >= 1, seed >= 0")
    photos = _photos(cfg["scale"])
    size = cfg["size"]
    smallest = min(min(p.shape[1:]) for p in photos)
    if not 2 <= size <= smallest:
        raise DiffemError(
            f"patches option size must lie in [2, {smallest}] at scale {cfg['scale']}, got {size}"
        )
    g = torch.Generator().manual_seed(cfg["seed"])
    which = torch.randint(len(photos), (cfg["n"],), generator=g)
    out = torch.empty(cfg["n"], 3, size, size)
    for i, k in enumerate(which.tolist()):
        _, h, w = photos[k].shape
        top = int(torch.randint(h - size + 1, (1,), generator=g))
        left = int(torch.randint(w - size + 1, (1,), generator=g))
        out[i] = photos[k][:, top : top + size, left : left + size]
    spec = "patches:" + ",".join(f"{k}={cfg[k]}" for k in PATCHES_DEFAULTS)
    return TensorSource(out, spec=spec, value_range=IMAGE_RANGE)


# --- images ------------------------------------------------------------------------------------


def _to_tensor(
    images: list[Any], mode: str, size: tuple[int, int], where: Callable[[int], str]
) -> torch.Tensor:
    """PIL images -> float32 ``(B, C, H, W)`` in [-1, 1]; every image must have ``size``."""
    arrays = []
    for i, img in enumerate(images):
        if img.size != size:
            raise DiffemError(
                f"{where(i)} is {img.size[0]}x{img.size[1]}, not {size[0]}x{size[1]} like the first image; "
                "resize all images to one size first"
            )
        arr = np.asarray(img.convert(mode) if img.mode != mode else img, dtype=np.uint8)
        arrays.append(arr[..., None] if arr.ndim == 2 else arr)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return (x / 127.5 - 1.0).contiguous()


class ImageFolderSource(Source):
    """Every image file under a folder (sorted by relative path), decoded lazily per batch."""

    def __init__(self, root: Path, spec: str, limit: int | None = None) -> None:
        from PIL import Image, UnidentifiedImageError

        self.root = root
        self.spec = spec
        self.files = sorted(
            (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        self.total = len(self.files)
        self.files = self.files[:limit]  # only the images used need to agree in size
        if not self.files:
            raise DiffemError(f"folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        size, colour = None, False
        for f in self.files:  # headers only: sizes and modes, no pixel decoding
            try:
                with Image.open(f) as img:
                    if size is None:
                        size = img.size
                    elif img.size != size:
                        raise DiffemError(
                            f"image {f} is {img.size[0]}x{img.size[1]}, not {size[0]}x{size[1]} like "
                            f"{self.files[0]}; resize all images to one size first"
                        )
                    colour = colour or img.mode not in _GRAY_MODES
            except (UnidentifiedImageError, OSError) as e:
                raise DiffemError(f"cannot read image {f} ({type(e).__name__})") from None
        assert size is not None
        self.size = size
        self.mode = "RGB" if colour else "L"
        self.shape = (3 if colour else 1, size[1], size[0])
        self.value_range = IMAGE_RANGE

    def __len__(self) -> int:
        return len(self.files)

    def read(self, start: int, stop: int) -> torch.Tensor:
        from PIL import Image

        files = self.files[start:stop]
        images = []
        for f in files:
            with Image.open(f) as img:
                img.load()
                images.append(img)
        return _to_tensor(images, self.mode, self.size, lambda i: f"image {files[i]}")

    def columns(self, start: int, stop: int) -> RowColumns:
        """``file_name``: each file's path relative to the folder (POSIX separators)."""
        return {FILE_NAME: [f.relative_to(self.root).as_posix() for f in self.files[start:stop]]}

    def describe(self) -> dict[str, Any]:
        extra = {"limit": len(self)} if len(self) < self.total else {}
        return {**super().describe(), **extra}


class DatasetSource(Source):
    """A Hugging Face ``Dataset``: an image column, or an array column ``x`` (diffem's clean folders)."""

    def __init__(self, ds: Any, spec: str, manifest: dict[str, Any] | None = None) -> None:
        import datasets

        self.ds = ds
        self.spec = spec
        if len(ds) == 0:
            raise DiffemError(f"{spec} holds no rows")
        feats = ds.features
        image_cols = [c for c in ("image", "img") if c in feats and isinstance(feats[c], datasets.Image)]
        image_cols += [c for c, f in feats.items() if isinstance(f, datasets.Image)]
        if image_cols:
            self.column = image_cols[0]
            first = ds[0][self.column]
            self.mode = "L" if first.mode in _GRAY_MODES else "RGB"
            self.size = first.size
            self.shape = (1 if self.mode == "L" else 3, first.size[1], first.size[0])
            self.value_range = IMAGE_RANGE
        elif "x" in feats:
            self.column = "x"
            self.mode = None
            self.shape = tuple(np.asarray(ds.with_format("numpy", columns=["x"])[0]["x"]).shape)
            if len(self.shape) not in (1, 3):
                raise DiffemError(
                    f"{spec}: column 'x' holds samples of shape {self.shape}, not (n,) or (C, H, W)"
                )
            recorded = (manifest or {}).get("value_range")
            default = MANIFOLD_RANGE if self.kind == VECTOR else IMAGE_RANGE
            self.value_range = tuple(recorded) if recorded else default
        else:
            raise DiffemError(
                f"{spec} has no image column ('image', 'img' or an Image feature) and no array column 'x' "
                f"(columns: {', '.join(ds.column_names)})"
            )
        self.label_names = rowmeta.label_names(ds)

    def __len__(self) -> int:
        return len(self.ds)

    def read(self, start: int, stop: int) -> torch.Tensor:
        from diffem_cli.io.store import columns

        if self.mode is None:
            return columns(self.ds, ["x"], start, stop)["x"].float()
        images = self.ds[start:stop][self.column]
        return _to_tensor(images, self.mode, self.size, lambda i: f"{self.spec} row {start + i}")

    def columns(self, start: int, stop: int) -> RowColumns:
        """``file_name`` from a string column ``file_name``, ``file`` or ``path``, ``label`` from an
        integer, string or ClassLabel column ``label`` (those the data set has)."""
        return check_rows(read_rows(self.ds, start, stop), min(stop, len(self)) - start, self.spec)


class RowRange(Source):
    """Samples ``skip`` to ``skip + limit`` of another source (to its end when ``limit`` is None)."""

    def __init__(self, base: Source, skip: int = 0, limit: int | None = None) -> None:
        self.base = base
        self.skip = min(skip, len(base))
        self.stop = len(base) if limit is None else min(self.skip + limit, len(base))
        self.first = base.first + self.skip
        self.spec = base.spec
        self.shape = base.shape
        self.value_range = base.value_range
        self.path = base.path
        self.label_names = base.label_names

    def __len__(self) -> int:
        return self.stop - self.skip

    def _bounds(self, start: int, stop: int) -> tuple[int, int]:
        return self.skip + start, self.skip + min(stop, len(self))

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.base.read(*self._bounds(start, stop))

    def columns(self, start: int, stop: int) -> RowColumns:
        return self.base.columns(*self._bounds(start, stop))

    def describe(self) -> dict[str, Any]:
        cut = {"skip": self.skip} if self.skip else {}
        return {**self.base.describe(), "n": len(self), **cut, "limit": len(self)}


def _is_saved_dataset(path: Path) -> bool:
    return any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hub host (``HF_ENDPOINT``) opens within ``timeout`` seconds.

    True without trying when a proxy is configured (the proxy decides) or when offline mode is set
    (``datasets`` then reads its local cache and fails fast by itself).
    """
    from urllib.parse import urlparse

    if _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE"):
        return True
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or HUB_ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_spec(spec: str) -> tuple[str, str] | None:
    """``(NAME, SPLIT)`` of a Hub source ``hf:NAME[:SPLIT]`` (split ``train`` when not given), else None."""
    head, _, rest = str(spec).strip().partition(":")
    if head != "hf" or not rest:
        return None
    name, _, split = rest.partition(":")
    return name, split or "train"


def load_hub_dataset(name: str, split: str) -> Any:
    """The ``split`` of the Hub data set ``name`` (a ``datasets.Dataset``), through
    ``datasets.load_dataset``; no connection, an unknown name or split: one line naming ``hf:NAME``.
    ``corrupt`` (:func:`load_source`) and ``import`` both read Hub data through it."""
    if not hub_reachable():
        host = os.environ.get("HF_ENDPOINT") or HUB_ENDPOINT
        raise DiffemError(
            f"could not load hf:{name}: no connection to the Hugging Face Hub ({host}); set HF_HUB_OFFLINE=1 "
            "to read it from the local cache, or save_to_disk it on a connected machine and pass that folder"
        )
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, missing split: all reported as one line
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DiffemError(
            f"could not load hf:{name} split {split!r}: the Hugging Face Hub could not be reached or has no "
            f"such data set ({detail}); save_to_disk it on a connected machine and pass that folder"
        ) from None


def load_source(spec: str, *, limit: int | None = None, skip: int = 0) -> Source:
    """Open a clean-data source by spec (see docs/data.md).

    ``manifold[:samples=16384,n=5,seed=0,draw_seed=1]``, ``digits``,
    ``patches[:size=16,n=4096,seed=0,scale=4]`` (natural-image crops), ``folder:PATH`` or a folder
    path (images, or a ``save_to_disk`` folder), ``hf:NAME[:SPLIT]`` (online). ``skip`` drops
    the first ``skip`` samples and ``limit`` keeps the first ``limit`` of the rest: a train/test
    split of one source, each sample keeping its index (:attr:`Source.first`).
    """
    from diffem_cli.io.store import read_dataset

    spec = str(spec).strip()
    if limit is not None and limit < 1:
        raise DiffemError(f"limit must be >= 1, got {limit}")
    if skip < 0:
        raise DiffemError(f"skip must be >= 0, got {skip}")
    head, _, rest = spec.partition(":")
    source: Source
    if head == "manifold":
        source = _manifold(rest)
    elif spec == "digits":
        source = _digits()
    elif head == "patches":
        source = _patches(rest)
    elif (hub := hub_spec(spec)) is not None:
        source = DatasetSource(load_hub_dataset(*hub), f"hf:{hub[0]}:{hub[1]}")
    else:
        path = Path(rest if head == "folder" and rest else spec).expanduser()
        if not spec or not path.is_dir():
            raise DiffemError(
                f"source {spec!r} not found: not a built-in (manifold, digits, patches), a folder, or hf:NAME"
            )
        if _is_saved_dataset(path):
            ds, manifest = read_dataset(path)
            source = DatasetSource(ds, str(path), manifest)
        else:
            source = ImageFolderSource(path, str(path), None if limit is None else skip + limit)
        source.path = path
    if skip >= len(source):
        raise DiffemError(f"source {spec!r} holds {len(source)} samples: none left after skipping {skip}")
    if skip or (limit is not None and limit < len(source)):
        return RowRange(source, skip, limit)
    return source
