"""Channel discovery: every channel, built-in or third-party, is an entry point in ``diffem.channels``.

Listing names reads package metadata only; a channel's module is imported when that channel is
loaded. A broken plugin (import failure, wrong class, newer interface, name clash) is reported
with its error and never stops the other channels from working.

Distributions found in the current directory only because Python put it first on ``sys.path``
(``python -m diffem_cli``, ``accelerate launch -m diffem_cli``, ``python -c``) are ignored: a
``*.dist-info`` lying in the folder one runs diffem from must not register code that diffem then
imports. The current directory counts when it is installed (site-packages) or put on the path
on purpose (``PYTHONPATH``, a ``.pth`` file).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import replace
from importlib.metadata import EntryPoint
from typing import Any

from diffem_channels.base import API_VERSION, Channel, Param
from diffem_cli.core.errors import DiffemError
from diffem_cli.core.plugins import PluginInfo, declared, normalise_dist

GROUP = "diffem.channels"
DATA_KINDS = frozenset({"image", "vector"})


ChannelInfo = PluginInfo[Channel]
"""An entry point of ``GROUP``, loaded or not (:class:`~diffem_cli.core.plugins.PluginInfo`)."""


def discover() -> dict[str, list[ChannelInfo]]:
    """Channel name -> the (unloaded) entry points claiming it, one per distinct distribution.

    Reads package metadata only; no channel module is imported.
    """
    found: dict[str, list[ChannelInfo]] = {}
    seen: set[tuple[str, str, str]] = set()
    for dist, ep in declared(GROUP):
        key = (ep.name, normalise_dist(dist), ep.value)
        if key not in seen:
            seen.add(key)
            found.setdefault(ep.name, []).append(PluginInfo(ep.name, dist, ep.value))
    return dict(sorted(found.items()))


def _problem(name: str, obj: Any) -> str | None:
    """Why the loaded object ``obj`` cannot serve as channel ``name``, or ``None``."""
    if not (isinstance(obj, type) and issubclass(obj, Channel)):
        return f"{obj!r} is not a subclass of diffem_channels.Channel"
    if not obj.name or not isinstance(obj.name, str):
        return f"{obj.__name__} does not set the class attribute 'name'"
    if obj.name != name:
        return f"entry point {name!r} points at {obj.__name__} whose name is {obj.name!r}"
    if not obj.description or not isinstance(obj.description, str):
        return f"{obj.__name__} does not set the class attribute 'description'"
    version = obj.api_version
    if not isinstance(version, int) or version < 1:
        return f"{obj.__name__}.api_version must be a positive integer, got {version!r}"
    if version > API_VERSION:
        return (
            f"written for channel interface version {version}, but this diffem supports up to "
            f"{API_VERSION}; upgrade diffem"
        )
    if not all(isinstance(p, Param) for p in obj.params):
        return f"{obj.__name__}.params must be a tuple of diffem_channels.Param"
    if not obj.data_kinds or not set(obj.data_kinds) <= DATA_KINDS:
        return f"{obj.__name__}.data_kinds must be a non-empty subset of {sorted(DATA_KINDS)}"
    return None


def load_info(info: ChannelInfo) -> ChannelInfo:
    """Import the entry point of ``info``; return a copy with ``cls`` set, or with ``error`` set."""
    try:
        obj = EntryPoint(info.name, info.value, GROUP).load()
    except Exception as e:  # a plugin may fail in any way; report it instead of crashing
        what = f"{type(e).__name__}: {e}".strip().splitlines()[0]
        return replace(info, error=f"cannot import {info.value}: {what}")
    try:
        problem = _problem(info.name, obj)
    except Exception as e:  # e.g. ``params`` that is not iterable
        problem = f"invalid channel class {info.value}: {type(e).__name__}: {e}"
    if problem:
        return replace(info, error=problem)
    return replace(info, cls=obj)


def _clash(name: str, infos: list[ChannelInfo]) -> str:
    owners = ", ".join(f"{i.dist} ({i.value})" for i in sorted(infos, key=lambda i: i.dist))
    return f"channel {name!r} is declared by several distributions: {owners}; uninstall all but one"


def _resolve(name: str, infos: list[ChannelInfo], load: bool) -> list[ChannelInfo]:
    out = []
    for info in sorted(infos, key=lambda i: i.dist):
        item = load_info(info) if load else info
        if len(infos) > 1:
            item = replace(item, error=_clash(name, infos))
        out.append(item)
    return out


def list_channels(load: bool = True) -> list[ChannelInfo]:
    """Every declared channel sorted by name (then distribution), broken ones included.

    With ``load`` each is imported and checked; otherwise only metadata is read.
    A name claimed by several distributions is listed once per distribution, each with an error.
    """
    return [item for name, infos in discover().items() for item in _resolve(name, infos, load)]


def channel_entries(name: str) -> list[ChannelInfo]:
    """The loaded entries declaring channel ``name`` (several on a clash); ``DiffemError`` if none."""
    found = discover()
    if name not in found:
        raise unknown_channel(name, list(found))
    return _resolve(name, found[name], load=True)


def unknown_channel(name: str, names: list[str]) -> DiffemError:
    """The error for an unknown channel name, suggesting the closest known names."""
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    available = ", ".join(names) or "none installed"
    return DiffemError(f"unknown channel {name!r}{hint} (available: {available})")


def get_channel_info(name: str) -> ChannelInfo:
    """The loaded entry of channel ``name``; raises ``DiffemError`` if unknown, ambiguous or broken."""
    found = discover()
    infos = found.get(name)
    if not infos:
        raise unknown_channel(name, list(found))
    if len(infos) > 1:
        raise DiffemError(_clash(name, infos))
    info = load_info(infos[0])
    if info.error:
        raise DiffemError(f"channel {name!r} from {info.dist} is broken: {info.error}")
    return info


def get_channel_class(name: str) -> type[Channel]:
    """The ``Channel`` subclass registered as ``name`` (imports only that channel's module)."""
    cls = get_channel_info(name).cls
    assert cls is not None
    return cls


def make_channel(name: str, params: Mapping[str, Any] | None = None) -> Channel:
    """Build channel ``name`` with ``params`` (strings from the command line are converted).

    Raises ``DiffemError`` for an unknown or broken channel and ``ChannelError`` for bad parameters.
    """
    return get_channel_class(name)(**dict(params or {}))


def channel_from_spec(spec: Mapping[str, Any]) -> Channel:
    """Rebuild a channel from ``Channel.spec()`` output (e.g. read back from a checkpoint)."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise DiffemError(f"invalid channel spec {spec!r}: expected a mapping with a 'name'")
    version = spec.get("api_version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise DiffemError(f"invalid channel spec: api_version must be an integer, got {version!r}")
    if version > API_VERSION:
        raise DiffemError(
            f"channel spec {spec['name']!r} was written for channel interface version {version}, but this "
            f"diffem supports up to {API_VERSION}; upgrade diffem"
        )
    params = spec.get("params", {})
    if not isinstance(params, Mapping):
        raise DiffemError(f"invalid channel spec: params must be a mapping, got {params!r}")
    return make_channel(spec["name"], params)


def _plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples as lists), for comparing specs."""
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError):
        return value


def same_channel(
    spec_a: Mapping[str, Any], spec_b: Mapping[str, Any], labels: tuple[str, str] = ("one", "other")
) -> str | None:
    """``None`` when two channel specs (``Channel.spec()``) describe the same channel, else the
    first difference as a phrase: name, interface version, then each parameter in sorted order.

    ``labels`` name the two sides in the phrase, e.g. ``("the RUN", "the observations")`` gives
    ``"parameter 'sigma' is 0.01 in the RUN but 0.5 in the observations"``. A missing
    ``api_version`` counts as 1; a parameter given on one side only is a difference.
    """
    a, b = _plain(dict(spec_a or {})), _plain(dict(spec_b or {}))
    la, lb = labels

    def differ(what: str, va: Any, vb: Any) -> str:
        return f"{what} is {json.dumps(va)} in {la} but {json.dumps(vb)} in {lb}"

    if a.get("name") != b.get("name"):
        return differ("the channel", a.get("name"), b.get("name"))
    if a.get("api_version", 1) != b.get("api_version", 1):
        return differ("the channel interface version", a.get("api_version", 1), b.get("api_version", 1))
    pa, pb = a.get("params") or {}, b.get("params") or {}
    if not isinstance(pa, dict) or not isinstance(pb, dict):
        return None if pa == pb else differ("the parameter set", pa, pb)
    for key in sorted(set(pa) | set(pb)):
        if key not in pa:
            return f"parameter {key!r} is set to {json.dumps(pb[key])} in {lb} but absent in {la}"
        if key not in pb:
            return f"parameter {key!r} is set to {json.dumps(pa[key])} in {la} but absent in {lb}"
        if pa[key] != pb[key]:
            return differ(f"parameter {key!r}", pa[key], pb[key])
    for key in sorted((set(a) | set(b)) - {"name", "api_version", "params"}):
        if a.get(key) != b.get(key):
            return differ(f"the spec entry {key!r}", a.get(key), b.get(key))
    return None


def parse_assignments(items: list[str] | None) -> dict[str, str]:
    """``["rho=0.5", "sigma=0.01"]`` -> ``{"rho": "0.5", "sigma": "0.01"}`` (for ``-p key=value``)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise DiffemError(f"malformed parameter {item!r}: expected KEY=VALUE, e.g. rho=0.5")
        if key in out:
            raise DiffemError(f"parameter {key!r} given twice")
        out[key] = value.strip()
    return out
