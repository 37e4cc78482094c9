"""Experiment tracking (``--log tensorboard``, ``--log wandb``) through Accelerate's trackers.

A RUN's trackers receive its configuration once, scalars by step (per-epoch loss and learning
rate, per-lap metrics) and its sample grids; TensorBoard writes event files under ``RUN/logs/``,
W&B keeps its files there too (``WANDB_MODE=offline`` needs no account). Off by default: a
:class:`Tracking` of no names does nothing. Only the main process opens trackers (the caller says
which one it is); metrics.jsonl stays the RUN's own record whatever is tracked.

Accelerate's tracker classes are used directly, without an ``Accelerator`` (which would take over
the precision and device set-up that :mod:`diffem_cli.core.runtime` keeps); every name in
Accelerate's list works for scalars and configuration, images go to TensorBoard and W&B.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from diffem_cli.core.errors import DiffemError
from diffem_cli.core.logs import get_logger

log = get_logger(__name__)

PACKAGES = {
    "tensorboard": ("tensorboard", "pip install 'diffem[track]'"),
    "wandb": ("wandb", "pip install wandb"),
    "mlflow": ("mlflow", "pip install mlflow"),
    "aim": ("aim", "pip install aim"),
    "comet_ml": ("comet_ml", "pip install comet-ml"),
    "clearml": ("clearml", "pip install clearml"),
    "dvclive": ("dvclive", "pip install dvclive"),
    "swanlab": ("swanlab", "pip install swanlab"),
    "trackio": ("trackio", "pip install trackio"),
}
"""Each tracker's module, and how to install it (the one line of a missing package)."""

LOG_HELP = (
    "Track the run with tensorboard (event files in RUN/logs/) or wandb (WANDB_MODE=offline needs no "
    "account); repeat or comma-separate for several. Default: none. Under torchrun write --log-with "
    "(torchrun reads --log as its own --log-dir)."
)


def check_trackers(names: Iterable[str] | None) -> tuple[str, ...]:
    """The ``--log`` names (repeated or comma-separated), checked: known and installed, one line
    naming what to install otherwise."""
    out: list[str] = []
    for item in names or ():
        for name in (part.strip().lower() for part in str(item).split(",")):
            if not name or name in out:
                continue
            if name not in PACKAGES:
                raise DiffemError(f"--log {name}: unknown tracker (choose from {', '.join(PACKAGES)})")
            module, install = PACKAGES[name]
            if importlib.util.find_spec(module) is None:
                raise DiffemError(f"--log {name} needs the {module} package: {install}")
            out.append(name)
    return tuple(out)


def flat_config(values: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """``values`` with nested sections as ``section.key`` and anything but a scalar as JSON text:
    what TensorBoard's hyperparameters accept."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_config(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out


class Tracking:
    """The trackers of one RUN (none: every call does nothing)."""

    def __init__(self, names: Iterable[str] = (), logs: Path | None = None, project: str = "diffem",
                 run_name: str = "run") -> None:  # fmt: skip
        self.trackers: list[Any] = []
        names = tuple(names)
        if not names:
            return
        from accelerate import PartialState
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        # TensorBoard's calls ask Accelerate which process this is: a single process gets a CPU state
        # (no device probing); a distributed one already has its state from runtime.launch.
        PartialState(cpu=True)
        logs = Path(logs or ".")
        logs.mkdir(parents=True, exist_ok=True)
        for name in names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            if name == "wandb":
                tracker = cls(project, name=run_name, dir=str(logs))
            elif cls.requires_logging_directory:
                tracker = cls(run_name, str(logs))
            else:
                tracker = cls(run_name)
            tracker.start()
            self.trackers.append(tracker)
            log.debug("tracking with %s in %s", name, logs)

    def config(self, values: Mapping[str, Any]) -> None:
        """Store the run's configuration (flattened, see :func:`flat_config`)."""
        flat = flat_config(values)
        for tracker in self.trackers:
            tracker.store_init_configuration(flat)

    def scalars(self, values: Mapping[str, Any], step: int) -> None:
        """Log the finite numbers of ``values`` at ``step`` (other entries are left out)."""
        numbers = {
            k: float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        numbers = {k: v for k, v in numbers.items() if v == v and abs(v) != float("inf")}
        if numbers:
            for tracker in self.trackers:
                tracker.log(numbers, step=step)

    def image(self, tag: str, path: Path, step: int) -> None:
        """Log the PNG at ``path`` (a sample grid) to the trackers that take images."""
        if not self.trackers or not Path(path).exists():
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({tag: pixels[None]}, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({tag: [pixels]}, step=step)

    def close(self) -> None:
        """Finish every tracker (files flushed and closed)."""
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []

    def __enter__(self) -> Tracking:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
