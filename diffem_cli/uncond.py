"""The unconditional model: ``train-uncond`` on reconstructions and ``sample`` from it.

``train-uncond RECON RUN`` writes ``RUN/config.yaml``, ``RUN/checkpoints/uncond.safetensors``,
``RUN/metrics.jsonl`` and ``RUN/samples/uncond.png``; it resumes from ``RUN/state/`` after an
interruption, like ``em-train``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from diffem_cli.checkpoint import build_model, save_checkpoint
from diffem_cli.config import RunConfig, SampleConfig, config_from_dict
from diffem_cli.diffusion import SCHEDULE, sample
from diffem_cli.em import Run, _first_difference, load_recon, pick_device
from diffem_cli.errors import DiffemError
from diffem_cli.estep import clip_range_for
from diffem_cli.export import load_model_source
from diffem_cli.nets import build_network
from diffem_cli.progress import progress
from diffem_cli.store import check_output, fingerprint_dataset, write_dataset, write_text_atomic
from diffem_cli.train import train_denoiser


def _data_meta(x: torch.Tensor, manifest: dict[str, Any], path: Path) -> dict[str, Any]:
    shape = list(x.shape[1:])
    kind = "vector" if len(shape) == 1 else "image"
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
    log: Any = print,
) -> Path:
    """Train an unconditional model on reconstructions; returns the checkpoint path."""
    x, manifest = load_recon(recon_path)
    data = _data_meta(x, manifest, recon_path)
    run = Run(run_path)
    ckpt = run.ckpt_dir / "uncond.safetensors"
    cfg_file = run.root / "config.yaml"
    if not run.root.parent.exists():
        raise DiffemError(f"folder {run.root.parent} does not exist")
    if run.root.exists() and any(run.root.iterdir()) and not force:
        if not cfg_file.exists():
            raise DiffemError(f"{run.root} exists and is not a diffem run (use --force or another RUN)")
        diff = _first_difference(
            config_from_dict(yaml.safe_load(cfg_file.read_text()) or {}).to_dict(), cfg.to_dict()
        )
        info = json.loads((run.root / "run.json").read_text()) if (run.root / "run.json").exists() else {}
        if diff or info.get("fingerprint") != data["fingerprint"]:
            raise DiffemError(
                f"{run.root} holds another run ({diff or 'other reconstructions'}); "
                "use another RUN or --force"
            )
        if ckpt.exists():
            log(f"{ckpt} already complete")
            return ckpt
    elif run.root.exists() and force:
        import shutil

        for child in ("checkpoints", "samples", "state", "metrics.jsonl"):  # only what diffem wrote
            p = run.root / child
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    for d in (run.root, run.ckpt_dir, run.samples_dir, run.state.parent):
        d.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cfg_file, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    write_text_atomic(
        run.root / "run.json",
        json.dumps({"recon": str(Path(recon_path).resolve()), "fingerprint": data["fingerprint"]}, indent=2)
        + "\n",
    )
    dev = pick_device(device)
    torch.manual_seed(cfg.seed)
    model = build_network(cfg.network, tuple(data["shape"]), 0)
    result = train_denoiser(
        model,
        x,
        None,
        cfg.train,
        seed=cfg.seed,
        device=dev,
        state_path=run.state,
        tag={"uncond": data["fingerprint"]},
        label="train-uncond",
        on_epoch=lambda info: run.log({"event": "epoch", **info}),
    )
    meta = {
        "kind": "unconditional",
        "network": cfg.network,
        "cond_size": 0,
        "data": data,
        "schedule": SCHEDULE,
        "trained_on": str(recon_path),
        "trained_on_channel": manifest.get("channel"),
        "laps": manifest.get("lap"),
    }
    save_checkpoint(ckpt, result.ema_model, meta)
    run.state.unlink(missing_ok=True)
    run.log({"event": "done", "seconds": result.seconds, "loss": result.last_loss, "steps": result.steps})
    t0 = time.perf_counter()
    preview = sample_tensors(
        result.ema_model, meta, 64 if data["kind"] == "image" else 2048, cfg.sample, seed=cfg.seed, device=dev
    )
    _preview(run.samples_dir / "uncond.png", preview, data)
    log(
        f"train-uncond: {result.steps} steps in {result.seconds:.1f} s, loss {result.last_loss:.4f}; "
        f"preview in {time.perf_counter() - t0:.1f} s"
    )
    return ckpt


@torch.no_grad()
def sample_tensors(
    model: torch.nn.Module,
    meta: dict[str, Any],
    n: int,
    cfg: SampleConfig,
    *,
    seed: int,
    device: torch.device,
) -> torch.Tensor:
    """``n`` unconditional samples, in batches of ``cfg.batch_size``, seeded per batch."""
    from diffem_channels import mix_seed

    data = meta["data"]
    shape = tuple(data["shape"])
    clip = clip_range_for(data["kind"], data.get("value_range"))
    model = model.to(device).eval()
    out = []
    with progress() as bar:
        task = bar.add_task("sample", total=n, info=f"{cfg.sampler}, {cfg.steps} steps")
        for start in range(0, n, cfg.batch_size):
            k = min(cfg.batch_size, n - start)
            gen = torch.Generator().manual_seed(mix_seed(seed, start))
            out.append(
                sample(
                    model,
                    shape,
                    k,
                    None,
                    sampler=cfg.sampler,
                    steps=cfg.steps,
                    generator=gen,
                    clip_range=clip,
                    device=device,
                )
                .float()
                .cpu()
            )
            bar.update(task, advance=k)
    return torch.cat(out)


def _preview(path: Path, x: torch.Tensor, data: dict[str, Any]) -> None:
    from diffem_cli import plots

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
    sample_cfg: SampleConfig | None = None,
    seed: int = 0,
    png_dir: Path | None = None,
    device: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write ``n`` unconditional samples as a datasets folder (column ``x``), and PNGs for images."""
    if n < 1:
        raise DiffemError(f"-n must be >= 1, got {n}")
    check_output(out, force)
    if png_dir is not None:
        check_output(png_dir, force)
    ckpt = load_model_source(ckpt_path)
    if ckpt.meta["kind"] != "unconditional":
        raise DiffemError(f"{ckpt_path} is a conditional model; use 'diffem reconstruct' with observations")
    if png_dir is not None:
        from diffem_cli.reconstruct import check_png

        check_png(ckpt.meta["data"]["kind"])
    cfg = sample_cfg or SampleConfig()
    x = sample_tensors(build_model(ckpt), ckpt.meta, n, cfg, seed=seed, device=pick_device(device))
    data = ckpt.meta["data"]
    manifest = {
        "kind": "samples",
        "checkpoint": str(ckpt_path),
        "sampler": cfg.sampler,
        "steps": cfg.steps,
        "seed": seed,
        "data_shape": data["shape"],
        "data_kind": data["kind"],
        "value_range": data.get("value_range"),
    }
    write_dataset(out, ({"x": x[s : s + 8192]} for s in range(0, n, 8192)), manifest, force=force)
    if png_dir is not None:
        from diffem_cli.reconstruct import write_pngs

        write_pngs(png_dir, x, [f"{i:06d}" for i in range(n)], data, force)
    return manifest
