"""Runtime choices made in one place: the device, mixed precision and the process context.

Every command picks its device through :func:`pick_device` and wraps network evaluations in
:func:`autocast`; :class:`Context` says which process this is (rank, world size) so that only
the main process writes files and work can be sharded across processes. :func:`launch` makes that
context for a command: a plain single process, or one process of several started by ``torchrun`` /
``accelerate launch`` (Accelerate's ``PartialState`` over gloo on CPU, NCCL on CUDA), with the
launcher's variables checked first.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from diffem_cli.core.errors import DiffemError
from diffem_cli.core.logs import get_logger

log = get_logger(__name__)


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
    """bf16 autocast on CUDA, full precision elsewhere: the one precision policy of diffem.

    Not Accelerate's: its autocast belongs to an ``Accelerator``, one per process with its precision
    fixed when made, while diffem evaluates networks (sampling, evaluation) outside any training loop
    and on the device each call names.
    """
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
            from accelerate import PartialState

            PartialState().wait_for_everyone()


@contextlib.contextmanager
def single(device: str | None = None) -> Iterator[Context]:
    """The context of a plain single-process run on ``device``."""
    yield Context(0, 1, pick_device(device))


# --- several processes: torchrun / accelerate launch ---------------------------------------------
#
# Accelerate's ``PartialState`` joins the process group (backend, env:// rendezvous, timeout) and
# answers rank, world size and main process; its ``gather``/``reduce`` run the collectives and its
# ``wait_for_everyone`` the barriers. What stays here, and why:
# - a single process never touches Accelerate: ``PartialState`` would pick its own device (``mps`` on
#   a Mac) and is one state per process, while diffem picks the device per call (``--device``) and
#   must stay bitwise what it was;
# - the launcher's variables are checked before any wait (Accelerate passes a bad RANK or an
#   unreachable master straight to ``init_process_group``, which waits for the whole timeout);
# - the device of each process: Accelerate maps LOCAL_RANK onto the GPUs modulo their number (two
#   processes silently share one GPU); diffem refuses that and hands its choice to Accelerate
#   through ``ACCELERATE_TORCH_DEVICE``;
# - the thread count: Accelerate sets torch's threads on CPU processes when OMP_NUM_THREADS is unset;
#   diffem's own choice (``--threads``, ``DIFFEM_THREADS``) is put back;
# - a peer's failure (a lost connection, a timeout, SIGTERM from the launcher) as one line, and
#   the console and warnings of every process but the main one silenced: Accelerate has neither;
# - uneven shards in :func:`gather_rows`: Accelerate's ``gather`` needs one shape on every process,
#   so each process pads its rows to the widest share first.

TIMEOUT_ENV = "DIFFEM_DIST_TIMEOUT"
"""Minutes a process waits for the others at a barrier or collective before the job stops (default 30:
longer than the main process's longest solo phase, e.g. lap 0's Gaussian fit or an evaluation)."""

CONNECT_ENV = "DIFFEM_CONNECT_TIMEOUT"
"""Seconds a process tries to reach MASTER_ADDR:MASTER_PORT before the job stops with one line (default
60): the launcher's agents meet before they start the processes, so the main one is soon there."""


@dataclass(frozen=True)
class Launch:
    """What a launcher (torchrun, accelerate launch, srun + either) told this process."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    addr: str
    port: int


def _int_var(env: Mapping[str, str], name: str, what: str) -> int | None:
    raw = env.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise DiffemError(f"{name}={raw!r} is not a number ({what})") from None


def _missing(world: int, name: str) -> DiffemError:
    return DiffemError(f"WORLD_SIZE={world} is set but {name} is not: start the processes with torchrun")


def launch_settings(env: Mapping[str, str] | None = None) -> Launch | None:
    """The launcher's variables, checked before anything waits; ``None`` for a plain single process
    (no ``WORLD_SIZE``, or ``WORLD_SIZE=1``)."""
    env = os.environ if env is None else env
    world = _int_var(env, "WORLD_SIZE", "the number of processes")
    if world is None:
        return None
    if world < 1:
        raise DiffemError(f"WORLD_SIZE={world}: the number of processes must be >= 1")
    rank = _int_var(env, "RANK", "this process's number")
    if world == 1:
        if rank not in (None, 0):
            raise DiffemError(f"RANK={rank} is out of range for WORLD_SIZE=1 (only 0)")
        return None
    if rank is None:
        raise _missing(world, "RANK")
    if not 0 <= rank < world:
        raise DiffemError(f"RANK={rank} is out of range for WORLD_SIZE={world} (0 to {world - 1})")
    local_rank = _int_var(env, "LOCAL_RANK", "this process's number on its machine")
    if local_rank is None:
        raise _missing(world, "LOCAL_RANK")
    local_world = _int_var(env, "LOCAL_WORLD_SIZE", "the number of processes on this machine")
    local_world = world if local_world is None else local_world
    if not 1 <= local_world <= world:
        raise DiffemError(f"LOCAL_WORLD_SIZE={local_world} must be between 1 and WORLD_SIZE={world}")
    if not 0 <= local_rank < local_world:
        raise DiffemError(
            f"LOCAL_RANK={local_rank} is out of range for {local_world} process(es) on this machine "
            f"(0 to {local_world - 1})"
        )
    addr = env.get("MASTER_ADDR", "").strip()
    if not addr:
        raise _missing(world, "MASTER_ADDR")
    port = _int_var(env, "MASTER_PORT", "the main process's port")
    if port is None:
        raise _missing(world, "MASTER_PORT")
    if not 1 <= port <= 65535:
        raise DiffemError(f"MASTER_PORT={port} is not a port (1 to 65535)")
    return Launch(rank, world, local_rank, local_world, addr, port)


def _connect_timeout() -> float:
    raw = os.environ.get(CONNECT_ENV, "60")
    try:
        seconds = float(raw)
    except ValueError:
        raise DiffemError(f"{CONNECT_ENV}={raw!r} is not a number of seconds") from None
    if not seconds > 0:
        raise DiffemError(f"{CONNECT_ENV} must be > 0 seconds, got {raw}")
    return seconds


def check_master(settings: Launch, seconds: float | None = None) -> None:
    """Refuse, in one line, a main process that cannot be reached within ``seconds`` (default
    ``DIFFEM_CONNECT_TIMEOUT``), before ``torch.distributed`` retries it for the whole timeout.

    The address must resolve on every process; the port must answer on every process that connects
    to it (all but rank 0, which listens, unless torchrun's agent already holds the store).
    """
    seconds = _connect_timeout() if seconds is None else seconds
    where = f"MASTER_ADDR:MASTER_PORT = {settings.addr}:{settings.port}"
    try:
        socket.getaddrinfo(settings.addr, settings.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise DiffemError(f"process {settings.rank}: {where} does not resolve ({_reason(e)})") from None
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if settings.rank == 0 and not agent_store:
        return
    deadline = time.monotonic() + seconds
    while True:
        wait = max(0.05, min(deadline - time.monotonic(), 5.0))
        try:
            socket.create_connection((settings.addr, settings.port), timeout=wait).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DiffemError(
                    f"process {settings.rank}: cannot reach the main process at {where} within "
                    f"{seconds:g} s ({_reason(e)}); check the address, the port and firewalls, or raise "
                    f"{CONNECT_ENV}"
                ) from None
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or " ".join(str(e).split())[:120] or type(e).__name__


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


def _join(settings: Launch, dev: torch.device) -> tuple[Any, bool]:
    """Accelerate's ``PartialState`` of this process, joined to the others (one-line errors), and
    whether this call started the process group (and so ends it)."""
    import torch.distributed as dist
    from accelerate import PartialState

    owner = not dist.is_initialized()
    if owner:
        PartialState._reset_state()  # a state left by an earlier command of this process is stale
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    kwargs: dict[str, Any] = {"backend": "nccl" if dev.type == "cuda" else "gloo", "timeout": _timeout()}
    if dev.type == "cuda":
        kwargs["device_id"] = dev
    threads, chosen = torch.get_num_threads(), os.environ.get("ACCELERATE_TORCH_DEVICE")
    os.environ["ACCELERATE_TORCH_DEVICE"] = str(dev)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Accelerate's note on OMP_NUM_THREADS: diffem sets threads
            state = PartialState(cpu=dev.type == "cpu", **kwargs)
    except (RuntimeError, ValueError, NotImplementedError) as e:
        raise DiffemError(
            f"process {settings.rank}: could not join the other {settings.world - 1} process(es) "
            f"({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        ) from None
    finally:
        torch.set_num_threads(threads)
        if chosen is None:
            os.environ.pop("ACCELERATE_TORCH_DEVICE", None)
        else:
            os.environ["ACCELERATE_TORCH_DEVICE"] = chosen
    return state, owner


@contextlib.contextmanager
def launch(device: str | None = None) -> Iterator[Context]:
    """The process context of a command: one process of several when started by ``torchrun`` or
    ``accelerate launch`` (``WORLD_SIZE`` > 1), else a plain single process with no distributed set-up.

    Under a launcher it checks the launcher's variables and that the main process answers (one line
    each, before any wait), joins the others through Accelerate (gloo on CPU, NCCL on CUDA, one GPU
    per process from ``LOCAL_RANK``, a timeout of ``DIFFEM_DIST_TIMEOUT`` minutes), silences the
    console and warnings of every process but the main one, turns a peer's failure (a lost
    connection, a timeout, SIGTERM from the launcher) into a one-line :class:`DiffemError`, and ends
    the process group at exit.
    """
    settings = launch_settings()
    if settings is None:
        yield Context(0, 1, pick_device(device))
        return
    import torch.distributed as dist

    dev = rank_device(device, settings.local_rank, settings.local_world)
    check_master(settings)
    state, owner = _join(settings, dev)
    ctx = Context(state.process_index, state.num_processes, dev)
    log.debug("process %d of %d on %s (%s)", ctx.rank, ctx.world, dev, state.backend)
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
        if owner:
            with contextlib.suppress(Exception):
                state.destroy_process_group()
            type(state)._reset_state()


_DIST_WORDS = ("gloo", "nccl", "processgroup", "connection closed", "connection reset", "timed out")


def _looks_distributed(e: RuntimeError) -> bool:
    text = str(e).lower()
    return any(w in text for w in _DIST_WORDS)


def gather_rows(out: torch.Tensor, starts: list[int], batch_size: int, ctx: Context) -> torch.Tensor:
    """Every rank's rows of ``out`` on every rank: rank ``r`` filled the batches ``starts[r::world]``
    (rows ``start:start + batch_size``); returns ``out`` complete (CPU), the same on every rank.

    Each rank sends only its own rows, padded to the largest share, through one Accelerate gather on
    the process group's device (NCCL needs CUDA tensors; gloo takes CPU ones).
    """
    if not ctx.distributed:
        return out
    from accelerate.utils import gather

    n = out.shape[0]
    spans = [[(s, min(s + batch_size, n)) for s in starts[r :: ctx.world]] for r in range(ctx.world)]
    sizes = [sum(b - a for a, b in sp) for sp in spans]
    width = max(sizes)
    mine = torch.zeros((width, *out.shape[1:]), dtype=out.dtype, device=_comm_device(ctx))
    if sizes[ctx.rank]:
        mine[: sizes[ctx.rank]] = torch.cat([out[a:b] for a, b in spans[ctx.rank]]).to(mine.device)
    parts = gather(mine).cpu().view(ctx.world, width, *out.shape[1:])
    full = torch.empty_like(out)
    for r, sp in enumerate(spans):
        row = 0
        for a, b in sp:
            full[a:b] = parts[r, row : row + b - a]
            row += b - a
    return full


def _comm_device(ctx: Context) -> torch.device:
    """Where collectives take their tensors: the GPU under NCCL, the CPU under gloo."""
    import torch.distributed as dist

    return ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_mean(value: torch.Tensor, ctx: Context | None) -> torch.Tensor:
    """The mean of a scalar tensor over all processes (itself for one process)."""
    if ctx is None or not ctx.distributed:
        return value
    from accelerate.utils import reduce

    return reduce(value.detach().float(), "mean")


def same_on_all(value: int, ctx: Context | None) -> bool:
    """Whether every process holds the same integer ``value``."""
    if ctx is None or not ctx.distributed:
        return True
    from accelerate.utils import reduce

    t = reduce(torch.tensor([value, -value], dtype=torch.int64, device=_comm_device(ctx)), "max")
    return int(t[0]) == value and int(t[1]) == -value
