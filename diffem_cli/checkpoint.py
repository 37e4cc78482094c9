"""Checkpoints: safetensors files whose metadata (JSON strings) says how to rebuild the model.

Metadata keys: ``format`` ("diffem-checkpoint"), ``diffem_version``, ``kind`` ("conditional" or
"unconditional"), ``network`` (network config), ``data`` (shape, kind, value range, fingerprint
of the observations), ``channel`` (the channel spec, conditional models), ``schedule``, ``lap``,
and any extra entries (``metrics``). A checkpoint file alone is enough to sample or reconstruct.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffem_cli import __version__
from diffem_cli.errors import DiffemError

FORMAT = "diffem-checkpoint"


@dataclass
class Checkpoint:
    """A loaded checkpoint: its tensors and decoded metadata."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.meta["data"]["shape"])


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write tensors and JSON metadata atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    encoded = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in meta.items()}
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=encoded)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors file; a missing, truncated or foreign file is a one-line DiffemError."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise DiffemError(f"{path} does not exist")
    if path.is_dir():
        raise DiffemError(f"{path} is a folder, not a checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for broken headers and data
        raise DiffemError(f"{path} is not a readable safetensors file (truncated or corrupt: {e})") from None
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return tensors, meta


def save_checkpoint(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Save a model's weights with diffem metadata."""
    full = {"format": FORMAT, "diffem_version": __version__, **meta}
    save_tensors(path, model.state_dict(), full)


def load_checkpoint(path: Path) -> Checkpoint:
    """Load a diffem checkpoint, refusing files that are not diffem checkpoints."""
    tensors, meta = load_tensors(path)
    if meta.get("format") != FORMAT:
        raise DiffemError(f"{path} is a safetensors file but not a diffem checkpoint (no diffem metadata)")
    for key in ("kind", "network", "data"):
        if key not in meta:
            raise DiffemError(f"{path} lacks checkpoint metadata {key!r}")
    return Checkpoint(tensors, meta)


def build_model(ckpt: Checkpoint) -> nn.Module:
    """Rebuild the network of a checkpoint and load its weights (eval mode)."""
    from diffem_cli.nets import build_network

    cond_size = int(ckpt.meta.get("cond_size", 0))
    model = build_network(ckpt.meta["network"], ckpt.shape, cond_size)
    try:
        model.load_state_dict(ckpt.tensors)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise DiffemError(f"checkpoint weights do not match its network config ({first})") from None
    return model.eval()
