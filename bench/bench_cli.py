"""Benchmark the commands that should answer at once: ``diffem --help``, ``--version``, ``channels``.

Each command runs ``--runs`` times as a fresh process through the installed console script (what a
user types), after one unmeasured run that warms the file cache; the table gives the median, the
fastest and the slowest wall time, and whether the command imported torch (one extra run under
``python -X importtime``). ``em-train --help`` and a bare interpreter (``python -c pass``) are
timed alongside for reference. The target is a median under 1.5 s. Results:
bench/results/cli.json and bench/results/cli.md (date, commit, machine, load before and after).

    python bench/bench_cli.py            # 10 runs each
    python bench/bench_cli.py --quick    # 3 runs each, written to bench/results/quick/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TARGET_S = 1.5
COMMANDS: tuple[tuple[str, ...], ...] = (("--help",), ("--version",), ("channels",), ("em-train", "--help"))
TARGETED = {("--help",), ("--version",), ("channels",)}


def diffem() -> list[str]:
    """The console script next to this interpreter, else ``python -m diffem_cli``."""
    script = Path(sys.executable).with_name("diffem")
    return [str(script)] if script.exists() else [sys.executable, "-m", "diffem_cli"]


def wall(cmd: list[str]) -> float:
    """Seconds one run of ``cmd`` takes (output discarded); a failing command stops the benchmark."""
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def imports_torch(args: tuple[str, ...]) -> bool:
    """Whether ``python -m diffem_cli ARGS`` imports torch (read from ``-X importtime``)."""
    cmd = [sys.executable, "-X", "importtime", "-m", "diffem_cli", *args]
    err = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True).stderr
    return any(line.rsplit("|", 1)[-1].strip() == "torch" for line in err.splitlines())


def machine() -> dict[str, object]:
    """CPU model, cores (``nproc``) and Python, without importing torch (it would skew nothing here,
    but this benchmark is about not needing it)."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": cores,
        "python": platform.python_version(),
        "summary": f"{cpu}, {cores} cores (nproc), Python {platform.python_version()}",
    }


def uptime() -> str:
    """``uptime``'s line (load averages over 1, 5 and 15 minutes)."""
    if shutil.which("uptime"):
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def commit() -> str:
    """The short commit, with ``+dirty`` when the work tree has changes."""
    git = ["git", "-C", str(HERE.parent)]
    head = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    )
    return f"{head}+dirty" if head and dirty.stdout.strip() else head or "unknown"


def measure(runs: int) -> list[dict[str, object]]:
    """One row per command: median, min and max seconds over ``runs`` runs, and torch imported."""
    base = diffem()
    cases = [(f"diffem {' '.join(a)}", [*base, *a], a) for a in COMMANDS]
    cases.append(("python -c pass", [sys.executable, "-c", "pass"], None))
    rows = []
    for label, cmd, args in cases:
        wall(cmd)  # warms the file cache; not counted
        times = [wall(cmd) for _ in range(runs)]
        median = statistics.median(times)
        row: dict[str, object] = {
            "command": label,
            "median_s": round(median, 3),
            "min_s": round(min(times), 3),
            "max_s": round(max(times), 3),
            "runs": runs,
            "imports_torch": imports_torch(args) if args is not None else False,
        }
        if args is not None and args in TARGETED:
            row["under_target"] = median < TARGET_S
        rows.append(row)
        print(f"{label:24s} median {median:.3f} s (min {min(times):.3f}, max {max(times):.3f})", flush=True)
    return rows


def markdown(data: dict[str, Any]) -> str:
    """The result page: where it ran, then one table row per command."""
    lines = [
        "# Start-up time of the commands that should answer at once",
        "",
        f"Date: {data['date']}; commit: {data['commit']}; machine: {data['machine']['summary']}.",
        f"Load before: `{data['load_before']}`; after: `{data['load_after']}`.",
        "",
        f"Wall time of a fresh process through the console script `{data['runner']}`, {data['runs']} runs "
        f"each after one unmeasured warm-up run; target: a median under {TARGET_S} s for `--help`, "
        "`--version` and `channels`. `imports torch`: read from one extra run under "
        "`python -X importtime -m diffem_cli`. `python -c pass` is the interpreter's own start-up.",
        "",
        "| command | median s | min s | max s | imports torch | under target |",
        "|---|---:|---:|---:|---|---|",
    ]
    for r in data["rows"]:
        target = {True: "yes", False: "no"}.get(r.get("under_target"), "-")
        lines.append(
            f"| `{r['command']}` | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} | "
            f"{'yes' if r['imports_torch'] else 'no'} | {target} |"
        )
    lines += [
        "",
        "Reproduce: `python bench/bench_cli.py` (`--quick`: 3 runs, written to `bench/results/quick/`).",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="measured runs per command")
    ap.add_argument("--quick", action="store_true", help="3 runs, results under bench/results/quick/")
    ap.add_argument("--results", type=Path, default=None, help="folder for cli.json and cli.md")
    args = ap.parse_args()
    runs = 3 if args.quick else args.runs
    out = args.results or HERE / "results" / ("quick" if args.quick else "")
    load_before = uptime()
    rows = measure(runs)
    data = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
        "machine": machine(),
        "load_before": load_before,
        "load_after": uptime(),
        "load": load_before,
        "runner": " ".join(Path(p).name if i == 0 else p for i, p in enumerate(diffem())),
        "runs": runs,
        "target_s": TARGET_S,
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "cli.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "cli.md").write_text(markdown(data))
    print(f"wrote {out / 'cli.json'} and {out / 'cli.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
