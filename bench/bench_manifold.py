"""Manifold benchmark at the anchor's budget (algorithm.md): DiffEM vs the Gaussian start vs an oracle.

16,384 observations of a random curve in R^5 through fresh 2x5 random projections (sigma 0.01);
MLP 3 x 256; 6 laps of 2,000 steps at batch 1,024. Scores every lap's reconstructions by the
Sinkhorn divergence against 4,096 held-out clean points of the same curve, and an oracle: the
same conditional model trained for one lap's budget on the clean data (an upper bound for one
lap). Writes ``bench/results/manifold.json`` and ``.md``.

    python -m bench.bench_manifold [--curve-seed 0] [--laps 6] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from bench.common import machine, write_results
from diffem_cli.config import load_config
from diffem_cli.corrupt import corrupt_dataset, recorrupt
from diffem_cli.em import Observations, em_train, pick_device
from diffem_cli.estep import posterior_samples
from diffem_cli.evaluate import evaluate_tensors
from diffem_cli.nets import build_network
from diffem_cli.registry import make_channel
from diffem_cli.sources import load_source, sample_manifold
from diffem_cli.store import write_dataset
from diffem_cli.train import train_denoiser

OFFICIAL = {
    "official DiffEM": {"sinkhorn": [1.320, 1.189, 0.920, 0.784, 0.680, 0.563, 0.491], "seconds": 476},
    "official EM-MMPS": {"sinkhorn": [1.289, 0.852, 0.603, 0.456, 0.335, 0.286, 0.238], "seconds": 844},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--curve-seed", type=int, default=0)
    ap.add_argument("--laps", type=int, default=6)
    ap.add_argument("--quick", action="store_true", help="a short smoke run (1 lap, 200 steps)")
    ap.add_argument("--work", type=Path, default=None, help="default: bench/work/manifold[-quick]")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()

    work = args.work or Path("bench/work/manifold-quick" if args.quick else "bench/work/manifold")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sets = ["train.epochs=12", "em.laps=1"] if args.quick else []
    cfg = load_config("manifold", sets)
    laps = 1 if args.quick else args.laps
    channel = make_channel("projection", {})
    source = load_source(f"manifold:seed={args.curve_seed}")
    corrupt_dataset(source, channel, work / "obs", seed=0, clean_out=work / "clean", progress=False)
    heldout = sample_manifold(4096, 5, args.curve_seed, draw_seed=10_000 + args.curve_seed)
    write_dataset(work / "heldout", [{"x": heldout}], {"kind": "clean"})

    t0 = time.perf_counter()
    records = em_train(
        work / "obs",
        work / "run",
        cfg,
        laps=laps,
        eval_clean=work / "heldout",
        log=lambda s: print(s, flush=True),
    )
    em_wall = time.perf_counter() - t0
    train_s = sum(r.get(k, 0.0) for r in records for k in ("init_s", "mstep_s", "estep_s", "corrupt_s"))

    oracle = oracle_score(work, cfg, heldout)
    result = {
        "machine": machine(),
        "config": cfg.to_dict(),
        "laps": [
            {
                k: r.get(k)
                for k in (
                    "lap",
                    "init_s",
                    "mstep_s",
                    "estep_s",
                    "eval_sinkhorn",
                    "eval_sliced_w2",
                    "examples_per_s",
                    "estep_samples_per_s",
                )
            }
            for r in records
        ],
        "train_seconds": train_s,
        "wall_seconds_with_eval": em_wall,
        "oracle_sinkhorn": oracle,
        "official": OFFICIAL,
        "target": {"sinkhorn_after_6_laps": 0.24, "seconds": 240},
    }
    lines = [
        f"# Manifold benchmark (curve seed {args.curve_seed})",
        "",
        f"Machine: {result['machine']['summary']}",
        "",
        "| after lap | " + " | ".join(str(r["lap"]) for r in records) + " | train time |",
        "|---|" + "---|" * (len(records) + 1),
        "| diffem | "
        + " | ".join(f"{r.get('eval_sinkhorn', float('nan')):.3f}" for r in records)
        + f" | {train_s:.0f} s |",
    ]
    for name, row in OFFICIAL.items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{v:.3f}" for v in row["sinkhorn"][: len(records)])
            + f" | {row['seconds']} s |"
        )
    lines += [
        "",
        f"Oracle (conditional model trained one lap's budget on clean data): Sinkhorn {oracle:.3f}.",
        "",
        "| lap | start s | M-step s | E-step s | M-step examples/s | E-step samples/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['lap']} | {r.get('init_s', 0):.1f} | {r.get('mstep_s', 0):.1f} | "
            f"{r.get('estep_s', 0):.1f} | {r.get('examples_per_s', 0):.0f} | "
            f"{r.get('estep_samples_per_s', 0):.0f} |"
        )
    name = "manifold" if not args.quick else "manifold-quick"
    if args.curve_seed:
        name += f"-curve{args.curve_seed}"
    write_results(args.out, name, result, "\n".join(lines) + "\n")
    print("\n".join(lines))


def oracle_score(work: Path, cfg, heldout: torch.Tensor) -> float:
    """Train the conditional model on (clean x, fresh y) pairs for one lap's budget; score its E-step."""
    data = Observations(work / "obs")
    from diffem_cli.em import load_recon

    clean, _ = load_recon(work / "clean")
    dev = pick_device(None)
    torch.manual_seed(cfg.seed)
    cond_size = data.channel.cond_size(data.shape)
    model = build_network(cfg.network, data.shape, cond_size)
    fresh = recorrupt(data.channel, clean, cfg.seed, 1, data.index)
    result = train_denoiser(
        model,
        clean,
        data.channel.condition(fresh, data.shape),
        cfg.train,
        seed=cfg.seed,
        device=dev,
        label="oracle",
    )
    x = posterior_samples(
        result.ema_model, data.channel, data.obs, data.shape, cfg.sample, seed=cfg.seed, device=dev
    )
    return evaluate_tensors(x, heldout, ["sinkhorn"])["sinkhorn"]


if __name__ == "__main__":
    main()
