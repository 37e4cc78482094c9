"""Plugin discovery shared by the channel and method registries: the entry points of a group
declared by installed distributions.

Only deliberately installed code counts: the current directory when Python put it on the path
implicitly (``python -m``, a script run from it) is skipped, so a folder of someone else's
files cannot plant a channel or a method; each distribution counts once, the first on
``sys.path`` winning as for imports.
"""

from __future__ import annotations

import os
import re
import site
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import Distribution, EntryPoint, distributions
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class PluginInfo(Generic[T]):
    """One entry point of a plugin group: the plugin ``name``, the distribution declaring it, the
    ``module:Class`` value, and once loaded either ``cls`` or a one-line ``error``."""

    name: str
    dist: str
    value: str
    cls: type[T] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Loaded without error."""
        return self.cls is not None and self.error is None

    def summary(self) -> dict[str, Any]:
        """The JSON fields every plugin listing starts with (``--json``)."""
        return {
            "name": self.name,
            "dist": self.dist,
            "entry_point": self.value,
            "ok": self.ok,
            "error": self.error,
        }


def normalise_dist(dist: str) -> str:
    """A distribution name compared as packaging does (``Foo_Bar`` == ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", dist).lower()


def _resolved(entry: str) -> Path | None:
    try:
        return Path(entry or os.curdir).resolve()
    except (OSError, RuntimeError):
        return None


def untrusted_dirs() -> set[Path]:
    """Folders on ``sys.path`` whose distributions discovery ignores: the current directory when
    it is there only as the entry Python adds implicitly (``''`` or ``sys.path[0]``)."""
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the current directory was removed
        return set()
    implicit = [e for i, e in enumerate(sys.path) if e == "" or (i == 0 and _resolved(e) == cwd)]
    if not implicit:
        return set()
    installed = {*site.getsitepackages(), site.getusersitepackages()}
    installed.update(sysconfig.get_paths().get(k, "") for k in ("purelib", "platlib"))
    deliberate = {_resolved(e) for e in sys.path[1:] if e} | {_resolved(e) for e in installed if e}
    return set() if cwd in deliberate else {cwd}


def _location(dist: Distribution) -> Path | None:
    """The ``sys.path`` folder holding ``dist``'s metadata (resolved against the current directory)."""
    try:
        return Path(str(dist.locate_file(""))).resolve()
    except (OSError, RuntimeError, NotImplementedError, TypeError):
        return None


def declared(group: str) -> Iterator[tuple[str, EntryPoint]]:
    """(distribution name, entry point) for every entry point of ``group`` an installed
    distribution declares.

    A distribution found twice on ``sys.path`` (an editable install plus a stale copy) counts
    once, the first found winning as for imports; one whose metadata cannot be read is skipped
    rather than breaking every command.
    """
    seen: set[str] = set()
    skip = untrusted_dirs()
    for dist in distributions():
        if skip and _location(dist) in skip:
            continue
        try:
            name = dist.metadata["Name"] or "unknown"
            eps = dist.entry_points.select(group=group)
        except Exception:  # malformed metadata of some unrelated package
            continue
        if normalise_dist(name) in seen:
            continue
        seen.add(normalise_dist(name))
        for ep in eps:
            yield name, ep
