"""Runtime choices made in one place: the device, mixed precision and the process context.

Every command picks its device through :func:`pick_device` and wraps network evaluations in
:func:`autocast`; :class:`Context` says which process this is (rank, world size) so that only
the main process writes files and work can be sharded across processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from diffem_cli.errors import DiffemError


def pick_device(name: str | None = None) -> torch.device:
    """``cuda`` when available unless ``name`` forces one (``cpu``, ``cuda``, ``cuda:1``)."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DiffemError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise DiffemError(f"unknown device {name!r} (use cpu, cuda or cuda:N)") from None


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, full precision elsewhere: the one precision policy of diffem."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator living on ``device`` (so random draws need no host-to-device copy)."""
    return torch.Generator(device=device).manual_seed(int(seed))


@dataclass(frozen=True)
class Context:
    """Which process this is: ``rank`` of ``world`` (1 for a plain single-process run)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        """Wait for every process (no-op for one process)."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


@contextlib.contextmanager
def single(device: str | None = None) -> Iterator[Context]:
    """The context of a plain single-process run on ``device``."""
    yield Context(0, 1, pick_device(device))
