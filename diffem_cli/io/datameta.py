"""What diffem records about a data set: its sample shape, kind and value range, in one type.

The kind of data follows from the shape alone (:func:`data_kind`): ``(n,)`` rows are vectors,
anything else images ``(C, H, W)``. :class:`DataMeta` is read from and written to the two JSON
forms in use, byte for byte as before: a checkpoint's ``data`` entry (``shape``, ``kind``,
``value_range``, ``fingerprint``, ``source``) and a data folder's manifest entries
(``data_shape``, ``data_kind``, ``value_range``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from diffem_cli.core.errors import DiffemError

VECTOR = "vector"
IMAGE = "image"


def data_kind(shape: Sequence[int]) -> str:
    """``"vector"`` for a sample shape ``(n,)``, ``"image"`` otherwise (``(C, H, W)``)."""
    return VECTOR if len(shape) == 1 else IMAGE


@dataclass(frozen=True)
class DataMeta:
    """A data set's sample ``shape``, ``kind`` (see :func:`data_kind`) and ``value_range`` (as
    recorded, possibly None), with the observations' ``fingerprint`` and ``source`` a checkpoint
    records of the data it was trained on."""

    shape: tuple[int, ...]
    kind: str
    value_range: tuple[Any, ...] | None = None
    fingerprint: str | None = None
    source: Any = None

    @classmethod
    def from_shape(
        cls,
        shape: Sequence[int],
        value_range: Sequence[Any] | None = None,
        *,
        fingerprint: str | None = None,
        source: Any = None,
    ) -> DataMeta:
        """The metadata of samples of ``shape``, their kind derived from it."""
        dims = tuple(int(s) for s in shape)
        return cls(dims, data_kind(dims), _range(value_range), fingerprint, source)

    @classmethod
    def from_dict(cls, data: Any) -> DataMeta:
        """Read a checkpoint's ``data`` entry; a missing kind is derived from the shape (a bad
        entry is a one-line DiffemError)."""
        try:
            shape = tuple(int(s) for s in data["shape"])
        except (KeyError, TypeError, ValueError):
            raise DiffemError(f"invalid data metadata {data!r} (no sample shape)") from None
        kind = data.get("kind") or data_kind(shape)
        return cls(shape, kind, _range(data.get("value_range")), data.get("fingerprint"), data.get("source"))

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], **extra: Any) -> DataMeta:
        """Read a data folder's manifest entries (``data_shape``, ``data_kind``, ``value_range``);
        ``extra`` sets the fingerprint and source."""
        shape = tuple(int(s) for s in manifest["data_shape"])
        kind = manifest.get("data_kind", data_kind(shape))
        return cls(shape, kind, _range(manifest.get("value_range")), **extra)

    def to_dict(self) -> dict[str, Any]:
        """A checkpoint's ``data`` entry (JSON-able)."""
        return {
            "shape": list(self.shape),
            "kind": self.kind,
            "value_range": self.range_list(),
            "fingerprint": self.fingerprint,
            "source": self.source,
        }

    def manifest_entries(self) -> dict[str, Any]:
        """A data folder's manifest entries describing its samples (JSON-able)."""
        return {"data_shape": list(self.shape), "data_kind": self.kind, "value_range": self.range_list()}

    def range_list(self) -> list[Any] | None:
        """The value range as JSON writes it (a list), or None when none is recorded."""
        return None if self.value_range is None else list(self.value_range)


def _range(value_range: Sequence[Any] | None) -> tuple[Any, ...] | None:
    # kept as recorded (ints stay ints) so the JSON written back is byte for byte the one read
    return None if value_range is None else tuple(value_range)
