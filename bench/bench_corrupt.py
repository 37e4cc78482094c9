"""Benchmark ``corrupt``: throughput and peak memory of every built-in channel at CIFAR-10 scale.

Each image channel (mask, box, blur, jpeg, noise) corrupts N synthetic smooth 3x32x32 images
read from a ``datasets`` folder (written once under bench/work/), and ``projection`` corrupts N
manifold vectors. Every run is a separate process, so its peak RSS is its own: ``VmHWM`` of the
child's address space. (``ru_maxrss`` from ``wait4`` is reported too, but on Linux it also counts
the parent's memory at the fork.) Results: bench/results/corrupt.json and bench/results/corrupt.md.

    python bench/bench_corrupt.py            # N = 50,000 (a few minutes)
    python bench/bench_corrupt.py --n 2000   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMAGE_CHANNELS = ("mask", "box", "blur", "jpeg", "noise")


def make_images(path: Path, n: int, chunk: int = 1000) -> None:
    """Write ``n`` random smooth 3x32x32 images in [-1, 1] (column ``x``) unless already there."""
    import torch
    import torch.nn.functional as F

    from diffem_cli.io.store import read_manifest, write_dataset

    if read_manifest(path).get("num_rows") == n:
        return

    def chunks():
        for start in range(0, n, chunk):
            gen = torch.Generator().manual_seed(start)
            coarse = torch.randn(min(chunk, n - start), 3, 4, 4, generator=gen)
            fine = F.interpolate(coarse, size=(32, 32), mode="bicubic", align_corners=False)
            yield {"x": torch.tanh(fine)}

    manifest = {"kind": "clean", "value_range": [-1, 1], "note": "synthetic smooth images (bench)"}
    write_dataset(path, chunks(), manifest, force=path.exists())


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident set since its ``exec`` (Linux ``VmHWM``), in MiB."""
    return _status_mb("VmHWM")


class AnonPeak:
    """Samples ``RssAnon`` (resident memory not backed by files) every 20 ms in a thread.

    The resident set also counts pages of the memory-mapped Arrow files being read and written;
    those are page cache the kernel can drop, while anonymous memory is what the process holds.
    """

    def __init__(self) -> None:
        import threading

        self.peak = _status_mb("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _status_mb("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status_mb("RssAnon"))


def child(channel: str, source: str, out: Path, chunk_size: int) -> None:
    """Corrupt one source with one channel (run in its own process); print timings as JSON."""
    started = time.perf_counter()
    import datasets  # noqa: F401  (imported lazily by the store; timed as import, not as work)

    from diffem_cli.io.registry import make_channel
    from diffem_cli.io.sources import load_source
    from diffem_cli.pipeline.corrupt import corrupt_dataset

    if channel == "baseline":  # imports only: the floor under every other row's RSS
        print(
            json.dumps(
                {
                    "import_s": time.perf_counter() - started,
                    "corrupt_s": 0.0,
                    "peak_rss_mb": peak_rss_mb(),
                    "peak_anon_mb": _status_mb("RssAnon"),
                }
            )
        )
        return
    chan = make_channel(channel, {})
    anon = AnonPeak()
    imported = time.perf_counter()
    manifest = corrupt_dataset(
        load_source(source), chan, out, chunk_size=chunk_size, progress=False, force=True
    )
    done = time.perf_counter()
    anon_mb = anon.stop()
    size = sum(f.stat().st_size for f in out.iterdir())
    print(
        json.dumps(
            {
                "import_s": imported - started,
                "corrupt_s": done - imported,
                "rows": manifest["num_rows"],
                "bytes": size,
                "peak_rss_mb": peak_rss_mb(),
                "peak_anon_mb": anon_mb,
            }
        )
    )


def run_child(channel: str, source: str, out: Path, chunk_size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", channel, "--source", source, "--out", str(out)]
    cmd += ["--chunk-size", str(chunk_size)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{channel} failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    result["ru_maxrss_mb"] = usage.ru_maxrss / 1024  # kilobytes on Linux; includes the fork's parent
    return result


def machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
    }


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# `diffem corrupt` benchmark (N = {report['n']:,})",
        "",
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']} "
        f"({m['torch_threads']} threads), Python {m['python']}. Chunk size {report['chunk_size']}. "
        f"Load average at start (1, 5, 15 min): {', '.join(map(str, m['load_average_at_start']))}.",
        "Images: synthetic smooth 3x32x32 read from a datasets folder; projection: manifold vectors (n=5).",
        "Rate = samples / corrupt time (reading, corrupting and writing the folder, imports excluded);",
        "Peak RSS: the process's maximum resident set (VmHWM, imports included: see the baseline row);",
        "it counts pages of the memory-mapped Arrow files read and written (reclaimable page cache).",
        "Peak anon: the maximum of RssAnon (memory the process itself holds), sampled every 20 ms.",
        "",
        "| channel | data | samples/s | corrupt s | wall s | peak RSS MB | peak anon MB | output MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        rate = f"{row['rows'] / row['corrupt_s']:,.0f}" if row.get("rows") else "-"
        out_mb = f"{row['bytes'] / 2**20:,.0f}" if row.get("bytes") else "-"
        lines.append(
            f"| {row['channel']} | {row['data']} | {rate} | {row['corrupt_s']:.1f} | {row['wall_s']:.1f} "
            f"| {row['peak_rss_mb']:,.0f} | {row['peak_anon_mb']:,.0f} | {out_mb} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="samples per channel")
    parser.add_argument("--channels", nargs="*", default=[*IMAGE_CHANNELS, "projection"])
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--work", type=Path, default=HERE / "work")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.source, args.out, args.chunk_size)
        return

    args.work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    images = args.work / f"smooth-{args.n}"
    started = time.perf_counter()
    make_images(images, args.n)
    print(f"synthetic images ready in {time.perf_counter() - started:.1f} s: {images}", flush=True)

    host = machine()
    rows = []
    scratch = args.work / "corrupt-out"
    for channel in ["baseline", *args.channels]:
        vector = channel == "projection"
        source = f"manifold:samples={args.n}" if vector else str(images)
        result = run_child(channel, source, scratch, args.chunk_size)
        shutil.rmtree(scratch, ignore_errors=True)
        result.update(
            channel=channel, data="-" if channel == "baseline" else ("5-d vectors" if vector else "3x32x32")
        )
        rows.append(result)
        rate = f"{result['rows'] / result['corrupt_s']:,.0f}/s" if result.get("rows") else "-"
        rss, anon = result["peak_rss_mb"], result["peak_anon_mb"]
        print(
            f"{channel:>10}: {rate}, {result['corrupt_s']:.1f} s, RSS {rss:,.0f} MB, anon {anon:,.0f} MB",
            flush=True,
        )

    report = {"n": args.n, "chunk_size": args.chunk_size, "machine": host, "rows": rows}
    (args.results / "corrupt.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.results / "corrupt.md").write_text(to_markdown(report))
    print(f"wrote {args.results / 'corrupt.json'} and corrupt.md")


if __name__ == "__main__":
    main()
