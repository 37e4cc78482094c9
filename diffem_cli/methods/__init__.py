"""Methods diffem runs side by side, one module each, behind the protocol of :mod:`.base`,
found through the entry-point group ``diffem.methods`` (:mod:`.registry`)."""

from __future__ import annotations

from diffem_cli.methods.base import Method, ModelSpec, MStep, Posterior, Prior
from diffem_cli.methods.registry import (
    default_config,
    extensions,
    get_method,
    get_method_class,
    list_methods,
    load_config,
    method_classes,
    method_for_checkpoint,
    method_names,
)

__all__ = [
    "Method",
    "ModelSpec",
    "MStep",
    "Posterior",
    "Prior",
    "default_config",
    "extensions",
    "get_method",
    "get_method_class",
    "list_methods",
    "load_config",
    "method_classes",
    "method_for_checkpoint",
    "method_names",
]
