"""Digits benchmark: DiffEM on scikit-learn's 8x8 digits behind random pixel masks, vs oracle and naive.

For each missing rate rho (0.5, 0.75): the 1,797 digits are masked (``mask``, seed 0), DiffEM runs
K laps with the ``digits`` preset, and every lap's posterior samples are scored by PSNR and SSIM
against their clean digits (lap 0 is the Gaussian start). Then three unconditional models get
the training budget of one lap: DiffEM (trained on the last lap's
reconstructions), oracle (on the clean digits) and naive (on the observations ``y`` as if they
were clean, masked pixels 0). 1,797 samples of each are scored by Frechet distances against the
clean digits (``fd_pixels``: raw pixels, ``fd_rand``: features of a fixed random CNN). Writes
``bench/results/digits.json``, ``.md`` and one PNG grid per rho (``digits-rho*.png``).

    python -m bench.bench_digits [--laps 4] [--epochs 20] [--rhos 0.5 0.75] [--resume] [--quick]

Budget: the preset trains 40 epochs (560 steps) per lap; with K = 4 laps and three unconditional
models that is 7 x 560 UNet training steps and 7 passes of 1,797 x 32 network evaluations per
rho. Fewer laps alone cannot bring two rhos near 15 minutes on 2 CPU cores, so by default every
lap and every unconditional model trains 20 epochs (``--epochs 0`` restores the preset); the
report says which budget was used. Measured on a shared 2-core machine (1 thread, load 3-6):
45 minutes for the default run, of which rho 0.75 took 14 minutes at load 3. ``--resume``
reuses what a killed or earlier run left in the work folder (sampling is seeded, so the scores
are the same).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import machine, write_results
from diffem_cli import plots
from diffem_cli.checkpoint import build_model, load_checkpoint
from diffem_cli.config import RunConfig, load_config
from diffem_cli.corrupt import corrupt_dataset
from diffem_cli.em import Observations, Run, em_train, load_recon, pick_device
from diffem_cli.evaluate import evaluate_tensors
from diffem_cli.registry import make_channel
from diffem_cli.sources import load_source
from diffem_cli.store import write_dataset
from diffem_cli.uncond import sample_tensors, train_uncond

VALUE_RANGE = (-1.0, 1.0)
FD_METRICS = ["fd_pixels", "fd_rand"]
LAP_METRICS = ["psnr", "ssim", *FD_METRICS]
LAP_KEYS = ("lap", "init_s", "mstep_s", "estep_s", "loss", "examples_per_s", "estep_samples_per_s")
MODELS = ("diffem", "oracle", "naive")
GRID = 16


def config(sets: list[str]) -> RunConfig:
    """The digits preset with the benchmark's overrides (``key=value``, as ``--set``)."""
    return load_config("digits", sets)


def run_rho(rho: float, work: Path, laps: int, sets: list[str], grid_path: Path) -> dict[str, Any]:
    """One missing rate: corrupt, DiffEM laps, three unconditional models, their scores and a grid.

    Every stage that already finished under ``work`` (``--resume``) is reused, not redone.
    """
    dev = pick_device(None)
    timings: dict[str, float] = {}
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not (work / "obs" / "diffem.json").exists():
        channel = make_channel("mask", {"rho": rho})
        corrupt_dataset(
            load_source("digits"),
            channel,
            work / "obs",
            seed=0,
            clean_out=work / "clean",
            force=True,
            progress=False,
        )
    timings["corrupt_s"] = time.perf_counter() - t0

    def log(s: str) -> None:
        print(f"[rho {rho}] {s}", flush=True)

    t0 = time.perf_counter()
    records = em_train(
        work / "obs", work / "run", config(sets), laps=laps, eval_clean=work / "clean", log=log
    )
    timings["em_s"] = time.perf_counter() - t0

    clean, _ = load_recon(work / "clean")
    data = Observations(work / "obs")
    y = data.obs["y"]
    run = Run(work / "run")
    t0 = time.perf_counter()
    per_lap = []
    for r in records:  # scored from the saved reconstructions, so a resumed run scores every lap alike
        x, _ = load_recon(run.recon(r["lap"]))
        scores = evaluate_tensors(
            x,
            clean,
            LAP_METRICS,
            sample_index=data.index,
            reference_index=data.index,
            value_range=VALUE_RANGE,
        )
        per_lap.append({**{k: r.get(k) for k in LAP_KEYS}, **{k: float(v) for k, v in scores.items()}})
    timings["eval_laps_s"] = time.perf_counter() - t0
    recon_path = run.recon(laps)
    recon, _ = load_recon(recon_path)
    naive_path = work / "naive-data"
    if not (naive_path / "diffem.json").exists():
        write_dataset(
            naive_path,
            [{"x": y, "index": data.index}],
            {"kind": "clean", "value_range": list(VALUE_RANGE), "note": "observations y taken as clean"},
            force=True,
        )

    samples: dict[str, torch.Tensor] = {}
    for name, train_on in zip(MODELS, (recon_path, work / "clean", naive_path), strict=True):
        cfg = config(sets)
        t0 = time.perf_counter()
        ckpt = load_checkpoint(train_uncond(train_on, work / f"uncond-{name}", cfg, log=log))
        timings[f"train_{name}_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        samples[name] = sample_tensors(
            build_model(ckpt), ckpt.meta, len(clean), cfg.sample, seed=cfg.seed, device=dev
        )
        timings[f"sample_{name}_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fd = {
        name: evaluate_tensors(x, clean, FD_METRICS, value_range=VALUE_RANGE) for name, x in samples.items()
    }
    fd["reconstructions"] = evaluate_tensors(recon, clean, FD_METRICS, value_range=VALUE_RANGE)
    fd["observations"] = evaluate_tensors(y, clean, FD_METRICS, value_range=VALUE_RANGE)
    timings["eval_s"] = time.perf_counter() - t0

    rows = [clean[:GRID], y[:GRID], recon[:GRID], *(samples[m][:GRID] for m in MODELS)]
    labels = ["clean", "observed", f"lap {laps}", "DiffEM", "oracle", "naive"]
    plots.save_image_grid(rows, grid_path, labels=labels, value_range=VALUE_RANGE)
    return {
        "rho": rho,
        "laps": per_lap,
        "fd": {k: {m: float(v) for m, v in d.items()} for k, d in fd.items()},
        "timings": timings,
        "grid": str(grid_path),
    }


def markdown(result: dict[str, Any]) -> str:
    """Tables per rho: posterior PSNR/SSIM per lap, and Frechet distances of the three models."""
    b = result["budget"]
    lines = [
        "# Digits benchmark (scikit-learn 8x8 digits, 1,797 images, random pixel masks)",
        "",
        f"Machine: {result['machine']['summary']} "
        f"({result['machine']['torch_threads']} torch thread(s), "
        f"1-min load average {result['load_avg_1m']:.1f} at the end)",
        "",
        f"Budget: {b['laps']} laps of {b['epochs']} epochs x {b['steps_per_epoch']} steps (batch "
        f"{b['batch_size']}); each unconditional model gets one lap's budget "
        f"({b['epochs'] * b['steps_per_epoch']} steps). "
        f"E-step and sampling: {b['sampler']}, {b['steps']} steps.",
        b["note"],
        f"Total time: {result['total_s'] / 60:.1f} min"
        + (" (resumed: stages finished by an earlier run are not counted)." if result["resumed"] else "."),
        "",
        "Lap 0 is the Gaussian start; PSNR/SSIM of one posterior sample per observation against its clean "
        "digit, and the Frechet distances of those reconstructions to the clean digits (`fd_pixels` compares "
        "only means and covariances of raw pixels, which the Gaussian start matches by construction; "
        "`fd_rand` compares them in the feature space of a fixed random CNN). "
        "Frechet distances (lower is better) of 1,797 samples against the 1,797 clean digits; "
        "'reconstructions' and 'observations' score the last lap's posterior samples and the masked "
        "images themselves, for reference.",
    ]
    for r in result["rhos"]:
        laps = r["laps"]
        lines += [
            "",
            f"## rho = {r['rho']}",
            "",
            "| after lap | " + " | ".join(str(x["lap"]) for x in laps) + " |",
            "|---|" + "---|" * len(laps),
            "| PSNR (dB) | " + " | ".join(_fmt(x.get("psnr"), 2) for x in laps) + " |",
            "| SSIM | " + " | ".join(_fmt(x.get("ssim"), 3) for x in laps) + " |",
            "| fd_pixels | " + " | ".join(_fmt(x.get("fd_pixels"), 3) for x in laps) + " |",
            "| fd_rand | " + " | ".join(_fmt(x.get("fd_rand"), 3) for x in laps) + " |",
            "",
            "| model | fd_pixels | fd_rand | train s |",
            "|---|---|---|---|",
        ]
        for name in (*MODELS, "reconstructions", "observations"):
            fd = r["fd"][name]
            secs = r["timings"].get(f"train_{name}_s")
            lines.append(
                f"| {name} | {_fmt(fd.get('fd_pixels'), 3)} | {_fmt(fd.get('fd_rand'), 3)} | "
                f"{_fmt(secs, 0)} |"
            )
        t = r["timings"]
        lines += [
            "",
            f"EM ({len(laps) - 1} laps): {t['em_s']:.0f} s. Grid: `{Path(r['grid']).name}` (rows: clean, "
            "observation, last-lap reconstruction, DiffEM / oracle / naive unconditional samples).",
        ]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--laps", type=int, default=4)
    ap.add_argument(
        "--epochs",
        type=int,
        default=20,
        help="epochs per lap and per unconditional model (the digits preset has 40; 0 = the preset's)",
    )
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--quick", action="store_true", help="a smoke run (1 lap, 2 epochs, 8 sampling steps)")
    ap.add_argument("--resume", action="store_true", help="reuse what an earlier run left in --work")
    ap.add_argument("--work", type=Path, default=None, help="default bench/work/digits (-quick)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()

    laps, epochs = (1, 2) if args.quick else (args.laps, args.epochs)
    sets = [f"train.epochs={epochs}"] if epochs else []
    if args.quick:
        sets.append("sample.steps=8")
    name = "digits-quick" if args.quick else "digits"
    work = args.work or Path("bench/work") / name
    if not args.resume:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = config(sets)
    preset = load_config("digits")
    if args.quick:
        note = "Smoke run (`--quick`): the figures only show that the chain runs."
    elif cfg.train.epochs != preset.train.epochs:
        note = (
            f"The digits preset trains {preset.train.epochs} epochs per lap; this run used "
            f"{cfg.train.epochs} to bring the whole benchmark toward 15 minutes on an unloaded 2-core "
            "machine (`--epochs 0` restores the preset)."
        )
    else:
        note = "The digits preset's budget."
    t0 = time.perf_counter()
    rhos = [
        run_rho(rho, work / f"rho{rho}", laps, sets, args.out / f"{name}-rho{rho}.png") for rho in args.rhos
    ]
    result = {
        "machine": machine(),
        "load_avg_1m": os.getloadavg()[0],
        "config": cfg.to_dict(),
        "budget": {
            "laps": laps,
            "epochs": cfg.train.epochs,
            "preset_epochs": preset.train.epochs,
            "batch_size": cfg.train.batch_size,
            "steps_per_epoch": 1797 // min(cfg.train.batch_size, 1797),
            "sampler": cfg.sample.sampler,
            "steps": cfg.sample.steps,
            "note": note,
        },
        "rhos": rhos,
        "total_s": time.perf_counter() - t0,
        "resumed": args.resume,
    }
    text = markdown(result)
    write_results(args.out, name, result, text)
    print(text)


if __name__ == "__main__":
    main()
