"""Data-parallel scaling of the M-step: examples/s with 1 and 2 processes on this CPU (1 thread each).

Each measurement is one ``train_denoiser`` phase on random data (the whole loop: batches,
timesteps, noise, loss, DDP gradient all-reduce over gloo, clipping, AdamW, EMA), started the way a
user starts it: ``python -m bench.bench_scaling --worker`` for one process and ``python -m
torch.distributed.run --standalone --nproc_per_node 2 -m bench.bench_scaling --worker`` for two,
``OMP_NUM_THREADS=1`` in both. The global batch is the preset's ``train.batch_size`` either way, so
two processes each compute half of it. Cases: the ``manifold`` MLP (5-d vectors, batch 1,024) and
the ``digits`` UNet (8x8x1 images, batch 128), both conditional as in DiffEM's M-step. The 1- and
2-process runs alternate (``--rounds``) and the best of each is reported, with
``os.getloadavg()`` beside every figure: the machine is shared with other jobs, so a busy
neighbour lowers the 2-process figure most (it needs both cores). Efficiency =
rate(2) / (2 x rate(1)). Writes ``bench/results/scaling.json`` and ``.md``.

    python -m bench.bench_scaling [--quick] [--cases manifold digits] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

CASES: dict[str, dict[str, Any]] = {
    "manifold": {"preset": "manifold", "shape": (5,), "cond_size": 12, "rows": 16384, "steps": 48},
    "digits": {"preset": "digits", "shape": (1, 8, 8), "cond_size": 2, "rows": 4096, "steps": 32},
}


def worker(case: str, steps: int, out: Path) -> None:
    """One measurement in this process (of 1 or of several under torchrun); rank 0 writes ``out``."""
    import torch

    from diffem_cli.core.runtime import launch
    from diffem_cli.diffusion.nets import build_network
    from diffem_cli.diffusion.train import train_denoiser
    from diffem_cli.methods import load_config

    spec = CASES[case]
    cfg = load_config(spec["preset"]).train
    bs = cfg.batch_size
    cfg.warmup, cfg.epochs = 0, 1
    gen = torch.Generator().manual_seed(0)
    rows = steps * bs  # one epoch of exactly ``steps`` global batches
    shape, cond_size = spec["shape"], spec["cond_size"]
    cond_shape = (cond_size,) if len(shape) == 1 else (cond_size, *shape[1:])
    data = {
        "x": torch.randn((rows, *shape), generator=gen),
        "cond": torch.randn((rows, *cond_shape), generator=gen),
    }
    with launch("cpu") as ctx:
        torch.manual_seed(0)
        warm = build_network(load_config(spec["preset"]).network, shape, cond_size)
        short = {k: v[: 2 * bs] for k, v in data.items()}  # first-call overheads (allocator, DDP buckets)
        train_denoiser(warm, short, cfg, seed=1, device=ctx.device, label="warm-up", ctx=ctx)
        torch.manual_seed(0)
        model = build_network(load_config(spec["preset"]).network, shape, cond_size)
        ctx.barrier()
        load0 = os.getloadavg()
        result = train_denoiser(model, data, cfg, seed=0, device=ctx.device, label=case, ctx=ctx)
        load1 = os.getloadavg()
        if ctx.is_main:
            record = {
                "case": case,
                "processes": ctx.world,
                "threads_per_process": torch.get_num_threads(),
                "global_batch": bs,
                "steps": result.steps,
                "seconds": result.seconds,
                "examples_per_s": result.steps * bs / result.seconds,
                "load_before": load0,
                "load_after": load1,
            }
            out.write_text(json.dumps(record))


def measure(case: str, processes: int, steps: int) -> dict[str, Any]:
    """Start a worker with ``processes`` processes and return its record."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        args = ["-m", "bench.bench_scaling", "--worker", case, "--steps", str(steps), "--record", str(out)]
        if processes == 1:
            cmd = [sys.executable, *args]
        else:
            launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
            cmd = [sys.executable, *launcher, *args]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        return json.loads(out.read_text())


def _markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    lines = [
        "# M-step scaling: 1 and 2 processes on CPU",
        "",
        f"Machine: {info['machine']['summary']}. Date: {info['date']}. One torch thread per process; "
        "gloo all-reduce; the global batch is the preset's `train.batch_size` in both columns.",
        "",
        "The machine is shared with other agents' jobs: the load averages (1-minute) taken before and "
        "after each best run are beside its figure; with a busy neighbour two processes compete for "
        "the two cores; at a load well above 2 these figures say little about an idle machine.",
        "",
        "| case | global batch | 1 process (ex/s) | load | 2 processes (ex/s) | load | speed-up "
        "| efficiency |",
        "|---|---:|---:|---|---:|---|---:|---:|",
    ]
    for r in rows:
        one, two = r["best"]["1"], r["best"]["2"]
        lines.append(
            f"| {r['case']} | {one['global_batch']} | {one['examples_per_s']:,.0f} | "
            f"{one['load_before'][0]:.1f} / {one['load_after'][0]:.1f} | {two['examples_per_s']:,.0f} | "
            f"{two['load_before'][0]:.1f} / {two['load_after'][0]:.1f} | {r['speedup']:.2f}x | "
            f"{r['efficiency']:.0%} |"
        )
    lines += ["", f"Command: `{info['command']}`; every run is in `scaling.json`.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="fewer steps, one round, results under bench/results/quick"
    )
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    ap.add_argument("--rounds", type=int, default=2, help="alternations of 1- and 2-process runs")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", choices=sorted(CASES), help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.record)
        return 0

    from bench.common import machine, write_results

    rounds = 1 if args.quick else args.rounds
    out = args.out or ROOT / ("bench/results/quick" if args.quick else "bench/results")
    rows = []
    for case in args.cases:
        steps = max(4, CASES[case]["steps"] // (4 if args.quick else 1))
        runs: dict[str, list[dict[str, Any]]] = {"1": [], "2": []}
        for _ in range(rounds):
            for processes in (1, 2):
                rec = measure(case, processes, steps)
                runs[str(processes)].append(rec)
                print(
                    f"{case}: {processes} process(es) {rec['examples_per_s']:,.0f} ex/s "
                    f"(load {rec['load_before'][0]:.1f})",
                    flush=True,
                )
        best = {k: max(v, key=lambda r: r["examples_per_s"]) for k, v in runs.items()}
        speedup = best["2"]["examples_per_s"] / best["1"]["examples_per_s"]
        rows.append({"case": case, "runs": runs, "best": best, "speedup": speedup, "efficiency": speedup / 2})
    info = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python -m bench.bench_scaling" + (" --quick" if args.quick else ""),
        "rounds": rounds,
    }
    write_results(out, "scaling", {**info, "cases": rows}, _markdown(rows, info))
    print(_markdown(rows, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
