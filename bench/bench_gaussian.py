"""Benchmark lap 0 (``diffem_cli.gaussian``): the Gaussian EM fit plus one posterior sample per
observation, against one E-step of the default sampler on the same observations.

Cases (run one at a time with ``--cases``; rows merge into the results files):

* ``mask16``: N smooth random 3x16x16 images (low-pass filtered noise in [-1, 1]) behind
  ``mask`` rho 0.5 (d = 768, rank-r plus diagonal, exact Woodbury posteriors);
* ``blur32``: N smooth random 3x32x32 images behind ``blur`` (sigma 1, noiseless; d = 3,072,
  EM in the blur's eigenbasis: rank-r plus a diagonal spectrum there);
* ``cifar``: CIFAR size, 50,000 x 3x32x32 behind ``mask`` rho 0.75 (lap 0 only);
* ``manifold`` / ``digits``: the small-d exact full-covariance path (16,384 5-d points through
  2x5 random projections; the 1,797 8x8 digits behind mask rho 0.75).

For ``mask16`` and ``blur32`` the E-step is DiffEM's sampling loop (``sampling.draw`` over
``NetworkDenoiser`` batches, as ``ConditionalMethod.posterior`` runs it) of the default UNet
(``nets.default_network``, untrained: the cost does not depend on the weights) with
``SampleConfig()`` defaults; ``ratio`` = lap-0 seconds / E-step seconds (target
<= 0.25). ``--busy K`` runs K single-thread matrix-product jobs beside the measurement ("another
job beside it"). Each row records the 1-minute load average before and after. Quality: PSNR
(peak-to-peak 2) of the starts and of the zero-filled observations against the clean images.

    python -m bench.bench_gaussian --cases mask16            # idle machine
    python -m bench.bench_gaussian --cases mask16 --busy 1   # with another job beside it
    python -m bench.bench_gaussian --cases cifar
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from diffem_channels.base import sample_seeds
from diffem_channels.blur import BlurChannel
from diffem_channels.mask import MaskChannel
from diffem_channels.projection import ProjectionChannel
from diffem_cli.gaussian.fit import fit_gaussian, gaussian_start

HERE = Path(__file__).resolve().parent
CASES = ("mask16", "blur32", "cifar", "manifold", "digits")
BURNER = (
    "import torch\ntorch.set_num_threads(1)\na = torch.randn(384, 384)\n"
    "while True:\n    a = torch.tanh(a @ a)\n"
)


def batches(obs: dict[str, torch.Tensor], size: int):
    n = obs["y"].shape[0]
    return lambda: ({k: v[i : i + size] for k, v in obs.items()} for i in range(0, n, size))


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float((x.float() - ref.float()).square().mean())
    return round(10 * math.log10(4.0 / max(mse, 1e-12)), 2)


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` random smooth RGB images in [-1, 1]: two octaves of bicubically upsampled noise."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(n, 3, size, size)
    for i in range(0, n, 4096):
        b = min(4096, n - i)
        x = sum(
            w * F.interpolate(torch.randn(b, 3, c, c, generator=gen), size=(size, size), mode="bicubic")
            for c, w in ((4, 1.0), (8, 0.5))
        )
        out[i : i + b] = torch.tanh(1.2 * x)
    return out


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def estep_seconds(channel, obs: dict[str, torch.Tensor], shape: tuple[int, ...]) -> float:
    """Seconds of one E-step of the default UNet with ``SampleConfig()`` on ``obs``: the sampling
    loop the DiffEM method runs (``sampling.draw`` over ``NetworkDenoiser`` batches), on the CPU."""
    from diffem_cli.diffusion.denoise import NetworkDenoiser
    from diffem_cli.diffusion.nets import build_network, default_network
    from diffem_cli.diffusion.sampling import SampleConfig, clip_range_for, draw

    torch.manual_seed(0)
    model = build_network(default_network(shape), shape, channel.cond_size(shape)).eval()
    cfg = SampleConfig()
    n = obs["y"].shape[0]

    def make(start: int, stop: int) -> NetworkDenoiser:
        part = {k: v[start:stop] for k, v in obs.items()}
        return NetworkDenoiser(model, channel.condition(part, shape))

    t0 = time.perf_counter()
    with torch.no_grad():
        draw(
            make,
            n,
            shape,
            sampler=cfg.sampler,
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            seed_parts=(0, 1),
            device=torch.device("cpu"),
            clip_range=clip_range_for("image", [-1, 1]),
            label="E-step",
        )
    return time.perf_counter() - t0


def run_case(case: str, args: argparse.Namespace) -> dict[str, Any]:
    if case == "mask16":
        clean, channel, shape, n_label = (
            smooth_images(args.n, 16),
            MaskChannel(rho=0.5),
            (3, 16, 16),
            "mask rho 0.5",
        )
    elif case == "blur32":
        clean, channel, shape, n_label = smooth_images(args.n, 32), BlurChannel(), (3, 32, 32), "blur sigma 1"
    elif case == "cifar":
        clean, channel, shape = smooth_images(args.cifar_n, 32), MaskChannel(rho=0.75), (3, 32, 32)
        n_label = "mask rho 0.75"
    elif case == "manifold":
        from diffem_cli.io.sources import sample_manifold

        clean, channel, shape = sample_manifold(16384), ProjectionChannel(m=2, sigma=0.01), (5,)
        n_label = "projection 2x5, sigma 0.01"
    elif case == "digits":
        from diffem_cli.io.sources import load_source

        clean, channel, shape, n_label = (
            load_source("digits").read(0, 1797),
            MaskChannel(),
            (1, 8, 8),
            "mask rho 0.75",
        )
    else:
        raise SystemExit(f"unknown case {case!r} (known: {', '.join(CASES)})")
    n = clean.shape[0]
    obs = channel.corrupt(clean, sample_seeds(0, range(n)))
    iters = args.cifar_iters if case == "cifar" else args.iters
    row: dict[str, Any] = {
        "case": case,
        "channel": n_label,
        "n": n,
        "dim": math.prod(shape),
        "iters": iters,
        "threads": torch.get_num_threads(),
        "busy_jobs": args.busy,
        "load_before": load1(),
    }
    t0 = time.perf_counter()
    prior = fit_gaussian(
        channel,
        batches(obs, 4096),
        shape,
        iters=iters,
        rank=args.rank,
        generator=torch.Generator().manual_seed(0),
        max_fit=args.max_fit,
    )
    t1 = time.perf_counter()
    start = torch.cat(list(gaussian_start(prior, channel, batches(obs, 4096), shape, seed=1)))
    t2 = time.perf_counter()
    row.update(
        form="full"
        if prior.full
        else f"rank {prior.factor.shape[1]} + " + ("spectrum" if prior.basis is not None else "diag"),
        n_fit=n if prior.full else min(n, args.max_fit),
        fit_s=round(t1 - t0, 2),
        start_s=round(t2 - t1, 2),
        lap0_s=round(t2 - t0, 2),
        mean_err=round(float((prior.mean.double() - clean.reshape(n, -1).double().mean(0)).abs().max()), 4),
    )
    if len(shape) == 3:
        row["start_psnr"] = psnr(start, clean)
        row["zero_fill_psnr"] = psnr(channel.At(obs, obs["y"]), clean)
    else:
        row["start_rmse"] = round(math.sqrt(float((start - clean).square().mean())), 4)
    if case in ("mask16", "blur32") and args.estep:
        m = min(args.estep_n or n, n)
        part = {k: v[:m] for k, v in obs.items()}
        sec = estep_seconds(channel, part, shape) * n / m
        row.update(estep_s=round(sec, 2), estep_n=m, ratio=round((t2 - t0) / sec, 3))
    row["load_after"] = load1()
    print(json.dumps(row), flush=True)
    return row


def write(results: Path, rows: list[dict[str, Any]]) -> None:
    """Merge ``rows`` into ``gaussian.json`` (keyed by case, busy jobs and threads) and redraw the table."""
    from bench.common import machine

    results.mkdir(parents=True, exist_ok=True)
    path = results / "gaussian.json"
    old = []
    if path.exists():
        try:
            old = json.loads(path.read_text()).get("rows", [])
        except (json.JSONDecodeError, AttributeError):
            old = []

    def key(r: dict[str, Any]) -> tuple:
        return (r.get("case"), r.get("busy_jobs", 0), r.get("threads"), r.get("n"), r.get("form"))

    new_keys = {key(r) for r in rows}
    merged = [r for r in old if "lap0_s" in r and key(r) not in new_keys] + rows
    merged.sort(key=lambda r: (CASES.index(r["case"]) if r["case"] in CASES else 99, r.get("busy_jobs", 0)))
    data = {"machine": machine(), "rows": merged}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    cols = ["case", "channel", "n", "dim", "form", "iters", "n_fit", "threads", "busy_jobs", "load_before",
            "load_after", "fit_s", "start_s", "lap0_s", "estep_s", "estep_n", "ratio", "start_psnr",
            "zero_fill_psnr", "start_rmse", "mean_err"]  # fmt: skip
    lines = [
        "# Gaussian start (lap 0) against one E-step",
        "",
        f"Machine: {data['machine']['summary']}. Written by `python -m bench.bench_gaussian`;",
        "lap0_s = fit_s + start_s; ratio = lap0_s / estep_s (E-step: default UNet, dpm++ 32 steps;",
        "scaled from estep_n observations when estep_n < n). busy_jobs = single-thread jobs run beside it.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in merged]
    tmp = results / "gaussian.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(results / "gaussian.md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", choices=CASES, default=["manifold", "digits", "mask16", "cifar"])
    ap.add_argument("--n", type=int, default=1024, help="images in mask16 / blur32")
    ap.add_argument("--cifar-n", type=int, default=50000, help="images in the cifar case (0: skip it)")
    ap.add_argument("--iters", type=int, default=16, help="EM iterations (config default)")
    ap.add_argument("--cifar-iters", type=int, default=16)
    ap.add_argument("--rank", type=int, default=32, help="low-rank factors (config default)")
    ap.add_argument("--max-fit", type=int, default=8192, help="observations the stochastic EM fits on")
    ap.add_argument("--no-estep", dest="estep", action="store_false", help="skip the E-step timing")
    ap.add_argument("--estep-n", type=int, default=0, help="time the E-step on this many (0: all), scaled")
    ap.add_argument("--busy", type=int, default=0, help="single-thread jobs to run beside the measurement")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [c for c in args.cases if not (c == "cifar" and args.cifar_n == 0)]
    burners = [subprocess.Popen([sys.executable, "-c", BURNER]) for _ in range(args.busy)]
    rows = []
    try:
        if burners:
            time.sleep(5)
        for case in cases:
            rows.append(run_case(case, args))
    finally:
        for p in burners:
            p.terminate()
            p.wait()
    write(args.results, rows)


if __name__ == "__main__":
    main()
