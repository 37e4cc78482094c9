"""Held-out oracle gap: DiffEM and the oracle scored on observations neither of them trained on.

``compare`` scores a method on the observations it trained on, and the oracle, which trains on
their clean images, can memorise what it is scored on. Here the digits are split (the first
``--train`` rows train, the rest are held out; ``corrupt --limit`` / ``--skip``), both methods
train on the first part through ``compare`` (``--laps`` laps of the ``digits`` preset), and every
lap's checkpoint draws ``--k`` posterior samples of each held-out observation. They are scored as
a posterior (``post_psnr_one``: one draw; ``post_psnr_mean``: the K-draw mean; ``post_coverage``
beside its exact value) and by the Fréchet distance of one draw to the held-out clean digits.

Each ``--variant NAME [KEY=VALUE ...]`` is one compare folder with those config overrides for
both methods (default: ``base``, none). Writes ``bench/results/NAME.json`` and ``.md``
(``--name``, default ``heldout``); a rerun resumes the runs a killed one left in ``--work``.

    python -m bench.bench_heldout [--variant base] [--variant recorrupt em.recorrupt_every=1]
        [--train 1497] [--laps 6] [--k 8] [--every 1] [--quick]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine, write_results
from diffem_cli.io.observations import Observations
from diffem_cli.io.provenance import git_commit
from diffem_cli.io.registry import make_channel
from diffem_cli.io.sources import load_source
from diffem_cli.methods import load_config
from diffem_cli.metrics.evaluate import evaluate_folders, posterior_folder
from diffem_cli.metrics.posterior_quality import expected_coverage
from diffem_cli.pipeline.compare import compare
from diffem_cli.pipeline.corrupt import corrupt_dataset
from diffem_cli.pipeline.reconstruct import reconstruct

METHODS = ("diffem", "oracle")
SHOWN = {"post_psnr_one": ("one", ".2f"), "post_psnr_mean": ("mean", ".2f")}
SHOWN |= {"post_coverage": ("coverage", ".3f"), "fd_pixels": ("fd", ".3f")}


def split(work: Path, train: int, rho: float) -> None:
    """Masked digits (seed 0): rows ``:train`` to ``work/train``, the rest to ``work/test``, each
    with its clean folder; every row keeps its index, so its mask is the whole set's."""
    work.mkdir(parents=True, exist_ok=True)
    for part, cut in (("train", {"limit": train}), ("test", {"skip": train})):
        if not (work / part / "diffem.json").exists():
            corrupt_dataset(
                load_source("digits", **cut),
                make_channel("mask", {"rho": rho}),
                work / part,
                seed=0,
                clean_out=work / f"{part}-clean",
                force=True,
                progress=False,
            )


def nearest(work: Path) -> dict[str, float]:
    """A memoriser: for each observation, the clean training digit closest on its observed pixels.
    ``insample_own``: the share of training observations whose nearest is their own digit (an
    oracle's ceiling in-sample); ``heldout_psnr``: its PSNR on the held-out observations."""
    import torch

    from diffem_cli.io.observations import load_clean
    from diffem_cli.metrics.images import psnr

    train, test = Observations(work / "train"), Observations(work / "test")
    bank = load_clean(work / "train-clean", train).flatten(1)
    bank64 = bank.double()

    def pick(seen: Observations) -> torch.Tensor:
        y, m = seen.obs["y"].flatten(1).double(), seen.obs["mask"].expand(-1, *seen.shape).flatten(1).double()
        # sum_j m_j (b_j - y_j)^2 for every bank row b, expanded into three products
        dist = (m * y * y).sum(1, keepdim=True) - 2 * (m * y) @ bank64.T + m @ bank64.square().T
        return dist.argmin(1)

    own = pick(train) == torch.arange(len(train))
    truth = load_clean(work / "test-clean", test)
    return {
        "insample_own": float(own.float().mean()),
        "heldout_psnr": psnr(bank[pick(test)].reshape(truth.shape), truth, (-1.0, 1.0)),
    }


def score(ckpt: Path, work: Path, seen: Observations, k: int) -> dict[str, float]:
    """``k`` draws of every held-out observation (``seen``, loaded from ``work/test``) by the
    checkpoint, scored as a posterior."""
    with tempfile.TemporaryDirectory() as tmp:
        draws = Path(tmp) / "draws"
        reconstruct(ckpt, work / "test", draws, per_observation=k, seed=0)
        post = posterior_folder(
            draws, work / "test-clean", channel=seen.channel, obs=seen.obs, obs_index=seen.index
        )
        fd = evaluate_folders(draws, work / "test-clean", ["fd_pixels"])
    return {**(post or {}), **fd}


def run_variant(work: Path, name: str, sets: list[str], laps: int, k: int, every: int, log) -> dict[str, Any]:
    """Train both methods on the training part, then score every ``every``-th lap and the last on
    the held-out part."""
    out = work / f"cmp-{name}"
    summary = compare(
        work / "train",
        out,
        list(METHODS),
        load_config("digits", sets),
        eval_clean=work / "train-clean",
        laps=laps,
        uncond=False,
        log=log,
    )
    seen = Observations(work / "test")
    heldout: dict[str, list[dict[str, Any]]] = {}
    for method in METHODS:
        rows = []
        for ckpt in sorted((out / method / "checkpoints").glob("lap_*.safetensors"))[:laps]:
            lap = int(ckpt.stem.split("_")[1])
            if lap % every and lap != laps:
                continue
            rows.append({"lap": lap, **score(ckpt, work, seen, k)})
            log(f"{name} {method} lap {lap}: " + ", ".join(f"{s} {rows[-1][s]:.4g}" for s in SHOWN))
        heldout[method] = rows
    insample = {m: [r.get("eval_psnr") for r in summary["laps"][m]] for m in METHODS}
    return {"sets": sets, "heldout": heldout, "insample_psnr": insample}


def markdown(result: dict[str, Any]) -> str:
    """Per variant: the in-sample PSNR and the held-out posterior scores of both methods by lap."""
    m = result["machine"]
    lines = [
        "# Held-out oracle gap: DiffEM and the oracle on digits neither trained on",
        "",
        f"{result['date']}, commit {result['commit']}, {m['summary']}, {m['torch_threads']} torch thread(s); "
        f"load {result['load_start']:.1f} at the start, {result['load_end']:.1f} at the end.",
        f"Digits mask {result['rho']}: rows 0-{result['train'] - 1} train, the other {result['test']} are "
        f"held out. The `digits` preset, {result['laps']} laps. Held out: {result['k']} draws per "
        "observation of every lap's checkpoint; `one` the PSNR (dB) of one draw, `mean` of the "
        "K-draw mean, `coverage` of the central interval per missing pixel (exact posterior: "
        f"{result['coverage_expected']:.3f}), `fd` the Fréchet distance of one draw to the held-out "
        "clean digits (pixels; 300 rows, so biased upward alike for all). `in-sample`: one draw "
        "against the training observations' own clean digits, as `compare` scores.",
        "",
        f"A memoriser that returns the clean training digit nearest on the observed pixels finds the "
        f"observation's own digit for {result['nearest']['insample_own']:.1%} of the training "
        f"observations (no error at all in-sample) and scores {result['nearest']['heldout_psnr']:.2f} dB "
        "on the held-out ones.",
        "",
    ]
    for name, r in result["variants"].items():
        lines += [f"## {name} ({' '.join(r['sets']) or 'the preset'})", ""]
        laps = [row["lap"] for row in r["heldout"]["diffem"]]
        lines += ["| | " + " | ".join(f"lap {x}" for x in laps) + " |", "|---" * (len(laps) + 1) + "|"]
        for method in METHODS:
            rows = r["heldout"][method]
            ins = [r["insample_psnr"][method][row["lap"]] for row in rows]
            lines.append(f"| {method} in-sample | " + " | ".join(f"{v:.2f}" for v in ins) + " |")
            for key, (label, fmt) in SHOWN.items():
                cells = " | ".join(format(row[key], fmt) for row in rows)
                lines.append(f"| {method} {label} | {cells} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"))
    ap.add_argument("--train", type=int, default=1497, help="digits that train; the rest are held out")
    ap.add_argument("--rho", type=float, default=0.5, help="masked fraction")
    ap.add_argument("--laps", type=int, default=6)
    ap.add_argument("--k", type=int, default=8, help="draws per held-out observation")
    ap.add_argument("--every", type=int, default=1, help="score every N-th lap (and the last)")
    ap.add_argument("--quick", action="store_true", help="a smoke run (1 lap of 2 epochs, 4 steps)")
    ap.add_argument("--work", type=Path, default=None, help="default bench/work/heldout (-quick)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--name", default="heldout")
    args = ap.parse_args()

    variants = args.variant or [["base"]]
    work = args.work or Path("bench/work/heldout-quick" if args.quick else "bench/work/heldout")
    laps, extra = (1, ["train.epochs=2", "sample.steps=4"]) if args.quick else (args.laps, [])
    split(work, args.train, args.rho)
    result: dict[str, Any] = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "commit": (git_commit() or "unknown")[:7],
        "rho": args.rho,
        "train": args.train,
        "test": len(Observations(work / "test")),
        "laps": laps,
        "k": args.k,
        "coverage_expected": expected_coverage(args.k),
        "load_start": os.getloadavg()[0],
        "nearest": nearest(work),
        "variants": {},
    }
    for name, *sets in variants:
        result["variants"][name] = run_variant(
            work, name, [*sets, *extra], laps, args.k, args.every, lambda s: print(s, flush=True)
        )
        result["load_end"] = os.getloadavg()[0]
        out, stem = (args.out / "quick", f"{args.name}-quick") if args.quick else (args.out, args.name)
        write(out, stem, result)
    print(markdown(result))


def write(out: Path, stem: str, result: dict[str, Any]) -> None:
    """The JSON, the Markdown and ``stem.png``: each held-out score per lap, one line per variant
    and method."""
    from diffem_cli.pipeline import plots

    write_results(out, stem, result, markdown(result) + f"\n![held-out scores per lap]({stem}.png)\n")
    panels = {
        key: {
            f"{method} {name}": [(row["lap"], row[key]) for row in r["heldout"][method]]
            for name, r in result["variants"].items()
            for method in METHODS
        }
        for key in SHOWN
    }
    plots.save_curve_panels(panels, out / f"{stem}.png", "lap")


if __name__ == "__main__":
    main()
