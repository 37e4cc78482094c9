"""``reconstruct``: posterior samples for every observation from a conditional checkpoint.

With ``--png DIR`` the images also go to PNGs: grids of up to :data:`GRID_SIZE` (the default, to
look at), or one file per image (``--png-single``, to feed other tools).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from diffem_cli.core.errors import DiffemError
from diffem_cli.core.runtime import Context, pick_device
from diffem_cli.diffusion.checkpoint import build_model
from diffem_cli.diffusion.sampling import SampleConfig, validate_sample
from diffem_cli.io import provenance, rowmeta
from diffem_cli.io.observations import Observations, save_recon
from diffem_cli.io.store import check_output
from diffem_cli.methods import method_for_checkpoint
from diffem_cli.pipeline.em import check_checkpoint_for, posterior_samples, residual_record
from diffem_cli.pipeline.export import load_model_source

GRID_SIZE = 64
"""Images per ``--png`` grid (8 rows of 8)."""


def reconstruct(
    ckpt_path: Path,
    data_path: Path,
    out: Path,
    *,
    sample: SampleConfig | Mapping[str, Any] | None = None,
    per_observation: int = 1,
    seed: int = 0,
    png_dir: Path | None = None,
    png_single: bool = False,
    device: str | None = None,
    force: bool = False,
    ctx: Context | None = None,
) -> dict[str, Any]:
    """Write ``per_observation`` posterior samples per observation to ``out`` (columns x, index,
    sample, and the observations' ``file_name`` and ``label`` when they have them), and to
    ``png_dir`` as grids (:func:`write_png_grids`), or one PNG each with ``png_single``.

    The checkpoint's own method draws them (:meth:`~diffem_cli.methods.base.Method.posterior`):
    a conditional model samples ``q(x | y)`` directly, a prior by its method's guidance, with the
    sampling settings :func:`checkpoint_sampling` gives for ``sample``.
    """
    if per_observation < 1:
        raise DiffemError(f"--per-observation must be >= 1, got {per_observation}")
    check_output(out, force)
    if png_dir is not None:
        check_output(png_dir, force)
    ckpt = load_model_source(ckpt_path)
    data = Observations(data_path)
    method = method_for_checkpoint(ckpt.meta)
    check_checkpoint_for(ckpt.meta, data, ckpt_path, method)
    method.check(data)
    if png_dir is not None:
        check_png(data.kind)
    cfg = checkpoint_sampling(ckpt.meta, ckpt_path, sample)
    ctx = ctx or Context(0, 1, pick_device(device))
    model = build_model(ckpt)
    xs, idx, rep = [], [], []
    for r in range(per_observation):
        x, _ = posterior_samples(
            method,
            model,
            ckpt.aux,
            data,
            cfg,
            seed_parts=(seed, 1000 + r),
            device=ctx.device,
            label=f"reconstruct {r + 1}/{per_observation}",
            ctx=ctx,
        )
        xs.append(x)
        idx.append(data.index)
        rep.append(torch.full((len(x),), r, dtype=torch.int64))
    x_all = torch.cat(xs)
    meta = {
        "checkpoint": str(ckpt_path),
        "observations": str(data_path),
        "sampler": cfg.sampler,
        "steps": cfg.steps,
        "corrections": cfg.corrections,
        "corrector_tau": cfg.corrector_tau,
        "spacing": cfg.spacing,
        "per_observation": per_observation,
        "seed": seed,
        "data_shape": list(data.shape),
        "data_kind": data.kind,
        "value_range": data.value_range,
        "channel": data.channel.spec(),
        "method": method.name,
        "keep_observed": cfg.keep_observed,
        **residual_record(data, xs[0]),
    }
    done = provenance.step(
        "reconstruct",
        inputs=[
            provenance.input_ref(ckpt_path),
            provenance.input_ref(data_path, fingerprint=data.fingerprint),
        ],
        channel=meta["channel"],
        params={k: meta[k] for k in ("sampler", "steps", "corrections", "per_observation", "seed")},
        method=method.name,
        laps=ckpt.meta.get("lap"),
    )
    chains = (provenance.chain_of(data.manifest), provenance.chain_of(ckpt.meta))
    meta[provenance.KEY] = provenance.extend(*chains, then=done)
    if not ctx.is_main:
        return {"rows": len(x_all), **meta}
    rows = rowmeta.repeat(data.rows, per_observation)  # row k reconstructs observation k % len(data)
    save_recon(
        out,
        x_all,
        torch.cat(idx),
        meta,
        force=force,
        extra={"sample": torch.cat(rep)},
        rows=rows,
        row_features=data.row_features,
    )
    if png_dir is not None:
        files = rows.get(rowmeta.FILE_NAME) or [None] * len(x_all)
        index, draws = torch.cat(idx).tolist(), torch.cat(rep).tolist()
        names = [png_name(i, r, f) for i, r, f in zip(index, draws, files, strict=True)]
        if png_single:
            write_pngs(png_dir, x_all, names, data.data_meta(), force)
        else:
            write_png_grids(png_dir, x_all, index, draws, names, data.data_meta(), force)
    return {"rows": len(x_all), **meta}


def checkpoint_sampling(
    meta: Mapping[str, Any], path: Path, given: SampleConfig | Mapping[str, Any] | None = None
) -> SampleConfig:
    """How to sample a checkpoint: ``given`` itself when it is a SampleConfig; else the settings
    the checkpoint records (one written before they were recorded: its RUN's ``config.yaml``, or
    the defaults), with the keys of ``given`` (the options a user set) over them."""
    if isinstance(given, SampleConfig):
        return given
    known = {f.name for f in dataclasses.fields(SampleConfig)}
    recorded = meta.get("sample") if isinstance(meta.get("sample"), dict) else _run_sampling(Path(path))
    cfg = SampleConfig(**{k: v for k, v in {**recorded, **(given or {})}.items() if k in known})
    validate_sample(cfg)
    return cfg


def _run_sampling(path: Path) -> dict[str, Any]:
    """The ``sample`` section of the RUN a checkpoint file sits in (``RUN/checkpoints/NAME``), or {}."""
    import yaml

    config = path.parent.parent / "config.yaml"
    if path.parent.name != "checkpoints" or not config.is_file():
        return {}
    try:
        section = (yaml.safe_load(config.read_text()) or {}).get("sample")
    except (yaml.YAMLError, AttributeError, UnicodeDecodeError):
        return {}
    return section if isinstance(section, dict) else {}


def png_name(index: int, draw: int | None = None, file_name: str | None = None) -> str:
    """The stem of one ``--png`` file: the observation's index (6 digits), the posterior draw,
    then the source file's name made safe (:func:`~diffem_cli.io.rowmeta.safe_stem`) when the
    observation has one: ``000012_0_cats-tom`` for ``cats/tom.jpg``. The index keeps names unique
    and in observation order."""
    name = f"{index:06d}" + (f"_{draw}" if draw is not None else "")
    return name + (f"_{rowmeta.safe_stem(file_name)}" if file_name else "")


def check_png(kind: str) -> None:
    """``--png`` is refused for vector data before anything is written."""
    if kind != "image":
        raise DiffemError("--png is for image data; vector samples are in the dataset folder")


def write_pngs(png_dir: Path, x: torch.Tensor, names: list[str], data: dict[str, Any], force: bool) -> None:
    """One PNG per image, named ``names[i].png``, into a folder written atomically."""
    from PIL import Image

    from diffem_cli.io.store import atomic_path

    check_png(data["kind"])
    lo, hi = data.get("value_range") or (-1, 1)
    with atomic_path(png_dir, force) as target:
        target.mkdir()
        for xi, name in zip(x, names, strict=True):
            arr = ((xi.clamp(lo, hi) - lo) / (hi - lo) * 255).round().to(torch.uint8)
            arr = arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).numpy()
            Image.fromarray(arr).save(target / f"{name}.png")


def grid_name(first: int, last: int, draw: int) -> str:
    """The stem of one ``--png`` grid: the first and last observation index it shows (6 digits
    each) and the posterior draw, ``000000_000063_draw0``."""
    return f"{first:06d}_{last:06d}_draw{draw}"


def write_png_grids(
    png_dir: Path,
    x: torch.Tensor,
    index: list[int],
    draws: list[int],
    names: list[str],
    data: dict[str, Any],
    force: bool,
) -> None:
    """``x`` as grids of up to :data:`GRID_SIZE` images of one posterior draw each, in row order,
    every tile captioned with its observation's index, into a folder written atomically; the
    title says which observations and draw, the PNG text chunk ``diffem:tiles`` lists each tile's
    single-file name (:func:`png_name`: index, draw and the source file's name)."""
    from diffem_cli.io.store import atomic_path
    from diffem_cli.pipeline import plots

    check_png(data["kind"])
    value_range = tuple(data.get("value_range") or (-1, 1))
    starts = [k for k in range(len(x)) if k == 0 or draws[k] != draws[k - 1]]  # one block per draw
    ends = [*starts[1:], len(x)]
    parts = [
        (a, min(a + GRID_SIZE, e)) for s, e in zip(starts, ends, strict=True) for a in range(s, e, GRID_SIZE)
    ]
    with atomic_path(png_dir, force) as target:
        target.mkdir()
        for a, b in parts:
            first, last, draw = index[a], index[b - 1], draws[a]
            plots.save_tile_grid(
                x[a:b],
                target / f"{grid_name(first, last, draw)}.png",
                captions=[str(i) for i in index[a:b]],
                title=f"reconstructions of observations {first} to {last}, posterior draw {draw}",
                value_range=value_range,
                names=names[a:b],
            )
