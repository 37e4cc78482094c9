"""The unconditional model: ``train-uncond`` on reconstructions and ``sample`` from it.

``train-uncond RECON RUN`` writes ``RUN/config.yaml``, ``RUN/run.json``,
``RUN/checkpoints/uncond.safetensors``, ``RUN/metrics.jsonl`` and ``RUN/samples/uncond.png``; it
resumes from ``RUN/state/`` after an interruption, like ``em-train``. It is complete when the
checkpoint, the preview and the ``done`` record all exist.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from diffem_cli.config.run import RunConfig
from diffem_cli.core.errors import DiffemError
from diffem_cli.core.logs import get_logger
from diffem_cli.core.runtime import Context, pick_device
from diffem_cli.core.tracking import Tracking
from diffem_cli.diffusion.checkpoint import build_model, load_checkpoint, save_checkpoint
from diffem_cli.diffusion.compiled import maybe_compile
from diffem_cli.diffusion.nets import build_network
from diffem_cli.diffusion.sampling import SampleConfig, draw_unconditional, sample_tensors
from diffem_cli.diffusion.schedule import SCHEDULE
from diffem_cli.io import provenance
from diffem_cli.io.datameta import data_kind
from diffem_cli.io.observations import load_recon
from diffem_cli.io.store import check_finite, check_output, clean_stale, fingerprint_dataset, write_dataset
from diffem_cli.pipeline.export import load_model_source
from diffem_cli.pipeline.runs import Run


def _data_meta(x: torch.Tensor, manifest: dict[str, Any], path: Path) -> dict[str, Any]:
    shape = list(x.shape[1:])
    kind = data_kind(shape)
    value_range = manifest.get("value_range") or ([-1, 1] if kind == "image" else None)
    return {
        "shape": shape,
        "kind": kind,
        "value_range": value_range,
        "fingerprint": fingerprint_dataset(path),
        "source": manifest.get("source"),
    }


def train_uncond(
    recon_path: Path,
    run_path: Path,
    cfg: RunConfig,
    *,
    device: str | None = None,
    force: bool = False,
    log: Any = get_logger(__name__).info,
    ctx: Context | None = None,
    track: tuple[str, ...] = (),
) -> Path:
    """Train an unconditional model on reconstructions; returns the checkpoint path."""
    from diffem_cli.diffusion.train import train_denoiser
    from diffem_cli.io.lock import hold_lock
    from diffem_cli.pipeline.em import sampling_record

    ctx = ctx or Context(0, 1, pick_device(device))
    x, manifest = load_recon(recon_path)
    check_finite({"x": x}, f"reconstructions {recon_path}")
    data = _data_meta(x, manifest, recon_path)
    run = Run(run_path)
    ckpt = run.ckpt_dir / "uncond.safetensors"
    preview = run.samples_dir / "uncond.png"
    lock = hold_lock(run.root, "train-uncond") if ctx.is_main else contextlib.nullcontext()
    with lock, contextlib.ExitStack() as stack:
        if ctx.is_main:
            if run.root.is_dir():
                clean_stale(run.root, locked=True)
            info = {"recon": str(Path(recon_path).resolve()), "fingerprint": data["fingerprint"]}
            note = run.lacked_note(run.prepare(cfg, info, force), cfg, {"train", "sample", "seed"})
            if note:
                log(note)
            run.redo_broken_checkpoint(ckpt, log)  # done only when the checkpoint verifies
        ctx.barrier()
        done = any(r.get("event") == "done" for r in run.records())
        if done and ckpt.exists() and preview.exists():
            log(f"{ckpt} already complete")
            return ckpt
        # the trackers (main process, RUN/logs): configuration, per-epoch loss and lr, the preview
        names = track if ctx.is_main else ()
        tracking = stack.enter_context(Tracking(names, run.root / "logs", run_name=run.root.name))
        tracking.config(cfg.to_dict())

        def on_epoch(info: dict[str, Any]) -> None:
            run.log({"event": "epoch", **info})
            tracking.scalars({"train/loss": info["loss"], "train/lr": info["lr"]}, info["epoch"])

        if not ckpt.exists():
            torch.manual_seed(cfg.seed)
            model = build_network(cfg.network, tuple(data["shape"]), 0)
            result = train_denoiser(
                model,
                {"x": x},
                cfg.train,
                seed=cfg.seed,
                device=ctx.device,
                state_path=run.state,  # read by every rank, written by the main one
                tag={"uncond": data["fingerprint"]},
                label="train-uncond",
                on_epoch=on_epoch if ctx.is_main else None,
                log=log,
                ctx=ctx,
            )
            examples = result.steps * min(cfg.train.batch_size, len(x))  # full batches only
            summary = {
                "seconds": result.seconds,
                "loss": result.last_loss,
                "steps": result.steps,
                "examples": examples,
            }
            meta = {
                "kind": "unconditional",
                "method": "uncond",
                "network": cfg.network,
                "cond_size": 0,
                "data": data,
                "schedule": SCHEDULE,
                "trained_on": str(recon_path),
                "trained_on_channel": manifest.get("channel"),
                "laps": manifest.get("lap"),
                "train": summary,
                "sample": sampling_record(cfg.sample),
            }
            done = provenance.step(
                "train-uncond",
                inputs=[provenance.input_ref(recon_path, fingerprint=data["fingerprint"])],
                channel=manifest.get("channel"),
                params={"seed": cfg.seed, "config": cfg.to_dict()},
                method="uncond",
                run=run.root,
            )
            meta[provenance.KEY] = provenance.extend(provenance.chain_of(manifest), then=done)
            if ctx.is_main:
                save_checkpoint(ckpt, result.ema_model, meta)
                run.state.unlink(missing_ok=True)
            ctx.barrier()
        loaded = load_checkpoint(ckpt)
        model = build_model(loaded)
        t0 = time.perf_counter()
        n = 64 if data["kind"] == "image" else 2048
        samples = sample_tensors(model, loaded.meta, n, cfg.sample, seed=cfg.seed, device=ctx.device, ctx=ctx)
        summary = loaded.meta.get("train") or {}
        if ctx.is_main:
            _preview(preview, samples, data)
            run.log({"event": "done", **summary})
            tracking.scalars({f"done/{k}": v for k, v in summary.items()}, cfg.train.epochs)
            tracking.image("samples", preview, cfg.train.epochs)
        log(
            f"train-uncond: {summary.get('steps')} steps in {summary.get('seconds', 0):.1f} s, "
            f"loss {summary.get('loss', float('nan')):.4f}; preview in {time.perf_counter() - t0:.1f} s"
        )
    return ckpt


def _preview(path: Path, x: torch.Tensor, data: dict[str, Any]) -> None:
    from diffem_cli.pipeline import plots

    if data["kind"] == "image":
        rows = [x[i : i + 16] for i in range(0, min(len(x), 64), 16)]
        plots.save_image_grid(rows, path, value_range=tuple(data.get("value_range") or (-1, 1)))
    else:
        plots.save_pairwise_scatter({"samples": x}, path)


def sample_unconditional(
    ckpt_path: Path,
    out: Path,
    n: int,
    *,
    sample_cfg: SampleConfig | Mapping[str, Any] | None = None,
    seed: int = 0,
    png_dir: Path | None = None,
    device: str | None = None,
    force: bool = False,
    ctx: Context | None = None,
) -> dict[str, Any]:
    """Write ``n`` unconditional samples as a datasets folder (column ``x``), and PNGs for images,
    with the sampling settings :func:`~diffem_cli.pipeline.reconstruct.checkpoint_sampling` gives
    for ``sample_cfg``."""
    if n < 1:
        raise DiffemError(f"-n must be >= 1, got {n}")
    check_output(out, force)
    if png_dir is not None:
        check_output(png_dir, force)
    ckpt = load_model_source(ckpt_path)
    if ckpt.meta["kind"] == "conditional":
        raise DiffemError(
            f"{ckpt_path} is a {ckpt.meta['kind']} model; use 'diffem reconstruct' with observations"
        )
    from diffem_cli.pipeline.reconstruct import check_png, checkpoint_sampling

    if png_dir is not None:
        check_png(ckpt.meta["data"]["kind"])
    ctx = ctx or Context(0, 1, pick_device(device))
    cfg = checkpoint_sampling(ckpt.meta, ckpt_path, sample_cfg)
    from diffem_cli.methods import method_for_checkpoint
    from diffem_cli.pipeline.accounting import CountingNetwork

    method = method_for_checkpoint(ckpt.meta)  # a method may sample its model its own way
    counter = CountingNetwork(maybe_compile(build_model(ckpt).to(ctx.device).eval(), cfg.compile, ctx.device))
    prior = method.prior(counter, ckpt.meta, seed)
    t0 = time.perf_counter()
    x = draw_unconditional(
        prior.make, ckpt.meta["data"], n, cfg, seed=seed, device=ctx.device, label=prior.label, ctx=ctx
    )
    data = ckpt.meta["data"]
    manifest = {
        "kind": "samples",
        "checkpoint": str(ckpt_path),
        "sampler": cfg.sampler,
        "steps": cfg.steps,
        "corrections": cfg.corrections,
        "corrector_tau": cfg.corrector_tau,
        "spacing": cfg.spacing,
        **counter.totals(ctx),
        "seconds": time.perf_counter() - t0,
        "seed": seed,
        "data_shape": data["shape"],
        "data_kind": data["kind"],
        "value_range": data.get("value_range"),
    }
    done = provenance.step(
        "sample",
        inputs=[provenance.input_ref(ckpt_path)],
        params={k: manifest[k] for k in ("sampler", "steps", "corrections", "seed")} | {"n": n},
        method=ckpt.meta.get("method"),
    )
    manifest[provenance.KEY] = provenance.extend(provenance.chain_of(ckpt.meta), then=done)
    if ctx.is_main:
        write_dataset(out, ({"x": x[s : s + 8192]} for s in range(0, n, 8192)), manifest, force=force)
        if png_dir is not None:
            from diffem_cli.pipeline.reconstruct import write_pngs

            write_pngs(png_dir, x, [f"{i:06d}" for i in range(n)], data, force)
    return manifest
