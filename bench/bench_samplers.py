"""Image E-step samplers compared on one trained conditional checkpoint: quality per network pass.

For each sampler variant (sampler, steps, Langevin corrections, where the steps fall), one
posterior sample per observation of the first ``--n`` observations (PSNR and SSIM against the
clean images, Fréchet distance of the reconstructions to the clean set), and ``--k`` samples of
the first ``--k-n`` (PSNR of their mean: what a sampler that collapses toward the mean cannot
fake). The network passes per sample are counted by the sampling loop's formula. Writes
``bench/results/samplers-images.{json,md}``.

    python -m bench.bench_samplers --ckpt RUN/checkpoints/lap_001.safetensors --obs OBS --clean CLEAN
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import machine, write_results
from diffem_cli.diffusion.checkpoint import build_model, load_checkpoint
from diffem_cli.diffusion.sampling import SampleConfig, sample_nfe
from diffem_cli.io.observations import Observations, load_clean
from diffem_cli.methods.registry import method_for_checkpoint
from diffem_cli.metrics.evaluate import evaluate_tensors
from diffem_cli.metrics.images import psnr
from diffem_cli.pipeline.em import posterior_samples

VARIANTS: list[tuple[str, int, int, str]] = [
    ("dpm++", 16, 0, "trailing"),
    ("dpm++", 16, 0, "linspace"),
    ("dpm++", 32, 0, "trailing"),
    ("dpm++", 32, 0, "linspace"),
    ("ddim", 32, 0, "trailing"),
    ("ddpm", 32, 0, "linspace"),
    ("ddpm", 16, 1, "linspace"),
    ("ddpm", 64, 0, "linspace"),
]
"""(sampler, steps, corrections, spacing)."""


def first_rows(data: Observations, n: int) -> Observations:
    """The first ``n`` observations of ``data`` as an Observations object of their own."""
    sub = copy.copy(data)
    sub.obs = {k: v[:n] for k, v in data.obs.items()}
    sub.index = data.index[:n]
    return sub


def run_variant(
    method, model, aux, data, clean, variant, n: int, k: int, k_n: int, seed: int
) -> dict[str, Any]:
    """One variant's scores (module docstring)."""
    sampler, steps, corrections, spacing = variant
    cfg = SampleConfig(sampler=sampler, steps=steps, corrections=corrections, spacing=spacing, batch_size=512)
    one = first_rows(data, n)
    t0 = time.perf_counter()
    x, _ = posterior_samples(
        method, model, aux, one, cfg, seed_parts=(seed, 0), device=torch.device("cpu"), label=f"{variant}"
    )
    seconds = time.perf_counter() - t0
    scores = evaluate_tensors(
        x,
        clean[:n],
        ["psnr", "ssim", "fd_pixels"],
        sample_index=one.index,
        reference_index=one.index,
        value_range=tuple(data.value_range),
    )
    few = first_rows(data, k_n)
    draws = [x[:k_n]] + [
        posterior_samples(
            method, model, aux, few, cfg, seed_parts=(seed, r), device=torch.device("cpu"), label=f"k {r}"
        )[0]
        for r in range(1, k)
    ]
    mean = torch.stack(draws).mean(0)
    return {
        "sampler": sampler,
        "steps": steps,
        "corrections": corrections,
        "spacing": spacing,
        "nfe": sample_nfe(steps, corrections),
        "seconds": seconds,
        **scores,
        f"psnr_mean{k}": psnr(mean, clean[:k_n], tuple(data.value_range)),
        "spread": float(torch.stack(draws).std(0).mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--obs", type=Path, required=True)
    ap.add_argument("--clean", type=Path, required=True)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--k-n", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="samplers-images")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    ckpt = load_checkpoint(args.ckpt)
    data = Observations(args.obs)
    clean = load_clean(args.clean, data)
    method = method_for_checkpoint(ckpt.meta)
    model = build_model(ckpt)
    rows = []
    for variant in VARIANTS:
        rows.append(
            run_variant(method, model, ckpt.aux, data, clean, variant, args.n, args.k, args.k_n, args.seed)
        )
        print(rows[-1], flush=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    info = {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "machine": machine(),
        "load": os.getloadavg()[0],
        "args": {k: str(v) for k, v in vars(args).items()},
        "method": method.name,
        "rows": rows,
    }
    k = args.k
    lines = [
        f"# Image E-step samplers on one checkpoint ({method.name})",
        "",
        f"Date {info['date']}, commit {commit}, {info['machine']['summary']}, "
        f"1-minute load {info['load']:.1f}.",
        f"Command: `python -m bench.bench_samplers --ckpt {args.ckpt} --obs {args.obs} --clean {args.clean} "
        f"--n {args.n} --k {k} --k-n {args.k_n}`.",
        f"One posterior sample of each of the first {args.n} observations (PSNR, SSIM, Fréchet distance of "
        f"pixels to the clean rows); {k} samples of the first {args.k_n} (PSNR of their mean, mean "
        "per-pixel spread). NFE: network passes per sample.",
        "",
        "| sampler | steps | corrections | spacing | NFE | PSNR (dB) | SSIM | FD "
        f"| PSNR of {k}-mean | spread | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sampler']} | {r['steps']} | {r['corrections']} | {r['spacing']} | {r['nfe']} | "
            f"{r['psnr']:.2f} | {r['ssim']:.4f} | {r['fd_pixels']:.4f} | {r[f'psnr_mean{k}']:.2f} | "
            f"{r['spread']:.4f} | {r['seconds']:.1f} |"
        )
    write_results(args.out, args.name, info, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
