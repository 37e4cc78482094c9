"""Run every benchmark in order, each in its own process, and summarise (``make bench``).

Order: bench_cli, bench_corrupt, bench_metrics, bench_gaussian, bench_shrinkage, bench_manifold, bench_digits,
bench_estep, bench_oracle, bench_heldout, bench_speed, bench_cuda (on a machine with CUDA; it measures nothing
elsewhere), bench_scaling (scripts that do not exist are skipped). Each runs
as ``python -m bench.NAME`` from the repository root with the root on ``PYTHONPATH``, so ``import
bench.common`` works however this script is started. ``--quick`` is passed to the scripts that take it;
bench_corrupt gets a smaller ``--n`` and bench_gaussian a smaller image case instead, both writing under
``bench/results/quick/``, and bench_manifold works in ``bench/work/manifold-quick/``, so that a smoke
run never overwrites full results or the checkpoints bench_speed reuses. A failure does not stop the
others; the exit status is 1 when any failed.

    python bench/run_all.py [--quick] [--only NAME ...] [--skip NAME ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHES = (
    "bench_cli",
    "bench_corrupt",
    "bench_metrics",
    "bench_gaussian",
    "bench_shrinkage",
    "bench_manifold",
    "bench_budget",
    "bench_digits",
    "bench_estep",
    "bench_oracle",
    "bench_heldout",
    "bench_speed",
    "bench_cuda",
    "bench_scaling",
)
QUICK_RESULTS = "bench/results/quick"
QUICK_ARGS = {
    "bench_corrupt": ["--n", "2000", "--results", QUICK_RESULTS],
    "bench_gaussian": ["--cifar-n", "512", "--cifar-iters", "2", "--results", QUICK_RESULTS],
    # bench_manifold wipes its work folder: keep the full run's checkpoints (bench_speed reads them)
    "bench_manifold": ["--quick", "--work", "bench/work/manifold-quick"],
    "bench_budget": [
        "--curves",
        "0",
        "--laps",
        "1",
        "--out",
        QUICK_RESULTS,
        "--work",
        "bench/work/budget-quick",
    ],
}


def quick_args(name: str) -> list[str]:
    """The arguments that make ``name`` a smoke run: its own ``--quick`` if it has one."""
    if name in QUICK_ARGS:
        return QUICK_ARGS[name]
    text = (ROOT / "bench" / f"{name}.py").read_text()
    return ["--quick"] if '"--quick"' in text else []


def run_one(name: str, args: list[str]) -> tuple[int, float]:
    """Run ``python -m bench.NAME ARGS`` from the repository root; returns (exit status, seconds)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", f"bench.{name}", *args]
    print(f"\n=== {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    code = subprocess.call(cmd, cwd=ROOT, env=env)
    return code, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke runs of every benchmark")
    ap.add_argument("--only", nargs="+", choices=BENCHES, help="run only these")
    ap.add_argument("--skip", nargs="+", choices=BENCHES, default=[], help="skip these")
    args = ap.parse_args()

    results = []
    for name in args.only or BENCHES:
        if name in args.skip:
            continue
        if not (ROOT / "bench" / f"{name}.py").exists():
            results.append((name, None, 0.0))
            continue
        code, seconds = run_one(name, quick_args(name) if args.quick else [])
        results.append((name, code, seconds))

    print("\n=== summary" + (" (quick)" if args.quick else ""))
    for name, code, seconds in results:
        status = "skipped (no script)" if code is None else "ok" if code == 0 else f"FAILED (exit {code})"
        print(f"{name:16s} {status:22s} {seconds / 60:6.1f} min")
    failed = [name for name, code, _ in results if code not in (0, None)]
    if not args.quick:  # the index of bench/results/ (a smoke run writes elsewhere)
        subprocess.call([sys.executable, str(ROOT / "bench" / "results_index.py")], cwd=ROOT)
    if failed:
        print(f"{len(failed)} failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
