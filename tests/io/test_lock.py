"""Folder locks: a live second process is refused with one line, a dead holder's lock is taken over,
the lock goes away on exit and on exceptions, and works for folders that do not exist yet."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffem_cli.core.errors import DiffemError
from diffem_cli.io.lock import enclosing_run, hold_lock, holder, holding, lock_output, lock_path

HOLD = """
import sys, time
from pathlib import Path
from diffem_cli.io.lock import hold_lock
with hold_lock(Path(sys.argv[1]), "em-train"):
    print("locked", flush=True)
    time.sleep(60)
"""


def _dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def _write_lock(path: Path, pid: int, host: str | None = None, started: float | None = None) -> None:
    record = {
        "pid": pid,
        "host": host or socket.gethostname(),
        "started": started or time.time(),
        "what": "x",
    }
    path.write_text(json.dumps(record))


def test_second_process_is_refused_while_the_holder_lives(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(DiffemError) as err, hold_lock(run):
            pass
        msg = str(err.value)
        assert "\n" not in msg
        assert f"{run} is in use by diffem process {proc.pid}" in msg
        assert "em-train" in msg and "wait for it or kill it" in msg
        assert holder(run) is not None and holder(run)["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()
    # killed with SIGKILL: its lock file stays behind, and is taken over as stale
    assert lock_path(run).exists()
    assert holder(run) is None
    with hold_lock(run) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not lock_path(run).exists()


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _write_lock(lock_path(out), _dead_pid())
    with lock_output(out, "corrupt") as path:
        info = json.loads(path.read_text())
        assert info["pid"] == os.getpid() and info["what"] == "corrupt"
    assert list(tmp_path.iterdir()) == []


def test_reused_pid_of_a_later_process_does_not_hold_the_lock(tmp_path: Path) -> None:
    # the lock names PID 1 (alive, started long before) but was written "before" it started
    out = tmp_path / "out"
    _write_lock(lock_path(out), 1, started=1.0)
    with hold_lock(out):
        pass
    # whereas a lock written after PID 1 started, by PID 1, is honoured
    _write_lock(lock_path(out), 1)
    with pytest.raises(DiffemError, match="in use by diffem process 1 "), hold_lock(out):
        pass


def test_own_pid_in_a_leftover_lock_is_stale(tmp_path: Path) -> None:
    # a killed process's PID handed to us: the lock file names our PID but we hold nothing
    out = tmp_path / "out"
    _write_lock(lock_path(out), os.getpid())
    with hold_lock(out):
        pass
    assert not lock_path(out).exists()


def test_lock_of_another_host_is_never_taken(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _write_lock(lock_path(out), _dead_pid(), host="elsewhere")
    with pytest.raises(DiffemError, match="on host elsewhere") as err, hold_lock(out):
        pass
    assert f"once that process has ended, delete the lock file {lock_path(out)}" in str(err.value)


def test_released_on_exceptions_and_nesting_is_allowed(tmp_path: Path) -> None:
    run = tmp_path / "run"  # does not exist yet: the lock is beside it
    with pytest.raises(RuntimeError), hold_lock(run):
        assert lock_path(run).parent == tmp_path
        run.mkdir()  # the folder appearing while locked does not move the lock
        with hold_lock(run):
            with hold_lock(tmp_path / "run"):
                pass
            assert lock_path(run).exists()
        assert lock_path(run).exists()
        raise RuntimeError("boom")
    assert not lock_path(run).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_unparsable_lock_is_stale_only_once_old(tmp_path: Path) -> None:
    out = tmp_path / "out"
    lock_path(out).write_text("")  # a writer killed between creating and filling the file
    with pytest.raises(DiffemError, match="started at an unknown time"), hold_lock(out):
        pass
    old = time.time() - 60
    os.utime(lock_path(out), (old, old))
    with hold_lock(out):
        pass


def test_missing_parent_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DiffemError, match="does not exist"), hold_lock(tmp_path / "a" / "b"):
        pass


def test_unwritable_parent_locks_inside_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from diffem_cli.io import lock

    run = tmp_path / "run"
    run.mkdir()
    create = lock._create

    def refuse_beside(path: Path, record: bytes) -> bool:
        if path.parent == tmp_path:  # what a read-only parent folder does (root ignores chmod)
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return create(path, record)

    monkeypatch.setattr(lock, "_create", refuse_beside)
    with hold_lock(run) as path:
        assert path == run / ".diffem.lock"
        with hold_lock(run) as again:  # nesting finds the inner lock
            assert again == path
    assert not path.exists()
    # a missing folder in an unwritable parent cannot be locked: one line naming the lock file
    with pytest.raises(DiffemError, match=r"cannot create the lock file .*\.new\.lock \(Permission denied\)"):
        with hold_lock(tmp_path / "new"):
            pass


def test_a_lock_path_that_is_a_folder_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    lock_path(out).mkdir()
    with pytest.raises(DiffemError) as err, hold_lock(out):
        pass
    assert str(err.value) == f"the lock file {lock_path(out)} of {out} is a folder; remove it and try again"


def _run(folder: Path) -> Path:
    folder.mkdir()
    (folder / "run.json").write_text("{}")
    (folder / "config.yaml").write_text("em: {}\n")
    return folder


def test_writing_inside_a_run_takes_the_runs_lock(tmp_path: Path) -> None:
    from diffem_cli.io.store import atomic_path

    run = _run(tmp_path / "run")
    assert enclosing_run(run / "recon" / "lap_009") == run and enclosing_run(run) is None
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        (run / "recon").mkdir()
        with pytest.raises(DiffemError, match=f"{run} is in use by diffem process {proc.pid}"):
            with atomic_path(run / "recon" / "lap_009") as target:
                target.mkdir()
        assert list((run / "recon").iterdir()) == []
    finally:
        proc.kill()
        proc.wait()
    # whoever locks a folder inside the RUN holds the RUN's lock too, so em-train is refused meanwhile
    with hold_lock(run / "uncond", "train-uncond"):
        assert holder(run) is not None and holder(run)["pid"] == os.getpid()
    assert holder(run) is None


def test_holding_decorates_a_function_with_the_lock_of_its_folder(tmp_path: Path) -> None:
    @holding("out", "compare")
    def work(data: int, out: Path) -> dict | None:
        return holder(out)

    info = work(1, out=tmp_path / "cmp")
    assert info is not None and info["what"] == "compare" and not lock_path(tmp_path / "cmp").exists()
    assert work(1, tmp_path / "missing" / "cmp") is None  # the function refuses a missing parent itself
