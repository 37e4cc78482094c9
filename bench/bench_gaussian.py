"""Benchmark lap 0 (``diffem_cli.gaussian``): Gaussian EM fit and the Gaussian start.

* manifold: 16,384 points of the 5-d curve seen through 2x5 random projections (sigma 0.01),
  16 exact EM iterations (full covariance), then one posterior sample per observation;
* digits: the 1,797 8x8 digits behind a pixel mask (rho 0.75, noiseless), the same;
* cifar-like: N smooth random 3x32x32 images behind a mask (rho 0.75, sigma 1e-3), the
  matrix-free path (rank-32 plus diagonal, stochastic EM with CG posterior samples).

Each is timed with 1 and 2 torch threads. Quality: the fitted mean/covariance against the
clean data's, and the RMSE of the starts against the clean data (images: also of zero-filled
observations). Results: bench/results/gaussian.json and bench/results/gaussian.md.

    python bench/bench_gaussian.py                 # cifar-like N = 4096, 4 EM iterations
    python bench/bench_gaussian.py --cifar-n 0     # skip the large-D case
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffem_channels.base import sample_seeds
from diffem_channels.mask import MaskChannel
from diffem_channels.projection import ProjectionChannel
from diffem_cli.gaussian import fit_gaussian, gaussian_start
from diffem_cli.sources import load_source, sample_manifold

HERE = Path(__file__).resolve().parent


def batches(obs: dict[str, torch.Tensor], size: int):
    n = obs["y"].shape[0]
    return lambda: ({k: v[i : i + size] for k, v in obs.items()} for i in range(0, n, size))


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    return math.sqrt(float((x.float() - ref.float()).square().mean()))


def run_case(name, clean, channel, shape, iters, batch, threads, **fit_kw) -> dict:
    torch.set_num_threads(threads)
    n = clean.shape[0]
    obs = channel.corrupt(clean, sample_seeds(0, range(n)))
    t0 = time.perf_counter()
    prior = fit_gaussian(channel, batches(obs, batch), shape, iters=iters, **fit_kw)
    t1 = time.perf_counter()
    start = torch.cat(list(gaussian_start(prior, channel, batches(obs, batch), shape, seed=1)))
    t2 = time.perf_counter()
    flat = clean.reshape(n, -1).double()
    cov = prior.covariance() if prior.dim <= 1024 else None
    row = {
        "case": name,
        "threads": threads,
        "n": n,
        "dim": prior.dim,
        "iters": iters,
        "form": "full" if prior.full else f"rank {prior.factor.shape[1]} + diag",
        "fit_s": round(t1 - t0, 3),
        "start_s": round(t2 - t1, 3),
        "mean_err": round(float((prior.mean.double() - flat.mean(0)).abs().max()), 4),
    }
    if cov is not None:
        emp = torch.cov(flat.T)
        row["cov_rel_err"] = round(
            float(torch.linalg.matrix_norm(cov - emp) / torch.linalg.matrix_norm(emp)), 4
        )
    row["start_rmse"] = round(rmse(start, clean), 4)
    if len(shape) == 3:
        row["zero_fill_rmse"] = round(rmse(channel.At(obs, obs["y"]), clean), 4)
    print(json.dumps(row), flush=True)
    return row


def smooth_images(n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    coarse = torch.randn(n, 3, 4, 4, generator=gen)
    return torch.tanh(F.interpolate(coarse, size=(32, 32), mode="bicubic", align_corners=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cifar-n", type=int, default=4096)
    ap.add_argument("--cifar-iters", type=int, default=4)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()

    manifold = sample_manifold(16384)
    digits = load_source("digits").read(0, 1797)
    rows = []
    for th in args.threads:
        rows.append(run_case("manifold", manifold, ProjectionChannel(m=2, sigma=0.01), (5,), 16, 16384, th))
        rows.append(run_case("digits", digits, MaskChannel(rho=0.75), (1, 8, 8), 16, 1797, th))
        if args.cifar_n:
            rows.append(
                run_case(
                    "cifar-like",
                    smooth_images(args.cifar_n),
                    MaskChannel(rho=0.75, sigma=1e-3),
                    (3, 32, 32),
                    args.cifar_iters,
                    512,
                    th,
                )
            )
    load = os.getloadavg()[0]
    meta = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_1m": load,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "gaussian.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    cols = list(rows[0].keys() | set().union(*map(set, rows)))
    order = ["case", "threads", "n", "dim", "form", "iters", "fit_s", "start_s", "mean_err", "cov_rel_err"]
    cols = order + [c for c in cols if c not in order]
    lines = [
        f"# Gaussian start benchmark ({meta['cpus']} CPUs, 1-min load average {load:.1f} when it ended)",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    (args.results / "gaussian.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
