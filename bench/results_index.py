"""Render ``bench/results/README.md``, the index of the benchmark results, from the JSON files there.

One section per ``*.json`` file: where the run came from (date, commit, machine, load average, or
"not recorded" where the file does not say), its headline figures and a link to its detailed
``.md`` page. The figures are read from the file's own structure, never typed in: a per-lap
series gives its first and last value, records (``rows``, ``cases``, per-method laps) give a small
table of their labels and leading figures. ``make bench`` (``bench/run_all.py``) calls this at the
end; ``python bench/results_index.py [--check]`` runs it alone (``--check``: exit 1 when the
committed README.md differs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
NOT_RECORDED = "not recorded"
MAX_COLUMNS = 6
MAX_ROWS = 12
# Figures shown first when a record has them (the ones each benchmark exists to measure).
PREFERRED = (
    "eval_sinkhorn",
    "eval_psnr",
    "eval_ssim",
    "gap_db",
    "sinkhorn",
    "estep_ratio",
    "mstep_ratio",
    "mstep_rate",
    "wide_rate",
    "estep_rate",
    "samples_per_s",
    "forward_per_step",
    "vjp_per_step",
    "speedup",
    "efficiency",
    "ratio",
    "start_psnr",
    "fit_s",
    "wall_s",
    "peak_rss_mb",
    "rel_diff",
    "value",
    "seconds",
)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return " ".join(str(value).split()).replace("|", "\\|")


def provenance(data: dict[str, Any]) -> dict[str, str]:
    """Date, commit, machine and load average of a run, ``not recorded`` where the file lacks one."""
    machine = data.get("machine")
    if isinstance(machine, dict):
        machine_text = machine.get("summary") or ", ".join(
            f"{k} {v}" for k, v in sorted(machine.items()) if not isinstance(v, dict | list)
        )
        machine_load = machine.get("load_average_at_start")
    else:
        machine_text, machine_load = machine, None
    load = next(
        (data[k] for k in ("load", "load_start", "load_before") if data.get(k) is not None),
        machine_load,
    )
    return {
        "date": _fmt(data["date"]) if data.get("date") else NOT_RECORDED,
        "commit": _fmt(data["commit"]) if data.get("commit") else NOT_RECORDED,
        "machine": _fmt(machine_text) if machine_text else NOT_RECORDED,
        "load": _fmt(load) if load is not None else NOT_RECORDED,
    }


def _rank(key: str) -> int:
    """Sort order of a figure: the preferred ones, then evaluation metrics, then the rest."""
    if key in PREFERRED:
        return PREFERRED.index(key)
    return len(PREFERRED) + (0 if key.startswith("eval_") and not key.endswith("_s") else 1)


def _table(records: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """A markdown table of labelled records: the label, their text fields, then leading figures."""
    records = records[:MAX_ROWS]
    keys: list[str] = []
    for _, rec in records:
        keys += [k for k in rec if k not in keys]
    text = [k for k in keys if all(isinstance(r.get(k, ""), str) for _, r in records) and k != "event"]
    numbers = [
        k
        for k in keys
        if any(isinstance(r.get(k), int | float) and not isinstance(r.get(k), bool) for _, r in records)
    ]
    numbers = sorted(numbers, key=lambda k: (_rank(k), k))
    columns = (text + numbers)[:MAX_COLUMNS]
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, rec in records:
        lines.append(f"| {_fmt(label)} | " + " | ".join(_fmt(rec.get(k, "")) for k in columns) + " |")
    return lines


def _series(name: str, values: list[Any]) -> str:
    return f"- {name}: {_fmt(values[0])} -> {_fmt(values[-1])} over {len(values) - 1} laps"


def _last_laps(laps: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(m, recs[-1]) for m, recs in laps.items() if isinstance(recs, list) and recs]


def headline(data: dict[str, Any]) -> list[str]:
    """The figures a reader looks for first, from whichever structure the file has."""
    lines: list[str] = []
    for key in ("note", "budget", "command"):
        if isinstance(data.get(key), str):
            lines.append(f"{key.capitalize()}: {_fmt(data[key])}.")
    runs = data.get("runs")
    if isinstance(runs, dict) and all(isinstance(r, dict) for r in runs.values()):
        series = [(n, r) for n, r in runs.items() if isinstance(r.get("sinkhorn_by_lap"), list)]
        if series:
            lines += ["", "Sinkhorn divergence by lap (first -> last):", ""]
            lines += [_series(n, r["sinkhorn_by_lap"]) for n, r in series]
    methods = data.get("methods")
    if isinstance(methods, dict) and all(isinstance(m, dict) and "laps" in m for m in methods.values()):
        lines += ["After the last lap:", "", *_table(_last_laps({m: v["laps"] for m, v in methods.items()}))]
    official = data.get("official")
    if isinstance(official, dict):
        lines += [""] + [
            _series(f"{n} (reference)", v["sinkhorn"])
            for n, v in official.items()
            if isinstance(v.get("sinkhorn"), list)
        ]
    cases = data.get("cases")
    if isinstance(cases, dict):
        for case, body in cases.items():
            if not isinstance(body, dict):
                continue
            if isinstance(body.get("gaps"), list):
                lines += [
                    "",
                    f"{case}, DiffEM against the oracle by lap:",
                    "",
                    *_table([(g.get("lap"), g) for g in body["gaps"]]),
                ]
            elif isinstance(body.get("laps"), dict):
                lines += ["", f"{case}, after the last lap:", "", *_table(_last_laps(body["laps"]))]
        flat = [(c, b) for c, b in cases.items() if isinstance(b, dict) and not {"gaps", "laps"} & set(b)]
        if flat:
            lines += ["", *_table(flat)]
    elif isinstance(cases, list) and all(isinstance(c, dict) for c in cases):
        lines += ["", *_table([(c.get("case", i), c) for i, c in enumerate(cases)])]
    for key in ("rows", "agreement", "divergence", "speed"):
        rows = data.get(key)
        if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
            lines += [
                "",
                f"{key.capitalize()}:" if key != "rows" else "",
                *_table([(i + 1, r) for i, r in enumerate(rows)]),
            ]
    if not lines:
        scalars = {
            k: v for k, v in data.items() if isinstance(v, int | float | str) and k not in ("date", "commit")
        }
        lines += [f"- {k}: {_fmt(v)}" for k, v in sorted(scalars.items())]
    tidy: list[str] = []
    for line in lines:  # a blank line between blocks, never two, none at the start
        if line.startswith("|") and tidy and tidy[-1] and not tidy[-1].startswith("|"):
            tidy.append("")
        if line or (tidy and tidy[-1]):
            tidy.append(line)
        if line.endswith(":") and not line.startswith("|"):
            tidy.append("")
    return [line for i, line in enumerate(tidy) if line or (i and tidy[i - 1])]


def render(results: Path = RESULTS) -> str:
    """The index page for the results folder ``results``."""
    out = [
        "# Benchmark results",
        "",
        "<!-- Generated by bench/results_index.py (`make bench`) from the JSON files here; do not edit. -->",
        "",
        "Each section is one benchmark's result file: where it ran, its headline figures, and a link to "
        "the detailed page (method, settings, every figure, discussion). `make bench` reruns them all "
        "(`make bench-quick`: smoke runs, written to `quick/`). Figures measured on a shared CPU scatter "
        "with the machine's load; the detailed pages give the spread.",
        "",
    ]
    files = sorted(results.glob("*.json"))
    for path in files:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            out += [f"## {path.stem}", "", f"Unreadable ({type(e).__name__}).", ""]
            continue
        page = path.with_suffix(".md")
        title = f"[{path.stem}]({page.name})" if page.exists() else path.stem
        where = provenance(data if isinstance(data, dict) else {})
        out += [
            f"## {title}",
            "",
            f"Date: {where['date']}; commit: {where['commit']}; machine: {where['machine']}; "
            f"load average: {where['load']}. Data: [`{path.name}`]({path.name}).",
            "",
        ]
        if isinstance(data, dict):
            out += [*headline(data), ""]
    pages = sorted(
        p for p in results.glob("*.md") if p.name != "README.md" and not p.with_suffix(".json").exists()
    )
    if pages:
        out += ["## Other pages", "", *[f"- [{p.stem}]({p.name})" for p in pages], ""]
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="the results folder")
    ap.add_argument("--check", action="store_true", help="exit 1 when README.md is not current")
    args = ap.parse_args(argv)
    text = render(args.results)
    target = args.results / "README.md"
    if args.check:
        current = target.read_text() if target.exists() else ""
        if current != text:
            print(f"{target.name} is stale: run python bench/results_index.py")
            return 1
        return 0
    target.write_text(text)
    print(f"wrote {target.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
