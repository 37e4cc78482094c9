"""Speed benchmark: E-step samplers (speed against quality) and M-step training throughput.

E-step: posterior reconstructions of every observation with the default sampler (DPM-Solver++
2M, 32 steps) against ancestral DDPM at 256 steps (the official code's sampler), DDIM 32 and
DPM-Solver++ 16/64. Each is timed (samples/s; network evaluations = steps) and scored:

* manifold: the conditional model of ``bench/work/manifold/run/checkpoints/lap_006.safetensors``
  (``bench_manifold``) when present, else one lap of the ``manifold`` preset trained here on
  16,384 observations; Sinkhorn divergence against 4,096 held-out clean points of the curve;
* digits: the last conditional checkpoint of ``bench_digits`` (``bench/work/digits/rho0.75``)
  when present, else skipped; PSNR/SSIM against the paired clean digits, on the first
  ``--digits-n`` observations.

M-step: training examples/s of the manifold MLP (batch 1,024) and the digits UNet (batch 128)
over ``--train-steps`` steps of ``train_denoiser`` (after a short warm-up). Writes
``bench/results/speed.json`` and ``.md``.

    python -m bench.bench_speed [--quick] [--digits-n 512]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import machine, write_results
from diffem_cli.checkpoint import build_model, load_checkpoint
from diffem_cli.config import SampleConfig, load_config
from diffem_cli.corrupt import corrupt_dataset
from diffem_cli.em import Observations, em_train, load_recon, pick_device
from diffem_cli.estep import clip_range_for, posterior_samples
from diffem_cli.evaluate import evaluate_tensors
from diffem_cli.nets import build_network
from diffem_cli.registry import make_channel
from diffem_cli.sources import load_source, sample_manifold
from diffem_cli.store import columns, fingerprint_dataset, read_dataset
from diffem_cli.train import train_denoiser

SAMPLERS = [("dpm++", 32), ("ddpm", 256), ("ddim", 32), ("dpm++", 16), ("dpm++", 64)]
QUICK_SAMPLERS = [("dpm++", 32), ("ddpm", 256)]
MANIFOLD_CKPT = Path("bench/work/manifold/run/checkpoints/lap_006.safetensors")


def manifold_model(work: Path, ckpt_path: Path, quick: bool) -> tuple[Path, Path, str]:
    """A conditional manifold checkpoint and its observations: bench_manifold's, or one lap trained here."""
    obs = ckpt_path.parent.parent.parent / "obs"
    if ckpt_path.exists() and (obs / "diffem.json").exists():
        if load_checkpoint(ckpt_path).meta["data"]["fingerprint"] == fingerprint_dataset(obs):
            return ckpt_path, obs, f"{ckpt_path} (bench_manifold)"
    obs, run = work / "manifold-obs", work / ("manifold-run-quick" if quick else "manifold-run")
    if not (obs / "diffem.json").exists():
        corrupt_dataset(
            load_source("manifold"), make_channel("projection", {}), obs, seed=0, force=True, progress=False
        )
    sets = ["train.epochs=12"] if quick else []
    em_train(obs, run, load_config("manifold", sets), laps=1, log=lambda s: print(s, flush=True))
    steps = "200" if quick else "2,000"
    return run / "checkpoints" / "lap_001.safetensors", obs, f"one lap ({steps} steps) trained by bench_speed"


class CountCalls(torch.nn.Module):
    """Wraps a network and counts its forward calls (network evaluations)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, *args: Any) -> torch.Tensor:
        self.calls += 1
        return self.inner(*args)


def digits_model(work: Path) -> tuple[Path, Path, Path] | None:
    """bench_digits' last conditional checkpoint for rho 0.75, its observations and clean digits."""
    ckpts = sorted((work / "run" / "checkpoints").glob("lap_*.safetensors"))
    if (
        not ckpts
        or not (work / "obs" / "diffem.json").exists()
        or not (work / "clean" / "diffem.json").exists()
    ):
        return None
    return ckpts[-1], work / "obs", work / "clean"


def time_samplers(
    ckpt_path: Path,
    obs_path: Path,
    samplers: list[tuple[str, int]],
    score: Any,
    limit: int | None,
    batch_size: int,
) -> list[dict[str, Any]]:
    """Posterior samples of (the first ``limit``) observations with each sampler: speed and ``score``.

    ``nfe`` counts the network evaluations per sample (calls per batch)."""
    dev = pick_device(None)
    data = Observations(obs_path)
    obs = {k: v[:limit] for k, v in data.obs.items()}
    index = data.index[:limit]
    model = CountCalls(build_model(load_checkpoint(ckpt_path)))
    clip = clip_range_for(data.kind, data.value_range)
    warm = {k: v[:256] for k, v in obs.items()}  # first-call overheads stay out of the timings
    posterior_samples(
        model,
        data.channel,
        warm,
        data.shape,
        SampleConfig(steps=2),
        seed=0,
        device=dev,
        clip_range=clip,
        label="warm-up",
    )
    rows = []
    for sampler, steps in samplers:
        cfg = SampleConfig(sampler=sampler, steps=steps, batch_size=batch_size)
        model.calls = 0
        t0 = time.perf_counter()
        x = posterior_samples(
            model,
            data.channel,
            obs,
            data.shape,
            cfg,
            seed=0,
            device=dev,
            clip_range=clip,
            label=f"{sampler} {steps}",
        )
        seconds = time.perf_counter() - t0
        row = {
            "sampler": sampler,
            "steps": steps,
            "nfe": model.calls / -(-len(x) // batch_size),
            "n": len(x),
            "seconds": seconds,
            "samples_per_s": len(x) / seconds,
            **score(x, index),
        }
        print(row, flush=True)
        rows.append(row)
    return rows


def mstep_speed(preset: str, channel: str, shape: tuple[int, ...], batch: int, steps: int) -> dict[str, Any]:
    """Training examples/s of ``preset``'s conditional network (for ``channel``) at ``batch`` over
    ``steps`` steps of ``train_denoiser``, on random inputs (speed does not depend on them)."""
    dev = pick_device(None)
    cfg = load_config(preset)
    cond_size = make_channel(channel, {}).cond_size(shape)
    torch.manual_seed(0)
    model = build_network(cfg.network, shape, cond_size)
    gen = torch.Generator().manual_seed(0)
    cond_shape = (cond_size, *shape[1:])
    out: dict[str, Any] = {"preset": preset, "channel": channel, "batch_size": batch, "steps": steps}
    for phase, n_steps in (("warmup", 3), ("timed", steps)):
        n = batch * n_steps
        x = torch.randn((n, *shape), generator=gen).clamp(-1, 1)
        cond = torch.randn((n, *cond_shape), generator=gen)
        train = dataclasses.replace(cfg.train, batch_size=batch, epochs=1)
        result = train_denoiser(model, x, cond, train, seed=0, device=dev, label=f"{preset} M-step ({phase})")
        if phase == "timed":
            out.update(
                {
                    "seconds": result.seconds,
                    "examples_per_s": result.steps * batch / result.seconds,
                    "steps_per_s": result.steps / result.seconds,
                }
            )
    print(out, flush=True)
    return out


def markdown(result: dict[str, Any]) -> str:
    """Sampler tables (speed and quality) and M-step throughput."""
    lines = [
        "# Speed benchmark: E-step samplers and M-step throughput",
        "",
        f"Machine: {result['machine']['summary']} "
        f"({result['machine']['torch_threads']} torch thread(s), "
        f"1-min load average {result['load_avg_1m']:.1f} at the end; "
        "timings on a shared machine are upper bounds)",
        "",
        f"## E-step on the manifold ({result['manifold']['n']:,} observations)",
        "",
        f"Model: {result['manifold']['model']}. Sinkhorn divergence against 4,096 held-out clean points "
        "(lower is better).",
        "",
        "| sampler | steps (NFE) | samples/s | seconds | Sinkhorn |",
        "|---|---|---|---|---|",
    ]
    for r in result["manifold"]["rows"]:
        lines.append(_speed_cells(r) + f"{r['sinkhorn']:.3f} |")
    digits = result.get("digits")
    lines += ["", "## E-step on digits", ""]
    if digits is None:
        lines.append("Skipped: no bench_digits conditional checkpoint under bench/work/digits.")
    else:
        lines += [
            f"Model: {digits['model']} ({digits['n']:,} observations). PSNR/SSIM of one posterior sample "
            "against its clean digit.",
            "",
            "| sampler | steps (NFE) | samples/s | seconds | PSNR (dB) | SSIM |",
            "|---|---|---|---|---|---|",
        ]
        for r in digits["rows"]:
            lines.append(_speed_cells(r) + f"{r['psnr']:.2f} | {r['ssim']:.3f} |")
    lines += [
        "",
        "## M-step throughput",
        "",
        "| network | batch | steps | examples/s | steps/s |",
        "|---|---|---|---|---|",
    ]
    for r in result["mstep"]:
        lines.append(
            f"| {r['preset']} | {r['batch_size']} | {r['steps']} | {r['examples_per_s']:,.0f} | "
            f"{r['steps_per_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _speed_cells(r: dict[str, Any]) -> str:
    return f"| {r['sampler']} | {r['nfe']:.0f} | {r['samples_per_s']:,.0f} | {r['seconds']:.1f} | "


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: two samplers, 4,096 manifold and 128 digits observations, 10 training steps",
    )
    ap.add_argument("--manifold-ckpt", type=Path, default=MANIFOLD_CKPT)
    ap.add_argument("--digits-work", type=Path, default=Path("bench/work/digits/rho0.75"))
    ap.add_argument("--digits-n", type=int, default=512, help="digits observations per sampler")
    ap.add_argument("--train-steps", type=int, default=50)
    ap.add_argument("--work", type=Path, default=Path("bench/work/speed"))
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    samplers = QUICK_SAMPLERS if args.quick else SAMPLERS
    train_steps = 10 if args.quick else args.train_steps
    result: dict[str, Any] = {"machine": machine()}

    ckpt, obs, desc = manifold_model(args.work, args.manifold_ckpt, args.quick)
    curve_seed = int(Observations(obs).manifest.get("source", {}).get("curve_seed", 0))
    heldout = sample_manifold(4096, 5, curve_seed, draw_seed=10_000 + curve_seed)
    n = 4096 if args.quick else None
    batch = load_config("manifold").sample.batch_size
    rows = time_samplers(
        ckpt, obs, samplers, lambda x, _: evaluate_tensors(x, heldout, ["sinkhorn"]), n, batch
    )
    result["manifold"] = {"model": desc, "checkpoint": str(ckpt), "n": rows[0]["n"], "rows": rows}

    found = digits_model(args.digits_work)
    if found is None and args.quick:
        found = digits_model(Path("bench/work/digits-quick/rho0.75"))
    if found is not None:
        d_ckpt, d_obs, d_clean = found
        clean, manifest = load_recon(d_clean)
        clean_index = columns(read_dataset(d_clean)[0], ["index"])["index"]
        vr = tuple(manifest.get("value_range") or (-1.0, 1.0))

        def psnr(x: torch.Tensor, index: torch.Tensor) -> dict[str, float]:
            return evaluate_tensors(
                x, clean, ["psnr", "ssim"], sample_index=index, reference_index=clean_index, value_range=vr
            )

        d_batch = load_config("digits").sample.batch_size
        d_n = min(128 if args.quick else args.digits_n, len(clean))
        d_rows = time_samplers(d_ckpt, d_obs, samplers, psnr, d_n, d_batch)
        result["digits"] = {"model": str(d_ckpt), "n": d_rows[0]["n"], "rows": d_rows}

    result["mstep"] = [
        mstep_speed("manifold", "projection", (5,), 1024, train_steps),
        mstep_speed("digits", "mask", (1, 8, 8), 128, train_steps),
    ]
    result["load_avg_1m"] = os.getloadavg()[0]
    text = markdown(result)
    write_results(args.out, "speed-quick" if args.quick else "speed", result, text)
    print(text)


if __name__ == "__main__":
    main()
