"""Throughput benchmark: diffem's M-step and E-step against the bare network on this machine.

For each preset network (the ``digits`` UNet on 8x8x1, the default UNet of
``diffem_cli.diffusion.nets.default_network`` on 16x16x3 and 32x32x3, the ``img16``/``img32`` preset UNets,
the ``manifold`` MLP; every one conditioned on ``mask``, the MLP on ``projection``):

* bare forward: timed loops of ``net(x_t, t, cond)`` under ``no_grad`` at the E-step batch size;
* bare training step: ``net`` forward, MSE, backward (``fb``) and the same plus an AdamW step
  (``fbs``) at the M-step batch size;
* M-step: ``train_denoiser`` on random data (examples/s; the whole loop: batches, timesteps,
  noise, loss, clipping, AdamW, EMA, learning-rate schedule);
* E-step: DiffEM's ``posterior`` over a few batches of observations (network evaluations/s,
  counted by a wrapper around the network: rows times calls).

The measurements alternate (bare, diffem, bare, diffem, ...) in one process so that the ratios
compare figures taken under the same machine load; ``os.getloadavg()`` is recorded beside each
figure. The target is a ratio of at least 0.8 to the bare rate. Like the ``diffem`` command, the
benchmark sets OpenMP's waiting (:func:`diffem_cli.core.threads.openmp_wait_env`) and raises
glibc's malloc thresholds (:mod:`diffem_cli.core.allocator`) before torch loads.

The roofline (:mod:`bench.roofline`): the FLOPs of one training step (forward + backward) and of
one forward, and the rate at which this machine runs exactly those matrix products and
convolutions alone; the M-step and E-step are then reported as achieved FLOP/s and as a fraction
of that limit. Every case runs at 1 torch thread and at every core (``--threads``). With
``--compile``, the M-step is also timed with ``train.compile=on`` (``torch.compile``), after a
first step whose time, the compilation's, is reported apart. A thread study times the digits
UNet and manifold MLP M-steps in a fresh process per variant (1 thread, 2 threads, 2 threads with
``OMP_WAIT_POLICY=PASSIVE``, 2 threads with ``GOMP_SPINCOUNT=10000``), as the machine is and with
a busy job beside it (a second process multiplying matrices). Writes ``bench/results/speed.json``
and ``.md``; ``--cases`` with no name reruns only the thread study and keeps the last case figures.

    python -m bench.bench_speed [--quick] [--cases digits unet16 ...] [--rounds 2] [--no-threads]
        [--threads 1 2] [--compile mlp digits]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from diffem_cli.core.allocator import keep_freed_memory  # noqa: E402
from diffem_cli.core.threads import openmp_wait_env  # noqa: E402

if "--child-mstep" not in sys.argv:  # a thread-study child gets its variant's environment as it is
    os.environ.update(openmp_wait_env())  # as the diffem command does, before torch loads
keep_freed_memory()  # as the diffem command does

import torch  # noqa: E402

from bench.common import machine, write_results  # noqa: E402
from bench.roofline import dense_limit, dense_ops, flops_of  # noqa: E402
from diffem_cli.core.runtime import autocast  # noqa: E402
from diffem_cli.diffusion.nets import build_network, count_parameters, default_network  # noqa: E402
from diffem_cli.diffusion.sampling import SampleConfig  # noqa: E402
from diffem_cli.diffusion.train import TrainConfig, train_denoiser  # noqa: E402
from diffem_cli.io.observations import Observations  # noqa: E402
from diffem_cli.io.registry import make_channel  # noqa: E402
from diffem_cli.io.sources import TensorSource  # noqa: E402
from diffem_cli.methods import get_method, load_config  # noqa: E402
from diffem_cli.pipeline.corrupt import corrupt_dataset  # noqa: E402
from diffem_cli.pipeline.em import posterior_samples  # noqa: E402

DEV = torch.device("cpu")


@dataclasses.dataclass
class Case:
    """One network at one M-step and one E-step batch size; ``work`` scales the timed steps."""

    name: str
    network: dict[str, Any]
    shape: tuple[int, ...]
    channel: tuple[str, dict[str, Any]]
    batch: int
    sample_batch: int
    train_cfg: TrainConfig
    steps: int  # training steps (and forward calls) per timed measurement
    e_steps: int  # sampler steps per E-step batch (two batches per measurement)


def cases(quick: bool) -> dict[str, Case]:
    """The benchmarked networks; ``quick`` cuts the timed steps to a smoke run."""
    digits, manifold = load_config("digits"), load_config("manifold")
    out = {
        "digits": Case(
            "digits", digits.network, (1, 8, 8), ("mask", {"rho": 0.5}), 128, 256, digits.train, 12, 6
        ),
        "unet16": Case(
            "unet16",
            default_network((3, 16, 16)),
            (3, 16, 16),
            ("mask", {"rho": 0.5}),
            64,
            128,
            digits.train,
            6,
            3,
        ),
        "unet32": Case(
            "unet32",
            default_network((3, 32, 32)),
            (3, 32, 32),
            ("mask", {"rho": 0.5}),
            32,
            64,
            digits.train,
            4,
            2,
        ),
        "mlp": Case("mlp", manifold.network, (5,), ("projection", {}), 1024, 4096, manifold.train, 60, 16),
    }
    for preset, shape in (("img16", (3, 16, 16)), ("img32", (3, 32, 32))):
        try:
            cfg = load_config(preset)
        except Exception:  # a checkout without the image presets
            continue
        small = out["unet16" if shape[1] == 16 else "unet32"]
        out[preset] = dataclasses.replace(
            small, name=preset, network=cfg.network, batch=cfg.train.batch_size, train_cfg=cfg.train
        )
    if quick:
        for c in out.values():
            c.steps, c.e_steps = max(2, c.steps // 4), 2
    return out


class CountCalls(torch.nn.Module):
    """Wraps a network and counts its forward calls and the rows they evaluated."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.rows = 0

    def forward(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        self.calls += 1
        self.rows += x.shape[0]
        return self.inner(x, *args)


def load1() -> float:
    """The 1-minute load average."""
    return round(os.getloadavg()[0], 2)


def _inputs(case: Case, model: torch.nn.Module, batch: int, gen: torch.Generator, device: torch.device = DEV):
    """Random ``x``, timesteps and conditioning for ``batch`` rows, drawn on the CPU, on ``device``."""
    cond_size = model.cond_size
    x = torch.randn((batch, *case.shape), generator=gen)
    cond = torch.randn((batch, cond_size, *case.shape[1:]), generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    return x.to(device), t.to(device), cond.to(device)


def bare_forward(case: Case, model: torch.nn.Module, calls: int) -> dict[str, float]:
    """Rows/s of ``calls`` plain forward passes at the E-step batch size (one timestep per call,
    as the sampler calls the network)."""
    model.eval()
    x, _, cond = _inputs(case, model, case.sample_batch, torch.Generator().manual_seed(1))
    t = torch.full((1,), 500, dtype=torch.long)
    with torch.no_grad():
        model(x, t, cond)
        t0 = time.perf_counter()
        for _ in range(calls):
            model(x, t, cond)
        seconds = time.perf_counter() - t0
    return {"rate": calls * case.sample_batch / seconds, "seconds": seconds, "load": load1()}


def bare_train(case: Case, model: torch.nn.Module, steps: int, with_step: bool) -> dict[str, float]:
    """Examples/s of ``steps`` forward + MSE + backward passes (and AdamW steps if ``with_step``)."""
    model.train()
    x, t, cond = _inputs(case, model, case.batch, torch.Generator().manual_seed(2))
    target = torch.randn_like(x)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)

    def one() -> None:
        loss = torch.mean((model(x, t, cond) - target) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if with_step:
            opt.step()

    one()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    seconds = time.perf_counter() - t0
    return {"rate": steps * case.batch / seconds, "seconds": seconds, "load": load1()}


def mstep(
    case: Case,
    model: torch.nn.Module,
    steps: int,
    compile: str = "off",
    device: torch.device = DEV,
    batch_size: int | None = None,
) -> dict[str, float]:
    """Examples/s of ``train_denoiser`` over ``steps`` steps on random data (one epoch) on ``device``,
    with ``train.compile`` set to ``compile``, at the case's batch size or ``batch_size``."""
    bs = batch_size or case.batch
    n = bs * steps
    gen = torch.Generator().manual_seed(3)
    data = {
        "x": torch.randn((n, *case.shape), generator=gen).clamp(-1, 1),
        "cond": torch.randn((n, model.cond_size, *case.shape[1:]), generator=gen),
    }
    cfg = dataclasses.replace(case.train_cfg, batch_size=bs, epochs=1, compile=compile)
    # nothing queued before the loop's clock starts (its epoch-end loss waits at the end)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result = train_denoiser(model, data, cfg, seed=0, device=device, label=f"{case.name} M-step")
    return {"rate": result.steps * bs / result.seconds, "seconds": result.seconds, "load": load1()}


def roofline(case: Case, model: torch.nn.Module, device: torch.device = DEV) -> dict[str, float]:
    """FLOPs per training example (forward + backward) and per evaluated row (forward), and the
    rate at which ``device`` runs that network's own dense ops alone (:mod:`bench.roofline`), under
    diffem's autocast as the training loop and the samplers run it (full precision on CPU)."""
    x, t, cond = _inputs(case, model, case.batch, torch.Generator().manual_seed(5), device)
    target = torch.randn_like(x)

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        with autocast(device):
            loss = torch.mean((model(x, t, cond).float() - target) ** 2)
        loss.backward()

    xs, _, cs = _inputs(case, model, case.sample_batch, torch.Generator().manual_seed(6), device)
    ts = torch.full((1,), 500, dtype=torch.long, device=device)

    def forward() -> None:
        with torch.no_grad(), autocast(device):
            model(xs, ts, cs)

    model.train()
    train_limit = dense_limit(dense_ops(train_step))
    train_flops = flops_of(train_step) / case.batch
    model.zero_grad(set_to_none=True)
    model.eval()
    fwd_limit = dense_limit(dense_ops(forward))
    fwd_flops = flops_of(forward) / case.sample_batch
    return {
        "train_flops_per_example": train_flops,
        "train_limit": train_limit["rate"],
        "fwd_flops_per_row": fwd_flops,
        "fwd_limit": fwd_limit["rate"],
    }


def compiled_mstep(case: Case, net: torch.nn.Module, rounds: int) -> dict[str, Any]:
    """The M-step with ``train.compile=on`` against eager, alternating: the first compiled call's
    seconds (compilation, then one epoch of 2 steps) apart, then ``rounds`` pairs of timed epochs."""
    t0 = time.perf_counter()
    mstep(case, net, 2, compile="on")
    first = time.perf_counter() - t0
    eager, compiled = [], []
    for _ in range(rounds):
        eager.append(mstep(case, net, case.steps))
        compiled.append(mstep(case, net, case.steps, compile="on"))
    rows = case.batch * case.steps
    return {
        "first_call_s": first,
        "eager_rate": rows * rounds / sum(r["seconds"] for r in eager),
        "compiled_rate": rows * rounds / sum(r["seconds"] for r in compiled),
        "load": [r["load"] for r in eager + compiled],
    }


def observations(case: Case, work: Path, n: int) -> Observations:
    """An observations folder of ``n`` random clean samples through the case's channel."""
    folder = work / f"obs-{case.name}-{n}"
    if not (folder / "diffem.json").exists():
        x = torch.randn((n, *case.shape), generator=torch.Generator().manual_seed(4)).clamp(-1, 1)
        name, params = case.channel
        channel = make_channel(name, params)
        corrupt_dataset(TensorSource(x), channel, folder, seed=0, force=True, progress=False)
    return Observations(folder)


def estep_method(case: Case) -> Any:
    """DiffEM configured by the case's preset, without the Gaussian feature (``cond.gaussian_mean``
    off): the E-step timed is the network's, the feature's closed-form cost apart."""
    preset = "digits" if len(case.shape) == 3 else "manifold"
    return get_method("diffem", load_config(preset, ["cond.gaussian_mean=off"]))


def estep(case: Case, model: CountCalls, data: Observations) -> dict[str, float]:
    """Network evaluations/s (rows x calls) of DiffEM's posterior over ``data``."""
    method = estep_method(case)
    sample = SampleConfig(sampler="dpm++", steps=case.e_steps, batch_size=case.sample_batch)
    model.calls = model.rows = 0
    t0 = time.perf_counter()
    posterior_samples(
        method, model, {}, data, sample, seed_parts=(0, 1), device=DEV, label=f"{case.name} E-step"
    )
    seconds = time.perf_counter() - t0
    return {"rate": model.rows / seconds, "seconds": seconds, "calls": model.calls, "load": load1()}


def run_case(case: Case, rounds: int, work: Path, compile_study: bool = False) -> dict[str, Any]:
    """Alternate bare and diffem measurements ``rounds`` times; ratios of the summed times; the
    roofline; with ``compile_study``, the compiled M-step against eager."""
    name, params = case.channel
    cond_size = make_channel(name, params).cond_size(case.shape)
    torch.manual_seed(0)
    net = build_network(case.network, case.shape, cond_size)
    counted = CountCalls(net)
    data = observations(case, work, 2 * case.sample_batch)
    estep(dataclasses.replace(case, e_steps=1), counted, data)  # warm-up: first-call overheads
    mstep(dataclasses.replace(case), net, 2)
    rows: dict[str, list[dict[str, float]]] = {"fwd": [], "estep": [], "fb": [], "fbs": [], "mstep": []}
    calls = 2 * case.e_steps  # the E-step's calls: two batches of e_steps
    for _ in range(rounds):
        rows["fwd"].append(bare_forward(case, net, calls))
        rows["estep"].append(estep(case, counted, data))
        rows["fb"].append(bare_train(case, net, case.steps, with_step=False))
        rows["fbs"].append(bare_train(case, net, case.steps, with_step=True))
        rows["mstep"].append(mstep(case, net, case.steps))

    def rate(key: str, per: int) -> float:
        return sum(per for _ in rows[key]) / sum(r["seconds"] for r in rows[key])

    e_rows = 2 * case.sample_batch * case.e_steps
    t_rows = case.batch * case.steps
    out = {
        "network": case.network,
        "parameters": count_parameters(net),
        "shape": list(case.shape),
        "channel": name,
        "batch_size": case.batch,
        "sample_batch_size": case.sample_batch,
        "train_steps": case.steps,
        "sampler_steps": case.e_steps,
        "rounds": rows,
        "fwd_rate": rate("fwd", e_rows),
        "estep_rate": rate("estep", e_rows),
        "fb_rate": rate("fb", t_rows),
        "fbs_rate": rate("fbs", t_rows),
        "mstep_rate": rate("mstep", t_rows),
        "load": [r["load"] for key in rows for r in rows[key]],
    }
    out["estep_ratio"] = out["estep_rate"] / out["fwd_rate"]
    out["mstep_ratio"] = out["mstep_rate"] / out["fb_rate"]
    out["mstep_ratio_step"] = out["mstep_rate"] / out["fbs_rate"]
    out["threads"] = torch.get_num_threads()
    out.update(roofline(case, net))
    out["mstep_flops"] = out["mstep_rate"] * out["train_flops_per_example"]
    out["estep_flops"] = out["estep_rate"] * out["fwd_flops_per_row"]
    out["mstep_fraction"] = out["mstep_flops"] / out["train_limit"]
    out["estep_fraction"] = out["estep_flops"] / out["fwd_limit"]
    if compile_study:
        out["compile"] = compiled_mstep(case, net, rounds)
    print(
        f"{case.name} ({out['threads']} thread(s)): E-step {out['estep_rate']:.0f} / fwd "
        f"{out['fwd_rate']:.0f} = {out['estep_ratio']:.2f}; "
        f"M-step {out['mstep_rate']:.0f} / fb {out['fb_rate']:.0f} = {out['mstep_ratio']:.2f} "
        f"(/ fbs {out['fbs_rate']:.0f} = {out['mstep_ratio_step']:.2f}); roofline M "
        f"{out['mstep_fraction']:.2f}, E {out['estep_fraction']:.2f}; "
        f"compile {out.get('compile')}; load {out['load']}",
        flush=True,
    )
    return out


BUSY = (
    "import torch, time\n"
    "torch.set_num_threads(2)\n"
    "a = torch.randn(512, 512)\n"
    "end = time.time() + 3600\n"
    "while time.time() < end:\n"
    "    a = torch.tanh(a @ a)\n"
)
# (label, torch threads, extra environment): OMP_WAIT_POLICY=PASSIVE makes idle OpenMP threads
# sleep instead of spinning (set before torch loads, as the diffem command does)
THREAD_VARIANTS: tuple[tuple[str, int, dict[str, str]], ...] = (
    ("1 thread", 1, {}),
    ("2 threads", 2, {}),
    ("2 threads, OMP_WAIT_POLICY=PASSIVE", 2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("2 threads, GOMP_SPINCOUNT=10000", 2, {"GOMP_SPINCOUNT": "10000"}),
)


def child_mstep(threads: int, steps: int, name: str = "digits") -> None:
    """(In a child process) case ``name``'s M-step at ``threads`` torch threads; prints examples/s."""
    torch.set_num_threads(threads)
    case = cases(False)[name]
    name, params = case.channel
    torch.manual_seed(0)
    net = build_network(case.network, case.shape, make_channel(name, params).cond_size(case.shape))
    mstep(case, net, 2)
    r = mstep(case, net, steps)
    print(f"RATE {r['rate']} {r['seconds']}", flush=True)


def thread_study(
    steps: int, repeats: int, variants: list[int] | None = None, names: tuple[str, ...] = ("digits", "mlp")
) -> list[dict[str, Any]]:
    """The M-step of each case of ``names`` (digits UNet at batch 128, manifold MLP at 1,024) in a
    fresh process per variant (threads, OpenMP waiting), alternating, as the machine is and with a
    busy job beside it (a second process multiplying 512x512 matrices on 2 threads)."""
    variants = list(range(len(THREAD_VARIANTS))) if variants is None else variants
    rows = []
    root = Path(__file__).resolve().parent.parent
    for busy in (False, True):
        plain = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        proc = subprocess.Popen([sys.executable, "-c", BUSY], env=plain) if busy else None  # OpenMP defaults
        try:
            if proc is not None:
                time.sleep(2.0)
            for rep, name in [(r, n) for r in range(repeats) for n in names]:
                for label, threads, extra in [THREAD_VARIANTS[i] for i in variants]:
                    unset = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
                    env = {k: v for k, v in os.environ.items() if k not in unset}
                    env.update(extra)
                    env["PYTHONPATH"] = str(root)
                    cmd = [
                        sys.executable,
                        "-m",
                        "bench.bench_speed",
                        "--child-mstep",
                        str(threads),
                        str(steps * (8 if name == "mlp" else 1)),
                        name,
                    ]
                    out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=True)
                    line = [x for x in out.stdout.splitlines() if x.startswith("RATE ")][-1].split()
                    row = {
                        "case": name,
                        "busy": busy,
                        "variant": label,
                        "threads": threads,
                        "repeat": rep,
                        "rate": float(line[1]),
                        "seconds": float(line[2]),
                        "load": load1(),
                    }
                    print(row, flush=True)
                    rows.append(row)
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()
    return rows


def summarise_threads(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean examples/s per (busy, variant) and the load averages seen."""
    out = []
    for name, busy in [
        (n, b) for n in dict.fromkeys(r.get("case", "digits") for r in rows) for b in (False, True)
    ]:
        for label, threads, _ in THREAD_VARIANTS:
            sel = [
                r
                for r in rows
                if r.get("case", "digits") == name and r["busy"] == busy and r["variant"] == label
            ]
            if sel:
                out.append(
                    {
                        "case": name,
                        "busy": busy,
                        "variant": label,
                        "threads": threads,
                        "rate": sum(r["rate"] for r in sel) / len(sel),
                        "min": min(r["rate"] for r in sel),
                        "max": max(r["rate"] for r in sel),
                        "load": [r["load"] for r in sel],
                    }
                )
    return out


def _openmp(result: dict[str, Any]) -> str:
    env = {k: v for k, v in (result.get("openmp") or {}).items() if v is not None}
    return ", ".join(f"`{k}={v}`" for k, v in env.items()) or "OpenMP's defaults"


def markdown(result: dict[str, Any]) -> str:
    """The throughput table and the thread study."""
    lines = [
        "# Throughput: diffem's M-step and E-step against the bare network",
        "",
        f"Machine: {result['machine']['summary']}, {result['machine']['torch_threads']} torch thread(s). "
        "The machine is shared with other jobs: absolute rates are whatever the load left; the ratios "
        "compare measurements taken alternately in one process (bare, diffem, bare, diffem...), "
        "with the 1-minute load average beside them; with other jobs competing for the two cores a "
        "single figure can be off by tens of percent either way. OpenMP waiting of the case and "
        f"roofline measurements: {_openmp(result)}.",
        "",
        "Bare forward: `net(x_t, t, cond)` under `no_grad` at the E-step batch; E-step: DiffEM's "
        "`posterior` (DPM-Solver++, network evaluations = rows x calls). Bare fb: forward + MSE + "
        "backward; fbs: the same + AdamW step; M-step: `train_denoiser` (examples/s). Target: ratio >= 0.8.",
        "",
        "| network | threads | params | shape | batch (M / E) | bare fwd /s | E-step evals/s | E ratio | "
        "bare fb /s | bare fbs /s | M-step ex/s | M ratio (fb) | M ratio (fbs) | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in result["cases"].items():
        load, name = r["load"], key.split("/")[0]
        lines.append(
            f"| {name} | {r.get('threads', '')} | {r['parameters'] / 1e6:.2f} M | "
            f"{'x'.join(map(str, r['shape']))} | "
            f"{r['batch_size']} / {r['sample_batch_size']} | {r['fwd_rate']:,.0f} | {r['estep_rate']:,.0f} | "
            f"**{r['estep_ratio']:.2f}** | {r['fb_rate']:,.0f} | {r['fbs_rate']:,.0f} | "
            f"{r['mstep_rate']:,.0f} | "
            f"**{r['mstep_ratio']:.2f}** | {r['mstep_ratio_step']:.2f} | {min(load):.1f}-{max(load):.1f} |"
        )
    dated = [
        f"{k.split('/')[0]} ({k.split('/')[1]} thread(s)) {r['date']}, {_openmp(r)}"
        for k, r in result["cases"].items()
        if r.get("date")
    ]
    if dated:
        rest = "; the other rows in an earlier run" if len(dated) < len(result["cases"]) else ""
        lines += ["", "Measured on: " + "; ".join(dated) + rest + "."]
    roof = [(k, r) for k, r in result["cases"].items() if "mstep_fraction" in r]
    if roof:
        lines += [
            "",
            "## Roofline",
            "",
            "FLOPs by `torch.utils.flop_counter` (matrix products and convolutions; a multiply-add is 2). "
            "Limit: this machine's rate for exactly the network's own dense ops (a training step's "
            "forward and backward, or a forward at the E-step batch), each replayed alone on fresh "
            "tensors of the same layout, best of 5, in the same process just after the measurements "
            "(`bench/roofline.py`). Fraction: achieved FLOP/s over that limit; the rest of the time goes "
            "to everything else (activations, normalisations, loss, optimiser, EMA, sampler, data).",
            "",
            "| network | threads | train GFLOP/ex | dense limit GFLOP/s | M-step GFLOP/s | M fraction | "
            "fwd MFLOP/row | dense limit GFLOP/s | E-step GFLOP/s | E fraction | load |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key, r in roof:
            load = r["load"]
            lines.append(
                f"| {key.split('/')[0]} | {r['threads']} | {r['train_flops_per_example'] / 1e9:.4f} | "
                f"{r['train_limit'] / 1e9:.1f} | {r['mstep_flops'] / 1e9:.1f} | "
                f"**{r['mstep_fraction']:.2f}** | "
                f"{r['fwd_flops_per_row'] / 1e6:.2f} | {r['fwd_limit'] / 1e9:.1f} | "
                f"{r['estep_flops'] / 1e9:.1f} | **{r['estep_fraction']:.2f}** | "
                f"{min(load):.1f}-{max(load):.1f} |"
            )
    comp = [(k, r["compile"]) for k, r in result["cases"].items() if r.get("compile")]
    if comp:
        lines += [
            "",
            "## torch.compile (M-step, CPU: Inductor's C++ code generation)",
            "",
            "`train_denoiser` with `train.compile=on` against eager, alternating in one process. First "
            "call: compiling plus one 2-step epoch (Inductor's on-disk cache may serve a graph compiled "
            "by an earlier run).",
            "",
            "| network | threads | first call s | eager ex/s | compiled ex/s | compiled / eager | load |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, c in comp:
            name, threads = key.split("/")[0], result["cases"][key]["threads"]
            lines.append(
                f"| {name} | {threads} | {c['first_call_s']:.1f} | {c['eager_rate']:,.0f} | "
                f"{c['compiled_rate']:,.0f} | **{c['compiled_rate'] / c['eager_rate']:.2f}** | "
                f"{min(c['load']):.1f}-{max(c['load']):.1f} |"
            )
    threads = result.get("threads")
    if threads:
        lines += [
            "",
            "## Torch threads (M-step: digits UNet at batch 128, manifold MLP at 1,024)",
            "",
            "One fresh process per variant, alternating, as the machine was and with a busy job beside "
            "it (a second process multiplying 512x512 matrices on 2 threads).",
            "",
            "| network | beside it | variant | examples/s (mean) | min-max | load |",
            "|---|---|---|---|---|---|",
        ]
        for r in threads["summary"]:
            lines.append(
                f"| {r.get('case', 'digits')} | {'busy job' if r['busy'] else 'as is'} | {r['variant']} | "
                f"{r['rate']:,.0f} | "
                f"{r['min']:,.0f}-{r['max']:,.0f} | {min(r['load']):.1f}-{max(r['load']):.1f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) in (4, 5) and sys.argv[1] == "--child-mstep":
        child_mstep(int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="a smoke run: fewer steps, one round, no thread study"
    )
    ap.add_argument("--cases", nargs="*", help="networks to time (default: all; none: only the thread study)")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of bare and diffem measurements")
    ap.add_argument("--no-threads", action="store_true", help="skip the thread study")
    ap.add_argument("--thread-steps", type=int, default=8, help="digits M-step steps per thread measurement")
    ap.add_argument("--thread-repeats", type=int, default=2)
    ap.add_argument(
        "--thread-variants", type=int, nargs="+", help="indices into THREAD_VARIANTS (default: all)"
    )
    ap.add_argument(
        "--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1], help="torch threads per pass"
    )
    ap.add_argument(
        "--compile", nargs="*", default=["mlp", "digits"], help="cases whose M-step is also timed compiled"
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument(
        "--merge", action="store_true", help="keep the last file's other cases (each row carries its date)"
    )
    args = ap.parse_args()

    all_cases = cases(args.quick)
    chosen = list(all_cases) if args.cases is None else args.cases
    unknown = [c for c in chosen if c not in all_cases]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)} (known: {', '.join(all_cases)})")
    name = "speed-quick" if args.quick else "speed"
    result: dict[str, Any] = {"machine": machine(), "cases": {}, "load_start": load1()}
    result["openmp"] = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    previous = (args.out / "quick" if args.quick else args.out) / f"{name}.json"
    if (args.merge or not chosen) and previous.exists():  # keep the last case figures
        kept = json.loads(previous.read_text())
        result["cases"] = kept.get("cases", {})
        result["openmp"] = kept.get("openmp", result["openmp"])  # the kept rows' setting
    with tempfile.TemporaryDirectory(prefix="diffem-speed-") as tmp:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for case in chosen:
                row = run_case(
                    all_cases[case],
                    1 if args.quick else args.rounds,
                    Path(tmp),
                    compile_study=case in args.compile and not args.quick,
                )
                row["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                row["openmp"] = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
                result["cases"][f"{case}/{threads}"] = row
    if not (args.quick or args.no_threads):
        rows = thread_study(args.thread_steps, args.thread_repeats, args.thread_variants)
        result["threads"] = {"rows": rows, "summary": summarise_threads(rows), "steps": args.thread_steps}
    elif previous.exists():  # keep the last thread study (it is labelled with its own loads)
        kept = json.loads(previous.read_text()).get("threads")
        if kept:
            result["threads"] = kept
    result["load_end"] = load1()
    text = markdown(result)
    write_results(args.out / "quick" if args.quick else args.out, name, result, text)
    print(text)


if __name__ == "__main__":
    main()
