"""Checkpoints: safetensors files whose metadata (JSON strings) says how to rebuild the model.

Metadata keys: ``format`` ("diffem-checkpoint"), ``diffem_version``, ``kind`` ("conditional" or
"unconditional"), ``network`` (network config), ``data`` (shape, kind, value range, fingerprint
of the observations), ``channel`` (the channel spec, conditional models), ``schedule``, ``lap``,
``provenance`` (the chain of commands that made it, :mod:`diffem_cli.io.provenance`) and any extra
entries (``metrics``). A checkpoint file alone is enough to sample or reconstruct.
Besides the network's weights it may hold a method's auxiliary tensors (names starting with
``aux.``, e.g. the Gaussian moments of EM-MMPS's covariance heuristic), which are not weights.

Every file written by :func:`save_tensors` also carries ``checksum`` ("sha256:...", over the other
metadata entries and the tensor names, dtypes, shapes and bytes in sorted order), verified by
:func:`load_tensors`: flipped bytes or edited metadata are refused instead of used. A checkpoint
without a checksum (written before it existed, by other tools, or with the key removed) is refused
by :func:`load_checkpoint` unless the user trusts it (``DIFFEM_TRUST_UNVERIFIED=1``).
:func:`load_checkpoint` refuses non-finite weights, and :func:`build_model` checks the network
its metadata describes against the stored tensor shapes (on PyTorch's ``meta`` device, allocating
nothing) before building it for real.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffem_cli import __version__
from diffem_cli.core.errors import DiffemError
from diffem_cli.io.datameta import DataMeta
from diffem_cli.io.provenance import chain_of
from diffem_cli.io.store import DISK_ERRNOS, EXPORT_FORMAT, TRUST_ENV, disk_error, trust_unverified

FORMAT = EXPORT_FORMAT
AUX_PREFIX = "aux."
CHECKSUM_KEY = "checksum"


@dataclass(frozen=True)
class CheckpointMeta:
    """The typed view of a checkpoint's metadata: what rebuilds its network and says what it models.

    Read with :meth:`from_dict`, which tolerates the entries older checkpoints lack (``cond_size``
    0, no channel, lap, method, an empty provenance chain); the metadata dict itself stays what is
    written and read on disk.
    """

    kind: str
    network: dict[str, Any]
    data: DataMeta
    cond_size: int = 0
    channel: dict[str, Any] | None = None
    lap: int | None = None
    method: str | None = None
    method_config: dict[str, Any] | None = None
    provenance: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, meta: dict[str, Any]) -> CheckpointMeta:
        """Decode and check a checkpoint's metadata (a bad entry is a one-line DiffemError)."""
        network = meta.get("network")
        if not isinstance(network, dict):
            raise DiffemError(f"invalid network config in checkpoint metadata: {network!r}")
        try:
            data = DataMeta.from_dict(meta["data"])
            cond_size = int(meta.get("cond_size", 0))
        except (DiffemError, KeyError, TypeError, ValueError, AttributeError):
            raise DiffemError("invalid data shape or cond_size in checkpoint metadata") from None
        if not data.shape or min(data.shape) < 1 or cond_size < 0:
            raise DiffemError(
                f"invalid data shape {data.shape} or cond_size {cond_size} in checkpoint metadata"
            )
        lap = meta.get("lap")
        return cls(
            kind=str(meta.get("kind")),
            network=network,
            data=data,
            cond_size=cond_size,
            channel=meta.get("channel"),
            lap=int(lap) if isinstance(lap, int) else None,
            method=meta.get("method"),
            method_config=meta.get("method_config"),
            provenance=chain_of(meta),
        )


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

    @property
    def info(self) -> CheckpointMeta:
        """The metadata, decoded and checked (see :class:`CheckpointMeta`)."""
        return CheckpointMeta.from_dict(self.meta)

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The network's weights (every tensor but the auxiliary ones)."""
        return {k: v for k, v in self.tensors.items() if not k.startswith(AUX_PREFIX)}

    @property
    def aux(self) -> dict[str, torch.Tensor]:
        """The method's auxiliary tensors, named without their ``aux.`` prefix."""
        n = len(AUX_PREFIX)
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(AUX_PREFIX)}


def tensors_checksum(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> str:
    """``sha256:<hex>`` over the (string) metadata ``meta`` and every tensor's name, dtype, shape and
    bytes, in sorted name order."""
    h = hashlib.sha256()
    h.update(json.dumps(meta or {}, sort_keys=True).encode() + b"\0")
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode() + b"\0")
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return f"sha256:{h.hexdigest()}"


def umask_mode() -> int:
    """The mode a new plain file gets under the process umask (``0o644`` under umask 022)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def apply_umask(path: Path) -> None:
    """Give ``path`` (a file, or every file under a folder) the umask's mode: safetensors and
    ``tempfile`` create files 0600 whatever the umask, and checkpoints are meant to be shared."""
    path = Path(path)
    mode = umask_mode()
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        os.chmod(f, mode)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write tensors and JSON metadata (plus their checksum) atomically: temporary file, rename.

    A failed write (a full disk) leaves no temporary file and raises a one-line ``DiskError`` (an
    ``OSError``) naming the path.
    """
    from safetensors.torch import save_file

    path = Path(path)
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    encoded = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in meta.items()}
    encoded.pop(CHECKSUM_KEY, None)
    encoded[CHECKSUM_KEY] = tensors_checksum(cpu, encoded)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        try:
            save_file(cpu, str(tmp), metadata=encoded)
        except Exception as e:  # safetensors reports I/O errors as its own type: make them OSErrors
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            n = int(code.group(1))
            raise OSError(n, os.strerror(n), str(path)) from None
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in DISK_ERRNOS:
            raise disk_error(e, path) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def load_tensors(
    path: Path, *, require_checksum: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors file; a missing, truncated or foreign file is a one-line DiffemError.

    A file whose ``checksum`` disagrees with its contents is refused; one without a checksum is
    refused too when ``require_checksum``, unless the user trusts it (``DIFFEM_TRUST_UNVERIFIED=1``).
    """
    tensors, meta, verified = _read_verified(Path(path))
    if require_checksum and not verified:
        refuse_unverified(path)
    return tensors, meta


def verify_file(path: Path) -> bool:
    """Read a safetensors file whole and check its checksum: True when it verified, False when it
    carries none; a missing, truncated or modified file is a one-line DiffemError."""
    return _read_verified(Path(path))[2]


def refuse_unverified(path: Path) -> None:
    """Refuse a file that carries no checksum, unless the user trusts such files."""
    if not trust_unverified():
        raise DiffemError(
            f"{path} carries no checksum, so its contents cannot be verified; "
            f"set {TRUST_ENV}=1 to use it anyway"
        )


def _read_verified(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], bool]:
    """The tensors and decoded metadata of a safetensors file, and whether a checksum verified them."""
    from safetensors import safe_open

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
    expected = raw.get(CHECKSUM_KEY)
    rest = {k: v for k, v in raw.items() if k != CHECKSUM_KEY}
    if expected is not None and tensors_checksum(tensors, rest) != expected:
        raise DiffemError(f"{path}: checksum mismatch (the file was modified or corrupted)")
    meta: dict[str, Any] = {}
    for k, v in rest.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return tensors, meta, expected is not None


def save_checkpoint(
    path: Path, model: nn.Module, meta: dict[str, Any], aux: dict[str, torch.Tensor] | None = None
) -> None:
    """Save a model's weights with diffem metadata (and a method's auxiliary tensors ``aux``)."""
    full = {"format": FORMAT, "diffem_version": __version__, **meta}
    tensors = dict(model.state_dict())
    tensors.update({AUX_PREFIX + k: v.detach().cpu().contiguous() for k, v in (aux or {}).items()})
    save_tensors(path, tensors, full)


def load_checkpoint(path: Path) -> Checkpoint:
    """Load a diffem checkpoint, refusing files that are not diffem checkpoints or that carry no
    checksum (unless trusted: ``DIFFEM_TRUST_UNVERIFIED=1``)."""
    tensors, meta, verified = _read_verified(Path(path))
    if meta.get("format") != FORMAT:
        raise DiffemError(f"{path} is a safetensors file but not a diffem checkpoint (no diffem metadata)")
    for key in ("kind", "network", "data"):
        if key not in meta:
            raise DiffemError(f"{path} lacks checkpoint metadata {key!r}")
    if not verified:
        refuse_unverified(path)
    check_finite_weights(tensors, path)
    return Checkpoint(tensors, meta)


def check_finite_weights(tensors: dict[str, torch.Tensor], source: object) -> None:
    """Refuse NaN or infinite values in floating-point ``tensors`` (``source`` names the file)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            count = int((~torch.isfinite(t)).sum())
            raise DiffemError(
                f"{source}: weight {name!r} holds {count} non-finite value(s) (NaN or infinity)"
            )


def check_shapes(ckpt: Checkpoint) -> None:
    """Refuse a checkpoint whose metadata describes another network than its tensors hold.

    The network is built on PyTorch's ``meta`` device (no memory is allocated, whatever width
    the metadata claims) and its parameter names and shapes are compared with the tensors'.
    """
    from diffem_cli.diffusion.nets import build_network

    info = ckpt.info
    if info.network.get("type") == "unet":
        import diffusers  # noqa: F401  (imported outside the meta-device context)
        from diffusers import UNet2DModel  # noqa: F401
    try:
        with torch.device("meta"):
            skeleton = build_network(info.network, info.data.shape, info.cond_size)
    except DiffemError:
        raise
    except Exception as e:  # a config the network constructors reject
        first = f"{type(e).__name__}: {e}".strip().splitlines()[0]
        raise DiffemError(f"invalid network config in checkpoint metadata ({first})") from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in ckpt.weights.items()}
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing:
        raise DiffemError(
            f"checkpoint weights do not match its network config (missing weight {missing[0]!r})"
        )
    if extra:
        raise DiffemError(
            f"checkpoint weights do not match its network config (unexpected weight {extra[0]!r})"
        )
    for name in sorted(expected):
        if expected[name] != stored[name]:
            raise DiffemError(
                f"checkpoint weights do not match its network config ({name!r} has shape {stored[name]} in "
                f"the file, the config builds {expected[name]})"
            )


def build_model(ckpt: Checkpoint) -> nn.Module:
    """Rebuild the network of a checkpoint and load its weights (eval mode).

    The shapes are checked first (:func:`check_shapes`), so a lying config fails in one line
    without allocating the network it describes.
    """
    from diffem_cli.diffusion.nets import build_network

    check_shapes(ckpt)
    info = ckpt.info
    model = build_network(info.network, info.data.shape, info.cond_size)
    try:
        model.load_state_dict(ckpt.weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise DiffemError(f"checkpoint weights do not match its network config ({first})") from None
    return model.eval()
