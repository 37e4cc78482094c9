"""Provenance: the chain of commands that made a data folder or a model, recorded in it.

Every data folder's manifest (``diffem.json``) and every checkpoint's metadata holds ``provenance``,
a list of steps, oldest first. A step is ``{"command", "inputs", "channel", "params", "method",
"laps", "run", "diffem_version", "git_commit", "created"}``: what ran, on which files (each input's
``path`` with the ``checksum`` or ``fingerprint`` found for it), through which channel, with which
method and options, at which lap and in which RUN, by which diffem (the commit when its source is a
git checkout) and when (UTC). A command copies the chains of its inputs (:func:`extend`) and
appends its own step, so an exported model lists source -> corrupt -> em-train -> reconstruct ->
train-uncond -> export. Files written before provenance existed read as an empty chain.

Provenance is history, not meaning: a data folder's fingerprint and checksum leave it out (like
``diffem_version``), so the same command twice gives the same fingerprint. ``SOURCE_DATE_EPOCH``
(the reproducible-builds convention) pins ``created``.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import subprocess
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from diffem_cli import __version__

KEY = "provenance"
"""The manifest or checkpoint metadata entry holding the chain."""
MANIFEST = "diffem.json"


@functools.cache
def git_commit() -> str | None:
    """The commit of the diffem source when it runs from a git checkout, else None (never fails)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():  # an installed diffem inside some other repository is not ours
        return None
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) == 40 else None


def now() -> str:
    """The current UTC time in ISO 8601 (seconds), or ``SOURCE_DATE_EPOCH`` when that is set."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    moment = datetime.fromtimestamp(int(epoch), UTC) if epoch.isdigit() else datetime.now(UTC)
    return moment.isoformat(timespec="seconds")


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header, read without loading tensors ({} when
    it cannot be read)."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                return {}
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _manifest(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def input_ref(path: Path | str, **known: Any) -> dict[str, Any]:
    """An input of a step: its absolute ``path`` and what identifies its contents, as found on disk
    (a checkpoint's or data folder's ``checksum``, an export's per-file ``checksums``) or given in
    ``known`` (e.g. ``fingerprint``); entries that are None are left out."""
    p = Path(path)
    ref: dict[str, Any] = {"path": str(p.resolve()) if p.exists() else str(path)}
    if p.is_file():
        ref["checksum"] = _safetensors_metadata(p).get("checksum")
    elif p.is_dir():
        manifest = _manifest(p)
        ref["checksum"] = manifest.get("checksum")
        ref["checksums"] = manifest.get("checksums")
    ref.update(known)
    return {k: v for k, v in ref.items() if v is not None}


def step(
    command: str,
    *,
    inputs: Iterable[dict[str, Any]] = (),
    channel: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    method: str | None = None,
    laps: int | None = None,
    run: Path | str | None = None,
) -> dict[str, Any]:
    """One step of a chain: the command that ran now, with this diffem's version and commit."""
    return {
        "command": command,
        "inputs": list(inputs),
        "channel": dict(channel) if channel else None,
        "params": json.loads(json.dumps(dict(params or {}), default=str)),
        "method": method,
        "laps": laps,
        "run": str(Path(run).resolve()) if run is not None else None,
        "diffem_version": __version__,
        "git_commit": git_commit(),
        "created": now(),
    }


def chain_of(meta: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The chain a manifest or checkpoint metadata records (a JSON string is decoded); empty when
    none is recorded or it is not a list of steps."""
    value = (meta or {}).get(KEY)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    if not isinstance(value, list) or not all(isinstance(s, dict) for s in value):
        return []
    return [dict(s) for s in value]


def read_chain(path: Path | str | None) -> list[dict[str, Any]]:
    """The chain recorded in a checkpoint file, or in the ``diffem.json`` of a data folder or an
    export; empty for anything else (an image folder, a missing path, a built-in source name)."""
    if path is None:
        return []
    p = Path(path)
    if p.is_file():
        return chain_of(_safetensors_metadata(p))
    if p.is_dir():
        return chain_of(_manifest(p))
    return []


def extend(*chains: Iterable[dict[str, Any]], then: dict[str, Any]) -> list[dict[str, Any]]:
    """The chains of a command's inputs, merged (a step two inputs share, copied from the same
    origin, is kept once, at its first place), followed by the command's own step ``then``."""
    merged: list[dict[str, Any]] = []
    seen: set[str] = set()
    for chain in chains:
        for s in chain:
            key = json.dumps(s, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                merged.append(s)
    return [*merged, then]


def last(chain: Iterable[dict[str, Any]], command: str) -> dict[str, Any] | None:
    """The latest step of ``command`` in ``chain``, or None."""
    found = None
    for s in chain:
        if s.get("command") == command:
            found = s
    return found


def channel_text(channel: Mapping[str, Any] | None) -> str:
    """``NAME (k=v, ...)`` for a channel spec, ``none`` without one."""
    if not channel:
        return "none"
    params = channel.get("params") or {}
    inner = ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
    return f"{channel.get('name')} ({inner})" if inner else str(channel.get("name"))


def step_text(s: Mapping[str, Any]) -> str:
    """One line for a step: command, channel, method, lap and RUN (by name), and when."""
    parts = [str(s.get("command"))]
    source = (s.get("params") or {}).get("source")
    if isinstance(source, dict) and source.get("spec"):
        parts.append(f"of {source['spec']} ({source.get('n')} samples)")
    if s.get("channel"):
        parts.append(f"channel {channel_text(s['channel'])}")
    if s.get("method"):
        parts.append(f"method {s['method']}")
    if s.get("laps") is not None:
        parts.append(f"lap {s['laps']}")
    if s.get("run"):
        parts.append(f"RUN {Path(s['run']).name}")
    version = f"diffem {s.get('diffem_version')}"
    if s.get("git_commit"):
        version += f" @ {str(s['git_commit'])[:12]}"
    return f"{', '.join(parts)} ({version}, {s.get('created')})"


KIND_TEXT = {
    "observations": "Corrupted observations",
    "clean": "Clean samples",
    "reconstructions": "Reconstructions (posterior samples of the clean data given the observations)",
    "samples": "Samples of an unconditional diffusion model",
    "images": "Images (PNG, a datasets.Image column) of a diffem data folder",
}


def describe_folder(manifest: Mapping[str, Any]) -> str:
    """The ``DatasetInfo.description`` of a data folder diffem writes: what it holds, through which
    channel, and which command wrote it (from its manifest and provenance)."""
    kind = str(manifest.get("kind") or "data")
    chain = chain_of(manifest)
    writer = f"'diffem {chain[-1].get('command')}'" if chain else "diffem"
    text = f"{KIND_TEXT.get(kind, kind.capitalize())}, written by {writer}"
    shape = manifest.get("data_shape")
    if shape:
        rows = manifest.get("num_rows")
        count = f"{rows} " if rows is not None else ""
        text += f": {count}{manifest.get('data_kind') or 'data'} samples of shape {list(shape)}"
    lines = [text + "."]
    if manifest.get("channel"):
        lines.append(f"Corruption channel: {channel_text(manifest['channel'])}.")
    if manifest.get("method"):
        lap = f", EM lap {manifest['lap']}" if manifest.get("lap") is not None else ""
        lines.append(f"Method: {manifest['method']}{lap}.")
    lines.append("Parameters and provenance: diffem.json.")
    return " ".join(lines)
