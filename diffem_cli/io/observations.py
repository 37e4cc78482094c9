"""Observations and reconstructions on disk, loaded as tensors.

:class:`Observations` is an observations folder (written by ``diffem corrupt``) in memory: its
channel, clean-data shape and observation tensors. :func:`save_recon` / :func:`load_recon`
write and read reconstruction (or clean data) folders.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from diffem_channels import Channel, ChannelError, sample_seeds
from diffem_cli.core.errors import DiffemError
from diffem_cli.io.datameta import DataMeta
from diffem_cli.io.rowmeta import RowColumns, found_columns, read_rows, tensor_names
from diffem_cli.io.store import (
    check_finite,
    check_manifest_columns,
    columns,
    read_dataset,
    verify_dataset,
    write_dataset,
)


class Observations:
    """An observations folder loaded in memory: its channel, data shape and tensors.

    The folder must verify against the checksum ``corrupt`` recorded in its manifest (flipped
    bytes or an edited channel parameter are refused); one without a checksum is refused unless
    the user trusts it (``DIFFEM_TRUST_UNVERIFIED=1``).
    """

    def __init__(self, path: Path):
        from diffem_cli.io.registry import channel_from_spec

        ds, manifest = read_dataset(path)
        if manifest.get("kind") != "observations" or "channel" not in manifest:
            raise DiffemError(f"{path} is not an observations folder written by 'diffem corrupt'")
        self.path = Path(path)
        self.manifest = manifest
        self.channel: Channel = channel_from_spec(manifest["channel"])
        check_manifest_columns(ds, manifest, self.path, channel=self.channel)
        self.fingerprint = verify_dataset(self.path, manifest, required=True)
        self.meta = DataMeta.from_manifest(
            manifest, fingerprint=self.fingerprint, source=manifest.get("source")
        )
        self.shape = self.meta.shape
        self.kind = self.meta.kind
        self.value_range = self.meta.range_list()
        self.obs = columns(ds, tensor_names(ds.column_names))  # never file names or labels
        check_finite(self.obs, f"observations {path}")
        self.index = columns(ds, ["index"])["index"] if "index" in ds.column_names else torch.arange(len(ds))
        self.rows: RowColumns = read_rows(ds)
        """Per-row metadata (``file_name``, ``label``), row ``i`` of observation ``i``; {} when the
        folder has none (written before they were carried, or from a source without them)."""
        self.row_features: dict[str, Any] = {k: ds.features[v] for k, v in found_columns(ds).items()}
        """The ``datasets`` features of :attr:`rows` (a label's ClassLabel), for folders that carry them."""

    def __len__(self) -> int:
        return len(self.index)

    def data_meta(self) -> dict[str, Any]:
        """What a checkpoint records of the data it was trained on (its ``data`` entry)."""
        return self.meta.to_dict()

    def batches(self, size: int = 4096) -> Callable[[], Iterator[dict[str, torch.Tensor]]]:
        """A re-iterable over the observations, ``size`` rows at a time (for the Gaussian fit)."""

        def gen() -> Iterator[dict[str, torch.Tensor]]:
            for s in range(0, len(self), size):
                yield {k: v[s : s + size] for k, v in self.obs.items()}

        return gen


def binary_fields(channel: Channel, shape: tuple[int, ...]) -> tuple[str, ...]:
    """The observation fields ``channel`` declares 0/1 for data ``shape`` (its binary import
    fields, e.g. a mask), which observation folders store compactly (uint8)."""
    try:
        fields = channel.import_fields(tuple(shape))
    except ChannelError:
        return ()
    return tuple(f.name for f in fields if f.binary)


def save_recon(
    path: Path,
    x: torch.Tensor,
    index: torch.Tensor,
    meta: dict[str, Any],
    force: bool = True,
    extra: dict[str, torch.Tensor] | None = None,
    *,
    rows: RowColumns | None = None,
    row_features: dict[str, Any] | None = None,
) -> None:
    """Write reconstructions (columns ``x``, ``index`` and any ``extra``) as a datasets folder,
    with ``rows``, the per-row metadata of their observations (``file_name``, ``label``, one value
    per row of ``x``; their ``datasets`` features in ``row_features``), when there are any."""
    chunk = 8192
    cols: dict[str, Any] = {"x": x, "index": index, **(extra or {}), **(rows or {})}

    def chunks() -> Iterator[dict[str, Any]]:
        for s in range(0, len(x), chunk):
            yield {k: v[s : s + chunk] for k, v in cols.items()}

    feats = {k: v for k, v in (row_features or {}).items() if k in cols}
    write_dataset(path, chunks(), {"kind": "reconstructions", **meta}, force=force, features=feats)


def load_recon(path: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read the ``x`` column of a reconstructions (or clean data) folder, verified against its
    manifest's checksum when it carries one."""
    ds, manifest = read_dataset(path)
    verify_dataset(path, manifest)
    return columns(ds, ["x"])["x"], manifest


def load_clean(
    path: Path, data: Observations, what: str = "--eval-clean", *, paired: bool = True
) -> torch.Tensor:
    """The clean data of the observations (for evaluation or the oracle), row ``i`` the clean
    sample of observation ``i``: paired by the ``index`` column (``corrupt --clean-out`` writes
    it), by position in a folder without one. Refuses a folder whose indices are not exactly
    the observations'. With ``paired=False`` (a reference set for metrics that compare
    distributions, such as a held-out clean set) a folder of other samples comes back as it is."""
    ds, _ = read_dataset(path)
    if "x" not in ds.column_names:
        raise DiffemError(f"{what} {path} has no column 'x' (columns: {', '.join(ds.column_names)})")
    cols = columns(ds, ["x", "index"] if "index" in ds.column_names else ["x"])
    x = cols["x"]
    check_finite({"x": x}, f"{what} {path}")
    if tuple(x.shape[1:]) != data.shape:
        raise DiffemError(
            f"{what} {path} holds data of shape {tuple(x.shape[1:])}, observations are {data.shape}"
        )
    if "index" not in cols:
        if len(x) != len(data) and paired:
            raise DiffemError(
                f"{what} {path} holds {len(x)} rows and no index column, the observations {len(data)}"
            )
        return x
    index = cols["index"].long().reshape(-1)
    order = torch.argsort(index)
    ours = data.index.long().reshape(-1)
    if len(index) != len(ours) or not torch.equal(index[order], torch.sort(ours).values):
        if not paired:
            return x
        raise DiffemError(
            f"{what} {path} holds other indices than the observations ({len(index)} rows against "
            f"{len(ours)}): pass the --clean-out folder of the same 'diffem corrupt'"
        )
    # the k-th observation in index order takes the k-th clean row in index order
    rows = torch.empty_like(order)
    rows[torch.argsort(ours)] = order
    return x[rows]


def recorrupt(
    channel: Channel, x: torch.Tensor, seed: int, lap: int, indices: torch.Tensor, *, chunk_size: int = 1024
) -> dict[str, torch.Tensor]:
    """A fresh corruption of reconstructions ``x`` (samples ``indices``) for EM lap ``lap``.

    Seeds are ``sample_seeds(seed, indices, lap)``: new observations every lap, the same ones
    for the same (seed, lap, index), and never those of the observed data set. Works through
    ``x`` ``chunk_size`` samples at a time (some channels need much scratch memory per sample);
    the result does not depend on ``chunk_size``.
    """
    indices = torch.as_tensor(indices).reshape(-1)
    if len(indices) != len(x):
        raise ValueError(f"recorrupt got {len(x)} samples but {len(indices)} indices")
    parts = [
        channel.corrupt(x[i : i + chunk_size], sample_seeds(seed, indices[i : i + chunk_size], lap))
        for i in range(0, len(x), chunk_size)
    ]
    if len(parts) == 1:
        return parts[0]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
