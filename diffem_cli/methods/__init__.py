"""Methods diffem runs side by side, one module each, behind the protocol of :mod:`.base`."""

from __future__ import annotations

import copy
from typing import Any

from diffem_cli.config.run import METHODS, RunConfig
from diffem_cli.core.errors import DiffemError
from diffem_cli.methods.ambient import Ambient
from diffem_cli.methods.ambient_tweedie import AmbientTweedie
from diffem_cli.methods.base import Method
from diffem_cli.methods.diffem import DiffEM
from diffem_cli.methods.dps_em import DPSEM
from diffem_cli.methods.em_mmps import EMMMPS
from diffem_cli.methods.naive import Naive
from diffem_cli.methods.oracle import Oracle

REGISTRY: dict[str, type[Method]] = {
    m.name: m for m in (DiffEM, EMMMPS, Naive, Oracle, DPSEM, Ambient, AmbientTweedie)
}


def get_method(name: str, cfg: RunConfig) -> Method:
    """The method called ``name``, configured by ``cfg``; one-line error for an unknown one."""
    if name not in REGISTRY:
        known = ", ".join(REGISTRY)
        if name in METHODS:
            raise DiffemError(f"method {name!r} is not implemented yet (implemented: {known})")
        raise DiffemError(f"unknown method {name!r} (known: {known})")
    return REGISTRY[name](cfg)


def method_for_checkpoint(meta: dict[str, Any], base: RunConfig | None = None) -> Method:
    """The method that wrote a checkpoint, configured as it was (older checkpoints: by kind)."""
    name = meta.get("method") or ("diffem" if meta.get("kind") == "conditional" else "em-mmps")
    if name == "uncond":  # a train-uncond prior: posterior samples by MMPS guidance
        name = "em-mmps"
    cfg = copy.deepcopy(base) if base is not None else RunConfig()
    for section, values in (meta.get("method_config") or {}).items():
        target = getattr(cfg, section, None)
        for key, value in (values or {}).items():
            if target is not None and hasattr(target, key):
                setattr(target, key, value)
    return get_method(name, cfg)


__all__ = ["REGISTRY", "Method", "get_method", "method_for_checkpoint"]
