"""Benchmark the Sinkhorn divergence of the manifold benchmark: ours against POT, speed and agreement.

The score (algorithm.md) is POT's ``ot.sinkhorn2(..., method="sinkhorn_log")`` with reg 1e-3,
1,024 iterations, squared Euclidean cost. Measured here:

* agreement: ``diffem_cli.metrics.sinkhorn_cost`` against POT's numpy result on the same points
  (full 1,024 iterations) for point clouds of the 5-d curve: a fresh sample of the curve, the same
  with N(0, 0.3^2) noise, a Gaussian with the data's mean and covariance (what lap 0 looks like),
  and two halves of the reference; POT's torch backend on the smallest size too;
* speed at 4,096 points (and 16,384 unless ``--no-large``): ours in full, with 1 and 2 torch
  threads; POT (numpy and torch backends) and a plain dense torch log-domain loop (float32 and
  float64, ``torch.logsumexp``) timed over a few iterations and extrapolated to 1,024, since
  running them in full takes tens of minutes;
* ``sinkhorn_divergence`` at 4,096 points per set, with a cold and a warm reference-term cache.

The machine is shared with other jobs, so wall times carry noise; CPU seconds are reported too.
Results: bench/results/metrics.json and bench/results/metrics.md (``--quick``: bench/results/quick/).

    python -m bench.bench_metrics [--quick] [--no-large]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import machine, write_results
from diffem_cli.io.sources import sample_manifold
from diffem_cli.metrics import sinkhorn as sk

HERE = Path(__file__).resolve().parent
REG, ITERS = 1e-3, 1024


def clouds(n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Named (samples, reference half) pairs of n points each, float64, on the seed-0 curve."""
    ref = sample_manifold(2 * n, draw_seed=100).double()
    ref_a, ref_b = ref[:n], ref[n:]
    fresh = sample_manifold(n, draw_seed=101).double()
    gen = torch.Generator().manual_seed(0)
    noisy = fresh + 0.3 * torch.randn(fresh.shape, generator=gen, dtype=torch.float64)
    chol = torch.linalg.cholesky(torch.cov(ref.T))
    gauss = ref.mean(0) + torch.randn(fresh.shape, generator=gen, dtype=torch.float64) @ chol.T
    return {
        "fresh sample": (fresh, ref_a),
        "noisy sample": (noisy, ref_a),
        "fitted Gaussian": (gauss, ref_a),
        "reference halves": (ref_b, ref_a),
    }


def timed(fn: Any) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def pot_numpy(x: torch.Tensor, y: torch.Tensor, iters: int = ITERS) -> float:
    import ot

    m = ot.dist(x.numpy(), y.numpy())
    return float(ot.sinkhorn2([], [], m, REG, method="sinkhorn_log", numItermax=iters, warn=False))


def pot_torch(x: torch.Tensor, y: torch.Tensor, iters: int = ITERS) -> float:
    import ot

    m = ot.dist(x, y)
    return float(
        ot.sinkhorn2(
            torch.tensor([]), torch.tensor([]), m, REG, method="sinkhorn_log", numItermax=iters, warn=False
        )
    )


def dense_torch(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, iters: int = ITERS) -> float:
    """POT's log-domain loop written directly in torch (dense ``logsumexp``), same stopping rule."""
    x, y = x.to(dtype), y.to(dtype)
    mr = -(torch.cdist(x, y) ** 2) / REG
    n, m = mr.shape
    log_a, log_b = -math.log(n), -math.log(m)
    u, v = torch.zeros(n, dtype=dtype), torch.zeros(m, dtype=dtype)
    for it in range(iters):
        v = log_b - torch.logsumexp(mr + u[:, None], 0)
        u = log_a - torch.logsumexp(mr + v[None, :], 1)
        if it % 10 == 0:
            err = torch.linalg.norm(torch.exp(mr + u[:, None] + v[None, :]).sum(0) - 1.0 / m)
            if err < 1e-9:
                break
    return float((-mr * REG * torch.exp(mr + u[:, None] + v[None, :])).sum())


def with_threads(k: int, fn: Any) -> Any:
    old = torch.get_num_threads()
    torch.set_num_threads(k)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def agreement(n: int, cases: list[str] | None, with_torch: bool, log: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name, (x, y) in clouds(n).items():
        if cases is not None and name not in cases:
            continue
        ours, t_ours, _ = timed(lambda x=x, y=y: sk.sinkhorn_cost(x, y))
        ref, t_pot, _ = timed(lambda x=x, y=y: pot_numpy(x, y))
        row = {
            "n": n,
            "case": name,
            "pot_numpy": ref,
            "ours": ours,
            "rel_diff": abs(ours - ref) / abs(ref),
            "pot_numpy_s": t_pot,
            "ours_s": t_ours,
        }
        if with_torch:
            pt, t_pt, _ = timed(lambda x=x, y=y: pot_torch(x, y))
            row.update(pot_torch=pt, pot_torch_rel_diff=abs(pt - ref) / abs(ref), pot_torch_s=t_pt)
        rows.append(row)
        log.append(f"agreement n={n} {name}: POT {ref:.6g} ours {ours:.6g} rel {row['rel_diff']:.1e}")
        print(log[-1], flush=True)
    return rows


def speed(
    n: int, cases: list[str] | None, threads_list: tuple[int, ...], probe_iters: int, log: list[str]
) -> list[dict[str, Any]]:
    rows = []
    for name, (x, y) in clouds(n).items():
        if cases is not None and name not in cases:
            continue
        for threads in threads_list:
            value, wall, cpu = timed(
                lambda x=x, y=y, t=threads: with_threads(t, lambda: sk.sinkhorn_cost(x, y))
            )
            rows.append(
                {
                    "n": n,
                    "case": name,
                    "method": "ours (sparse log-domain)",
                    "threads": threads,
                    "seconds": wall,
                    "cpu_seconds": cpu,
                    "value": value,
                    "extrapolated": False,
                }
            )
            log.append(
                f"speed n={n} {name} ours threads={threads}: {wall:.2f} s (cpu {cpu:.2f} s) value {value:.6g}"
            )
            print(log[-1], flush=True)
    if probe_iters == 0:
        return rows
    x, y = clouds(n)["fresh sample"]
    probes = {
        "POT numpy (sinkhorn_log)": lambda: pot_numpy(x, y, probe_iters),
        "POT torch backend": lambda: pot_torch(x, y, probe_iters),
        "dense torch logsumexp float32": lambda: dense_torch(x, y, torch.float32, probe_iters),
        "dense torch logsumexp float64": lambda: dense_torch(x, y, torch.float64, probe_iters),
    }
    for method, fn in probes.items():
        _, wall, cpu = timed(lambda fn=fn: with_threads(2, fn))
        scale = ITERS / probe_iters
        rows.append(
            {
                "n": n,
                "case": "fresh sample",
                "method": method,
                "threads": 2,
                "seconds": wall * scale,
                "cpu_seconds": cpu * scale,
                "value": None,
                "extrapolated": True,
                "probe_iters": probe_iters,
            }
        )
        log.append(
            f"speed n={n} {method}: {wall / probe_iters:.3f} s/iteration -> ~{wall * scale:.0f} s for {ITERS}"
        )
        print(log[-1], flush=True)
    return rows


def divergence(n: int, log: list[str]) -> list[dict[str, Any]]:
    ref = sample_manifold(4 * n, draw_seed=200)
    sample = sample_manifold(2 * n, draw_seed=201)
    sk._REF_CACHE.clear()
    rows = []
    for label in ("cold cache (two Sinkhorn runs)", "warm cache (one run)"):
        value, wall, cpu = timed(lambda: sk.sinkhorn_divergence(sample, ref, n_points=n))
        rows.append({"n_points": n, "call": label, "seconds": wall, "cpu_seconds": cpu, "value": value})
        log.append(f"sinkhorn_divergence n_points={n} {label}: {wall:.2f} s, value {value:.3g}")
        print(log[-1], flush=True)
    return rows


def markdown(data: dict[str, Any]) -> str:
    lines = [
        "# Sinkhorn divergence: ours vs POT",
        "",
        f"Machine: {data['machine']['summary']}. Load average before/after: {data['load_before']} / "
        f"{data['load_after']} (a shared machine: wall times carry noise).",
        "",
        "Settings: POT `sinkhorn2(..., method='sinkhorn_log')`, reg 1e-3, 1,024 iterations, squared",
        "Euclidean cost, uniform weights, points on the seed-0 manifold curve (see bench/bench_metrics.py).",
        "",
        "## Agreement with POT (numpy backend, full 1,024 iterations)",
        "",
        "| n | case | POT | ours | relative difference | POT s | ours s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["agreement"]:
        lines.append(
            f"| {r['n']} | {r['case']} | {r['pot_numpy']:.10g} | {r['ours']:.10g} | {r['rel_diff']:.1e} | "
            f"{r['pot_numpy_s']:.1f} | {r['ours_s']:.2f} |"
        )
    torch_rows = [r for r in data["agreement"] if "pot_torch" in r]
    if torch_rows:
        lines += [
            "",
            "POT's torch backend on the same points: "
            + "; ".join(
                f"{r['case']} rel. diff {r['pot_torch_rel_diff']:.1e} in {r['pot_torch_s']:.1f} s"
                for r in torch_rows
            )
            + ".",
        ]
    lines += [
        "",
        "## Speed (one Sinkhorn run, 1,024 iterations)",
        "",
        "| n | case | method | threads | seconds | CPU seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["speed"]:
        tag = f" (extrapolated from {r['probe_iters']} iterations)" if r["extrapolated"] else ""
        lines.append(
            f"| {r['n']} | {r['case']} | {r['method']}{tag} | {r['threads']} | {r['seconds']:.1f} | "
            f"{r['cpu_seconds']:.1f} |"
        )
    lines += [
        "",
        "## `sinkhorn_divergence` (samples vs half A, minus half A vs half B)",
        "",
        "| points per set | call | seconds | CPU seconds | value |",
        "|---|---|---|---|---|",
    ]
    for r in data["divergence"]:
        lines.append(
            f"| {r['n_points']} | {r['call']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
            f"{r['value']:.4g} |"
        )
    lines += ["", "## Log", "", "```", *data["log"], "```", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="small sizes only, results under bench/results/quick/"
    )
    ap.add_argument("--no-large", action="store_true", help="skip the 16,384-point runs")
    ap.add_argument("--results", type=Path, default=None, help="results folder")
    args = ap.parse_args()
    out = args.results or (HERE / "results" / ("quick" if args.quick else ""))
    log: list[str] = []
    data: dict[str, Any] = {"machine": machine(), "load_before": [round(v, 2) for v in os.getloadavg()]}
    np.random.seed(0)
    data["agreement"] = agreement(64 if args.quick else 256, None, True, log)
    if not args.quick:
        data["agreement"] += agreement(1024, ["fresh sample"], False, log)
    data["speed"] = speed(512 if args.quick else 4096, None, (1, 2), 2 if args.quick else 5, log)
    if not args.quick and not args.no_large:
        data["speed"] += speed(16384, ["fresh sample", "fitted Gaussian"], (2,), 0, log)
    data["divergence"] = divergence(256 if args.quick else 4096, log)
    data["load_after"] = [round(v, 2) for v in os.getloadavg()]
    data["log"] = log
    write_results(out, "metrics", data, markdown(data))
    print(f"wrote {out / 'metrics.json'} and {out / 'metrics.md'}")


if __name__ == "__main__":
    main()
