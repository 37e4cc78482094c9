"""Benchmark covariance shrinkage for the Gaussian conditioning feature: the feature on the rows it
was fitted to against rows it has never seen.

For each data set, a Gaussian is fitted to clean training rows (what the oracle's M-step fits; a
DiffEM M-step fits its reconstructions the same way), its covariance shrunk toward the stationary
target by a fixed amount or by the cross-validated one (``auto``), and its posterior mean is scored
under a fresh mask (rho 0.5) on the training rows and on held-out rows: PSNR over [-1, 1] (images
clamped, one MSE over all pixels) and ``sigma``, the root mean square error on the missing
entries, which is what ``cond.residual`` measures on the training rows. A feature that is far
better on its own rows than on new ones tells the residual a ``sigma`` too small.

    python -m bench.bench_shrinkage
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from diffem_channels.base import sample_seeds
from diffem_channels.mask import MaskChannel
from diffem_cli.gaussian.moments import fit_moments
from diffem_cli.gaussian.posterior import posterior_mean
from diffem_cli.gaussian.shrinkage import apply_shrinkage, choose_shrinkage
from diffem_cli.io.sources import load_source

HERE = Path(__file__).resolve().parent
AMOUNTS = ("off", "0.1", "0.3", "0.5", "0.85", "1", "auto")
HELD = 300


def data_sets() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Training and held-out clean rows of each case."""
    held = load_source("patches:size=16,n=300,seed=100").read(0, HELD)
    out = {
        f"patches16 n={n}": (load_source(f"patches:size=16,n={n},seed=0").read(0, n), held)
        for n in (1024, 4096)
    }
    digits = load_source("digits").read(0, 1797)
    out["digits n=1497"] = (digits[:-HELD], digits[-HELD:])
    return out


def score(prior: Any, x: torch.Tensor, seed: int) -> tuple[float, float]:
    """PSNR of the posterior mean and rms error on the missing entries, under a fresh mask."""
    ch = MaskChannel(rho=0.5)
    obs = ch.corrupt(x, sample_seeds(seed, range(len(x))))
    mean = posterior_mean(prior, ch, obs, tuple(x.shape[1:])).double()
    xd = x.double()
    miss = (1 - obs["mask"].double()).expand_as(xd)
    sigma = math.sqrt(float(((xd - mean) ** 2 * miss).sum() / miss.sum()))
    psnr = 10 * math.log10(4.0 / float((mean.clamp(-1, 1) - xd).square().mean()))
    return round(psnr, 2), round(sigma, 4)


def run(amounts: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = []
    for name, (train, held) in data_sets().items():
        shape = tuple(train.shape[1:])
        prior = fit_moments(train, full_max_dim=10**6)
        for amount in amounts:
            timing: list[float] = []

            def choose(train=train, shape=shape, timing=timing) -> float:
                t0 = time.perf_counter()
                value = choose_shrinkage(train, shape)
                timing.append(time.perf_counter() - t0)
                return value

            shrunk, value = apply_shrinkage(prior, shape, "setting", amount, choose)
            psnr_in, sigma_in = score(shrunk, train, 1)
            psnr_held, sigma_held = score(shrunk, held, 2)
            row = {
                "data": name,
                "dim": math.prod(shape),
                "setting": amount,
                "amount": value,
                "psnr_train": psnr_in,
                "psnr_heldout": psnr_held,
                "sigma_train": sigma_in,
                "sigma_heldout": sigma_held,
                "choose_s": round(timing[0], 2) if timing else None,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


COLUMNS = (
    "data",
    "dim",
    "setting",
    "amount",
    "psnr_train",
    "psnr_heldout",
    "sigma_train",
    "sigma_heldout",
    "choose_s",
)


def main() -> None:
    from bench.common import machine, write_results

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
    ).stdout.strip()
    load_before = round(os.getloadavg()[0], 2)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = run(AMOUNTS)
    mach = machine()
    data = {
        "name": "feature-shrinkage",
        "date": started,
        "commit": commit,
        "machine": mach,
        "load": {"before": load_before, "after": round(os.getloadavg()[0], 2)},
        "command": "python -m bench.bench_shrinkage",
        "rows": rows,
    }
    lines = [
        "# Shrinking the conditioning feature's covariance",
        "",
        f"{started}, commit {commit}, {mach['summary']}, load {load_before} before and "
        f"{data['load']['after']} after. Written by `python -m bench.bench_shrinkage`.",
        "",
        "A Gaussian fitted to clean training rows, its covariance shrunk toward the stationary target",
        "(`setting`: a fixed amount, `off`, or `auto`, chosen by 5-fold cross-validated likelihood;",
        "`amount`: the amount used), scored by its posterior mean under a fresh 50% mask: PSNR over",
        "[-1, 1] and `sigma`, the rms error on the missing entries, on the training rows and on",
        f"{HELD} held-out rows (patches: another draw of positions, seed 100; digits: the last {HELD}).",
        "`choose_s`: seconds for the cross-validation.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join("" if r[c] is None else str(r[c]) for c in COLUMNS) + " |" for r in rows]
    write_results(args.results, "feature-shrinkage", data, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
