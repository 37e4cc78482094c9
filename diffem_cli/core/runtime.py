"""Runtime choices made in one place: the device, mixed precision and the process context.

Every command picks its device through :func:`pick_device` and wraps network evaluations in
:func:`autocast`; :class:`Context` says which process this is (rank, world size) so that only
the main process writes files and work can be sharded across processes. :func:`launch` makes that
context for a command: a plain single process, or one process of several started by ``torchrun`` /
``accelerate launch`` (``torch.distributed`` over gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch

from diffem_cli.core.errors import DiffemError


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


# --- several processes: torchrun / accelerate launch -------------------------------------------

TIMEOUT_ENV = "DIFFEM_DIST_TIMEOUT"
"""Minutes a process waits for the others at a barrier or collective before the job stops (default 30:
longer than the main process's longest solo phase, e.g. lap 0's Gaussian fit or an evaluation)."""

LAUNCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def launched_world() -> int:
    """The number of processes a launcher (torchrun, accelerate launch, srun + torchrun) started; 1
    when none did."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise DiffemError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise DiffemError(f"WORLD_SIZE is set but {name} is not: start several processes with torchrun")
    try:
        return int(value)
    except ValueError:
        raise DiffemError(f"{name}={value!r} is not a number") from None


def rank_device(name: str | None, local_rank: int, local_world: int) -> torch.device:
    """The device of one process of several: ``cuda:LOCAL_RANK`` (CUDA unless ``name`` is ``cpu``)."""
    if name in (None, "", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    dev = pick_device(name)
    if dev.type != "cuda":
        return dev
    if dev.index is not None and local_world > 1:
        raise DiffemError(
            f"--device {name}: with {local_world} processes on this machine each takes cuda:LOCAL_RANK; "
            "pass --device cuda (choose GPUs with CUDA_VISIBLE_DEVICES)"
        )
    index = local_rank if dev.index is None else dev.index
    count = torch.cuda.device_count()
    if index >= count:
        raise DiffemError(
            f"process with LOCAL_RANK {local_rank} needs cuda:{index}, but this machine shows "
            f"{count} GPU(s); start at most one process per GPU"
        )
    return torch.device("cuda", index)


def _timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "30")
    try:
        minutes = float(raw)
    except ValueError:
        raise DiffemError(f"{TIMEOUT_ENV}={raw!r} is not a number of minutes") from None
    if minutes <= 0:
        raise DiffemError(f"{TIMEOUT_ENV} must be > 0 minutes, got {raw}")
    return timedelta(minutes=minutes)


class _Stopped(Exception):
    pass


def _peer_failure(rank: int, e: BaseException) -> DiffemError:
    """One line for a collective that failed because a peer died or stalled: the backend's first
    sentence, without its source location."""
    why = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(e).split()))
    why = why.split(". ")[0][:160]
    why = why if isinstance(e, _Stopped) else f"{type(e).__name__}: {why}"
    return DiffemError(
        f"process {rank}: stopped, another process of this job failed or timed out ({why}); "
        "see its error, then run the same command again to resume"
    )


@contextlib.contextmanager
def launch(device: str | None = None) -> Iterator[Context]:
    """The process context of a command: one process of several when started by ``torchrun`` or
    ``accelerate launch`` (``WORLD_SIZE`` > 1), else a plain single process with no distributed set-up.

    Under a launcher it initialises ``torch.distributed`` (gloo on CPU, NCCL on CUDA, one GPU per
    process from ``LOCAL_RANK``, a timeout of ``DIFFEM_DIST_TIMEOUT`` minutes), silences the console
    and warnings of every process but the main one, turns a peer's failure (a lost connection, a
    timeout, SIGTERM from the launcher) into a one-line :class:`DiffemError`, and destroys the process
    group at exit.
    """
    world = launched_world()
    if world == 1:
        yield Context(0, 1, pick_device(device))
        return
    import torch.distributed as dist

    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    dev = rank_device(device, local_rank, local_world)
    owner = not dist.is_initialized()
    if owner:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        extra = {"device_id": dev} if dev.type == "cuda" else {}
        try:
            dist.init_process_group(backend, init_method="env://", timeout=_timeout(), **extra)
        except (RuntimeError, ValueError) as e:
            raise DiffemError(
                f"process {rank}: could not join the other {world - 1} process(es) "
                f"({type(e).__name__}: {' '.join(str(e).split())[:200]})"
            ) from None
    ctx = Context(dist.get_rank(), dist.get_world_size(), dev)
    from diffem_cli.core.progress import console

    quiet, handler = console.quiet, signal.getsignal(signal.SIGTERM)

    def _on_term(_signum, _frame):
        raise _Stopped("stopped by the launcher (SIGTERM)")

    try:
        with warnings.catch_warnings():
            if not ctx.is_main:
                console.quiet = True
                warnings.simplefilter("ignore")
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, _on_term)
            try:
                yield ctx
            except (_Stopped, dist.DistError) as e:
                raise _peer_failure(ctx.rank, e) from None
            except RuntimeError as e:
                if not _looks_distributed(e):
                    raise
                raise _peer_failure(ctx.rank, e) from None
    finally:
        console.quiet = quiet
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)
        if owner and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


_DIST_WORDS = ("gloo", "nccl", "processgroup", "connection closed", "connection reset", "timed out")


def _looks_distributed(e: RuntimeError) -> bool:
    text = str(e).lower()
    return any(w in text for w in _DIST_WORDS)


def gather_rows(out: torch.Tensor, starts: list[int], batch_size: int, ctx: Context) -> torch.Tensor:
    """Every rank's rows of ``out`` on every rank: rank ``r`` filled the batches ``starts[r::world]``
    (rows ``start:start + batch_size``); returns ``out`` complete (CPU), the same on every rank.

    Each rank sends only its own rows, padded to the largest share, through one all-gather on the
    process group's device (NCCL needs CUDA tensors; gloo takes CPU ones).
    """
    if not ctx.distributed:
        return out
    import torch.distributed as dist

    n = out.shape[0]
    spans = [[(s, min(s + batch_size, n)) for s in starts[r :: ctx.world]] for r in range(ctx.world)]
    sizes = [sum(b - a for a, b in sp) for sp in spans]
    width = max(sizes)
    comm = ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.zeros((width, *out.shape[1:]), dtype=out.dtype, device=comm)
    if sizes[ctx.rank]:
        mine[: sizes[ctx.rank]] = torch.cat([out[a:b] for a, b in spans[ctx.rank]]).to(comm)
    parts = [torch.empty_like(mine) for _ in range(ctx.world)]
    dist.all_gather(parts, mine)
    full = torch.empty_like(out)
    for r, sp in enumerate(spans):
        part, row = parts[r].cpu(), 0
        for a, b in sp:
            full[a:b] = part[row : row + b - a]
            row += b - a
    return full


def all_mean(value: torch.Tensor, ctx: Context | None) -> torch.Tensor:
    """The mean of a scalar tensor over all processes (itself for one process)."""
    if ctx is None or not ctx.distributed:
        return value
    import torch.distributed as dist

    t = value.detach().clone().float()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / ctx.world


def same_on_all(value: int, ctx: Context | None) -> bool:
    """Whether every process holds the same integer ``value``."""
    if ctx is None or not ctx.distributed:
        return True
    import torch.distributed as dist

    dev = ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value, -value], dtype=torch.int64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0]) == value and int(t[1]) == -value
