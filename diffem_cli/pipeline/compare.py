"""``diffem compare``: several methods on the same observations at the same budget, side by side.

Each method runs as a normal, resumable RUN in ``OUT/METHOD/`` with the same configuration
(network, steps per lap, laps, sampler), evaluated every lap against the clean data. After its
laps, each method's unconditional model is sampled: priors directly (their own sampler),
conditional models through ``train-uncond`` on their last reconstructions (in
``OUT/METHOD/uncond/``, from scratch, with the training budget of all K laps: see
:func:`compare`). With several seeds each method runs once per seed (``OUT/METHOD-seedS/``
after the first). ``OUT/compare.json``, ``OUT/compare.md``, ``OUT/compare.png`` (every metric
per lap) and ``OUT/compare-samples.png`` (reconstructions and unconditional samples of each
method) summarise the comparison: final metrics (their mean and 95% Student-t interval over the
seeds), the posterior quality of the last lap (``post_*``, a table of its own), the label-free
monitor, and the compute each method took, counted on the network, with each conditional
method's unconditional budget in laps (``uncond_budget_laps``).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from diffem_cli.config.run import RunConfig
from diffem_cli.core.errors import DiffemError
from diffem_cli.io.lock import holding
from diffem_cli.io.observations import Observations, load_clean, load_recon
from diffem_cli.io.store import foreign_output, write_text_atomic
from diffem_cli.pipeline.runs import Run

Logger = Callable[[str], None]
TIME_KEYS = ("init_s", "corrupt_s", "mstep_s", "estep_s")
MONITOR_KEYS = ("obs_sw2", "obs_sw2_floor", "observed_residual")
"""The label-free monitor's fields of the last lap record that ``compare`` reports too."""
POSTERIOR_PREFIX = "post_"
"""The posterior-quality fields of the last lap record (:mod:`diffem_cli.metrics.posterior_quality`), a
table of their own in ``compare.md``; ``post_s``, ``post_k`` and ``post_n`` stay in the records."""
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


@holding("out", "compare")
def compare(
    data_path: Path,
    out: Path,
    methods: list[str],
    cfg: RunConfig,
    *,
    eval_clean: Path | None = None,
    laps: int | None = None,
    uncond: bool = True,
    n_samples: int | None = None,
    seeds: int = 1,
    match: str = "steps",
    device: str | None = None,
    force: bool = False,
    skip_unfit: bool = False,
    log: Logger = print,
    track: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run every method on ``data_path`` into ``out/METHOD`` (once per seed: ``cfg.seed``,
    ``cfg.seed + 1``, ...; seeds after the first in ``out/METHOD-seedS``) and write the
    comparison files: per method the mean of every metric over the seeds and, with several
    seeds, its 95% Student-t interval.

    Without ``eval_clean`` (observations with no clean counterpart) every method is scored by
    label-free measures only: the lap monitor's ``obs_sw2`` (real observations against fresh
    corruptions of its reconstructions), the observed-entry residual, and ``uncond_obs_sw2``, the
    same distance for corruptions of its unconditional samples; a method that trains on clean data
    is refused.

    ``match``: ``steps`` gives every method's posterior sampler the configured steps; ``compute``
    divides them by the network passes one of its steps costs (:meth:`Method.passes_per_step`:
    1 for DiffEM and Ambient, 2 for DPS, 2 + CG iterations for MMPS with the Tweedie covariance),
    so every method spends about the same network passes per observation on each E-step.
    Unconditional samples keep the configured steps (they are unguided).

    Unconditional models at equal budget: a prior method samples its prior, trained over all K
    laps (each lap fine-tuning the previous lap's); a conditional method (model kind
    ``conditional``: DiffEM, the oracle, the denoiser baselines) gets one from ``train-uncond`` on
    its last reconstructions, trained from scratch for K x ``train.epochs`` epochs, the optimiser
    steps and examples a prior received over its K laps. From scratch on the final
    reconstructions is the DiffEM paper's recipe, equal total steps the fairest budget; the
    conditional network cannot seed it, its architecture differs (extra input channels).

    A method that cannot serve the observations (its ``check`` refuses them) is refused
    before anything trains, or, with ``skip_unfit`` (``--methods all``), left out with a line
    saying why. ``track``: the trackers each method's RUN logs to (``em_train``'s ``track``)."""
    from diffem_cli.methods import get_method
    from diffem_cli.metrics.intervals import t_interval

    out = Path(out)
    if match not in MATCHES:
        raise DiffemError(f"--match must be one of {', '.join(MATCHES)}, got {match!r}")
    if seeds < 1:
        raise DiffemError(f"--seeds must be >= 1, got {seeds}")
    if out.exists() and not out.is_dir():
        raise DiffemError(f"OUT {out} is a file, not a folder")
    if not out.parent.exists():
        raise DiffemError(f"folder {out.parent} does not exist")
    foreign = foreign_output(out, "compare")
    if foreign is not None:  # an em-train RUN or someone else's folder, --force or not
        raise DiffemError(f"OUT {out} {foreign}; give a new folder or an earlier compare OUT")
    data = Observations(data_path)
    clean = None if eval_clean is None else load_clean(eval_clean, data, paired=data.kind == "image")
    fit = []
    for name in methods:  # every refusal before any training
        try:
            method = get_method(name, cfg)
            if eval_clean is None and method.needs_clean:
                raise DiffemError(f"method {name!r} trains on clean data: give --eval-clean")
            method.check(data)
        except DiffemError as e:
            if not skip_unfit:
                raise
            log(f"skipping {name}: {e}")
            continue
        fit.append(name)
    methods = fit
    out.mkdir(exist_ok=True)
    seed_list = [cfg.seed + i for i in range(seeds)]
    summary: dict[str, Any] = {
        "methods": {},
        "intervals": {},
        "accounting": {},
        "seeds": seed_list,
        "runs": {},
        "laps": {},
        "config": cfg.to_dict(),
        "data": str(data_path),
        "clean": None if eval_clean is None else str(eval_clean),
        "match": match,
        "sample_steps": {},
    }
    pictures: dict[str, dict[str, torch.Tensor]] = {}
    for name in methods:
        runs = []
        steps = matched_steps(
            get_method(name, cfg), data.channel, cfg.sample.steps, match, cfg.sample.corrections
        )
        summary["sample_steps"][name] = steps
        for seed in seed_list:
            log(f"== {name}" + (f" (seed {seed})" if seeds > 1 else ""))
            run_cfg = copy.deepcopy(cfg)
            run_cfg.seed = seed
            run_cfg.sample.steps = steps
            folder = run_folder(out, name, seed, cfg.seed)
            run = _one_run(
                data_path,
                folder,
                name,
                run_cfg,
                data,
                clean,
                eval_clean,
                laps=laps,
                uncond=uncond,
                n_samples=n_samples,
                device=device,
                force=force,
                log=log,
                track=track,
                uncond_steps=cfg.sample.steps,
            )
            runs.append(
                {
                    "seed": seed,
                    "run": str(run["dir"]),
                    "metrics": run["row"],
                    "accounting": run["accounting"],
                    "laps": run["records"],
                }
            )
            pictures.setdefault(name, run["pictures"])
        keys = list(dict.fromkeys(k for r in runs for k in r["metrics"]))
        values = {k: [r["metrics"][k] for r in runs if r["metrics"].get(k) is not None] for k in keys}
        intervals = {k: t_interval(v) for k, v in values.items() if v}
        summary["methods"][name] = {k: iv.mean for k, iv in intervals.items()}
        if seeds > 1:
            summary["intervals"][name] = {k: iv.to_dict() for k, iv in intervals.items()}
        spent = [r["accounting"] for r in runs]
        summary["accounting"][name] = {
            k: None if any(a[k] is None for a in spent) else sum(a[k] for a in spent) / len(spent)
            for k in spent[0]
        }
        summary["runs"][name] = runs
        summary["laps"][name] = runs[0]["laps"]
    _write(out, summary, pictures, data, clean)
    return summary


MATCHES = ("steps", "compute")


def matched_steps(method: Any, channel: Any, steps: int, match: str, corrections: int = 0) -> int:
    """The posterior sampler's steps for ``method`` under ``match``: ``steps`` itself, or (``compute``)
    the step count whose denoiser evaluations (``sample_nfe``: steps plus ``corrections`` after
    each but the last) times the passes one evaluation costs come nearest to ``steps``' at one
    pass each; at least 1."""
    from diffem_cli.diffusion.sampling import sample_nfe

    if match == "steps":
        return steps
    target, passes = sample_nfe(steps, corrections), method.passes_per_step(channel)
    return min(range(1, steps + 1), key=lambda s: (abs(passes * sample_nfe(s, corrections) - target), -s))


def run_folder(out: Path, method: str, seed: int, first_seed: int) -> Path:
    """Where ``compare`` runs ``method`` with ``seed``: ``out/METHOD`` for the first seed (so a
    one-seed comparison gains seeds without training it again), ``out/METHOD-seedS`` after."""
    return out / method if seed == first_seed else out / f"{method}-seed{seed}"


def _one_run(
    data_path: Path,
    run_dir: Path,
    name: str,
    cfg: RunConfig,
    data: Observations,
    clean: torch.Tensor | None,
    eval_clean: Path | None,
    *,
    laps: int | None,
    uncond: bool,
    n_samples: int | None,
    device: str | None,
    force: bool,
    log: Logger,
    track: tuple[str, ...] = (),
    uncond_steps: int | None = None,
) -> dict[str, Any]:
    """One method with one seed: its RUN (trained or resumed), its final row of metrics (the
    last lap's evaluation and label-free monitor, time, unconditional scores), its lap records
    and the tensors of its pictures."""
    from diffem_cli.methods import get_method
    from diffem_cli.pipeline.em import em_train

    records = em_train(
        data_path,
        run_dir,
        cfg,
        laps=laps,
        method=name,
        eval_clean=eval_clean,
        clean=eval_clean if get_method(name, cfg).needs_clean else None,
        device=device,
        force=force,
        log=log,
        track=track,
    )
    last = records[-1]
    row = {k[5:]: v for k, v in last.items() if k.startswith("eval_") and k != "eval_s"}
    row.update({k: last[k] for k in MONITOR_KEYS if last.get(k) is not None})
    skip = {f"{POSTERIOR_PREFIX}{k}" for k in ("s", "k", "n")}
    row.update({k: v for k, v in last.items() if k.startswith(POSTERIOR_PREFIX) and k not in skip})
    row["seconds"] = sum(float(r.get(k) or 0.0) for r in records for k in TIME_KEYS)
    recon, _ = load_recon(run_dir / "recon" / f"lap_{last['lap']:03d}")
    pictures = {"posterior": recon}
    drawn: dict[str, Any] = {}
    if uncond:
        t0 = time.perf_counter()
        n = n_samples if n_samples is not None else len(clean) if clean is not None else len(data)
        ucfg = copy.deepcopy(cfg)
        ucfg.sample.steps = cfg.sample.steps if uncond_steps is None else uncond_steps
        ucfg.train.epochs = last["lap"] * cfg.train.epochs  # all K laps' budget, as a prior had
        samples, drawn = _unconditional_samples(run_dir, last["lap"], ucfg, n, device, force, log, track)
        if clean is not None:
            from diffem_cli.metrics.evaluate import evaluate_tensors

            metrics = UNCOND_METRICS["vector" if data.kind == "vector" else "image"]
            values = evaluate_tensors(
                samples, clean, metrics, value_range=data.value_range, n_points=cfg.eval.n_points
            )
            row.update({f"uncond_{k}": v for k, v in values.items()})
        row.update(uncond_monitor(data, samples, cfg))
        row["uncond_seconds"] = time.perf_counter() - t0
        pictures["samples"] = samples
    uncond_run = Run(run_dir / "uncond")
    done = [r for r in uncond_run.records() if r.get("event") == "done"]
    trained = done[-1] if done and uncond else {}
    spent = accounting(records, trained, drawn, row["seconds"])
    spent["uncond_budget_laps"] = budget_laps(uncond_run, cfg.train.epochs) if trained else 0.0
    return {"dir": run_dir, "row": row, "records": records, "pictures": pictures, "accounting": spent}


def accounting(
    records: list[dict[str, Any]],
    uncond_train: dict[str, Any],
    uncond_samples: dict[str, Any],
    seconds: float,
) -> dict[str, float | None]:
    """The compute one run took, from its lap records, its unconditional model's training summary
    and its samples' manifest: M-step steps and examples; E-step network forwards and VJPs
    (counted on the network, in samples); the same for the unconditional model; wall time; and
    ``network_passes``, the total in network-equivalent passes (a forward or a VJP counts one, a
    training example two: its forward and its backward). None where a record predates the count."""

    def total(key: str, recs: list[dict[str, Any]]) -> float | None:
        values = [r.get(key) for r in recs]
        return None if any(v is None for v in values) else float(sum(values))

    trained = [r for r in records if r["lap"] >= 1]
    out: dict[str, float | None] = {
        "mstep_steps": total("steps", trained),
        "mstep_examples": total("examples", trained),
        "estep_forwards": total("estep_forwards", trained),
        "estep_vjps": total("estep_vjps", trained),
        "uncond_steps": float(uncond_train.get("steps") or 0),
        "uncond_examples": total("examples", [uncond_train]) if uncond_train else 0.0,
        "uncond_forwards": total("forwards", [uncond_samples]) if uncond_samples else 0.0,
        "uncond_vjps": total("vjps", [uncond_samples]) if uncond_samples else 0.0,
        "wall_s": seconds
        + float(uncond_train.get("seconds") or 0)
        + float(uncond_samples.get("seconds") or 0),
    }
    examples = [out["mstep_examples"], out["uncond_examples"]]
    passes = [out[k] for k in ("estep_forwards", "estep_vjps", "uncond_forwards", "uncond_vjps")]
    if any(v is None for v in examples + passes):
        out["network_passes"] = None
    else:
        out["network_passes"] = 2 * sum(v or 0.0 for v in examples) + sum(v or 0.0 for v in passes)
    return out


def budget_laps(uncond_run: Run, lap_epochs: int) -> float:
    """The training budget of a conditional method's unconditional model in laps: its RUN's
    ``train.epochs`` over one lap's (what it was trained with, whichever compare started it)."""
    saved = yaml.safe_load(uncond_run.config_file.read_text())
    return saved["train"]["epochs"] / lap_epochs


def uncond_monitor(data: Observations, samples: torch.Tensor, cfg: RunConfig) -> dict[str, float]:
    """``uncond_obs_sw2``: the label-free monitor's distance for an unconditional model, sample
    ``i`` corrupted as observation ``i`` was (its mask, operator...) and compared with the real
    observations of the other half; {} with fewer samples than observations."""
    from diffem_cli.pipeline.monitor import monitor_record

    if len(samples) < len(data):
        return {}
    record = monitor_record(data, samples[: len(data)], cfg.seed, 0, cfg.eval.n_points)
    return {"uncond_obs_sw2": record["obs_sw2"]} if "obs_sw2" in record else {}


def _unconditional_samples(
    run_dir: Path,
    lap: int,
    cfg: RunConfig,
    n: int,
    device: str | None,
    force: bool,
    log: Logger,
    track: tuple[str, ...] = (),
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Samples of a method's unconditional model (kept in ``run_dir/samples-uncond`` for reruns)
    and their manifest."""
    from diffem_cli.diffusion.checkpoint import load_checkpoint
    from diffem_cli.pipeline.uncond import sample_unconditional, train_uncond

    target = run_dir / "samples-uncond"
    if (target / "diffem.json").exists():
        return load_recon(target)
    ckpt = Run(run_dir).checkpoint(lap)
    if load_checkpoint(ckpt).kind == "conditional":
        ckpt = train_uncond(
            Run(run_dir).recon(lap), run_dir / "uncond", cfg, device=device, force=force, log=log, track=track
        )
    sample_unconditional(ckpt, target, n, sample_cfg=cfg.sample, seed=cfg.seed, device=device, force=True)
    return load_recon(target)


def _write(
    out: Path,
    summary: dict[str, Any],
    pictures: dict[str, dict[str, torch.Tensor]],
    data: Observations,
    clean: torch.Tensor | None = None,
) -> None:
    from diffem_cli.pipeline import plots

    write_text_atomic(out / "compare.json", json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    write_text_atomic(out / "compare.md", markdown_table(summary))
    panels, errors = lap_panels(summary["runs"])
    if panels:
        plots.save_curve_panels(
            panels,
            out / "compare.png",
            "lap",
            errors=errors if len(summary["seeds"]) > 1 else None,
        )
    if data.kind == "vector":
        sets = {f"{name} {what}": x for name, d in pictures.items() for what, x in d.items()}
        plots.save_pairwise_scatter(sets, out / "compare-samples.png", max_points=2048)
    else:
        rows, labels, held = [], [], []
        if clean is not None:
            rows.append(clean[:12])
            labels.append("clean")
            held.append(None)
        seen = plots.observation_row(data.channel, {k: v[:12] for k, v in data.obs.items()}, data.shape)
        if seen is not None:
            rows.append(seen[0])
            labels.append("observation")
            held.append(seen[1])
        for name, d in pictures.items():
            for what, x in d.items():
                rows.append(x[:12])
                labels.append(f"{name} {what}")
                held.append(None)
        value_range = tuple(data.value_range or (-1, 1))
        from diffem_cli.pipeline.report import spread_rows

        # each method's posterior spread: its first seed's last lap, as its picture rows above
        first = {n: (Path(r[0]["run"]), r[0]["laps"][-1]["lap"]) for n, r in summary["runs"].items()}
        plots.save_image_grid(
            rows,
            out / "compare-samples.png",
            labels=labels,
            value_range=value_range,
            observed=held,
            spread=spread_rows(first),
        )


def lap_panels(
    runs: dict[str, list[dict[str, Any]]],
) -> tuple[dict[str, dict[str, list[tuple[float, float]]]], dict[str, dict[str, dict[float, float]]]]:
    """Per lap metric (evaluation and label-free monitor, its floor a line of the monitor's
    panel), every method's mean over its seeds at each lap, and the half-width of its 95%
    Student-t interval there (0 with one seed)."""
    from diffem_cli.metrics.intervals import t_interval
    from diffem_cli.pipeline.plots import FLOOR_LINE

    by_lap: dict[str, dict[str, dict[float, list[float]]]] = {}
    for name, seed_runs in runs.items():
        for run in seed_runs:
            for rec in run["laps"]:
                for key, value in rec.items():
                    lap_metric = key.startswith("eval_") and key != "eval_s"
                    if (lap_metric or key in MONITOR_KEYS) and value is not None:
                        title, line = (key[5:] if lap_metric else key), name
                        if key == "obs_sw2_floor":  # the same for every method: real observations only
                            title, line = "obs_sw2", FLOOR_LINE
                        lines = by_lap.setdefault(title, {}).setdefault(line, {})
                        lines.setdefault(rec["lap"], []).append(value)
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    errors: dict[str, dict[str, dict[float, float]]] = {}
    for title, methods in by_lap.items():
        for name, laps in methods.items():
            for lap, values in sorted(laps.items()):
                interval = t_interval(values)
                panels.setdefault(title, {}).setdefault(name, []).append((lap, interval.mean))
                errors.setdefault(title, {}).setdefault(name, {})[lap] = interval.half_width or 0.0
    return panels, errors


def metric_table(
    methods: dict[str, dict[str, Any]], intervals: dict[str, dict[str, Any]], keys: list[str]
) -> list[str]:
    """The lines of a Markdown table of ``keys`` per method, each cell the mean and, with an
    interval, the half-width of its 95% Student-t interval."""
    lines = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in methods.items():
        cells = []
        for k in keys:
            value, half = row.get(k), (intervals.get(name, {}).get(k) or {}).get("half_width")
            text = f"{value:.4g}" if isinstance(value, float) else str(value if value is not None else "")
            cells.append(f"{text} ± {half:.2g}" if isinstance(half, float) else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def markdown_table(summary: dict[str, Any]) -> str:
    """The final metrics of every method as a Markdown table: with several seeds, each cell the
    mean and the half-width of its 95% Student-t interval over the seeds."""
    methods, intervals = summary["methods"], summary.get("intervals") or {}
    keys: list[str] = []
    for row in methods.values():
        keys += [k for k in row if k not in keys]
    lines = metric_table(methods, intervals, [k for k in keys if not k.startswith(POSTERIOR_PREFIX)])
    posterior = [k for k in keys if k.startswith(POSTERIOR_PREFIX)]
    if posterior:
        lines += ["", *metric_table(methods, intervals, posterior)]
        lines += [
            "",
            "Posterior quality (`post_*`): K samples of each of the first `eval.posterior_n` "
            "observations; `_one` one sample, `_mean` the K-sample mean; `coverage` of the central "
            "interval per pixel beside `coverage_expected` and `mse_ratio` beside `mse_ratio_exact`, "
            "their values for exact posterior samples.",
        ]
    spent = summary.get("accounting") or {}
    if spent:
        keys = ("mstep_examples", "estep_forwards", "estep_vjps", "uncond_examples", "uncond_forwards")
        keys += ("network_passes", "wall_s")
        lines += ["", "| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for name, acc in spent.items():
            cells = ["" if acc.get(k) is None else f"{acc[k]:.4g}" for k in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Network passes: a forward or a vector-Jacobian product counts one, a training example two.",
        ]
        budgets = {n: a["uncond_budget_laps"] for n, a in spent.items() if a.get("uncond_budget_laps")}
        if budgets:
            listed = ", ".join(f"{name} {laps:g}" for name, laps in budgets.items())
            lines += [
                "",
                "Unconditional models: a prior method samples its prior, trained over all its laps; a "
                "conditional method's is trained from scratch on its last reconstructions for its "
                f"laps x `train.epochs` epochs (in laps: {listed}), the steps and examples a prior "
                "received over its laps.",
            ]
    steps = summary.get("sample_steps") or {}
    if steps:
        listed = ", ".join(f"{name} {n}" for name, n in steps.items())
        how = "equal network passes" if summary.get("match") == "compute" else "equal steps"
        lines += [
            "",
            f"Posterior sampler steps ({how}, `--match {summary.get('match', 'steps')}`): {listed}.",
        ]
    seeds = summary.get("seeds") or []
    if len(seeds) > 1:
        listed = ", ".join(str(s) for s in seeds)
        lines += ["", f"Mean ± half-width of the 95% Student-t interval over {len(seeds)} seeds ({listed})."]
    return "\n".join(lines) + "\n"
