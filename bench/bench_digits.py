"""Digits benchmark: every method on scikit-learn's 8x8 digits, through ``diffem compare``.

Cases (``--cases``): ``mask0.5`` and ``mask0.75`` (random pixel masks), ``noise0.2`` (Gaussian
noise, sigma 0.2) and ``jpeg15`` (JPEG at quality 15, the non-linear channel). Each case corrupts
the 1,797 digits (seed 0) and runs ``compare`` with that case's methods at one budget: the
``digits`` preset with ``--epochs`` epochs per lap and ``--laps`` laps. Scores: posterior PSNR,
SSIM and ``fd_pixels`` of every lap's reconstructions against the clean digits, and Frechet
distances (``fd_rand``, ``fd_pixels``) of 1,797 unconditional samples of each method's model.
Writes ``bench/results/digits.json``, ``.md`` and one ``digits-CASE.png`` (reconstructions and
samples of every method) per case; a rerun resumes what a killed one left in ``--work``.

    python -m bench.bench_digits [--cases mask0.5 mask0.75] [--laps 3] [--epochs 20] [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from bench.common import machine, write_results
from diffem_cli.io.registry import make_channel
from diffem_cli.io.sources import load_source
from diffem_cli.methods import load_config
from diffem_cli.pipeline.compare import compare
from diffem_cli.pipeline.corrupt import corrupt_dataset

CASES: dict[str, tuple[str, dict[str, Any], str]] = {
    "mask0.5": ("mask", {"rho": 0.5}, "diffem,em-mmps,dps-em,ambient,naive,oracle"),
    "mask0.75": ("mask", {"rho": 0.75}, "diffem,em-mmps,dps-em,ambient,naive,oracle"),
    "noise0.2": ("noise", {"sigma": 0.2}, "diffem,em-mmps,dps-em,ambient-tweedie,naive,oracle"),
    "jpeg15": ("jpeg", {"quality": 15}, "diffem,dps-em,naive,oracle"),
}
SHOWN = ("psnr", "ssim", "fd_pixels", "uncond_fd_rand", "uncond_fd_pixels", "seconds")


def run_case(case: str, work: Path, methods: str | None, sets: list[str], laps: int, log) -> dict[str, Any]:
    """Corrupt the digits for ``case`` and compare its methods; returns compare's summary."""
    from diffem_cli.methods import method_names

    channel_name, params, default_methods = CASES[case]
    names = [m for m in (methods or default_methods).split(",") if m in method_names()]
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "obs" / "diffem.json").exists():
        corrupt_dataset(
            load_source("digits"),
            make_channel(channel_name, params),
            work / "obs",
            seed=0,
            clean_out=work / "clean",
            force=True,
            progress=False,
        )
    cfg = load_config("digits", sets)
    return compare(work / "obs", work / "cmp", names, cfg, eval_clean=work / "clean", laps=laps, log=log)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Digits benchmark (diffem compare)",
        "",
        f"Machine: {result['machine']['summary']}",
        f"Budget: {result['budget']}",
        "",
    ]
    for case, summary in result["cases"].items():
        lines += [f"## {case}", "", "| method | " + " | ".join(SHOWN) + " |", "|---" * (len(SHOWN) + 1) + "|"]
        for name, row in summary["methods"].items():
            cells = [f"{row[k]:.4g}" if isinstance(row.get(k), float) else "" for k in SHOWN]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Posterior PSNR (dB) by lap:",
            "",
            "| method | "
            + " | ".join(f"lap {r['lap']}" for r in next(iter(summary["laps"].values())))
            + " |",
        ]
        lines.append("|---" * (1 + len(next(iter(summary["laps"].values())))) + "|")
        for name, records in summary["laps"].items():
            lines.append(
                f"| {name} | " + " | ".join(f"{r.get('eval_psnr', float('nan')):.2f}" for r in records) + " |"
            )
        lines += ["", f"![{case}](digits-{case}.png)", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=["mask0.5", "mask0.75"])
    ap.add_argument("--methods", default=None, help="comma-separated (default: each case's list)")
    ap.add_argument("--laps", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20, help="epochs per lap (0: the preset's)")
    ap.add_argument("--set", action="append", default=[], help="config override, as em-train --set")
    ap.add_argument("--quick", action="store_true", help="a smoke run (1 lap, 2 epochs, 8 sampling steps)")
    ap.add_argument("--fresh", action="store_true", help="remove --work first instead of resuming")
    ap.add_argument("--work", type=Path, default=None, help="default bench/work/digits (-quick)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()

    work = args.work or Path("bench/work/digits-quick" if args.quick else "bench/work/digits")
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    sets = list(args.set)
    laps = args.laps
    if args.quick:
        sets += ["train.epochs=2", "sample.steps=8"]
        laps = 1
    elif args.epochs:
        sets.append(f"train.epochs={args.epochs}")
    name = "digits-quick" if args.quick else "digits"
    out = args.out / ("quick" if args.quick else "")
    budget = f"{laps} laps, overrides {' '.join(sets) or 'none'}"
    result: dict[str, Any] = {"machine": machine(), "budget": budget, "cases": {}, "seconds": {}}
    previous = out / f"{name}.json"
    if previous.exists() and not args.fresh:  # cases run one at a time accumulate in one file
        old = json.loads(previous.read_text())
        if old.get("budget") == budget:
            result["cases"].update(old.get("cases", {}))
            result["seconds"].update(old.get("seconds", {}))
    for case in args.cases:
        t0 = time.perf_counter()
        summary = run_case(
            case, work / case, args.methods, sets, laps, lambda s, c=case: print(f"[{c}] {s}", flush=True)
        )
        result["cases"][case] = {"methods": summary["methods"], "laps": summary["laps"]}
        result["seconds"][case] = time.perf_counter() - t0
        if not args.quick:
            args.out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(work / case / "cmp" / "compare-samples.png", args.out / f"digits-{case}.png")
        write_results(out, name, result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
