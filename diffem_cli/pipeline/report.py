"""``report``: a RUN's per-lap table (Rich and JSON) and its pictures.

Reads ``metrics.jsonl``; draws ``report.png`` (vectors: pairwise scatter of the clean data when
known, the lap-0 start and the last lap; images: clean data when known, observations with their
missing entries hatched, lap 0, the last lap and, when the last lap measured its posterior quality,
the posterior spread: the per-pixel standard deviation of its K samples of each of the first
observations, as a heat map; the clean data are ``--clean``, else the ``--eval-clean`` folder the
RUN remembers) and ``metrics.png`` (the label-free monitor and the evaluation metrics per lap).

The spread is kept by ``em-train`` in ``RUN/samples/lap_NNN.spread.safetensors`` (the standard
deviation of the first :data:`SPREAD_ROWS` observations only, a few kB; the K samples themselves
are not kept), so neither ``report`` nor ``compare`` samples anything again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from diffem_cli.core.errors import DiffemError
from diffem_cli.io.datameta import VECTOR, data_kind
from diffem_cli.io.observations import load_recon
from diffem_cli.io.store import write_text_atomic
from diffem_cli.pipeline.runs import Run, lap_name

COLUMNS = (("init_s", "start s"), ("mstep_s", "M-step s"), ("estep_s", "E-step s"), ("loss", "loss"))
MONITOR = ("obs_sw2", "obs_sw2_floor", "observed_residual")
"""The label-free monitor's lap-record fields (no clean data needed)."""
SPREAD_ROWS = 16
"""How many observations' posterior spread a lap keeps: one row of ``report.png``."""


def _eval_keys(records: list[dict[str, Any]]) -> list[str]:
    return sorted({k for r in records for k in r if k.startswith("eval_") and k != "eval_s"})


def lap_records(run_dir: Path) -> list[dict[str, Any]]:
    """The last record of every completed lap, in lap order."""
    run = Run(run_dir)
    if not run.metrics.exists():
        raise DiffemError(f"{run_dir} has no metrics.jsonl: not an em-train RUN, or no lap has finished")
    laps = run.lap_records()
    if not laps:
        raise DiffemError(f"{run_dir} has no finished lap yet")
    return [laps[k] for k in sorted(laps)]


def report_table(records: list[dict[str, Any]]) -> Any:
    """A Rich table: one row per lap, timings, loss, the label-free monitor and every evaluation
    metric (titled as in the figures)."""
    from rich.table import Table

    from diffem_cli.pipeline.plots import metric_title

    metrics = _eval_keys(records)
    monitor = [(k, metric_title(k)) for k in MONITOR if any(k in r for r in records)]
    columns = [*COLUMNS, *monitor]
    table = Table(title="DiffEM per lap")
    table.add_column("lap", justify="right")
    for _, title in columns:
        table.add_column(title, justify="right")
    for m in metrics:
        table.add_column(metric_title(m), justify="right")
    for r in records:
        cells = [str(r["lap"])]
        cells += [f"{r[k]:.4g}" if r.get(k) is not None else "" for k, _ in columns]
        cells += [f"{r[m]:.4g}" if m in r else "" for m in metrics]
        table.add_row(*cells)
    return table


def save_metric_curves(path: Path, records: list[dict[str, Any]]) -> None:
    """Draw one panel per lap metric of ``records``: the label-free monitor (beside its floor,
    the residual) and every evaluation metric."""
    from diffem_cli.pipeline import plots

    def points(key: str) -> list[tuple[float, float]]:
        return [(r["lap"], r[key]) for r in records if r.get(key) is not None]

    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    if any("obs_sw2" in r for r in records):
        panels["obs_sw2"] = {"run": points("obs_sw2"), plots.FLOOR_LINE: points("obs_sw2_floor")}
    if any("observed_residual" in r for r in records):
        panels["observed_residual"] = {"run": points("observed_residual")}
    panels.update({m[5:]: {"run": points(m)} for m in _eval_keys(records)})
    if panels:
        plots.save_curve_panels(panels, path, "lap")


def spread_file(run_dir: Path, lap: int) -> Path:
    """Where ``lap``'s posterior spread is kept: ``RUN/samples/lap_NNN.spread.safetensors``."""
    return Run(run_dir).samples_dir / f"{lap_name(lap)}.spread.safetensors"


def save_spread(path: Path, samples: torch.Tensor, index: torch.Tensor) -> None:
    """Keep the per-entry standard deviation (unbiased, as the posterior-quality metrics take it)
    of K posterior samples ``(K, N, *shape)`` of the first :data:`SPREAD_ROWS` observations, with
    their ``index`` and K."""
    from diffem_cli.diffusion.checkpoint import save_tensors

    m = min(SPREAD_ROWS, samples.shape[1])
    std = samples[:, :m].float().std(dim=0)
    save_tensors(path, {"std": std, "index": index[:m].to(torch.int64)}, {"k": int(samples.shape[0])})


def spread_rows(runs: Mapping[str, tuple[Path, int]]) -> dict[str, torch.Tensor]:
    """The posterior spread of each named RUN's lap, ``{label: std}``, for the spread rows of an
    image grid (:func:`~diffem_cli.pipeline.plots.save_image_grid`): labelled ``posterior spread
    (K=8)``, after the name when it has one. A RUN that kept none (vector data, no ``--eval-clean``,
    ``eval.posterior_n=0``, written before spreads were kept) or whose file fails its checksum is
    left out."""
    from diffem_cli.diffusion.checkpoint import load_tensors

    out = {}
    for name, (run_dir, lap) in runs.items():
        path = spread_file(run_dir, lap)
        if not path.is_file():
            continue
        try:
            tensors, meta = load_tensors(path)
        except DiffemError:
            continue
        label = f"posterior spread (K={meta.get('k')})"
        out[f"{name} {label}" if name else label] = tensors["std"]
    return out


def first_observations(run: Run, k: int) -> tuple[Any, Any] | None:
    """The first ``k`` observations the RUN was trained on as a row of ``report.png``, with the
    entries they hold (:func:`~diffem_cli.pipeline.plots.observation_row`); None when that
    folder is gone or its observations are not images."""
    from diffem_cli.io.registry import channel_from_spec
    from diffem_cli.io.rowmeta import tensor_names
    from diffem_cli.io.store import columns, read_dataset
    from diffem_cli.pipeline import plots

    try:
        ds, manifest = read_dataset(Path(json.loads(run.info_file.read_text())["data"]))
        channel = channel_from_spec(manifest["channel"])
        obs = columns(ds, tensor_names(ds.column_names), 0, k)
        return plots.observation_row(channel, obs, manifest["data_shape"])
    except (OSError, ValueError, KeyError, TypeError, DiffemError):
        return None


def write_report(run_dir: Path, clean: Path | None = None) -> dict[str, Any]:
    """Write ``report.json`` and ``report.png`` (and ``metrics.png`` when laps were evaluated),
    holding the RUN's lock, once every recorded lap's files verify (one line naming the first
    missing or broken file otherwise)."""
    from diffem_cli.io.lock import hold_lock

    if not Path(run_dir).is_dir():
        return _write_report(run_dir, clean)  # its one-line refusal
    with hold_lock(Path(run_dir), "report"):
        Run(run_dir).verify_laps()
        return _write_report(run_dir, clean)


def _write_report(run_dir: Path, clean: Path | None = None) -> dict[str, Any]:
    """Write ``report.json`` and ``report.png`` (and ``metrics.png`` when laps were evaluated)."""
    from diffem_cli.pipeline import plots

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise DiffemError(f"RUN {run_dir} does not exist")
    if not run_dir.is_dir():
        raise DiffemError(f"RUN {run_dir} is a file, not an em-train RUN folder")
    if clean is not None and not Path(clean).is_dir():
        raise DiffemError(f"--clean {clean} is not a folder")
    if clean is None:  # the clean data the RUN was evaluated against, while it is there
        from diffem_cli.pipeline.run_options import remembered_paths

        kept = remembered_paths(run_dir).get("eval_clean")
        clean = kept if kept is not None and kept.is_dir() else None
    run = Run(run_dir)
    records = lap_records(run_dir)
    last = records[-1]["lap"]
    total = sum(r.get(k, 0.0) for r in records for k in ("init_s", "mstep_s", "estep_s", "corrupt_s"))
    summary = {"laps": records, "last_lap": last, "train_seconds": total}
    # Read everything (and check the clean reference's shape) before writing anything.
    start, start_meta = load_recon(run.recon(0))
    end, _ = load_recon(run.recon(last))
    reference = load_recon(clean)[0] if clean is not None else None
    if reference is not None and tuple(reference.shape[1:]) != tuple(start.shape[1:]):
        raise DiffemError(
            f"--clean {clean} holds samples of shape {list(reference.shape[1:])}, but the RUN's "
            f"reconstructions have shape {list(start.shape[1:])}"
        )
    write_text_atomic(run.root / "report.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if data_kind(start.shape[1:]) == VECTOR:
        sets = {}
        if reference is not None:
            sets["clean"] = reference
        sets["lap 0 (start)"] = start
        sets[f"lap {last}"] = end
        plots.save_pairwise_scatter(sets, run.root / "report.png")
    else:
        k = min(16, len(start))
        rows, labels, held = [start[:k], end[:k]], ["lap 0 (start)", f"lap {last}"], [None, None]
        seen = first_observations(run, k)
        if seen is not None:
            rows.insert(0, seen[0])
            labels.insert(0, "observation")
            held.insert(0, seen[1])
        if reference is not None:
            rows.insert(0, reference[:k])
            labels.insert(0, "clean")
            held.insert(0, None)
        value_range = tuple(start_meta.get("value_range") or (-1.0, 1.0))
        plots.save_image_grid(
            rows,
            run.root / "report.png",
            labels=labels,
            value_range=value_range,
            observed=held,
            spread=spread_rows({"": (run_dir, last)}),
        )
    save_metric_curves(run.root / "metrics.png", records)
    return summary
