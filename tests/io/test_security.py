"""Loading never runs code: no pickle, unsafe YAML, eval/exec or shells in the source; channel
discovery ignores distributions lying in the current directory; export folders load locally."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
import torch
from helpers import fake_dist

from diffem_cli.core.errors import DiffemError

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("diffem_cli", "channels", "plugins", "bench")

SERIALISERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}
YAML_UNSAFE = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}


def _call_text(tokens: list[tokenize.TokenInfo], i: int) -> str:
    """The source of the argument list opening at ``tokens[i]`` (an ``(``)."""
    depth, parts = 0, []
    for tok in tokens[i:]:
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        parts.append(tok.string)
        if depth == 0:
            break
    return "".join(parts)


def unsafe_constructs(source: str) -> list[tuple[int, str]]:
    """(line, what) for every construct that can run code from data, found in Python ``source``.

    Comments and strings are skipped (tokens, not text), so documentation may name them.
    """
    tokens = [
        t
        for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
    ]
    found = []

    def at(j: int, string: str) -> bool:
        return 0 <= j < len(tokens) and tokens[j].string == string

    for i, tok in enumerate(tokens):
        if tok.type != tokenize.NAME:
            continue
        line, name = tok.start[0], tok.string
        after_dot = at(i - 1, ".")
        if name in SERIALISERS:
            found.append((line, f"{name} (a serialiser that runs code)"))
        elif name in ("eval", "exec", "compile", "__import__") and not after_dot and at(i + 1, "("):
            found.append((line, f"{name}("))
        elif (
            name == "yaml" and at(i + 1, ".") and i + 2 < len(tokens) and tokens[i + 2].string in YAML_UNSAFE
        ):
            call = _call_text(tokens, i + 3) if at(i + 3, "(") else ""
            if "SafeLoader" not in call and "CSafeLoader" not in call:
                found.append((line, f"yaml.{tokens[i + 2].string}( without SafeLoader"))
        elif name == "shell" and at(i + 1, "=") and at(i + 2, "True"):
            found.append((line, "shell=True"))
        elif name == "allow_pickle" and at(i + 1, "=") and at(i + 2, "True"):
            found.append((line, "allow_pickle=True"))
        elif (
            name == "os"
            and at(i + 1, ".")
            and i + 2 < len(tokens)
            and tokens[i + 2].string in ("system", "popen")
        ):
            found.append((line, f"os.{tokens[i + 2].string}("))
        elif name == "load" and after_dot and at(i - 2, "torch") and at(i + 1, "("):
            call = _call_text(tokens, i + 1).replace(" ", "")
            if "weights_only=True" not in call:
                found.append((line, "torch.load( without weights_only=True"))
    return found


def test_the_scanner_finds_what_it_looks_for() -> None:
    bad = "\n".join(
        [
            "import pickle",
            "x = eval('1')",
            "exec(code)",
            "yaml.load(f)",
            "yaml.load(f, Loader=yaml.SafeLoader)",
            "subprocess.run(cmd, shell=True)",
            "torch.load(path)",
            "torch.load(path, weights_only=True)",
            "torch.load(\n    path,\n    map_location='cpu',\n)",
            "np.load(f, allow_pickle=True)",
            "os.system('ls')",
            "model.eval()",
            "# pickle in a comment, eval( too",
            "'''shell=True in a docstring'''",
        ]
    )
    assert [line for line, _ in unsafe_constructs(bad)] == [1, 2, 3, 4, 6, 7, 9, 13, 14]


def test_no_code_running_constructs_in_the_source() -> None:
    problems = []
    files = [f for top in SCANNED for f in sorted((REPO / top).rglob("*.py"))]
    assert len(files) > 20, "the source tree was not found"
    for f in files:
        for line, what in unsafe_constructs(f.read_text()):
            problems.append(f"{f.relative_to(REPO)}:{line}: {what}")
    assert problems == []


# --- channel discovery and the current directory --------------------------------------------------

EVIL = """
from pathlib import Path
Path(__file__).with_name("IMPORTED").write_text("code from the current directory ran")
from diffem_channels import Channel


class Evil(Channel):
    name = "evil"
    description = "Runs code at import."
"""


def _diffem(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-m", "diffem_cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**clean, "OMP_NUM_THREADS": "1", **env},
        timeout=300,
    )


def test_distributions_in_the_current_directory_are_ignored(tmp_path: Path) -> None:
    fake_dist(tmp_path, "evil-channels", {"evil": "evil_mod:Evil"}, {"evil_mod": EVIL})
    listed = _diffem(tmp_path, "channels", "--json")
    assert listed.returncode == 0, listed.stderr
    names = {c["name"] for c in json.loads(listed.stdout)}
    assert "evil" not in names and {"mask", "noise"} <= names  # the built-ins still come
    named = _diffem(tmp_path, "channels", "evil")
    assert named.returncode == 2 and "unknown channel 'evil'" in named.stderr
    assert not (tmp_path / "IMPORTED").exists()
    # put on the path on purpose, the same folder is honoured (the fake distribution works)
    chosen = _diffem(tmp_path, "channels", "--json", PYTHONPATH=str(tmp_path))
    assert "evil" in {c["name"] for c in json.loads(chosen.stdout)}
    assert (tmp_path / "IMPORTED").exists()


def test_untrusted_dirs_follows_sys_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffem_cli.core import plugins as registry

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path[1:]])  # what `python -m` does
    assert registry.untrusted_dirs() == {tmp_path.resolve()}
    monkeypatch.setattr(sys, "path", ["", *sys.path[1:]])  # what `python -c` does
    assert registry.untrusted_dirs() == {tmp_path.resolve()}
    monkeypatch.setattr(sys, "path", ["", *sys.path[1:], str(tmp_path)])  # also on PYTHONPATH
    assert registry.untrusted_dirs() == set()
    monkeypatch.setattr(sys, "path", ["/nonexistent/bin", *sys.path[1:]])  # a console script
    assert registry.untrusted_dirs() == set()


def test_same_channel_names_the_first_difference() -> None:
    from diffem_cli.io.registry import same_channel

    a = {"name": "noise", "api_version": 1, "params": {"sigma": 0.01, "shape": (2, 2)}}
    assert same_channel(a, {"name": "noise", "params": {"sigma": 0.01, "shape": [2, 2]}}) is None
    assert same_channel(a, {**a, "name": "mask"}) == 'the channel is "noise" in one but "mask" in other'
    assert same_channel(a, {**a, "api_version": 2}, ("the RUN", "the data")) == (
        "the channel interface version is 1 in the RUN but 2 in the data"
    )
    b = {**a, "params": {"sigma": 0.5, "shape": [2, 2]}}
    assert (
        same_channel(a, b, ("the RUN", "the data"))
        == "parameter 'sigma' is 0.01 in the RUN but 0.5 in the data"
    )
    c = {**a, "params": {"sigma": 0.01, "shape": [2, 2], "rho": 0.5}}
    assert same_channel(a, c) == "parameter 'rho' is set to 0.5 in other but absent in one"


# --- export folders load locally --------------------------------------------------------------------


def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("diffem tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_export_folder_without_weights_is_one_line_and_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffem_cli.diffusion.checkpoint import FORMAT
    from diffem_cli.diffusion.nets import default_unet_config
    from diffem_cli.pipeline.export import load_model_source

    _no_network(monkeypatch)
    folder = tmp_path / "google" / "ddpm-cifar10-32"  # looks like a Hub repo id
    folder.mkdir(parents=True)
    meta = {
        "format": FORMAT,
        "kind": "conditional",
        "network": default_unet_config((1, 8, 8), channels=(16, 32)),
        "data": {"shape": [1, 8, 8]},
    }
    (folder / "diffem.json").write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DiffemError, match="carries no checksum"):
        load_model_source(Path("google/ddpm-cifar10-32"))
    monkeypatch.setenv("DIFFEM_TRUST_UNVERIFIED", "1")  # past the checksum, to the missing weights
    with pytest.raises(DiffemError) as err:
        load_model_source(Path("google/ddpm-cifar10-32"))
    assert str(err.value) == "google/ddpm-cifar10-32/unet cannot be loaded (the folder is missing)"
    # pickled weights are never read, only safetensors
    (folder / "unet").mkdir()
    torch.save({}, folder / "unet" / "diffusion_pytorch_model.bin")
    (folder / "unet" / "config.json").write_text("{}")
    with pytest.raises(DiffemError, match=r"lacks diffusion_pytorch_model\.safetensors"):
        load_model_source(folder)
