"""E-step cost per method: network evaluations and vector-Jacobian products per sampler step, and
posterior samples per second, on the digits UNet (masked digits; noisy digits for
Ambient-Tweedie) and the manifold MLP (random projections).

Each method's own ``posterior`` runs on freshly built networks (cost does not depend on the
weights) for ``--n`` observations and ``--steps`` sampler steps. Network forward passes are
counted by a hook on the network, vector-Jacobian products by counting ``torch.autograd.grad``
calls; the time is the median of ``--repeats`` runs after one warm-up. Writes
``bench/results/estep.json`` and ``.md``.

    python -m bench.bench_estep [--n 512] [--steps 16] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import machine, write_results
from diffem_cli.diffusion.nets import build_network
from diffem_cli.diffusion.sampling import SampleConfig
from diffem_cli.io.observations import Observations
from diffem_cli.io.registry import make_channel
from diffem_cli.io.sources import load_source
from diffem_cli.methods import get_method, load_config
from diffem_cli.pipeline.corrupt import corrupt_dataset
from diffem_cli.pipeline.em import posterior_samples

# (data case, preset, method, overrides)
ROWS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("digits mask 0.5", "digits", "diffem", ()),
    ("digits mask 0.5", "digits", "em-mmps", ()),
    ("digits mask 0.5", "digits", "em-mmps", ("mmps.covariance=gaussian",)),
    ("digits mask 0.5", "digits", "em-mmps", ("mmps.cg_iters=3",)),
    ("digits mask 0.5", "digits", "dps-em", ()),
    ("digits mask 0.5", "digits", "ambient", ()),
    ("digits noise 0.2", "digits", "ambient-tweedie", ()),
    ("manifold", "manifold", "diffem", ()),
    ("manifold", "manifold", "em-mmps", ("mmps.covariance=tweedie",)),
    ("manifold", "manifold", "em-mmps", ()),
    ("manifold", "manifold", "dps-em", ()),
)
CASES = {
    "digits mask 0.5": ("digits", "mask", {"rho": 0.5}),
    "digits noise 0.2": ("digits", "noise", {"sigma": 0.2}),
    "manifold": ("manifold:samples=2048", "projection", {}),
}


class Counter:
    """Counts network forward passes (a forward hook) and ``torch.autograd.grad`` calls."""

    def __init__(self) -> None:
        self.forward = 0
        self.vjp = 0
        self._grad = torch.autograd.grad

    def hook(self, *_: Any) -> None:
        self.forward += 1

    def __enter__(self) -> Counter:
        def grad(*args: Any, **kwargs: Any) -> Any:
            self.vjp += 1
            return self._grad(*args, **kwargs)

        torch.autograd.grad = grad
        return self

    def __exit__(self, *_: Any) -> None:
        torch.autograd.grad = self._grad


def observations(case: str, work: Path, n: int) -> Observations:
    """``n`` observations of ``case`` (made once under ``work``)."""
    source, channel, params = CASES[case]
    folder = work / case.replace(" ", "-")
    work.mkdir(parents=True, exist_ok=True)
    if not (folder / "diffem.json").exists():
        corrupt_dataset(
            load_source(source, limit=n),
            make_channel(channel, params),
            folder,
            seed=0,
            force=True,
            progress=False,
        )
    return Observations(folder)


def measure(case: str, preset: str, name: str, sets: tuple[str, ...], args: argparse.Namespace) -> dict:
    """One row: counts per step and samples/s for ``name`` on ``case``."""
    cfg = load_config(preset, list(sets))
    data = observations(case, args.work, args.n)
    method = get_method(name, cfg)
    method.check(data)
    torch.manual_seed(cfg.seed)
    model = build_network(cfg.network, data.shape, method.model_spec(data).cond_size).eval()
    aux: dict[str, torch.Tensor] = {}
    if name == "em-mmps" and cfg.mmps.covariance == "gaussian":
        start = torch.as_tensor(data.obs["y"]).float() if data.kind == "image" else _vectors(data)
        aux = method.mstep(data, start, 1, 1, None, cfg).aux
    sample = SampleConfig(sampler=cfg.sample.sampler, steps=args.steps, batch_size=args.n)
    counter = Counter()
    model.register_forward_hook(counter.hook)
    times = []
    for r in range(args.repeats + 1):
        counter.forward = counter.vjp = 0
        t0 = time.perf_counter()
        with counter:
            posterior_samples(
                method,
                model,
                aux,
                data,
                sample,
                seed_parts=(0, r),
                device=torch.device("cpu"),
                label=f"{name} {r}",
            )
        if r:  # the first run warms up
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return {
        "case": case,
        "method": name,
        "settings": " ".join(sets),
        "forward_per_step": counter.forward / args.steps,
        "vjp_per_step": counter.vjp / args.steps,
        "samples_per_s": args.n / seconds,
        "seconds": seconds,
    }


def _vectors(data: Observations) -> torch.Tensor:
    """Rough vectors for the Gaussian moments of a manifold prior (least-squares from y)."""
    return torch.linalg.lstsq(data.obs["A"], data.obs["y"].unsqueeze(-1)).solution.squeeze(-1)


def markdown(result: dict) -> str:
    lines = [
        "# E-step cost per method",
        "",
        f"Machine: {result['machine']['summary']}; {result['n']} observations, {result['steps']} sampler "
        f"steps, median of {result['repeats']} runs; untrained networks of each preset, its sampler "
        "without Langevin corrections (each correction costs one more step).",
        "",
        "| data | method | settings | network forwards / step | VJPs / step | samples/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['case']} | {r['method']} | {r['settings'] or 'preset'} | {r['forward_per_step']:.2f} | "
            f"{r['vjp_per_step']:.2f} | {r['samples_per_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a smoke run (64 observations, 4 steps, 1 repeat)")
    ap.add_argument("--work", type=Path, default=Path("bench/work/estep"))
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    if args.quick:
        args.n, args.steps, args.repeats = 64, 4, 1
        args.work = args.work.with_name("estep-quick")
    rows = [measure(*row, args) for row in ROWS]
    result = {"machine": machine(), "n": args.n, "steps": args.steps, "repeats": args.repeats, "rows": rows}
    write_results(args.out / ("quick" if args.quick else ""), "estep", result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
