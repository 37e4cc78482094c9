"""Method discovery: every method, built-in or third-party, is an entry point in ``diffem.methods``.

Mirrors the channel registry (:mod:`diffem_cli.io.registry`): listing reads package metadata,
then imports each entry point; a broken plugin (import failure, wrong class, name or option
section clash) is listed with its error and never stops the other methods from working; an
unknown name is a one-line error naming the known ones. Methods are listed by their ``order``
(the built-ins first), then by name.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import replace
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

from diffem_cli.config import run as run_config
from diffem_cli.config.run import Extensions, RunConfig
from diffem_cli.core.errors import DiffemError
from diffem_cli.core.plugins import PluginInfo, declared, normalise_dist
from diffem_cli.methods.base import Method

GROUP = "diffem.methods"


MethodInfo = PluginInfo[Method]
"""An entry point of ``GROUP``, loaded or not (:class:`~diffem_cli.core.plugins.PluginInfo`)."""


def _problem(name: str, obj: Any) -> str | None:
    """Why the loaded object ``obj`` cannot serve as method ``name``, or None."""
    if not (isinstance(obj, type) and issubclass(obj, Method)):
        return f"{obj!r} is not a subclass of diffem_cli.methods.base.Method"
    if obj.name != name:
        return f"entry point {name!r} points at {obj.__name__} whose name is {obj.name!r}"
    if not obj.description or not isinstance(obj.description, str) or "\n" in obj.description:
        return f"{obj.__name__} needs a one-line class attribute 'description'"
    if not isinstance(obj.kind, str) or not obj.kind:
        return f"{obj.__name__}.kind must be a non-empty string"
    for section, klass in dict(obj.option_classes).items():
        if not (isinstance(section, str) and section.isidentifier()):
            return f"{obj.__name__}.option_classes: section {section!r} is not an identifier"
        if section in {f.name for f in dataclasses.fields(RunConfig)}:
            return f"{obj.__name__}.option_classes: section {section!r} is one of diffem's own"
        if not dataclasses.is_dataclass(klass):
            return f"{obj.__name__}.option_classes[{section!r}] is not a dataclass"
        try:
            klass()
        except Exception as e:
            return f"{obj.__name__}.option_classes[{section!r}] has no defaults ({type(e).__name__}: {e})"
    return None


def _load(info: MethodInfo) -> MethodInfo:
    try:
        obj = EntryPoint(info.name, info.value, GROUP).load()
    except Exception as e:  # a plugin may fail in any way; report it instead of crashing
        what = f"{type(e).__name__}: {e}".strip().splitlines()[0]
        return replace(info, error=f"cannot import {info.value}: {what}")
    try:
        problem = _problem(info.name, obj)
    except Exception as e:
        problem = f"invalid method class {info.value}: {type(e).__name__}: {e}"
    return replace(info, error=problem) if problem else replace(info, cls=obj)


def list_methods() -> list[MethodInfo]:
    """Every declared method (built-ins first, then plugins by name), broken ones included."""
    by_name: dict[str, list[MethodInfo]] = {}
    for dist, ep in declared(GROUP):
        infos = by_name.setdefault(ep.name, [])
        if not any(normalise_dist(i.dist) == normalise_dist(dist) and i.value == ep.value for i in infos):
            infos.append(PluginInfo(ep.name, dist, ep.value))
    out: list[MethodInfo] = []
    sections: dict[str, tuple[type, str]] = {}  # section -> (options class, first method using it)
    loaded = {n: [_load(i) for i in sorted(infos, key=lambda i: i.dist)] for n, infos in by_name.items()}

    def rank(name: str) -> tuple[int, str]:
        cls = loaded[name][0].cls
        order = cls.__dict__.get("order", 1000) if cls is not None else 1000  # not inherited
        return (int(order), name)

    for name in sorted(loaded, key=rank):
        infos = loaded[name]
        if len(infos) > 1:
            owners = ", ".join(f"{i.dist} ({i.value})" for i in infos)
            clash = f"method {name!r} is declared by several distributions: {owners}; uninstall all but one"
            out += [replace(i, error=clash) for i in infos]
            continue
        info = infos[0]
        if info.ok and info.cls is not None:
            for section, klass in dict(info.cls.option_classes).items():
                owner = sections.setdefault(section, (klass, name))
                if owner[0] is not klass:
                    info = replace(info, error=f"option section {section!r} is already {owner[1]!r}'s")
                    break
        out.append(info)
    return out


def method_classes() -> dict[str, type[Method]]:
    """Name -> class of every method that loaded without error, in listing order."""
    return {i.name: i.cls for i in list_methods() if i.ok and i.cls is not None}


def method_names() -> tuple[str, ...]:
    """The names of the working methods."""
    return tuple(method_classes())


def get_method_class(name: str) -> type[Method]:
    """The class of method ``name``; one-line error for an unknown or broken one."""
    infos = [i for i in list_methods() if i.name == name]
    if not infos:
        known = method_names()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DiffemError(f"unknown method {name!r}{hint} (known: {', '.join(known) or 'none installed'})")
    info = infos[0]
    if not info.ok or info.cls is None:
        raise DiffemError(f"method {name!r} from {info.dist} is broken: {info.error}")
    return info.cls


def get_method(name: str, cfg: RunConfig) -> Method:
    """The method called ``name``, configured by ``cfg``'s option sections."""
    return get_method_class(name).from_config(cfg)


def extensions() -> Extensions:
    """The option sections and method names of every working method, for the config layer."""
    sections: dict[str, Any] = {}
    for cls in method_classes().values():
        for section, klass in dict(cls.option_classes).items():
            sections.setdefault(section, klass)
    return Extensions(sections=sections, methods=method_names())


def load_config(
    config: str | Path | None, sets: list[str] | None = None, *, default_preset: str = "digits"
) -> RunConfig:
    """:func:`diffem_cli.config.run.load_config` with the option sections of every installed
    method: what the CLI's ``--config`` / ``--set`` read, for library use."""
    return run_config.load_config(config, sets, default_preset=default_preset, extensions=extensions())


def default_config() -> RunConfig:
    """``RunConfig()`` with every method's option section at its defaults."""
    return extensions().new_config()


def checkpoint_method_name(meta: dict[str, Any]) -> str:
    """The method that reads a checkpoint: the one that wrote it; for older checkpoints without
    ``method``, by ``kind``; for a ``train-uncond`` prior (``uncond``), EM-MMPS."""
    name = meta.get("method") or ("diffem" if meta.get("kind") == "conditional" else "em-mmps")
    return "em-mmps" if name == "uncond" else str(name)


def method_for_checkpoint(meta: dict[str, Any], base: dict[str, Any] | None = None) -> Method:
    """The method that wrote a checkpoint (:func:`checkpoint_method_name`), configured as it was:
    its ``method_config`` laid over ``base`` (option sections, e.g. ``cfg.options``) and the
    defaults."""
    cls = get_method_class(checkpoint_method_name(meta))
    record = {s: dataclasses.asdict(o) for s, o in (base or {}).items() if dataclasses.is_dataclass(o)}
    for section, values in (meta.get("method_config") or {}).items():
        record[section] = {**record.get(section, {}), **(values or {})}
    return cls.from_record(copy.deepcopy(record))
