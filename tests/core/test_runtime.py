"""Several processes through ``torchrun`` on CPU (gloo): one job, one writer, sharded E-step, resume.

Two processes run ``em-train``; one of them is killed in the lap-1 M-step, the job stops with a
one-line error and a rerun resumes. ``reconstruct`` with 1 and 2 processes from the same checkpoint
must give the same reconstructions up to float32 kernel rounding.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_MLP, run_ok, sets

from diffem_cli.diffusion.checkpoint import build_model, load_checkpoint
from diffem_cli.io.store import columns, read_dataset

N = 256
EPOCHS = 12
BATCH = 32
TRAIN = [
    *TINY_MLP,
    *sets(f"train.batch_size={BATCH}", f"train.epochs={EPOCHS}", "train.warmup=0"),
    *sets("sample.steps=4", "sample.batch_size=64", "em.gaussian_iters=2"),
]
STEPS = 4
WIDTH, DEPTH, EMB = 32, 2, 16  # TINY_MLP


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).parents[2]), env.get("PYTHONPATH")) if p
    )
    return env


def _torchrun(*argv: object) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "diffem_cli", *map(str, argv)]  # fmt: skip


def _recon(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    ds, _ = read_dataset(folder)
    got = columns(ds, ["x", "index"])
    return got["x"], got["index"]


def _records(run_dir: Path, event: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == event]


def _worker(launcher: int, rank: int) -> int | None:
    """The pid of the launcher's child process with ``RANK=rank``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    """Observations; a 2-process em-train whose rank 1 is SIGKILLed after lap 1's first epoch; the
    rerun that finishes it."""
    root = tmp_path_factory.mktemp("dist")
    run_ok("corrupt", f"manifold:samples={N},n=2", root / "obs", "--channel", "projection")
    run = root / "run"
    cmd = _torchrun("em-train", root / "obs", run, "--laps", 2, *TRAIN)
    first = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, victim = time.monotonic() + 300, None
    while not [r for r in _records(run, "epoch") if r["lap"] == 1] and first.poll() is None:
        assert time.monotonic() < deadline, "lap 1 never started"
        victim = victim or _worker(first.pid, 1)
        time.sleep(0.01)
    assert victim is not None and first.poll() is None, "the run ended before rank 1 could be killed"
    os.kill(victim, signal.SIGKILL)
    out1, err1 = first.communicate(timeout=300)
    killed_after = [r["epoch"] for r in _records(run, "epoch") if r["lap"] == 1]
    second = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    return {"root": root, "run": run, "first": (first.returncode, out1, err1), "killed_after": killed_after,
            "second": (second.returncode, second.stdout, second.stderr)}  # fmt: skip


def test_killing_one_rank_stops_the_job_with_one_line_and_a_rerun_resumes(job):
    code, _, err = job["first"]
    assert code != 0
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1, err  # the surviving process; the rest is torchrun's own failure report
    assert "process 0" in ours[0] and "run the same command again" in ours[0]
    assert 1 <= len(job["killed_after"]) < EPOCHS
    code, _, err = job["second"]
    assert code == 0, err
    # the rerun went on from the saved epoch: every epoch of lap 1 logged once, in order
    assert [r["epoch"] for r in _records(job["run"], "epoch") if r["lap"] == 1] == list(range(1, EPOCHS + 1))


def test_two_processes_write_one_complete_run(job):
    code, out, err = job["second"]
    assert code == 0, err
    assert [r["lap"] for r in _records(job["run"], "lap")] == [0, 1, 2]  # one record per lap
    assert (out + err).count("done: 2 laps") == 1  # the other process prints nothing
    assert "error" not in err
    assert [r["epoch"] for r in _records(job["run"], "epoch") if r["lap"] == 2] == list(range(1, EPOCHS + 1))
    assert not (job["run"] / "state" / "mstep.safetensors").exists()
    for lap in (1, 2):
        ckpt = load_checkpoint(job["run"] / "checkpoints" / f"lap_{lap:03d}.safetensors")
        assert ckpt.meta["lap"] == lap and ckpt.meta["train"]["steps"] == EPOCHS * (N // BATCH)
        build_model(ckpt)
    for lap in (0, 1, 2):
        x, index = _recon(job["run"] / "recon" / f"lap_{lap:03d}")
        assert x.shape == (N, 2) and torch.isfinite(x).all()
        assert torch.equal(index, torch.arange(N))


def test_sharded_reconstruct_equals_one_process(job, tmp_path):
    """48 rows a batch: 6 batches, rank 0 draws 3 of 48 rows, rank 1 two of 48 and the last of 16.

    Both runs evaluate the same batches (same rows, same noise seeded by the batch's first index)
    with the same single-threaded CPU kernels, so they agree exactly unless a kernel picks another
    summation order for another memory layout. Reordering a float32 sum of k terms moves it by at
    most k * 2**-24 of the sum of magnitudes: each network evaluation has sums of at most
    WIDTH + EMB = 48 terms per layer, DEPTH + 2 layers, and the sampler takes STEPS steps, so the
    relative drift stays below STEPS * (DEPTH + 2) * 48 * 2**-24 ~ 5e-5; ``rtol = atol = 1e-4`` (the
    data lie in [-2, 2]) leaves a factor of two for the sampler's own arithmetic.
    """
    ckpt = job["run"] / "checkpoints" / "lap_002.safetensors"
    obs = job["root"] / "obs"
    args = ["--batch-size", 48, "--steps", STEPS, "--seed", 3]
    run_ok("reconstruct", ckpt, obs, tmp_path / "one", *args)
    two = subprocess.run(
        _torchrun("reconstruct", ckpt, obs, tmp_path / "two", *args),
        env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr
    assert two.stderr.count("wrote 256 reconstructions") == 1
    x1, i1 = _recon(tmp_path / "one")
    x2, i2 = _recon(tmp_path / "two")
    assert torch.equal(i1, i2) and x1.shape == x2.shape == (N, 2)
    tol = STEPS * (DEPTH + 2) * (WIDTH + EMB) * 2.0**-24
    assert tol < 1e-4
    torch.testing.assert_close(x2, x1, rtol=1e-4, atol=1e-4)


def test_a_plain_run_sets_up_nothing_distributed(monkeypatch):
    import torch.distributed as dist

    from diffem_cli.core.runtime import gather_rows, launch

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with launch("cpu") as ctx:
        assert (ctx.rank, ctx.world, ctx.device.type) == (0, 1, "cpu") and ctx.is_main
        assert not dist.is_initialized()
        x = torch.arange(6.0).view(3, 2)
        assert gather_rows(x, [0, 2], 2, ctx) is x


def test_launcher_settings_are_checked(monkeypatch):
    from diffem_cli.core.errors import DiffemError
    from diffem_cli.core.runtime import launch, rank_device

    assert rank_device("cpu", 1, 2) == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(DiffemError, match="RANK"), launch("cpu"):
        pass
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(DiffemError, match="WORLD_SIZE"), launch("cpu"):
        pass


def test_a_global_batch_smaller_than_the_world_is_refused():
    from diffem_cli.core.errors import DiffemError
    from diffem_cli.core.runtime import Context
    from diffem_cli.diffusion.nets import build_network
    from diffem_cli.diffusion.train import TrainConfig, train_denoiser

    net = build_network({"type": "mlp", "width": 8, "depth": 1, "emb_dim": 4}, (2,), 0)
    cpu = torch.device("cpu")
    with pytest.raises(DiffemError, match="cannot be split across 4 processes"):
        train_denoiser(net, {"x": torch.zeros(3, 2)}, TrainConfig(batch_size=3), seed=0, device=cpu,
                       ctx=Context(0, 4, cpu))  # fmt: skip


# --- the launcher's variables, checked before any wait ------------------------------------------

GOOD = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0: the number of processes must be >= 1"),
        ({"WORLD_SIZE": "-3"}, "WORLD_SIZE=-3"),
        ({"RANK": "5"}, "RANK=5 is out of range for WORLD_SIZE=2"),
        ({"RANK": "-1"}, "RANK=-1 is out of range"),
        ({"RANK": "one"}, "RANK='one' is not a number"),
        ({"RANK": None}, "RANK is not"),
        ({"LOCAL_RANK": None}, "LOCAL_RANK is not"),
        ({"LOCAL_RANK": "2"}, "LOCAL_RANK=2 is out of range"),
        ({"LOCAL_WORLD_SIZE": "1"}, "LOCAL_RANK=1 is out of range for 1 process(es)"),
        ({"LOCAL_WORLD_SIZE": "3"}, "LOCAL_WORLD_SIZE=3 must be between 1 and WORLD_SIZE=2"),
        ({"MASTER_ADDR": None}, "MASTER_ADDR is not"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a port"),
        ({"WORLD_SIZE": "1", "RANK": "3"}, "RANK=3 is out of range for WORLD_SIZE=1"),
    ],
)
def test_bad_launcher_variables_are_refused_in_one_line(change, words):
    from diffem_cli.core.errors import DiffemError
    from diffem_cli.core.runtime import launch_settings

    env = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(DiffemError) as info:
        launch_settings(env)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_the_launcher_variables_of_torchrun_pass():
    from diffem_cli.core.runtime import Launch, launch_settings

    assert launch_settings({}) is None and launch_settings({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert launch_settings(GOOD) == Launch(1, 2, 1, 2, "127.0.0.1", 29500)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"RANK": "5"}, "RANK=5 is out of range for WORLD_SIZE=2"),
        ({"MASTER_PORT": "CLOSED"}, "cannot reach the main process at MASTER_ADDR:MASTER_PORT = 127.0.0.1:"),
        ({"MASTER_ADDR": "no-such-host.invalid"}, "no-such-host.invalid"),
    ],
)
def test_a_command_under_a_bad_launch_stops_with_one_line_and_sets_up_nothing(
    cli, monkeypatch, tmp_path, change, words
):
    """The checks run before torch.distributed is touched: no process group, no 30-minute wait, no
    screen of socket retries; a short DIFFEM_CONNECT_TIMEOUT bounds the reachability check."""
    import torch.distributed as dist
    from helpers import error_line

    run_ok("corrupt", "manifold:samples=32,n=2", tmp_path / "obs", "--channel", "projection")
    env = {**GOOD, "MASTER_PORT": str(_closed_port()), **change, "DIFFEM_CONNECT_TIMEOUT": "0.3"}
    if env["MASTER_PORT"] == "CLOSED":
        env["MASTER_PORT"] = str(_closed_port())
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _, err = cli("em-train", tmp_path / "obs", tmp_path / "run", "--device", "cpu", *TRAIN)
    assert code == 2
    assert words in error_line(err)
    assert not dist.is_initialized()
