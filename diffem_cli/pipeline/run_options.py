"""The em-train inputs a RUN remembers, so that extending it needs none of them again.

``em-train`` records the ``--eval-clean``, ``--clean`` and ``--warm-start`` paths it was given in
``run.json`` (``paths``); a later ``em-train`` on the RUN without them, and ``report``, use them.
"""

from __future__ import annotations

import json
from pathlib import Path

REMEMBERED = ("eval_clean", "clean", "warm_start")
"""The em-train inputs a RUN records in ``run.json`` (``paths``) for the next em-train on it."""


def remembered_paths(run_path: Path) -> dict[str, Path]:
    """The :data:`REMEMBERED` paths a RUN was run with, from its ``run.json`` (none when unreadable),
    so that extending a RUN evaluates against the same clean data without repeating the options."""
    try:
        info = json.loads((Path(run_path) / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    paths = info.get("paths") if isinstance(info, dict) else None
    if not isinstance(paths, dict):
        return {}
    return {k: Path(paths[k]) for k in REMEMBERED if isinstance(paths.get(k), str)}
