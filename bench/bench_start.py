"""Benchmark the quality of lap 0 (the Gaussian start) on real images, against a Gaussian with the
full covariance of clean images and against the observations themselves.

Each case fits ``fit_gaussian`` to ``n`` observations (channel seed 0, rank 64, ``--iters``, the
low-rank path's residual ``--residual``, the full covariance's shrinkage ``--shrinkage``) and
draws one ``gaussian_start`` sample per observation; it reports PSNR (peak-to-peak 2, images
clamped to [-1, 1]) of that sample and of the posterior mean over all observations, and, on the
first 512, the same for two full Gaussians (dense float64 posteriors; only for ``D <= 3072``):
one fitted to those clean images themselves (in-sample, so optimistic: with ``n`` near ``D`` it
partly memorises them) and one fitted to as many other clean images of the same source, the best
a Gaussian prior can do on images it has not seen. The observation's own PSNR is the
zero-filled ``A^T y`` for masks and ``y`` for blurs. Rows merge into ``gaussian-start.json``
keyed by case, source seed and ``--label``, so the same script run on two commits gives a
before/after table.

    python -m bench.bench_start --cases p16blur p16mask --label after
    python -m bench.bench_start --cases p16blur --source-seed 1 --label after
    python -m bench.bench_start --cases p16mask p32mask --residual pixel --label pixel
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
from diffem_channels.blur import BlurChannel
from diffem_channels.mask import MaskChannel
from diffem_cli.gaussian.fit import choose_start_shrinkage, fit_gaussian, gaussian_start
from diffem_cli.gaussian.operators import operator_matrix
from diffem_cli.gaussian.posterior import posterior_mean
from diffem_cli.gaussian.prior import GaussianPrior
from diffem_cli.gaussian.shrinkage import apply_shrinkage
from diffem_cli.io.sources import load_source

HERE = Path(__file__).resolve().parent
CASES = {
    "p16mask": ("patches:size=16,n={n},seed={s}", lambda: MaskChannel(rho=0.5), "mask rho 0.5"),
    "p16blur": (
        "patches:size=16,n={n},seed={s}",
        lambda: BlurChannel(sigma=1.5, noise_sigma=0.05),
        "blur 1.5 + noise 0.05",
    ),
    "p16blur0": ("patches:size=16,n={n},seed={s}", lambda: BlurChannel(sigma=1.5), "blur 1.5, noiseless"),
    "dblur": ("digits", lambda: BlurChannel(sigma=1.0, noise_sigma=0.05), "blur 1 + noise 0.05"),
    "dmask": ("digits", lambda: MaskChannel(rho=0.5), "mask rho 0.5"),
    "p32blur": (
        "patches:size=32,n={n},seed={s}",
        lambda: BlurChannel(sigma=1.0, noise_sigma=0.05),
        "blur 1 + noise 0.05",
    ),
    "p32mask": ("patches:size=32,n={n},seed={s}", lambda: MaskChannel(rho=0.5), "mask rho 0.5"),
}
REF_ROWS = 512
# the held-out clean Gaussian is fitted to as many clean images drawn with this seed offset
HELD_OUT_SEED = 100


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    return round(10 * math.log10(4.0 / float((x.clamp(-1, 1) - ref).square().mean())), 2)


def run_case(
    case: str,
    n: int,
    source_seed: int,
    iters: int,
    label: str,
    full_max_dim: int,
    residual: str,
    shrinkage: str = "off",
) -> dict[str, Any]:
    spec, make, channel_label = CASES[case]
    src = load_source(spec.format(n=n, s=source_seed), limit=n)
    clean = src.read(0, len(src))
    n, shape = clean.shape[0], tuple(clean.shape[1:])
    ch = make()
    obs = ch.corrupt(clean, sample_seeds(0, range(n)))

    def batches():
        return ({k: v[i : i + 512] for k, v in obs.items()} for i in range(0, n, 512))

    seen = ch.At(obs, obs["y"]) if isinstance(ch, MaskChannel) else obs["y"]
    row: dict[str, Any] = {
        "case": case,
        "source": src.spec,
        "channel": channel_label,
        "label": label,
        "source_seed": source_seed,
        "n": n,
        "dim": math.prod(shape),
        "iters": iters,
        "full_max_dim": full_max_dim,
        "residual": residual,
        "load_before": round(os.getloadavg()[0], 2),
        "observation": psnr(seen.reshape(n, *shape), clean),
    }
    t0 = time.perf_counter()

    def fit(batches) -> GaussianPrior:
        return fit_gaussian(
            ch, batches, shape, iters=iters, rank=64, full_max_dim=full_max_dim, residual=residual
        )

    prior, row["shrinkage"] = apply_shrinkage(
        fit(batches), shape, "--shrinkage", shrinkage, lambda: choose_start_shrinkage(ch, batches, shape, fit)
    )
    t1 = time.perf_counter()
    start = torch.cat(list(gaussian_start(prior, ch, batches, shape, seed=1)))
    t2 = time.perf_counter()
    mean = torch.cat([posterior_mean(prior, ch, o, shape) for o in batches()])
    row.update(
        fit_s=round(t1 - t0, 1),
        start_s=round(t2 - t1, 1),
        sample=psnr(start, clean),
        mean=psnr(mean, clean),
        sample_min=round(float(start.min()), 2),
        sample_max=round(float(start.max()), 2),
    )
    if row["dim"] <= 3072:
        m = min(n, REF_ROWS)
        part = {k: v[:m] for k, v in obs.items()}
        ref_start, ref_mean = reference(full_gaussian(clean), ch, part, shape)
        row.update(
            clean_full_sample=psnr(ref_start, clean[:m]),
            clean_full_mean=psnr(ref_mean, clean[:m]),
            sample_first=psnr(start[:m], clean[:m]),
            mean_first=psnr(mean[:m], clean[:m]),
        )
        if "{s}" in spec:  # a source with a seed has other images to hold out (digits has not)
            other = load_source(spec.format(n=n, s=source_seed + HELD_OUT_SEED), limit=n).read(0, n)
            fresh = ch.corrupt(other[:m], sample_seeds(1, range(m)))
            row["mean_heldout"] = psnr(posterior_mean(prior, ch, fresh, shape), other[:m])
            held_start, held_mean = reference(full_gaussian(other), ch, part, shape)
            row.update(
                clean_heldout_sample=psnr(held_start, clean[:m]),
                clean_heldout_mean=psnr(held_mean, clean[:m]),
            )
    row["load_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(row), flush=True)
    return row


def full_gaussian(images: torch.Tensor) -> GaussianPrior:
    """The float64 mean and full covariance (plus a 1e-6 jitter) of ``images``, flattened."""
    flat = images.reshape(images.shape[0], -1).double()
    cov = torch.cov(flat.T) + 1e-6 * torch.eye(flat.shape[1], dtype=torch.float64)
    return GaussianPrior(mean=flat.mean(0), cov=cov)


def reference(
    prior: GaussianPrior, ch: Any, obs: dict[str, torch.Tensor], shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One posterior sample and the posterior mean per observation under the full Gaussian
    ``prior``: a blur shares one ``A``, so its gain ``K = cov A^T S^-1`` is solved once; masks go
    through the library's dense per-sample path."""
    if not isinstance(ch, BlurChannel):
        return torch.cat(list(gaussian_start(prior, ch, [obs], shape, seed=1))), posterior_mean(
            prior, ch, obs, shape
        )
    mu, cov = prior.mean, prior.cov
    a = operator_matrix(ch, {k: v[:1] for k, v in obs.items()}, shape)[0].double()
    s2 = float(ch.noise_std(obs)) ** 2
    s_mat = a @ cov @ a.T
    s_mat += (s2 + 1e-8 * float(s_mat.diagonal().mean())) * torch.eye(a.shape[0], dtype=torch.float64)
    gain = torch.linalg.solve(s_mat, a @ cov).T
    y = obs["y"].reshape(obs["y"].shape[0], -1).double()
    gen = torch.Generator().manual_seed(1)
    vals, vecs = torch.linalg.eigh(cov)
    x0 = (
        mu
        + torch.randn(y.shape[0], mu.numel(), generator=gen, dtype=torch.float64)
        @ (vecs * vals.clamp_min(0).sqrt()).T
    )
    y0 = x0 @ a.T + s2**0.5 * torch.randn(y.shape, generator=gen, dtype=torch.float64)
    sample = x0 + (y - y0) @ gain.T
    mean = mu + (y - mu @ a.T) @ gain.T
    return sample.float().view(-1, *shape), mean.float().view(-1, *shape)


COLUMNS = (
    "case",
    "channel",
    "label",
    "source_seed",
    "n",
    "dim",
    "residual",
    "observation",
    "sample",
    "mean",
    "sample_min",
    "sample_max",
    "clean_full_sample",
    "clean_full_mean",
    "clean_heldout_sample",
    "clean_heldout_mean",
    "sample_first",
    "mean_first",
    "mean_heldout",
    "shrinkage",
    "fit_s",
    "start_s",
    "load_before",
    "load_after",
    "commit",
)


def write(results: Path, rows: list[dict[str, Any]]) -> None:
    """Merge ``rows`` into ``gaussian-start.json`` and redraw the table."""
    from bench.common import machine

    path = results / "gaussian-start.json"
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    key = ("case", "source_seed", "label")
    fresh = {tuple(r[k] for k in key) for r in rows}
    merged = [r for r in old if tuple(r[k] for k in key) not in fresh] + rows
    merged.sort(key=lambda r: (r["case"], r["source_seed"], r["label"]))
    mach = machine()
    lines = [
        "# The Gaussian start on real images",
        "",
        f"Machine: {mach['summary']}. Written by `python -m bench.bench_start`. PSNR over [-1, 1],",
        "images clamped. `observation`: zero-filled `A^T y` (masks) or `y` (blurs). `sample`/`mean`:",
        "one start sample / the posterior mean, all rows. `clean_full_*`: a Gaussian with the clean",
        f"images' full covariance, on the first {REF_ROWS} rows (compare with `*_first`, the start on",
        "the same rows); it is fitted to the very images it is scored on. `clean_heldout_*`: the same",
        f"with the full covariance of as many other clean images (source seed + {HELD_OUT_SEED}), the",
        "best a Gaussian prior can do on images it has not seen (with `n` below `dim`, as for",
        "p32mask, both references are singular and mean nothing). `residual`: the low-rank path's",
        "residual, per pixel or in the cosine basis (blank: rows from before the option, per pixel).",
        "`mean_heldout`: the fitted prior's posterior mean on fresh observations of those other images",
        f"(first {REF_ROWS}): what it does on images it was not fitted to. `shrinkage`: how much the",
        "full covariance was shrunk toward the stationary target (blank: rows from before the option).",
        "`label`: the code measured (its commit in `commit`).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |" for r in merged]
    results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": mach, "rows": merged}, indent=2) + "\n")
    (results / "gaussian-start.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["p16mask", "p16blur", "p16blur0", "dblur", "p32blur"])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=16)
    ap.add_argument("--source-seed", type=int, default=0)
    ap.add_argument("--full-max-dim", type=int, default=128, help="fit_gaussian's full_max_dim")
    ap.add_argument("--residual", default="auto", help="fit_gaussian residual: auto, pixel, cosine")
    ap.add_argument("--shrinkage", default="off", help="fit_gaussian shrinkage: auto, off or an amount")
    ap.add_argument("--label", default="current")
    ap.add_argument(
        "--commit", default=None, help="commit of the measured code (default: this checkout's HEAD)"
    )
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()
    commit = (
        args.commit
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
        ).stdout.strip()
    )
    rows = []
    for case in args.cases:
        row = run_case(
            case,
            args.n,
            args.source_seed,
            args.iters,
            args.label,
            args.full_max_dim,
            args.residual,
            args.shrinkage,
        )
        row["commit"] = commit
        row["date"] = time.strftime("%Y-%m-%d")
        rows.append(row)
    write(args.results, rows)


if __name__ == "__main__":
    main()
