"""Helpers shared by the benchmark scripts: the machine description and result writing."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch


def machine() -> dict[str, Any]:
    """What the benchmark ran on (CPU model, cores, torch, CUDA device if any)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": gpu,
    }
    info["summary"] = f"{cpu}, {info['cores']} cores, torch {torch.__version__}" + (
        f", {gpu}" if gpu else ", no GPU"
    )
    return info


def write_results(out: Path, name: str, data: dict[str, Any], markdown: str) -> None:
    """Write ``name.json`` and ``name.md`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    (out / f"{name}.md").write_text(markdown)
