"""Oracle gap: DiffEM's posterior PSNR per lap beside the oracle's, same network and budget.

The oracle (``--method oracle``) trains DiffEM's conditional network on fresh corruptions of the
clean data, lap after lap, with the same network, steps per lap, laps and sampler; it bounds what
the observations allow at that budget. Both run through ``diffem_cli.pipeline.compare.compare`` (no
unconditional models), evaluated every lap on one posterior sample per observation against its
clean image. Cases (``--cases``):

* ``digits-mask0.5``, ``digits-mask0.75``, ``digits-noise0.2``: the first ``--n`` of
  scikit-learn's 8x8 digits, random pixel masks or Gaussian noise of sigma 0.2, the ``digits``
  preset;
* ``shapes16-mask0.5``: ``--n`` procedural 16x16 RGB images (``bench.images``: gradients, soft
  blobs, discs and rectangles; seed 0), the ``img16`` preset;
* ``patches16-mask0.5``: ``--n`` 16x16 RGB patches of scikit-learn's two photographs
  (``patches:size=16``, seed 0), the ``img16`` preset.

The budget is cut to keep each case to minutes on a 2-core CPU: ``--laps`` laps of ``--epochs``
epochs, ``--steps`` sampler steps (the presets train 32-40 epochs per lap and sample with 32
steps). Writes ``bench/results/oracle.json``, ``.md`` and ``oracle.png`` (PSNR per lap, one panel
per case); a rerun resumes what a killed one left in ``--work``.

    python -m bench.bench_oracle [--cases ...] [--laps 3] [--epochs 10] [--steps 16] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any

from bench.common import machine, write_results
from bench.images import shapes_images
from diffem_cli.io.registry import make_channel
from diffem_cli.io.sources import RowRange, TensorSource, load_source
from diffem_cli.methods import load_config
from diffem_cli.pipeline.compare import compare
from diffem_cli.pipeline.corrupt import corrupt_dataset

CASES: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "shapes16-mask0.5": ("shapes16", "mask", {"rho": 0.5}, "img16"),
    "patches16-mask0.5": ("patches16", "mask", {"rho": 0.5}, "img16"),
    "digits-mask0.5": ("digits", "mask", {"rho": 0.5}, "digits"),
    "digits-mask0.75": ("digits", "mask", {"rho": 0.75}, "digits"),
    "digits-noise0.2": ("digits", "noise", {"sigma": 0.2}, "digits"),
}
GOAL_DB = 1.0


def source(name: str, n: int):
    """The clean data of a case: the first ``n`` digits, ``n`` natural-image 16x16 patches (seed
    0), or ``n`` procedural 16x16 images."""
    if name == "digits":
        return RowRange(load_source("digits"), limit=n)
    if name == "patches16":
        return load_source(f"patches:size=16,n={n},seed=0")
    return TensorSource(shapes_images(n, 16, seed=0), spec=f"bench.images:shapes16:n={n},seed=0")


def run_case(case: str, work: Path, n: int, sets: list[str], laps: int, log) -> dict[str, Any]:
    """Corrupt the case's data (seed 0) and compare DiffEM with the oracle; compare's summary."""
    data_name, channel, params, preset = CASES[case]
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "obs" / "diffem.json").exists():
        corrupt_dataset(
            source(data_name, n),
            make_channel(channel, params),
            work / "obs",
            seed=0,
            clean_out=work / "clean",
            force=True,
            progress=False,
        )
    cfg = load_config(preset, sets)
    summary = compare(
        work / "obs",
        work / "cmp",
        ["diffem", "oracle"],
        cfg,
        eval_clean=work / "clean",
        laps=laps,
        uncond=False,
        log=log,
    )
    summary["preset"] = preset
    return summary


def gaps(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Per lap: DiffEM's and the oracle's PSNR, the gap (oracle - DiffEM) and each lap's seconds."""
    d, o = summary["laps"]["diffem"], summary["laps"]["oracle"]
    rows = []
    for rd, ro in zip(d, o, strict=True):
        pd, po = rd.get("eval_psnr"), ro.get("eval_psnr")
        rows.append(
            {
                "lap": rd["lap"],
                "diffem": pd,
                "oracle": po,
                "gap_db": None if pd is None or po is None else po - pd,
                "diffem_s": sum(float(rd.get(k) or 0) for k in ("init_s", "corrupt_s", "mstep_s", "estep_s")),
                "oracle_s": sum(float(ro.get(k) or 0) for k in ("init_s", "corrupt_s", "mstep_s", "estep_s")),
            }
        )
    return rows


def markdown(result: dict[str, Any]) -> str:
    """Per case: PSNR by lap for DiffEM and the oracle, and the gap in dB."""
    lines = [
        "# Oracle gap: DiffEM against the oracle at one budget",
        "",
        f"Machine: {result['machine']['summary']}, {result['machine']['torch_threads']} torch thread(s); "
        f"1-minute load average {result['load_start']:.1f} at the start, {result['load_end']:.1f} at the end "
        "(shared machine: seconds are upper bounds).",
        f"Budget: {result['budget']}. The oracle trains the same conditional network on fresh "
        "corruptions of the clean data (same steps per lap, same sampler); lap 0 is the Gaussian start "
        "of both. PSNR (dB) of one posterior sample per observation against its clean image; "
        f"gap = oracle - DiffEM (goal: <= {GOAL_DB:.0f} dB).",
        "",
    ]
    for case, r in result["cases"].items():
        rows = r["gaps"]
        lines += [
            f"## {case} ({r['n']:,} images, preset `{r['preset']}`, {r['seconds'] / 60:.1f} min)",
            "",
            "| lap | " + " | ".join(str(x["lap"]) for x in rows) + " |",
            "|---" * (len(rows) + 1) + "|",
            "| DiffEM | " + " | ".join(_f(x["diffem"]) for x in rows) + " |",
            "| oracle | " + " | ".join(_f(x["oracle"]) for x in rows) + " |",
            "| gap (dB) | " + " | ".join(_f(x["gap_db"]) for x in rows) + " |",
            "| DiffEM s | " + " | ".join(f"{x['diffem_s']:.0f}" for x in rows) + " |",
            "| oracle s | " + " | ".join(f"{x['oracle_s']:.0f}" for x in rows) + " |",
            "",
        ]
    if result.get("notes"):
        lines += ["## Findings", "", *result["notes"], ""]
    lines += ["![PSNR per lap](oracle.png)", ""]
    return "\n".join(lines) + "\n"


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--n", type=int, default=1024, help="images per case")
    ap.add_argument("--laps", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10, help="epochs per lap (0: the preset's)")
    ap.add_argument("--steps", type=int, default=16, help="sampler steps (0: the preset's)")
    ap.add_argument("--set", action="append", default=[], help="config override, as em-train --set")
    ap.add_argument("--quick", action="store_true", help="a smoke run (256 images, 1 lap, 2 epochs, 4 steps)")
    ap.add_argument("--fresh", action="store_true", help="remove --work first instead of resuming")
    ap.add_argument("--work", type=Path, default=None, help="default bench/work/oracle (-quick)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()

    work = args.work or Path("bench/work/oracle-quick" if args.quick else "bench/work/oracle")
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    sets, laps, n = list(args.set), args.laps, args.n
    if args.quick:
        sets += ["train.epochs=2", "sample.steps=4"]
        laps, n = 1, 256
    else:
        sets += [f"train.epochs={args.epochs}"] if args.epochs else []
        sets += [f"sample.steps={args.steps}"] if args.steps else []
    result: dict[str, Any] = {
        "machine": machine(),
        "budget": f"{laps} laps, overrides {' '.join(sets) or 'none'}",
        "cases": {},
        "load_start": os.getloadavg()[0],
    }
    for case in args.cases:
        t0 = time.perf_counter()
        summary = run_case(
            case, work / case, n, sets, laps, lambda s, c=case: print(f"[{c}] {s}", flush=True)
        )
        result["cases"][case] = {
            "n": n,
            "preset": summary["preset"],
            "gaps": gaps(summary),
            "laps": summary["laps"],
            "seconds": time.perf_counter() - t0,
            "load": os.getloadavg()[0],
        }
        result["load_end"] = os.getloadavg()[0]
        write(
            args.out / "quick" if args.quick else args.out, "oracle-quick" if args.quick else "oracle", result
        )
    print(markdown(result))


def write(out: Path, name: str, result: dict[str, Any]) -> None:
    """The JSON, the Markdown and the PSNR-per-lap panels (rewritten after every case)."""
    from diffem_cli.pipeline import plots

    write_results(out, name, result, markdown(result).replace("oracle.png", f"{name}.png"))
    panels = {
        case: {m: [(x["lap"], x[m]) for x in r["gaps"] if x[m] is not None] for m in ("diffem", "oracle")}
        for case, r in result["cases"].items()
    }
    plots.save_curve_panels(panels, out / f"{name}.png", "lap")


if __name__ == "__main__":
    main()
