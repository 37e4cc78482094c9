"""Corrupt a clean source through a channel into an observations folder, reproducibly.

Sample ``i`` is corrupted with seed ``mix_seed(seed, i)`` alone, so the output does not depend
on the chunk size and the same seed gives byte-identical folders. Work streams chunk by chunk:
memory stays bounded by one chunk however large the source. ``recorrupt`` draws the EM
M-step's fresh corruption of reconstructions with per-lap seeds from the same channel.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from diffem_channels.base import Channel, ChannelError, sample_seeds
from diffem_cli.core.errors import DiffemError
from diffem_cli.io import provenance, rowmeta
from diffem_cli.io.datameta import IMAGE, VECTOR, DataMeta
from diffem_cli.io.observations import binary_fields
from diffem_cli.io.rowmeta import NOT_TENSORS
from diffem_cli.io.sources import Source
from diffem_cli.io.store import check_apart, check_output, columns, read_dataset, read_manifest, write_dataset

PREVIEW_IMAGES = 16
PREVIEW_POINTS = 4096


def _check_outputs(
    out: Path, clean_out: Path | None, preview: Path | None, force: bool, source: Path | None = None
) -> None:
    paths = [Path(p).resolve() for p in (out, clean_out, preview) if p is not None]
    if len(set(paths)) != len(paths):
        raise DiffemError("the output, --clean-out and --preview paths must all differ")
    check_output(out, force, [source])
    if clean_out is not None:
        check_output(clean_out, force, [source])
        check_apart(clean_out, [out], "output")
    if preview is not None:
        check_output(preview, force, [source], kind="file")
        check_apart(preview, [out, clean_out], "output")
        if Path(preview).suffix.lower() != ".png":
            raise DiffemError(f"preview {preview} must be a .png file")
        if Path(preview).is_dir():
            raise DiffemError(f"preview {preview} is a folder")


class _Preview:
    """Keeps the first few clean samples and observations while the data stream past."""

    def __init__(self, kind: str) -> None:
        self.limit = PREVIEW_IMAGES if kind == IMAGE else PREVIEW_POINTS
        self.clean: list[torch.Tensor] = []
        self.obs: list[dict[str, torch.Tensor]] = []
        self.held = 0

    def add(self, x: torch.Tensor, obs: dict[str, torch.Tensor]) -> None:
        take = self.limit - self.held
        if take > 0:
            self.clean.append(x[:take].clone())
            self.obs.append({k: v[:take].clone() for k, v in obs.items()})
            self.held += len(self.clean[-1])

    def write(self, path: Path, channel: Channel, source: Source) -> None:
        from diffem_cli.pipeline import plots

        x = torch.cat(self.clean)
        obs = {k: torch.cat([o[k] for o in self.obs]) for k in self.obs[0]}
        y = obs["y"]
        if source.kind == VECTOR:
            plots.save_pairwise_scatter(
                {"clean x": x, f"observation y ({channel.name})": y.reshape(len(y), -1)},
                path,
                dims=(0, 1),
                lim=None,
            )
            return
        rows, labels, held = [x], ["clean"], [None]
        if y.dim() == 4:
            seen = plots.observation_row(channel, obs, source.shape)  # which entries y holds
            rows.append(y)
            labels.append(f"{channel.name} y")
            held.append(seen[1] if seen is not None else None)
        else:
            try:
                rows.append(channel.start(obs, source.shape))
                labels.append(f"{channel.name} start")
            except ChannelError:
                pass
        plots.save_image_grid(rows, path, labels=labels, value_range=source.value_range, observed=held)


def corrupt_dataset(
    source: Source,
    channel: Channel,
    out: Path,
    *,
    seed: int = 0,
    clean_out: Path | None = None,
    preview: Path | None = None,
    force: bool = False,
    chunk_size: int = 1024,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``channel``'s observations of every sample of ``source`` to the folder ``out``.

    Columns: the channel's observation tensors plus ``index`` (int64: the sample's position in
    the source, counted from :attr:`Source.first`, which also seeds its corruption) and the
    source's per-row metadata (:meth:`Source.columns`: ``file_name``, ``label``) when it has any.
    The manifest (``kind: observations``) records the channel spec, seed and source.
    ``clean_out`` also writes the clean samples (columns ``x``, ``index`` and the same metadata;
    ``kind: clean``); ``preview`` a PNG of the first examples. Inputs and outputs are checked
    before anything is written. Returns the manifest.
    """
    from diffem_cli.core.progress import progress as progress_display

    out = Path(out)
    clean_out = Path(clean_out) if clean_out is not None else None
    preview = Path(preview) if preview is not None else None
    if chunk_size < 1:
        raise DiffemError(f"chunk size must be >= 1, got {chunk_size}")
    channel.check_data(tuple(source.shape))
    common = {
        "seed": seed,
        "source": source.describe(),
        **DataMeta.from_shape(source.shape, source.value_range).manifest_entries(),
    }
    # a rerun after a kill between the clean folder and the observations reuses the clean folder
    reuse = clean_out is not None and not force and not out.exists() and _same_clean(clean_out, common)
    _check_outputs(out, None if reuse else clean_out, preview, force, getattr(source, "path", None))
    if len(source) == 0:
        raise DiffemError(f"source {source.spec!r} holds no samples")
    first = source.first  # the index of sample 0: a cut of a larger source keeps its indices
    trial = channel.corrupt(source.read(0, 1), sample_seeds(seed, [first]))  # fail here, not mid-way
    if "y" not in trial or set(trial) & set(NOT_TENSORS):
        reserved = ", ".join(map(repr, NOT_TENSORS))
        raise DiffemError(f"channel {channel.name!r} must return a 'y' and no {reserved} observation")
    row_features = rowmeta.features(source.columns(0, 1), source.label_names)

    n = len(source)
    local = getattr(source, "path", None)
    done = provenance.step(
        "corrupt",
        inputs=[provenance.input_ref(local) if local is not None else {"path": source.spec}],
        channel=channel.spec(),
        params={"seed": seed, "source": common["source"]},
    )
    chain = {provenance.KEY: provenance.extend(provenance.read_chain(local), then=done)}
    keep = _Preview(source.kind) if preview is not None else None
    wrote_clean = False
    with progress_display(transient=True) as bar:
        show = progress and not bar.disable
        try:
            stream: Iterator[tuple[int, torch.Tensor]]
            if reuse and clean_out is not None:
                stream = _chunks_from_folder(clean_out, chunk_size)
            elif clean_out is not None:
                task = bar.add_task("clean data", total=n, info="") if show else None

                def clean_chunks() -> Iterator[dict[str, Any]]:
                    for start, x in _chunks(source, chunk_size):
                        indices = torch.arange(first + start, first + start + len(x), dtype=torch.int64)
                        yield {"x": x, "index": indices, **source.columns(start, start + len(x))}
                        if task is not None:
                            bar.advance(task, len(x))

                clean_manifest = {"kind": "clean", **common, **chain}
                write_dataset(clean_out, clean_chunks(), clean_manifest, force=force, features=row_features)
                wrote_clean = True
                stream = _chunks_from_folder(clean_out, chunk_size)
            else:
                stream = _chunks(source, chunk_size)
            task = bar.add_task(f"corrupt ({channel.name})", total=n, info="") if show else None

            def observation_chunks() -> Iterator[dict[str, Any]]:
                for start, x in stream:
                    indices = torch.arange(first + start, first + start + len(x), dtype=torch.int64)
                    obs = channel.corrupt(x, sample_seeds(seed, indices))
                    if keep is not None:
                        keep.add(x, obs)
                    yield {**obs, "index": indices, **source.columns(start, start + len(x))}
                    if task is not None:
                        bar.advance(task, len(x))

            manifest = {"kind": "observations", "channel": channel.spec(), **common, **chain}
            compact = binary_fields(channel, tuple(source.shape))
            write_dataset(
                out, observation_chunks(), manifest, force=force, features=row_features, compact=compact
            )
        except BaseException:
            if wrote_clean and clean_out is not None:
                shutil.rmtree(clean_out, ignore_errors=True)
            raise
    if keep is not None and preview is not None:
        keep.write(preview, channel, source)
    return read_manifest(out)


def _same_clean(path: Path, common: dict[str, Any]) -> bool:
    """Whether ``path`` is a complete clean folder that this very command wrote before."""
    if not (Path(path) / "diffem.json").is_file():
        return False
    try:
        manifest = read_manifest(path)
    except DiffemError:
        return False
    wanted = json.loads(json.dumps({"kind": "clean", **common}, default=str))
    return all(manifest.get(k) == v for k, v in wanted.items())


def _chunks(source: Source, chunk_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    start = 0
    for x in source.batches(chunk_size):
        yield start, x
        start += len(x)


def _chunks_from_folder(path: Path, chunk_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """The clean samples just written to ``path``, read back memory-mapped (one decode per image)."""
    ds, _ = read_dataset(path)
    for start in range(0, len(ds), chunk_size):
        yield start, columns(ds, ["x"], start, start + chunk_size)["x"]
