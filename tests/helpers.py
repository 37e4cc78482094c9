"""What several test files share: tiny run settings, running diffem in-process, reading its one-line
errors and output folders, and faking installed plugin distributions.

Imported as ``from helpers import ...``: ``tests/`` has no ``__init__.py``, so pytest (prepend import
mode) puts it on ``sys.path``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def sets(*assignments: str) -> list[str]:
    """``--set`` options for ``key=value`` assignments, in the order given."""
    return [item for assignment in assignments for item in ("--set", assignment)]


TINY_MLP = sets("network.width=32", "network.depth=2", "network.emb_dim=16")
TINY_UNET = sets(
    "network.block_out_channels=[16, 32]",
    "network.norm_num_groups=8",
    "network.down_block_types=[DownBlock2D, DownBlock2D]",
    "network.up_block_types=[UpBlock2D, UpBlock2D]",
)
QUICK = sets("train.warmup=0", "sample.steps=4", "em.gaussian_iters=2")
"""No warm-up, 4 sampler steps, 2 Gaussian EM iterations: every tiny run uses these."""
FAST = [*sets("train.epochs=1", "train.batch_size=16"), *QUICK]
"""One epoch of batches of 16, on top of :data:`QUICK`."""


def run_ok(*argv: object) -> None:
    """Run ``diffem *argv`` in-process and require exit code 0."""
    from diffem_cli.cli.app import run

    code = run([str(a) for a in argv])
    assert code == 0, f"diffem {' '.join(map(str, argv))} exited with {code}"


def fast_em_lap(obs: Path, run_dir: Path, *settings: object) -> None:
    """One EM lap on ``obs`` into ``run_dir`` with the :data:`FAST` budget, then ``settings``."""
    run_ok("em-train", obs, run_dir, "--laps", 1, *FAST, *settings)


def fast_uncond(data: Path, run_dir: Path, *settings: object) -> None:
    """An unconditional model of ``data`` in ``run_dir`` with the :data:`FAST` budget, then ``settings``."""
    run_ok("train-uncond", data, run_dir, *FAST, *settings)


def kill_when_written(argv: list[str], path: Path, log: Path, timeout: float = 180.0) -> None:
    """Run ``python -m diffem_cli *argv`` on one thread and SIGKILL it as soon as ``path`` exists
    (its output goes to the file ``log``: a full pipe would stall it)."""
    import os
    import signal
    import subprocess
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "diffem_cli", *argv], env=env, stdout=sink, stderr=sink
        )
        try:
            deadline = time.monotonic() + timeout
            while not path.exists():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"{path} did not appear"
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def cut_network(monkeypatch) -> list[tuple[object, float | None]]:
    """No proxy or offline setting, and every socket connection refused; returns the list of the
    connections tried, filled as they are."""
    import socket

    offline = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    for var in (*offline, "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    tried: list[tuple[object, float | None]] = []

    def refuse(address: object, timeout: float | None = None) -> None:
        tried.append((address, timeout))
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return tried


def error_line(err: str) -> str:
    """The one ``error:`` line, last on stderr (progress lines may precede it), no traceback."""
    lines = err.strip().splitlines()
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], err
    assert "Traceback" not in err
    return lines[-1]


def read_x(folder: Path) -> torch.Tensor:
    """Column ``x`` of the datasets folder ``folder``."""
    import datasets

    from diffem_cli.io.store import columns

    return columns(datasets.load_from_disk(str(folder)), ["x"])["x"]


def file_bytes(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (relative POSIX path) with its contents."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``folder`` with its contents and modification time: equal snapshots mean
    nothing was rewritten, not even with the same bytes."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> None:
    """``a`` equals ``b`` up to ``tol`` (relative and absolute); avoids torch.testing's slow import."""
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, rtol=tol, atol=tol), (a - b).abs().max()


def fake_dist(root: Path, dist: str, entries: dict[str, str], modules: dict[str, str] | None = None) -> None:
    """Write an installed-distribution record for ``dist`` declaring ``entries`` under ``root``."""
    info = root / f"{dist.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entries.items())
    (info / "entry_points.txt").write_text(f"[diffem.channels]\n{lines}")
    for module, source in (modules or {}).items():
        (root / f"{module}.py").write_text(source)


def forget_modules(*folders: Path) -> None:
    """Drop from ``sys.modules`` every module imported from below one of ``folders``."""
    prefixes = tuple(str(f) for f in folders)
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", "") or "").startswith(prefixes):
            del sys.modules[name]


class OracleV(torch.nn.Module):
    """The exact v-prediction for data concentrated on one point ``mu``: sampling must return ``mu``."""

    def __init__(self, mu: torch.Tensor):
        super().__init__()
        self.mu = mu
        from diffem_cli.diffusion.schedule import ddpm_scheduler

        self.sched = ddpm_scheduler()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, cond=None):
        ab = self.sched.alphas_cumprod[t.long()].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        eps = (x - ab.sqrt() * self.mu) / (1 - ab).sqrt()
        return ab.sqrt() * eps - (1 - ab).sqrt() * self.mu
