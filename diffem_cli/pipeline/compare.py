"""``diffem compare``: several methods on the same observations at the same budget, side by side.

Each method runs as a normal, resumable RUN in ``OUT/METHOD/`` with the same configuration
(network, steps per lap, laps, sampler), evaluated every lap against the clean data. After its
laps, each method's unconditional model is sampled: priors directly (their own sampler),
conditional models through ``train-uncond`` on their last reconstructions (in
``OUT/METHOD/uncond/``, the same training budget as one lap). ``OUT/compare.json``,
``OUT/compare.md``, ``OUT/compare.png`` (every metric per lap) and ``OUT/compare-samples.png``
(reconstructions and unconditional samples of each method) summarise the comparison.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from diffem_cli.config.run import RunConfig
from diffem_cli.core.errors import DiffemError
from diffem_cli.io.observations import Observations, load_clean, load_recon
from diffem_cli.io.store import write_text_atomic
from diffem_cli.pipeline.runs import Run

Logger = Callable[[str], None]
TIME_KEYS = ("init_s", "corrupt_s", "mstep_s", "estep_s")
UNCOND_METRICS = {"vector": ["sinkhorn", "sliced_w2"], "image": ["fd_rand", "fd_pixels"]}


def default_methods() -> list[str]:
    """The methods compared when ``--methods`` is not given (those marked ``compared_by_default``)."""
    from diffem_cli.methods import method_classes

    return [name for name, cls in method_classes().items() if cls.compared_by_default]


def parse_methods(text: str | None) -> list[str]:
    """``"a,b"`` -> installed method names, refusing unknown or repeated ones; ``all``: every
    installed method; None: :func:`default_methods`."""
    from diffem_cli.methods import get_method_class, method_names

    if text is None:
        return default_methods()
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        example = ",".join(default_methods()[:2])
        raise DiffemError(f"--methods names no method (e.g. --methods {example})")
    if text.strip() == "all":
        return list(method_names())
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DiffemError(f"--methods lists {name!r} twice")
        seen.add(name)
        get_method_class(name)  # the one-line error naming the known methods
    return names


def compare(
    data_path: Path,
    out: Path,
    methods: list[str],
    cfg: RunConfig,
    *,
    eval_clean: Path,
    laps: int | None = None,
    uncond: bool = True,
    n_samples: int | None = None,
    device: str | None = None,
    force: bool = False,
    skip_unfit: bool = False,
    log: Logger = print,
) -> dict[str, Any]:
    """Run every method on ``data_path`` into ``out/METHOD`` and write the comparison files.

    A method that cannot serve the observations (its ``check`` refuses them) is refused
    before anything trains, or, with ``skip_unfit`` (``--methods all``), left out with a line
    saying why."""
    from diffem_cli.pipeline.em import em_train

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DiffemError(f"OUT {out} is a file, not a folder")
    if not out.parent.exists():
        raise DiffemError(f"folder {out.parent} does not exist")
    data = Observations(data_path)
    clean = load_clean(eval_clean, data)
    from diffem_cli.methods import get_method

    fit = []
    for name in methods:  # every refusal before any training
        try:
            get_method(name, cfg).check(data)
        except DiffemError as e:
            if not skip_unfit:
                raise
            log(f"skipping {name}: {e}")
            continue
        fit.append(name)
    methods = fit
    out.mkdir(exist_ok=True)
    summary: dict[str, Any] = {"methods": {}, "laps": {}, "config": cfg.to_dict(), "data": str(data_path)}
    pictures: dict[str, dict[str, torch.Tensor]] = {}
    for name in methods:
        log(f"== {name}")
        m = get_method(name, cfg)
        records = em_train(
            data_path,
            out / name,
            cfg,
            laps=laps,
            method=name,
            eval_clean=eval_clean,
            clean=eval_clean if m.needs_clean else None,
            device=device,
            force=force,
            log=log,
        )
        row = {k[5:]: v for k, v in records[-1].items() if k.startswith("eval_") and k != "eval_s"}
        row["seconds"] = sum(float(r.get(k) or 0.0) for r in records for k in TIME_KEYS)
        last_lap = records[-1]["lap"]
        recon, _ = load_recon(out / name / "recon" / f"lap_{last_lap:03d}")
        pictures[name] = {"posterior": recon}
        if uncond:
            t0 = time.perf_counter()
            samples = _unconditional_samples(
                out / name, last_lap, cfg, len(clean) if n_samples is None else n_samples, device, force, log
            )
            from diffem_cli.metrics.evaluate import evaluate_tensors

            metrics = UNCOND_METRICS["vector" if data.kind == "vector" else "image"]
            values = evaluate_tensors(
                samples, clean, metrics, value_range=data.value_range, n_points=cfg.eval.n_points
            )
            row.update({f"uncond_{k}": v for k, v in values.items()})
            row["uncond_seconds"] = time.perf_counter() - t0
            pictures[name]["samples"] = samples
        summary["methods"][name] = row
        summary["laps"][name] = records
    _write(out, summary, pictures, data)
    return summary


def _unconditional_samples(
    run_dir: Path, lap: int, cfg: RunConfig, n: int, device: str | None, force: bool, log: Logger
) -> torch.Tensor:
    """Samples of a method's unconditional model (kept in ``run_dir/samples-uncond`` for reruns)."""
    from diffem_cli.diffusion.checkpoint import load_checkpoint
    from diffem_cli.pipeline.uncond import sample_unconditional, train_uncond

    target = run_dir / "samples-uncond"
    if (target / "diffem.json").exists():
        return load_recon(target)[0]
    ckpt = Run(run_dir).checkpoint(lap)
    if load_checkpoint(ckpt).kind == "conditional":
        ckpt = train_uncond(
            Run(run_dir).recon(lap), run_dir / "uncond", cfg, device=device, force=force, log=log
        )
    sample_unconditional(ckpt, target, n, sample_cfg=cfg.sample, seed=cfg.seed, device=device, force=True)
    return load_recon(target)[0]


def _write(
    out: Path, summary: dict[str, Any], pictures: dict[str, dict[str, torch.Tensor]], data: Observations
) -> None:
    from diffem_cli.pipeline import plots

    write_text_atomic(out / "compare.json", json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    write_text_atomic(out / "compare.md", markdown_table(summary))
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for name, records in summary["laps"].items():
        for rec in records:
            for key, value in rec.items():
                if key.startswith("eval_") and key != "eval_s" and value is not None:
                    panels.setdefault(key[5:], {}).setdefault(name, []).append((rec["lap"], value))
    if panels:
        plots.save_curve_panels(panels, out / "compare.png", "lap")
    if data.kind == "vector":
        sets = {f"{name} {what}": x for name, d in pictures.items() for what, x in d.items()}
        plots.save_pairwise_scatter(sets, out / "compare-samples.png", max_points=2048)
    else:
        rows, labels = [], []
        y = data.obs.get("y")
        if y is not None and tuple(y.shape[1:]) == data.shape:
            rows.append(y[:12])
            labels.append("observation")
        for name, d in pictures.items():
            for what, x in d.items():
                rows.append(x[:12])
                labels.append(f"{name} {what}")
        plots.save_image_grid(
            rows, out / "compare-samples.png", labels=labels, value_range=tuple(data.value_range or (-1, 1))
        )


def markdown_table(summary: dict[str, Any]) -> str:
    """The final metrics of every method as a Markdown table."""
    methods = summary["methods"]
    keys: list[str] = []
    for row in methods.values():
        keys += [k for k in row if k not in keys]
    lines = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in methods.items():
        cells = [f"{row[k]:.4g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
