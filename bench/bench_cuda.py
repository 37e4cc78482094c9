"""Throughput on a CUDA device: the roofline, eager against compiled, and the batch size.

For each preset network of :mod:`bench.bench_speed` (the manifold MLP, the digits UNet, the
``img16`` and ``img32`` UNets), on the first CUDA device, in one process:

* the device's own ceilings: a large bf16 matrix product, the same in float32 with and without
  TF32, and a device-to-device copy (bytes read plus written);
* FLOPs of one training step per example and of one forward per row (``torch.utils.flop_counter``,
  under diffem's bf16 autocast as the training loop and the samplers run it);
* the dense limit: the network's own matrix products and convolutions, replayed alone on the
  device (:mod:`bench.roofline`);
* the M-step (``train_denoiser``, examples/s) eager and compiled (``train.compile``), and eager at
  eight times the preset batch; the first compiled call (compilation included) apart;
* the E-step (DiffEM's posterior with DPM-Solver++, network evaluations/s) eager and compiled
  (``sample.compile``).

Achieved FLOP/s is reported against the dense limit and against the bf16 matrix ceiling. Writes
``bench/results/speed-cuda.json`` and ``.md``. Compile studies start only while the run is inside
``--deadline`` seconds (compilation takes tens of seconds per graph); skipped ones say so.

    python -m bench.bench_cuda [--cases mlp digits img16 img32] [--compile mlp digits img16 img32]
        [--deadline 240] [--out bench/results]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.bench_speed import Case, cases, estep_method, mstep, observations, roofline
from bench.common import machine, write_results
from diffem_cli.diffusion.nets import build_network, count_parameters
from diffem_cli.diffusion.sampling import SampleConfig
from diffem_cli.io.registry import make_channel
from diffem_cli.pipeline.em import posterior_samples

WIDE = 8  # the larger M-step batch, as a multiple of the preset's


def timed(fn: Any, device: torch.device, repeats: int = 10) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after two warm-ups, timed with CUDA events."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def ceilings(device: torch.device) -> dict[str, float]:
    """FLOP/s of an 8192^3 matrix product in bf16, float32 with TF32 and float32 without; bytes/s
    of a 2 GiB device-to-device copy (read plus written)."""
    n, out = 8192, {}
    gen = torch.Generator(device=device).manual_seed(0)
    for key, dtype, tf32 in (("bf16", torch.bfloat16, True), ("tf32", torch.float32, True)):
        a = torch.randn((n, n), generator=gen, device=device, dtype=dtype)
        b = torch.randn((n, n), generator=gen, device=device, dtype=dtype)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        out[key] = 2 * n**3 / timed(lambda a=a, b=b: a @ b, device)
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn((n // 2, n // 2), generator=gen, device=device)
    out["fp32"] = 2 * (n // 2) ** 3 / timed(lambda: a @ a, device)
    src = torch.empty(2**29, device=device)  # 2 GiB of float32
    dst = torch.empty_like(src)
    out["copy_bytes"] = 2 * src.numel() * 4 / timed(lambda: dst.copy_(src), device)
    return out


def estep(
    case: Case, net: torch.nn.Module, data: Any, device: torch.device, compile: str
) -> dict[str, float]:
    """Network evaluations/s (rows x calls, as the E-step's own record counts them) of DiffEM's
    posterior over ``data`` on ``device``."""
    method = estep_method(case)
    sample = SampleConfig(sampler="dpm++", steps=case.e_steps, batch_size=case.sample_batch, compile=compile)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    _, record = posterior_samples(
        method, net, {}, data, sample, seed_parts=(0, 1), device=device, label=f"{case.name} E-step"
    )
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return {"rate": record["estep_forwards"] / seconds, "seconds": seconds}


def run_case(
    case: Case, device: torch.device, work: Path, compile_study: bool, rounds: int
) -> dict[str, Any]:
    """Eager M-step and E-step (and wide M-step) alternately ``rounds`` times; then the roofline;
    then, with ``compile_study``, the compiled M-step and E-step."""
    name, params = case.channel
    torch.manual_seed(0)
    net = build_network(case.network, case.shape, make_channel(name, params).cond_size(case.shape)).to(device)
    data = observations(case, work, 2 * case.sample_batch)
    steps = 8 * case.steps
    estep(case, net, data, device, "off")  # warm-up: cuDNN's choices, first-call overheads
    mstep(case, net, 4, device=device)
    mstep(case, net, 2, device=device, batch_size=WIDE * case.batch)
    rows: dict[str, list[dict[str, float]]] = {"mstep": [], "wide": [], "estep": []}
    for _ in range(rounds):
        rows["mstep"].append(mstep(case, net, steps, device=device))
        rows["wide"].append(
            mstep(case, net, max(2, steps // WIDE), device=device, batch_size=WIDE * case.batch)
        )
        rows["estep"].append(estep(case, net, data, device, "off"))

    def rate(key: str) -> float:
        return sum(r["rate"] * r["seconds"] for r in rows[key]) / sum(r["seconds"] for r in rows[key])

    out: dict[str, Any] = {
        "parameters": count_parameters(net),
        "shape": list(case.shape),
        "batch_size": case.batch,
        "wide_batch_size": WIDE * case.batch,
        "sample_batch_size": case.sample_batch,
        "rounds": rows,
        "mstep_rate": rate("mstep"),
        "wide_rate": rate("wide"),
        "estep_rate": rate("estep"),
    }
    out.update(roofline(case, net, device))
    out["mstep_flops"] = out["mstep_rate"] * out["train_flops_per_example"]
    out["wide_flops"] = out["wide_rate"] * out["train_flops_per_example"]
    out["estep_flops"] = out["estep_rate"] * out["fwd_flops_per_row"]
    if compile_study:
        t0 = time.perf_counter()
        mstep(case, net, 2, "on", device=device)
        first_m = time.perf_counter() - t0
        t0 = time.perf_counter()
        estep(case, net, data, device, "on")
        first_e = time.perf_counter() - t0
        m = [mstep(case, net, steps, "on", device=device) for _ in range(rounds)]
        e = [estep(case, net, data, device, "on") for _ in range(rounds)]
        out["compile"] = {
            "first_mstep_s": first_m,
            "first_estep_s": first_e,
            "mstep_rate": sum(r["rate"] * r["seconds"] for r in m) / sum(r["seconds"] for r in m),
            "estep_rate": sum(r["rate"] * r["seconds"] for r in e) / sum(r["seconds"] for r in e),
        }
    print(f"{case.name}: {_summary(out)}", flush=True)
    return out


def _summary(r: dict[str, Any]) -> str:
    c = r.get("compile") or {}
    return (
        f"M-step {r['mstep_rate']:,.0f} ex/s (x{WIDE} batch {r['wide_rate']:,.0f}; compiled "
        f"{c.get('mstep_rate', float('nan')):,.0f}); E-step {r['estep_rate']:,.0f} evals/s (compiled "
        f"{c.get('estep_rate', float('nan')):,.0f})"
    )


def markdown(result: dict[str, Any]) -> str:
    """The ceilings, the throughput and roofline table, and the compile study."""
    ceil = result["ceilings"]
    bf16 = ceil["bf16"]
    lines = [
        "# Throughput on CUDA: roofline, compiled networks, batch size",
        "",
        f"Machine: {result['machine']['summary']}. Date {result['date']}, commit {result['commit']}. "
        "The device was used by this benchmark alone; CUDA-event and synchronised host timings.",
        "",
        f"Device ceilings measured in the same process: bf16 matrix product (8192^3) "
        f"{bf16 / 1e12:,.0f} TFLOP/s; float32 with TF32 {ceil['tf32'] / 1e12:,.0f} TFLOP/s; float32 "
        f"without {ceil['fp32'] / 1e12:,.1f} TFLOP/s; device-to-device copy "
        f"{ceil['copy_bytes'] / 1e12:,.2f} TB/s (read plus written).",
        "",
        "Every network runs under diffem's bf16 autocast, as the training loop and the samplers run "
        "it on CUDA. FLOPs by `torch.utils.flop_counter` (matrix products and convolutions). Dense "
        "limit: the network's own matrix products and convolutions replayed alone on the device "
        "(`bench/roofline.py`). M-step: `train_denoiser` examples/s at the preset batch and at "
        f"{WIDE}x it; E-step: DiffEM's posterior with DPM-Solver++ (network evaluations/s).",
        "",
        "| network | params | batch (M / E) | M-step ex/s | GFLOP/s | of dense limit | of bf16 ceiling | "
        f"x{WIDE} batch ex/s | of bf16 ceiling | E-step evals/s | GFLOP/s | of dense limit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["cases"].items():
        lines.append(
            f"| {name} | {r['parameters'] / 1e6:.2f} M | {r['batch_size']} / {r['sample_batch_size']} | "
            f"{r['mstep_rate']:,.0f} | {r['mstep_flops'] / 1e9:,.0f} | "
            f"**{r['mstep_flops'] / r['train_limit']:.3f}** | {r['mstep_flops'] / bf16:.4f} | "
            f"{r['wide_rate']:,.0f} | {r['wide_flops'] / bf16:.4f} | {r['estep_rate']:,.0f} | "
            f"{r['estep_flops'] / 1e9:,.0f} | **{r['estep_flops'] / r['fwd_limit']:.3f}** |"
        )
    lines += [
        "",
        "Dense limits (GFLOP/s): "
        + "; ".join(
            f"{n} train {r['train_limit'] / 1e9:,.0f}, forward {r['fwd_limit'] / 1e9:,.0f}"
            for n, r in result["cases"].items()
        )
        + ".",
        "",
        "## torch.compile on CUDA (Inductor with Triton kernels)",
        "",
        "First call: compilation plus a 2-step epoch (M-step) or one E-step; Inductor's on-disk cache "
        "was empty (a fresh machine).",
        "",
        "| network | first M-step call s | M-step eager ex/s | compiled | compiled / eager | "
        "first E-step call s | E-step eager evals/s | compiled | compiled / eager |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["cases"].items():
        c = r.get("compile")
        if not c:
            lines.append(f"| {name} | skipped (past the deadline or not asked) | | | | | | | |")
            continue
        lines.append(
            f"| {name} | {c['first_mstep_s']:.1f} | {r['mstep_rate']:,.0f} | {c['mstep_rate']:,.0f} | "
            f"**{c['mstep_rate'] / r['mstep_rate']:.2f}** | {c['first_estep_s']:.1f} | "
            f"{r['estep_rate']:,.0f} | {c['estep_rate']:,.0f} | **{c['estep_rate'] / r['estep_rate']:.2f}** |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["mlp", "digits", "img16", "img32"])
    ap.add_argument("--compile", nargs="*", default=["mlp", "digits", "img16", "img32"])
    ap.add_argument(
        "--deadline", type=float, default=240.0, help="seconds after which no compile study starts"
    )
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--commit", default="unknown", help="the commit measured, for the page")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():  # nothing to measure here: a skip, not a failure of make bench
        print("bench_cuda: no CUDA device, nothing measured")
        return
    device = torch.device("cuda")
    all_cases = cases(False)
    unknown = [c for c in args.cases if c not in all_cases]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)} (known: {', '.join(all_cases)})")
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": args.commit,
        "ceilings": ceilings(device),
        "cases": {},
    }
    print(f"ceilings: {result['ceilings']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="diffem-cuda-") as tmp:
        for name in args.cases:
            in_time = time.perf_counter() - t_start < args.deadline
            result["cases"][name] = run_case(
                all_cases[name], device, Path(tmp), name in args.compile and in_time, args.rounds
            )
            write_results(args.out, "speed-cuda", result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
