"""``report``: a RUN's per-lap table (Rich and JSON) and its pictures.

Reads ``metrics.jsonl``; draws ``report.png`` (vectors: pairwise scatter of the clean data when
given, the lap-0 start and the last lap; images: observations, lap 0 and the last lap) and
``metrics.png`` (the per-lap evaluation curves).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffem_cli.core.errors import DiffemError
from diffem_cli.io.datameta import VECTOR, data_kind
from diffem_cli.io.observations import load_recon
from diffem_cli.io.store import write_text_atomic
from diffem_cli.pipeline.runs import Run

COLUMNS = (("init_s", "start s"), ("mstep_s", "M-step s"), ("estep_s", "E-step s"), ("loss", "loss"))


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
    """A Rich table: one row per lap, timings, loss and every evaluation metric."""
    from rich.table import Table

    metrics = sorted({k for r in records for k in r if k.startswith("eval_") and k != "eval_s"})
    table = Table(title="DiffEM per lap")
    table.add_column("lap", justify="right")
    for _, title in COLUMNS:
        table.add_column(title, justify="right")
    for m in metrics:
        table.add_column(m[5:], justify="right")
    for r in records:
        cells = [str(r["lap"])]
        cells += [f"{r[k]:.4g}" if k in r else "" for k, _ in COLUMNS]
        cells += [f"{r[m]:.4g}" if m in r else "" for m in metrics]
        table.add_row(*cells)
    return table


def save_metric_curves(path: Path, records: list[dict[str, Any]]) -> None:
    """Draw every per-lap evaluation metric of ``records`` as curves (log scale for Sinkhorn)."""
    from diffem_cli.pipeline import plots

    metrics = sorted({k for r in records for k in r if k.startswith("eval_") and k != "eval_s"})
    if not metrics:
        return
    curves = {m[5:]: [(r["lap"], r[m]) for r in records if m in r] for m in metrics}
    plots.save_curves(
        curves,
        path,
        xlabel="lap",
        ylabel="value",
        logy="eval_sinkhorn" in metrics,
        title="per-lap evaluation",
    )


def write_report(run_dir: Path, clean: Path | None = None) -> dict[str, Any]:
    """Write ``report.json`` and ``report.png`` (and ``metrics.png`` when laps were evaluated)."""
    from diffem_cli.pipeline import plots

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise DiffemError(f"RUN {run_dir} does not exist")
    if not run_dir.is_dir():
        raise DiffemError(f"RUN {run_dir} is a file, not an em-train RUN folder")
    if clean is not None and not Path(clean).is_dir():
        raise DiffemError(f"--clean {clean} is not a folder")
    run = Run(run_dir)
    records = lap_records(run_dir)
    last = records[-1]["lap"]
    total = sum(r.get(k, 0.0) for r in records for k in ("init_s", "mstep_s", "estep_s", "corrupt_s"))
    summary = {"laps": records, "last_lap": last, "train_seconds": total}
    # Read everything (and check the clean reference's shape) before writing anything.
    start, _ = load_recon(run.recon(0))
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
        rows, labels = [start[:k], end[:k]], ["lap 0 (start)", f"lap {last}"]
        if reference is not None:
            rows.insert(0, reference[:k])
            labels.insert(0, "clean")
        plots.save_image_grid(rows, run.root / "report.png", labels=labels)
    save_metric_curves(run.root / "metrics.png", records)
    return summary
