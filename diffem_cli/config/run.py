"""Run configuration: typed sections, YAML presets and ``--set key=value`` overrides.

A configuration is plain nested dataclasses. Presets live in ``diffem_cli/config/presets/*.yaml``;
``--config`` takes a preset name or a YAML file (read with ``yaml.safe_load``); ``--set`` changes
single keys (``train.lr=2e-4``). Unknown keys, ill-typed values and out-of-range values are
one-line errors raised when the configuration is loaded (``validate``), before anything is written;
``check_config_for_data`` adds the checks that need the data's shape and channel.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from diffem_cli.core.checks import bad, choice, finite, int_at_least
from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.sampling import SampleConfig, validate_sample
from diffem_cli.diffusion.train import TrainConfig, validate_train
from diffem_cli.gaussian.shrinkage import parse_shrinkage


@dataclass
class EMConfig:
    """The EM loop itself."""

    laps: int = 6
    method: str = "diffem"
    init: str = "auto"
    gaussian_iters: int = 16
    gaussian_rank: int = 64
    gaussian_full_max_dim: int = 768
    gaussian_residual: str = "auto"
    gaussian_shrinkage: str = "auto"
    recorrupt_every: int = 0
    drop_outside: float = 0.0


@dataclass
class EvalConfig:
    """Per-lap evaluation against clean data (``--eval-clean``).

    ``posterior_n`` / ``posterior_k``: the last lap also draws ``posterior_k`` posterior samples of
    each of the first ``posterior_n`` observations for the posterior-quality metrics (``post_*``:
    one sample against the K-sample mean, calibration, spread against error) on image data, whose
    clean rows are paired with the observations; 0 turns them off."""

    metrics: list[str] = field(default_factory=list)
    n_points: int = 4096
    posterior_n: int = 64
    posterior_k: int = 8


@dataclass
class RunConfig:
    """Everything ``em-train`` and ``train-uncond`` need besides their data.

    ``options`` holds the methods' option sections (``mmps``, ``dps``, ...), one dataclass per
    section, filled by the layer above from the method registry (:class:`Extensions`); they read
    and write as top-level sections (``cfg.mmps.cg_iters``, ``mmps:`` in YAML, ``--set mmps.cg_iters=2``).
    """

    network: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    em: EMConfig = field(default_factory=EMConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("options")
        if options is None or name.startswith("_") or name not in options:
            raise AttributeError(f"RunConfig has no section {name!r}")
        return options[name]

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts, option sections at top level after ``em`` (a RUN's config.yaml)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "options":
                continue
            value = getattr(self, f.name)
            out[f.name] = (
                dataclasses.asdict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
            )
            if f.name == "em":
                out.update({k: dataclasses.asdict(v) for k, v in self.options.items()})
        return out


@dataclass(frozen=True)
class Extensions:
    """What the layers above add to a run configuration: option sections (name -> a dataclass
    with defaults for every field and an optional ``validate()`` raising a one-line DiffemError)
    and the method names ``em.method`` may take (empty: not checked here)."""

    sections: Mapping[str, Callable[[], Any]] = field(default_factory=dict)
    methods: tuple[str, ...] = ()

    def new_config(self) -> RunConfig:
        """A default configuration with every option section."""
        return RunConfig(options={name: make() for name, make in self.sections.items()})


PRESETS = ("manifold", "digits", "img16", "img32", "cifar10", "celeba")


def default_preset(shape: tuple[int, ...] | list[int]) -> str:
    """The preset used when no ``--config`` is given, from the clean data's shape: ``manifold`` for
    vectors, ``img16`` / ``img32`` for 16x16 / 32x32 images, ``digits`` for other images."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 1:
        return "manifold"
    return {16: "img16", 32: "img32"}.get(shape[-1], "digits") if shape[-1] == shape[-2] else "digits"


INITS: tuple[str, ...] = ("auto", "gaussian", "observation")
GAUSSIAN_RESIDUALS: tuple[str, ...] = ("auto", "pixel", "cosine")
NETWORK_TYPES: tuple[str, ...] = ("mlp", "unet")
# UNet2DModel arguments diffem sets itself from the data and the channel.
UNET_DERIVED = ("sample_size", "in_channels", "out_channels")


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise DiffemError(f"config section {prefix.rstrip('.') or '<top>'} must be a mapping")
    names = {f.name: f for f in dataclasses.fields(obj)}
    sections: dict[str, Any] = {}
    if isinstance(obj, RunConfig):  # the methods' option sections read as top-level ones
        del names["options"]
        sections = obj.options
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key in sections:
            _apply(sections[key], value, path + ".")
            continue
        if key not in names:
            raise DiffemError(f"unknown config key {path!r}{_suggest(str(key), [*names, *sections])}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, path + ".")
        elif key == "network":
            if not isinstance(value, dict):
                raise DiffemError("config key 'network' must be a mapping")
            same = value.get("type", current.get("type")) == current.get("type")
            setattr(obj, key, {**current, **value} if same else dict(value))
        else:
            setattr(obj, key, _coerce(path, current, value, str(names[key].type)))


def _suggest(key: str, known: Any) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f" (known here: {', '.join(known)}){hint}"


def _scalar(path: str, kind: type, value: Any) -> Any:
    """``value`` as ``kind`` (bool, int, float or str); raises ValueError when it is not one."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
            return value.lower() in {"true", "1", "yes"}
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError
    if kind is str and isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
        return "on" if value else "off"
    if isinstance(value, bool) or value is None or isinstance(value, list | dict):
        raise ValueError
    if kind is int:
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, float) and not number.is_integer():
            raise ValueError
        return int(number)
    if kind is float:
        return float(value)
    return str(value)


def _coerce(path: str, current: Any, value: Any, annotation: str = "") -> Any:
    try:
        if isinstance(current, list):
            item = float if "float" in annotation else int if "int" in annotation else str
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            elif not isinstance(value, list | tuple):
                value = [value]
            return [_scalar(path, item, v) for v in value]
        return _scalar(path, type(current), value)
    except (TypeError, ValueError, OverflowError):
        expected = type(current).__name__
        if isinstance(current, list):
            expected = f"a list of {'float' if 'float' in annotation else 'str'}"
        raise DiffemError(f"config key {path!r} expects {expected}, got {value!r}") from None


def read_yaml(source: str | Path) -> dict[str, Any]:
    """A preset name or a YAML file, as a dict."""
    name = str(source)
    if name in PRESETS:
        text = resources.files("diffem_cli.config").joinpath("presets", f"{name}.yaml").read_text()
    else:
        path = Path(name)
        if not path.exists():
            raise DiffemError(
                f"config {name!r} is neither a preset ({', '.join(PRESETS)}) nor an existing file"
            )
        if path.is_dir():
            if not (path / "config.yaml").is_file():
                raise DiffemError(f"config {name!r} is a folder without config.yaml (not a diffem RUN)")
            path = path / "config.yaml"
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise DiffemError(f"config {name} cannot be read ({e})") from None
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
        parts = key.strip().split(".")
        if not all(parts):
            raise DiffemError(f"--set expects a dotted key like train.lr, got {key!r}")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise DiffemError(f"--set {item!r}: {p!r} is set to a value and used as a section")
            node = child
        if isinstance(node.get(parts[-1]), dict):
            raise DiffemError(f"--set {item!r}: {key.strip()!r} is a section, not a key")
        node[parts[-1]] = value
    return out


# --- validation -------------------------------------------------------------------------------


def _metric_names() -> tuple[str, ...]:
    from diffem_cli.metrics.evaluate import METRICS

    return tuple(METRICS)


def _validate_network(net: dict[str, Any]) -> None:
    kind = net.get("type")
    if kind not in NETWORK_TYPES:
        raise DiffemError(
            f"config key 'network.type' must be one of {', '.join(NETWORK_TYPES)}, got {kind!r}"
        )
    args = {k: v for k, v in net.items() if k != "type"}
    if kind == "mlp":
        from diffem_cli.diffusion.nets import VectorMLP

        known = [
            n
            for n in inspect.signature(VectorMLP.__init__).parameters
            if n not in ("self", "dim", "cond_size")
        ]
        for key, value in args.items():
            if key not in known:
                raise DiffemError(f"unknown config key 'network.{key}' for an mlp{_suggest(key, known)}")
            int_at_least(f"network.{key}", value, 1)
        return
    from diffusers import UNet2DModel

    params = inspect.signature(UNet2DModel.__init__).parameters
    known = [n for n in params if n not in ("self", *UNET_DERIVED)]
    for key in args:
        if key in UNET_DERIVED:
            raise DiffemError(f"config key 'network.{key}' is set by diffem from the data; remove it")
        if key not in known:
            raise DiffemError(f"unknown config key 'network.{key}' for a unet{_suggest(key, known)}")
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        value = args.get(key)
        if not isinstance(value, list | tuple) or not value:
            raise bad(f"network.{key}", value, "a non-empty list")
    channels = args["block_out_channels"]
    for c in channels:
        int_at_least("network.block_out_channels", c, 1)
    for key in ("down_block_types", "up_block_types"):
        if len(args[key]) != len(channels):
            raise DiffemError(
                f"config key 'network.{key}' lists {len(args[key])} blocks but "
                f"network.block_out_channels lists {len(channels)}"
            )
    groups = args.get("norm_num_groups", params["norm_num_groups"].default)
    int_at_least("network.norm_num_groups", groups, 1)
    if any(c % groups for c in channels):
        raise DiffemError(
            f"config key 'network.norm_num_groups' = {groups} must divide every block_out_channels {channels}"
        )
    if "layers_per_block" in args:
        int_at_least("network.layers_per_block", args["layers_per_block"], 1)
    if "dropout" in args and not 0 <= finite("network.dropout", args["dropout"]) < 1:
        raise bad("network.dropout", args["dropout"], "in [0, 1)")
    # The constructor itself has the last word (block names, attention settings...): build one on
    # the meta device (no memory, no weights) for a small square image.
    size = 2 ** (len(channels) - 1) * 4
    _try_build(net, (1, size, size), 0)


def _try_build(net: dict[str, Any], shape: tuple[int, ...], cond_size: int) -> None:
    import torch

    from diffem_cli.diffusion.nets import build_network

    try:
        with torch.device("meta"):
            build_network(net, shape, cond_size)
    except DiffemError:
        raise
    except Exception as e:  # the constructor's own complaint (diffusers raises several types)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DiffemError(f"config section 'network' is not a valid {net.get('type')} ({first})") from None


def validate(cfg: RunConfig, methods: tuple[str, ...] = ()) -> None:
    """Check every value of ``cfg`` (ranges, choices, network arguments, metric names, and each
    option section through its own ``validate()``); ``em.method`` against ``methods`` when given.

    Raises a one-line DiffemError naming the first bad key. Called by ``load_config`` and
    ``config_from_dict``, so a bad value is refused before any file is written.
    """
    _validate_network(cfg.network)
    validate_train(cfg.train)
    validate_sample(cfg.sample)
    em = cfg.em
    int_at_least("em.laps", em.laps, 1)
    if methods:
        choice("em.method", em.method, methods)
    elif not isinstance(em.method, str) or not em.method:
        raise bad("em.method", em.method, "a method name")
    choice("em.init", em.init, INITS)
    int_at_least("em.gaussian_iters", em.gaussian_iters, 1)
    int_at_least("em.gaussian_rank", em.gaussian_rank, 1)
    int_at_least("em.gaussian_full_max_dim", em.gaussian_full_max_dim, 0)
    choice("em.gaussian_residual", em.gaussian_residual, GAUSSIAN_RESIDUALS)
    parse_shrinkage("em.gaussian_shrinkage", em.gaussian_shrinkage)
    int_at_least("em.recorrupt_every", em.recorrupt_every, 0)
    if finite("em.drop_outside", em.drop_outside) < 0:
        raise bad("em.drop_outside", em.drop_outside, ">= 0 (0 keeps every reconstruction)")
    for options in cfg.options.values():
        check = getattr(options, "validate", None)
        if callable(check):
            check()
    known = _metric_names()
    for name in cfg.eval.metrics:
        choice("eval.metrics", name, known)
    if len(set(cfg.eval.metrics)) != len(cfg.eval.metrics):
        raise bad("eval.metrics", cfg.eval.metrics, "a list without repeats")
    int_at_least("eval.n_points", cfg.eval.n_points, 1)
    int_at_least("eval.posterior_n", cfg.eval.posterior_n, 0)
    int_at_least("eval.posterior_k", cfg.eval.posterior_k, 2)
    int_at_least("seed", cfg.seed, 0)


def check_config_for_data(cfg: RunConfig, channel: Any, shape: tuple[int, ...]) -> None:
    """The checks that need the data: the network against the data shape and the channel's
    conditioning size, ``em.init`` against the channel (``gaussian`` needs a linear channel),
    ``eval.metrics`` against the data kind, ``train.augment`` against the data's shape and the
    channel's conditioning of one trial observation (images; square for ``dihedral``).

    ``channel`` is a ``diffem_channels.base.Channel`` (or None for unconditional training);
    ``shape`` the clean data's shape. Raises a one-line DiffemError.
    """
    import torch

    from diffem_channels.base import ChannelError, sample_seeds
    from diffem_cli.diffusion.augment import check_augment
    from diffem_cli.diffusion.nets import check_network_shape
    from diffem_cli.gaussian.fit import resolve_residual
    from diffem_cli.io.datameta import data_kind

    shape = tuple(int(s) for s in shape)
    check_network_shape(cfg.network, shape)
    check_augment(cfg.train.augment, {"x": torch.zeros(1, *shape)})
    resolve_residual(cfg.em.gaussian_residual, shape, f"em.gaussian_residual={cfg.em.gaussian_residual}")
    from diffem_cli.metrics.evaluate import METRICS

    kind = data_kind(shape)
    for name in cfg.eval.metrics:
        if name in METRICS and kind not in METRICS[name].kinds:
            raise DiffemError(
                f"eval.metrics: {name!r} needs {' or '.join(k + 's' for k in METRICS[name].kinds)}; "
                f"the data are {kind}s of shape {shape}"
            )
    cond_size = 0
    if channel is not None:
        try:
            channel.check_data(shape)
            cond_size = int(channel.cond_size(shape))
            if cfg.train.augment != "none":  # the conditioning is flipped with its image
                trial = torch.zeros(1, *shape)
                cond = channel.condition(channel.corrupt(trial, sample_seeds(0, [0])), shape)
                check_augment(cfg.train.augment, {"x": trial, "conditioning": cond})
        except ChannelError as e:
            raise DiffemError(str(e)) from None
        if cfg.sample.project and not getattr(channel, "linear", False):
            raise DiffemError(f"sample.project needs a linear channel; {channel.name!r} has no linear form")
        if cfg.em.init == "gaussian" and not getattr(channel, "linear", False):
            raise DiffemError(
                f"em.init=gaussian needs a linear channel; {channel.name!r} has no linear form "
                "(use em.init=auto or observation, or --warm-start)"
            )
    _try_build(cfg.network, shape, cond_size)


def load_config(
    config: str | Path | None,
    sets: list[str] | None = None,
    *,
    default_preset: str = "digits",
    extensions: Extensions | None = None,
) -> RunConfig:
    """Build the effective configuration, then validate every value.

    ``config`` is a preset name, a YAML file or a RUN folder (its ``config.yaml``). A file is laid
    over ``default_preset``, so it needs to hold only the keys it changes; ``--set`` overrides
    come last. ``extensions`` (from the method registry) adds the methods' option sections and
    names; without it a section such as ``mmps`` is an unknown key.
    """
    ext = extensions or Extensions()
    cfg = ext.new_config()
    if config is not None and str(config) not in PRESETS:
        _apply(cfg, read_yaml(default_preset))
    _apply(cfg, read_yaml(config or default_preset))
    if sets:
        _apply(cfg, parse_sets(sets))
    validate(cfg, ext.methods)
    return cfg


def missing_keys(written: dict[str, Any], full: dict[str, Any]) -> tuple[str, ...]:
    """The dotted keys of ``full`` (a :meth:`RunConfig.to_dict`) that ``written`` (a RUN's
    ``config.yaml`` as read) lacks: keys added to diffem after that RUN was written. ``network``
    is free-form (its keys are the user's), so it is not looked into."""
    written = written if isinstance(written, dict) else {}
    lacked = []
    for section, values in full.items():
        if not isinstance(values, dict):
            lacked += [] if section in written else [section]
        elif section != "network":
            given = written.get(section) if isinstance(written.get(section), dict) else {}
            lacked += [f"{section}.{key}" for key in values if key not in given]
    return tuple(lacked)


def config_from_dict(data: dict[str, Any], extensions: Extensions | None = None) -> RunConfig:
    """Rebuild a RunConfig from its ``to_dict`` form (a RUN's config.yaml), validated."""
    ext = extensions or Extensions()
    cfg = ext.new_config()
    _apply(cfg, data)
    validate(cfg, ext.methods)
    return cfg


def effective_config(
    source: str | Path | None,
    sets: list[str] | None = None,
    *,
    default_preset: str = "digits",
    extensions: Extensions | None = None,
) -> RunConfig:
    """What ``diffem config show`` prints: a preset, a RUN folder (its config.yaml) or a YAML file
    (laid over ``default_preset``), with ``--set`` overrides, validated."""
    return load_config(source, sets, default_preset=default_preset, extensions=extensions)
