"""The wheel, installed without the editable finder, runs the corrupt -> em-train -> reconstruct chain.

The editable install that every other test uses maps ``diffem_cli`` onto the source tree, so a
package missing from the wheel would go unnoticed there. This test builds the wheel from a copy
of the tree, installs it into a new virtual environment that sees the test environment's
third-party packages but not its ``diffem`` distribution, and drives the console script from a
folder outside the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", ".venv", "build", "dist", "bench", "plugins", "demo_out", ".pytest_cache", ".ruff_cache"}


def _site_dirs() -> list[Path]:
    """Every site-packages folder on this interpreter's path (the venv's and, with
    ``--system-site-packages``, the base interpreter's)."""
    found = []
    for entry in sys.path:
        path = Path(entry)
        if path.name in {"site-packages", "dist-packages"} and path.is_dir() and path not in found:
            found.append(path)
    return found


def _foreign(name: str) -> bool:
    """Whether a site-packages entry belongs to diffem itself (its dist-info, the editable finder)."""
    lower = name.lower()
    return lower.startswith(("diffem", "__editable__")) or "editable" in lower


def _shadow(into: Path) -> Path:
    """A folder of links to every third-party package of this environment, diffem's own left out."""
    into.mkdir()
    for site in _site_dirs():
        for entry in site.iterdir():
            if _foreign(entry.name) or entry.suffix == ".pth" or (into / entry.name).exists():
                continue
            (into / entry.name).symlink_to(entry)
    return into


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=lambda _d, names: [n for n in names if n in SKIP or ".egg-info" in n])
    dist = base / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*build, "-q", "-w", str(dist), str(src)], check=True, capture_output=True)
    (wheel,) = dist.glob("diffem-*.whl")
    env = base / "env"
    python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([python, "-m", "venv", "--without-pip", str(env)], check=True)
    env_python = env / "bin" / "python"
    purelib = subprocess.run(
        [str(env_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    shadow = _shadow(base / "third-party")
    Path(purelib, "third_party.pth").write_text(f"{shadow}\n")
    install = [sys.executable, "-m", "pip", "--python", str(env_python), "install", "-q", "--no-deps"]
    subprocess.run([*install, "--no-index", str(wheel)], check=True, capture_output=True)
    return env


def _run(env: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    result = subprocess.run(
        [str(env / "bin" / "diffem"), *args], cwd=cwd, env=environ, capture_output=True, text=True
    )
    assert result.returncode == 0, f"diffem {' '.join(args)}: {result.stderr[-2000:]}"
    return result


def test_wheel_ships_every_package(wheel_env: Path, tmp_path: Path) -> None:
    probe = (
        "import json, importlib, pkgutil, diffem_cli, diffem_channels;"
        "mods = [m.name for m in pkgutil.walk_packages(diffem_cli.__path__, 'diffem_cli.')];"
        "[importlib.import_module(m) for m in mods if not m.endswith('__main__')];"
        "print(json.dumps({'file': diffem_cli.__file__, 'channels': diffem_channels.__file__}))"
    )
    out = subprocess.run(
        [str(wheel_env / "bin" / "python"), "-c", probe], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    files = json.loads(out.stdout)
    installed = sysconfig.get_paths(vars={"base": str(wheel_env), "platbase": str(wheel_env)})["purelib"]
    for path in files.values():  # the wheel's copies, not the source tree's
        assert Path(path).resolve().is_relative_to(Path(installed).resolve()), path
    source_modules = {p.stem for p in (ROOT / "diffem_cli").rglob("*.py")}
    shipped = {p.stem for p in Path(files["file"]).parent.rglob("*.py")}
    assert source_modules <= shipped, sorted(source_modules - shipped)


@pytest.mark.slow
def test_wheel_runs_the_chain_outside_the_repository(wheel_env: Path, tmp_path: Path) -> None:
    tiny = ["--set", "train.epochs=1", "--set", "train.batch_size=64", "--set", "sample.steps=2"]
    tiny += ["--set", "network.width=16", "--set", "em.gaussian_iters=1"]
    _run(wheel_env, tmp_path, "corrupt", "manifold", "obs", "-c", "projection", "--limit", "64")
    _run(wheel_env, tmp_path, "em-train", "obs", "run", "--laps", "1", *tiny)
    _run(wheel_env, tmp_path, "reconstruct", "run/checkpoints/lap_001.safetensors", "obs", "recon")
    assert (tmp_path / "recon" / "diffem.json").is_file()
    listing = _run(wheel_env, tmp_path, "channels").stdout
    assert "projection" in listing and "mask" in listing
