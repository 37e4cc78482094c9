"""``to-images``: a diffem data folder of images as a ``datasets`` folder with an ``image`` column.

diffem stores images as float arrays on its own scale (``(C, H, W)`` in [-1, 1]), which models read
directly but the Hugging Face dataset viewer cannot show. :func:`to_images` converts any image
folder diffem wrote (observations, ``--clean-out`` data, reconstructions, samples) into a folder
whose ``image`` column is a ``datasets.Image()`` feature holding one PNG per row (8-bit, grey or
RGB, pixel ``v`` from value ``x`` as ``(x - lo) / (hi - lo) * 255`` over the folder's value range,
the inverse of how sources read pixels), beside the ``index``, ``sample``, ``file_name`` and
``label`` columns the folder has.

Observations show what was observed. For a channel that hides entries (``mask``, ``box``),
entries missing in every channel of a pixel are, by ``missing``: ``transparent`` (the default: an
alpha channel, 0 where missing and 255 elsewhere, so the PNG keeps both the observed values and
the mask, and a viewer shows missing pixels as its background, never as dark or grey pixels),
``red`` (opaque pure red, RGB) or ``grey`` (the stored value, 0 on diffem's scale: mid-grey, what
the models see). Observations that are not images of one or three channels (a projection's
vectors) and vector data are refused in one line.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffem_cli.core.errors import DiffemError
from diffem_cli.io import provenance, rowmeta
from diffem_cli.io.datameta import DataMeta
from diffem_cli.io.sources import IMAGE_RANGE
from diffem_cli.io.store import (
    check_apart,
    check_manifest_columns,
    check_output,
    columns,
    read_dataset,
    read_manifest,
    verify_dataset,
    write_dataset,
)

IMAGE_COLUMN = "image"
MISSING = ("transparent", "red", "grey")
"""How ``to_images`` draws the entries an observation does not hold."""
CARRIED = ("index", "sample", *rowmeta.ROW_COLUMNS)
"""Columns copied as they are from the converted folder, when it has them, in this order."""
RED = (255, 0, 0)

Reader = Callable[[int, int], tuple[torch.Tensor, torch.Tensor | None]]
"""Rows ``start:stop`` as images ``(B, C, H, W)`` and, for masked observations, the held entries."""


def _pixels(x: torch.Tensor, value_range: tuple[float, float]) -> np.ndarray:
    """Values on ``value_range`` -> uint8 ``(B, H, W, C)``."""
    lo, hi = value_range
    v = ((x.float().clamp(lo, hi) - lo) / (hi - lo) * 255).round().to(torch.uint8)
    return v.permute(0, 2, 3, 1).numpy()


def _png(arr: np.ndarray) -> bytes:
    """One ``(H, W, C)`` uint8 image (C = 1, 2, 3 or 4: L, LA, RGB, RGBA) as PNG bytes."""
    from PIL import Image

    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[arr.shape[-1]]
    image = Image.fromarray(arr[..., 0] if mode == "L" else arr, mode=mode)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def encode(
    x: torch.Tensor,
    value_range: tuple[float, float],
    held: torch.Tensor | None = None,
    missing: str = "transparent",
) -> list[bytes]:
    """Images ``(B, C, H, W)`` (C = 1 or 3) as PNG bytes; with ``held`` (0/1 like ``x``), the pixels
    missing in every channel drawn as ``missing`` says (see the module's docstring)."""
    pixels = _pixels(x, value_range)
    if held is not None and missing != "grey":
        gone = held.reshape(len(x), -1, *x.shape[-2:]).amax(dim=1).numpy() < 0.5  # (B, H, W)
        if missing == "transparent":
            alpha = np.where(gone, 0, 255).astype(np.uint8)[..., None]
            pixels = np.concatenate([pixels, alpha], axis=-1)
        else:
            if pixels.shape[-1] == 1:
                pixels = np.repeat(pixels, 3, axis=-1)
            pixels = pixels.copy()
            pixels[gone] = RED
    return [_png(p) for p in pixels]


def _image_shape(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 and shape[0] in (1, 3)


def _reader(ds: Any, manifest: dict[str, Any], folder: Path) -> tuple[Reader, str, tuple[int, ...]]:
    """How rows of ``folder`` become images: the reader, the column read and the image shape.
    Vector data, observations that are not images and folders without ``x`` are refused."""
    names = rowmeta.tensor_names(ds.column_names)
    if manifest.get("kind") == "images" or any(_is_image_feature(ds.features[c]) for c in ds.column_names):
        raise DiffemError(f"{folder} already holds images (an Image column); nothing to convert")
    if "x" in names and manifest.get("kind") != "observations":
        shape = tuple(columns(ds, ["x"], 0, 1)["x"].shape[1:])
        if not _image_shape(shape):
            raise DiffemError(
                f"{folder} holds vector data (rows of shape {list(shape)}), not images: to-images "
                "converts image folders only"
            )
        return (lambda a, b: (columns(ds, ["x"], a, b)["x"], None)), "x", shape
    if manifest.get("kind") != "observations":
        raise DiffemError(
            f"{folder} has no column 'x' and is not an observations folder "
            f"(columns: {', '.join(ds.column_names)}): not an image folder diffem wrote"
        )
    from diffem_cli.io.registry import channel_from_spec

    check_manifest_columns(ds, manifest, folder)
    data_shape = tuple(manifest.get("data_shape") or ())
    channel = channel_from_spec(manifest.get("channel") or {})
    y_shape = tuple(columns(ds, ["y"], 0, 1)["y"].shape[1:]) if "y" in names else ()
    if not _image_shape(data_shape) or not _image_shape(y_shape):
        what = "vector data" if len(data_shape) == 1 else "data"
        raise DiffemError(
            f"{folder} holds observations of {what} (y of shape {list(y_shape)} through channel "
            f"{channel.name!r}), not images: to-images converts image folders only"
        )
    masked = bool(getattr(channel, "masked_observation", False)) and y_shape == data_shape

    def read(a: int, b: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        obs = columns(ds, names, a, b)
        return obs["y"], channel.observation_mask(obs) if masked else None

    return read, "y", y_shape


def _is_image_feature(feature: Any) -> bool:
    import datasets

    return isinstance(feature, datasets.Image)


def to_images(
    folder: Path,
    out: Path,
    *,
    missing: str = "transparent",
    force: bool = False,
    chunk_size: int = 256,
) -> dict[str, Any]:
    """Write the images of the diffem data folder ``folder`` to ``out`` as a ``datasets`` folder with
    an ``image`` column (``datasets.Image()``, PNG) and the ``index``, ``sample``, ``file_name`` and
    ``label`` columns ``folder`` has. ``missing`` (``transparent``, ``red``, ``grey``) draws the
    entries an observation does not hold. ``folder`` is verified against its checksum when it has
    one; ``out`` is written atomically and replaced only with ``force`` (and only if diffem wrote
    it). Returns the manifest."""
    import datasets

    folder, out = Path(folder), Path(out)
    if missing not in MISSING:
        raise DiffemError(f"--missing must be one of {', '.join(MISSING)}, got {missing!r}")
    if chunk_size < 1:
        raise DiffemError(f"chunk size must be >= 1, got {chunk_size}")
    check_apart(out, [folder])
    check_output(out, force, [folder])
    ds, found = read_dataset(folder)
    verify_dataset(folder, found)
    if len(ds) == 0:
        raise DiffemError(f"{folder} holds no rows")
    read, column, shape = _reader(ds, found, folder)
    value_range = tuple(found.get("value_range") or IMAGE_RANGE)
    lo, hi = float(value_range[0]), float(value_range[1])
    carried = [c for c in CARRIED if c in ds.column_names]
    features: dict[str, Any] = {IMAGE_COLUMN: datasets.Image(), **{c: ds.features[c] for c in carried}}
    is_obs = found.get("kind") == "observations"

    def chunks() -> Iterator[dict[str, Any]]:
        for start in range(0, len(ds), chunk_size):
            stop = min(start + chunk_size, len(ds))
            x, held = read(start, stop)
            pngs = encode(x, (lo, hi), held, missing)
            chunk: dict[str, Any] = {IMAGE_COLUMN: [{"bytes": b, "path": None} for b in pngs]}
            if carried:
                part = ds.select_columns(carried)[start:stop]
                chunk.update({c: list(part[c]) for c in carried})
            yield chunk

    manifest: dict[str, Any] = {
        "kind": "images",
        "images_of": found.get("kind") or "data",
        "column": column,
        **DataMeta.from_shape(shape, [lo, hi]).manifest_entries(),
        **{k: found[k] for k in ("channel", "method", "lap") if found.get(k) is not None},
    }
    if is_obs:
        manifest["missing"] = missing
    done = provenance.step(
        "to-images",
        inputs=[provenance.input_ref(folder)],
        channel=found.get("channel"),
        params={"missing": missing} if is_obs else {},
    )
    manifest[provenance.KEY] = provenance.extend(provenance.chain_of(found), then=done)
    write_dataset(out, chunks(), manifest, force=force, features=features)
    return read_manifest(out)
