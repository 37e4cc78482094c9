"""Data folders on disk: crash-safe overwrites, stale temporaries, full disks, fingerprints, paths
that leave the folder, and non-finite values."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import error_line, file_bytes

from diffem_cli.core.errors import DiffemError
from diffem_cli.io import store
from diffem_cli.io.store import (
    atomic_path,
    check_finite,
    clean_stale,
    fingerprint_dataset,
    read_dataset,
    recover,
    write_dataset,
    write_text_atomic,
)


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "000000.png").write_text(text)
    return path


def _data(out: Path, y: torch.Tensor | None = None, manifest: dict | None = None) -> Path:
    y = torch.arange(12.0).reshape(6, 2) if y is None else y
    chunk = {"y": y, "index": torch.arange(len(y))}
    return write_dataset(out, [chunk], manifest or {"kind": "observations", "channel": {"name": "noise"}})


# --- overwrites a kill cannot break ----------------------------------------------------------

KILL_IN_OVERWRITE = """
import os, signal, sys
from pathlib import Path
from diffem_cli.io import store
out = Path(sys.argv[1])
if sys.argv[2] == "two-renames":
    store._exchange = lambda a, b: False
    real = os.replace
    def replace(src, dst):
        real(src, dst)
        if ".old-" in str(dst):  # the old copy is parked, the new one not yet in place
            os.kill(os.getpid(), signal.SIGKILL)
    store.os.replace = replace
else:
    real = store._exchange
    def exchange(a, b):
        done = real(a, b)
        os.kill(os.getpid(), signal.SIGKILL)  # swapped, old copy not yet removed
    store._exchange = exchange
with store.atomic_path(out, force=True) as target:
    target.mkdir()
    (target / "000000.png").write_text("new")
"""


@pytest.mark.parametrize("how", ["two-renames", "exchange"])
def test_kill_during_a_forced_overwrite_leaves_old_or_new(tmp_path: Path, how: str) -> None:
    out = _folder(tmp_path / "out", "old")
    proc = subprocess.run([sys.executable, "-c", KILL_IN_OVERWRITE, str(out), how])
    assert proc.returncode == -9
    if how == "two-renames":
        assert not out.exists()  # only the hidden old copy is left ...
        assert recover(out) == out  # ... and is put back (read_dataset and check_output do this)
        assert (out / "000000.png").read_text() == "old"
    else:
        assert (out / "000000.png").read_text() == "new"  # never a moment without `out`
    # the next write removes what the killed writer left
    with atomic_path(out, force=True) as target:
        target.mkdir()
        (target / "000000.png").write_text("third")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "000000.png").read_text() == "third"


def test_forced_overwrite_of_a_file_and_a_folder(tmp_path: Path) -> None:
    f = tmp_path / "a.png"
    f.write_bytes(b"old")
    with atomic_path(f, force=True, kind="file") as target:
        target.write_bytes(b"new")
    assert f.read_bytes() == b"new"
    with pytest.raises(DiffemError, match="already exists"), atomic_path(f, kind="file"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_exchange_falls_back_where_unsupported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = _folder(tmp_path / "out", "old")
    monkeypatch.setattr(store, "_exchange", lambda a, b: False)
    with atomic_path(out, force=True) as target:
        _folder(target, "new")
    assert (out / "000000.png").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_read_dataset_recovers_an_interrupted_overwrite(tmp_path: Path) -> None:
    out = _data(tmp_path / "obs")
    os.rename(out, tmp_path / f".obs.old-{_dead_pid()}")
    ds, manifest = read_dataset(out)
    assert len(ds) == 6 and manifest["kind"] == "observations"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["obs"]


def test_old_copy_of_a_live_writer_is_left_alone(tmp_path: Path) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        old = _folder(tmp_path / f".out.old-{live.pid}", "old")
        assert recover(tmp_path / "out") is None and old.exists()
        assert clean_stale(tmp_path) == [] and old.exists()
    finally:
        live.kill()
        live.wait()
    assert recover(tmp_path / "out") == tmp_path / "out"


# --- stale temporaries -------------------------------------------------------------------------


def test_clean_stale_removes_what_dead_writers_left(tmp_path: Path) -> None:
    dead, me = _dead_pid(), os.getpid()
    run = tmp_path / "run"
    lap = run / "lap-1"
    lap.mkdir(parents=True)
    (lap / "model.safetensors").write_text("keep")
    stale = [
        lap / f".model.safetensors.tmp-{dead}",  # save_tensors
        run / f".run.json.tmp-{dead}",  # write_text_atomic
        _folder(run / f".recon.tmp-{dead}-abc123", "x"),  # atomic_path
        _folder(run / f".recon.tmp-{dead}-cache-abc123", "x"),  # write_dataset's cache
        _folder(run / f".report.old-{dead}", "x"),  # report exists: the old copy goes
    ]
    for p in stale[:2]:
        p.write_text("partial")
    _folder(run / "report", "new")
    restored = _folder(run / f".samples.old-{dead}", "old samples")  # samples missing: put back
    mine = lap / f".model.safetensors.tmp-{me}"
    mine.write_text("being written")
    old_style = _folder(run / ".recon.tmp-k2j4h5g6", "x")  # no PID: only removed under the lock
    assert sorted(clean_stale(run)) == sorted(stale)
    assert (run / "samples" / "000000.png").read_text() == "old samples" and not restored.exists()
    assert mine.exists() and old_style.exists() and (lap / "model.safetensors").exists()
    assert clean_stale(run) == []
    # under the folder's lock every temporary is stale, whatever its PID
    assert sorted(clean_stale(run, locked=True)) == sorted([mine, old_style])
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == [
        "lap-1",
        "lap-1/model.safetensors",
        "report",
        "report/000000.png",
        "samples",
        "samples/000000.png",
    ]


def test_clean_stale_only_and_not_recursive(tmp_path: Path) -> None:
    dead = _dead_pid()
    a = tmp_path / f".a.tmp-{dead}"
    b = tmp_path / f".b.tmp-{dead}"
    deep = tmp_path / "sub" / f".a.tmp-{dead}"
    deep.parent.mkdir()
    for p in (a, b, deep):
        p.write_text("x")
    assert clean_stale(tmp_path, only="a", recursive=False) == [a]
    assert b.exists() and deep.exists()


def test_atomic_path_cleans_its_own_stale_temporaries(tmp_path: Path) -> None:
    dead = _dead_pid()
    _folder(tmp_path / f".out.tmp-{dead}-zz", "x")
    other = _folder(tmp_path / f".other.tmp-{dead}-zz", "x")
    with atomic_path(tmp_path / "out") as target:
        target.mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", other.name])


# --- full disk ---------------------------------------------------------------------------------


def _enospc(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/somewhere/file")


def test_full_disk_in_write_text_atomic_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "run.json"
    f.write_text("old")
    real = Path.write_text

    def partial(self: Path, text: str) -> int:
        real(self, text[:3])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", partial)
    with pytest.raises(OSError) as err:
        write_text_atomic(f, "new contents")
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert f.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_full_disk_in_write_dataset_is_an_oserror_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", _enospc)
    with pytest.raises(OSError) as err:
        _data(tmp_path / "obs")
    assert err.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_full_disk_inside_the_datasets_generator_is_unwrapped(tmp_path: Path) -> None:
    def chunks():
        yield {"y": torch.zeros(4, 2)}
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "cache"))

    with pytest.raises(OSError) as err:
        write_dataset(tmp_path / "obs", chunks(), {})
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "cache")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_on_the_command_line_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    import datasets

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", _enospc)
    code, _, err = cli("corrupt", "digits", tmp_path / "obs", "--channel", "mask", "--limit", "20")
    assert code == 2  # a refusal the user can fix, like every other
    assert error_line(err) == "error: /somewhere/file: No space left on device"
    assert list(tmp_path.iterdir()) == []


REAL_FULL_DISK = """
set -e
mkdir -p "$1"
mount -t tmpfs -o size=200k tmpfs "$1"
trap 'umount "$1"' EXIT
cd "$2"
set +e
.venv/bin/python -m diffem_cli corrupt digits "$1/obs" --channel mask 2>"$1/../err.txt"
echo "rc=$?"
ls -A "$1"
"""


@pytest.mark.skipif(os.geteuid() != 0 or not sys.platform.startswith("linux"), reason="needs root to mount")
def test_real_full_disk_tmpfs(tmp_path: Path) -> None:
    """Only where the tests run as root: a 200 kB tmpfs that the observations (~1 MB) overflow."""
    mnt = tmp_path / "mnt"
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        ["sh", "-c", textwrap.dedent(REAL_FULL_DISK), "sh", str(mnt), str(repo)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if "mount" in proc.stderr and "rc=" not in proc.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    lines = proc.stdout.strip().splitlines()
    rc = [line for line in lines if line.startswith("rc=")]
    assert rc != ["rc=0"] and lines[-1].startswith("rc="), proc.stdout  # failed, and left nothing at all
    err = (tmp_path / "err.txt").read_text()
    assert error_line(err) == f"error: {mnt}/obs: No space left on device", err


# --- fingerprints and paths ----------------------------------------------------------------------


def _edit_manifest(folder: Path, **changes: object) -> None:
    f = folder / "diffem.json"
    manifest = json.loads(f.read_text())
    manifest.update(changes)
    f.write_text(json.dumps(manifest))


def test_fingerprint_covers_the_manifest_but_not_the_version(tmp_path: Path) -> None:
    spec = {"name": "noise", "api_version": 1, "params": {"sigma": 0.01}}
    obs = _data(tmp_path / "obs", manifest={"kind": "observations", "channel": spec})
    before = fingerprint_dataset(obs)
    assert len(before) == 16 and fingerprint_dataset(obs) == before
    _edit_manifest(obs, diffem_version="99.0")
    assert fingerprint_dataset(obs) == before
    _edit_manifest(obs, channel={**spec, "params": {"sigma": 0.5}})
    assert fingerprint_dataset(obs) != before
    # the rows count too, and the same rows and manifest give the same fingerprint elsewhere
    again = _data(tmp_path / "again", manifest={"kind": "observations", "channel": spec})
    assert fingerprint_dataset(again) == before
    other = _data(tmp_path / "other", torch.ones(6, 2), manifest={"kind": "observations", "channel": spec})
    assert fingerprint_dataset(other) != before


def test_fingerprint_covers_features(tmp_path: Path) -> None:
    obs = _data(tmp_path / "obs")
    before = fingerprint_dataset(obs)
    info_file = obs / "dataset_info.json"
    info = json.loads(info_file.read_text())
    info["features"]["index"]["dtype"] = "uint64"  # same bytes, read as other numbers
    info_file.write_text(json.dumps(info))
    assert fingerprint_dataset(obs) != before
    info["description"] = "edited"  # bookkeeping, not meaning
    info["features"]["index"]["dtype"] = "int64"
    info_file.write_text(json.dumps(info))
    assert fingerprint_dataset(obs) == before


def test_data_files_outside_the_folder_are_refused(tmp_path: Path) -> None:
    obs = _data(tmp_path / "obs")
    state_file = obs / "state.json"
    state = json.loads(state_file.read_text())
    arrow = obs / state["_data_files"][0]["filename"]
    outside = tmp_path / "outside.arrow"
    outside.write_bytes(arrow.read_bytes())
    state["_data_files"][0]["filename"] = "../outside.arrow"
    state_file.write_text(json.dumps(state))
    with pytest.raises(DiffemError) as err:
        read_dataset(obs)
    assert str(err.value) == f"{state_file} names '../outside.arrow', which lies outside {obs}: refused"
    with pytest.raises(DiffemError, match="outside"):
        fingerprint_dataset(obs)
    # a symbolic link leaving the folder is refused the same way
    state["_data_files"][0]["filename"] = "link.arrow"
    state_file.write_text(json.dumps(state))
    (obs / "link.arrow").symlink_to(outside)
    with pytest.raises(DiffemError, match="'link.arrow', which lies outside"):
        read_dataset(obs)
    # while an ordinary folder reads fine
    ds, _ = read_dataset(_data(tmp_path / "fine"))
    assert len(ds) == 6


def test_split_names_outside_the_folder_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "dd"
    folder.mkdir()
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": ["../../etc"]}))
    with pytest.raises(DiffemError, match="outside"):
        read_dataset(folder)


def test_check_finite_names_column_and_row() -> None:
    check_finite({"y": torch.zeros(3, 2), "index": torch.arange(3)}, "obs")
    y = torch.zeros(4, 2, 2)
    y[2, 1, 0] = float("nan")
    y[3, 0, 0] = float("inf")
    with pytest.raises(DiffemError) as err:
        check_finite({"index": torch.arange(4), "y": y}, "observations obs", start=100)
    assert str(err.value) == (
        "observations obs: column 'y' holds 2 non-finite values (NaN or infinity), the first in row 102; "
        "fix or drop those rows"
    )


def test_written_bytes_are_unchanged_by_the_temporaries_scheme(tmp_path: Path) -> None:
    a = file_bytes(_data(tmp_path / "a"))
    b = file_bytes(_data(tmp_path / "b"))
    assert a == b and "diffem.json" in a


def test_a_second_writer_of_the_same_out_is_refused(tmp_path: Path) -> None:
    hold = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from diffem_cli.io.lock import lock_output\n"
        "with lock_output(Path(sys.argv[1]), 'corrupt'):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(60)\n"
    )
    out = tmp_path / "obs"
    proc = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(DiffemError) as err:
            _data(out)
        assert str(err.value).startswith(f"{out} is in use by diffem process {proc.pid} (started ")
        assert not out.exists()
    finally:
        proc.kill()
        proc.wait()
    _data(out)  # the holder was killed: its lock is taken over, and removed after the write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["obs"]


# --- --force replaces only what diffem wrote --------------------------------------------------


def test_force_never_replaces_a_foreign_folder_or_a_plain_file(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("x")
    plain = tmp_path / "plain"
    plain.write_text("mine")
    for out, what in (
        (precious, "holds files diffem did not write (thesis.txt)"),
        (plain, "is a plain file"),
    ):
        for force in (False, True):
            with pytest.raises(DiffemError, match=r"--force replaces only what diffem wrote") as err:
                write_dataset(out, [{"y": torch.zeros(2, 2)}], {}, force=force)
            assert what in str(err.value) and "\n" not in str(err.value)
    assert (precious / "thesis.txt").read_text() == "x" and plain.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "precious"]


def test_force_replaces_what_diffem_wrote(tmp_path: Path) -> None:
    out = _data(tmp_path / "obs")
    pngs = _folder(tmp_path / "pngs", "old")
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (out, pngs, empty):
        assert store.foreign_output(folder) is None
        write_dataset(folder, [{"y": torch.ones(3, 2)}], {"kind": "samples"}, force=True)
        assert len(read_dataset(folder)[0]) == 3
    # a file diffem wrote inside one of its folders makes it foreign
    (out / "notes.md").write_text("mine")
    assert store.foreign_output(out) == "holds files diffem did not write (notes.md)"
    # a RUN is not an output that reconstruct or sample replace
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("em: {}\n")
    assert "is a RUN folder" in (store.foreign_output(run) or "")
    # file outputs (a --preview PNG, an --json file) replace files, never folders
    assert store.foreign_output(tmp_path / "plain.json", "file") is None
    assert store.foreign_output(run, "file") == "is a folder, not a file"


def test_a_compare_out_holds_its_files_and_its_runs_only(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "compare.json").write_text("{}")
    (out / "diffem").mkdir()
    (out / "diffem" / "run.json").write_text("{}")
    (out / "oracle" / "recon").mkdir(parents=True)  # created, then killed before its run.json
    assert store.foreign_output(out, "compare") is None
    (out / "thesis.txt").write_text("x")
    assert store.foreign_output(out, "compare") == "holds files diffem did not write (thesis.txt)"
    assert "RUN folder" in (store.foreign_output(out / "diffem", "compare") or "")


# --- records appended whole ---------------------------------------------------------------------


def test_a_fragment_line_is_dropped_before_the_next_record(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    store.append_record(log, {"lap": 1})
    with open(log, "a") as f:
        f.write('{"lap": 2, "los')  # a write cut short by a kill or a full disk
    store.append_record(log, {"lap": 2})
    assert [json.loads(line) for line in log.read_text().splitlines()] == [{"lap": 1}, {"lap": 2}]
    log.write_text('{"only": "a frag')  # a fragment and nothing before it
    store.append_record(log, {"lap": 0})
    assert log.read_text() == '{"lap": 0}\n'


# --- checksums of data folders --------------------------------------------------------------------


def _flip(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for i in range(n):
        data[len(data) // 2 + i] ^= 0xFF
    path.write_bytes(data)


def test_flipped_bytes_or_an_edited_manifest_fail_the_checksum(tmp_path: Path) -> None:
    out = _data(tmp_path / "obs", torch.arange(2000.0).reshape(1000, 2))
    manifest = read_dataset(out)[1]
    assert manifest["checksum"].startswith("sha256:" + fingerprint_dataset(out))
    assert store.verify_dataset(out, manifest) == fingerprint_dataset(out)
    _edit_manifest(out, channel={"name": "noise", "params": {"sigma": 0.5}})
    with pytest.raises(DiffemError, match="checksum mismatch"):
        store.verify_dataset(out, read_dataset(out)[1])
    out = _data(tmp_path / "obs2", torch.arange(2000.0).reshape(1000, 2))
    _flip(next(out.glob("*.arrow")))
    with pytest.raises(DiffemError, match=r"obs2: checksum mismatch \(its data or diffem.json"):
        store.verify_dataset(out, store.read_manifest(out))


def test_a_folder_without_checksum_passes_only_where_not_required_or_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _data(tmp_path / "obs")
    manifest = store.read_manifest(out)
    del manifest["checksum"]
    monkeypatch.delenv(store.TRUST_ENV, raising=False)
    assert store.verify_dataset(out, manifest) == fingerprint_dataset(out)
    with pytest.raises(DiffemError, match="carries no checksum.*DIFFEM_TRUST_UNVERIFIED=1"):
        store.verify_dataset(out, manifest, required=True)
    monkeypatch.setenv(store.TRUST_ENV, "1")
    assert store.verify_dataset(out, manifest, required=True) == fingerprint_dataset(out)


def test_disk_errors_are_one_line_refusals_and_still_oserrors() -> None:
    e = store.disk_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "/data/out")
    assert isinstance(e, OSError) and isinstance(e, DiffemError) and e.exit_code == 2
    assert str(e) == "/data/out: No space left on device" and e.errno == errno.ENOSPC


def test_binary_columns_are_stored_as_uint8_and_read_back_as_float32(tmp_path: Path) -> None:
    import datasets

    from diffem_cli.core.errors import DiffemError
    from diffem_cli.io.store import columns, read_dataset, write_dataset

    gen = torch.Generator().manual_seed(0)
    mask = (torch.rand(10, 1, 4, 4, generator=gen) < 0.5).float()
    y = torch.randn(10, 1, 4, 4, generator=gen) * mask
    chunks = [{"y": y[:6], "mask": mask[:6]}, {"y": y[6:], "mask": mask[6:]}]
    write_dataset(tmp_path / "d", iter(chunks), {"kind": "test"}, compact=["mask"])
    ds, manifest = read_dataset(tmp_path / "d")
    assert manifest["compact"] == ["mask"]
    assert datasets.load_from_disk(str(tmp_path / "d")).features["mask"].dtype == "uint8"
    back = columns(ds, ["y", "mask"])
    assert back["mask"].dtype == torch.float32 and torch.equal(back["mask"], mask)
    assert torch.equal(back["y"], y)
    half = [{"y": y, "mask": mask * 0.5}]
    with pytest.raises(DiffemError, match="'mask' is declared binary"):
        write_dataset(tmp_path / "e", iter(half), {"kind": "test"}, compact=["mask"])
    assert not (tmp_path / "e").exists()
