"""Run configuration: typed sections, YAML presets and ``--set key=value`` overrides.

A configuration is plain nested dataclasses. Presets live in ``diffem_cli/presets/*.yaml``;
``--config`` takes a preset name or a YAML file (read with ``yaml.safe_load``); ``--set`` changes
single keys (``train.lr=2e-4``). Unknown keys and ill-typed values are one-line errors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from diffem_cli.errors import DiffemError


@dataclass
class TrainConfig:
    """One training phase (an M-step, or train-uncond)."""

    batch_size: int = 256
    epochs: int = 50
    lr: float = 1e-3
    lr_min: float = 1e-6
    warmup: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    weight_decay: float = 0.0
    t_sampling: str = "uniform"


@dataclass
class SampleConfig:
    """How reconstructions and samples are drawn."""

    sampler: str = "dpm++"
    steps: int = 32
    batch_size: int = 4096


@dataclass
class EMConfig:
    """The EM loop itself."""

    laps: int = 6
    init: str = "auto"
    gaussian_iters: int = 16
    gaussian_rank: int = 32
    recorrupt_every: int = 0


@dataclass
class EvalConfig:
    """Per-lap evaluation against clean data (``--eval-clean``)."""

    metrics: list[str] = field(default_factory=list)
    n_points: int = 4096


@dataclass
class RunConfig:
    """Everything ``em-train`` and ``train-uncond`` need besides their data."""

    network: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    em: EMConfig = field(default_factory=EMConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS = ("manifold", "digits", "cifar10", "celeba")


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise DiffemError(f"config section {prefix.rstrip('.') or '<top>'} must be a mapping")
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise DiffemError(f"unknown config key {path!r} (known here: {', '.join(names)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, path + ".")
        elif key == "network":
            if not isinstance(value, dict):
                raise DiffemError("config key 'network' must be a mapping")
            same = value.get("type", current.get("type")) == current.get("type")
            setattr(obj, key, {**current, **value} if same else dict(value))
        else:
            setattr(obj, key, _coerce(path, current, value))


def _coerce(path: str, current: Any, value: Any) -> Any:
    try:
        if isinstance(current, bool):
            if isinstance(value, str):
                if value.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                    raise ValueError
                return value.lower() in {"true", "1", "yes"}
            return bool(value)
        if isinstance(current, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) else int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, list):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return list(value)
        return str(value)
    except (TypeError, ValueError):
        raise DiffemError(f"config key {path!r} expects {type(current).__name__}, got {value!r}") from None


def read_yaml(source: str | Path) -> dict[str, Any]:
    """A preset name or a YAML file, as a dict."""
    name = str(source)
    if name in PRESETS:
        text = resources.files("diffem_cli").joinpath("presets", f"{name}.yaml").read_text()
    else:
        path = Path(name)
        if not path.exists():
            raise DiffemError(
                f"config {name!r} is neither a preset ({', '.join(PRESETS)}) nor an existing file"
            )
        text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise DiffemError(f"config {name} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise DiffemError(f"config {name} must hold a mapping at top level")
    return data


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["train.lr=2e-4", ...]`` -> nested dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise DiffemError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_config(
    config: str | Path | None, sets: list[str] | None = None, *, default_preset: str = "digits"
) -> RunConfig:
    """Build the effective configuration: preset or file, then ``--set`` overrides."""
    cfg = RunConfig()
    _apply(cfg, read_yaml(config or default_preset))
    if sets:
        _apply(cfg, parse_sets(sets))
    return cfg


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from its ``to_dict`` form (a RUN's config.yaml)."""
    cfg = RunConfig()
    _apply(cfg, data)
    return cfg
