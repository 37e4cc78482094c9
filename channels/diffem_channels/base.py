"""The channel interface: a corruption ``Q(y | x)`` that diffem and third parties implement.

A channel is a class with a ``name``, a one-line ``description``, typed ``params`` and the data
kinds it accepts. It draws observations (``corrupt``), turns an observation into the tensor a
conditional network takes (``condition``), and, where the channel is linear
(``y = A x + s * eps``), exposes ``A``, ``A^T`` and ``s`` for Gaussian initialisation and
guidance-based baselines.

Interface version: ``API_VERSION``. A plugin sets ``api_version`` to the version it was written
for (1 when it does not say); the registry refuses a plugin written for a newer interface than
this one. Version 2 added two optional capabilities, both off by default, so version-1 plugins
keep working unchanged:

- ``differentiable`` / :meth:`Channel.forward`: the noiseless measurement ``F(x)`` as a
  differentiable function of ``x`` (linear channels: ``A x``; ``jpeg``: kornia's differentiable
  codec), used by diffusion posterior sampling (``--method dps-em``);
- ``masked_observation`` / :meth:`Channel.observation_mask`: the observation is the data with
  some entries hidden, and the channel says which (``mask``, ``box``), used by
  Ambient-Diffusion (``--method ambient``);
- :meth:`Channel.exact_entries`: the entries an observation gives exactly (no noise), where the
  true posterior puts ``x = y``; methods write ``y`` back there (data consistency). By default the
  observed entries of a noiseless ``masked_observation`` channel; a plugin may declare its own.
- :meth:`Channel.import_fields`: the per-sample tensors an observation holds beyond ``y`` (a
  mask, a matrix, a per-sample parameter) as :class:`ImportField` entries, which ``diffem
  import`` reads from the user's files and validates. By default derived from what
  :meth:`Channel.corrupt` returns; a non-linear channel with such tensors declares its own.

One more declaration, off by default, is open to every ``api_version`` (a diffem that predates it
ignores it, and the methods needing it refuse the channel): ``gaussian_denoising``, the channel is
``y = x + s * eps``, the identity plus Gaussian noise independent across entries at the known level
``s = noise_std(obs)`` (``noise``). The denoiser baselines (``--method noise2self``,
``sure-score``) and ``ambient-tweedie`` serve exactly these channels.

torch is imported where a channel first works on tensors, not when its module loads, so listing
the channels (``diffem channels``) does not load torch; a plugin may do the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

API_VERSION = 2

Observation = dict[str, "torch.Tensor"]


class ChannelError(ValueError):
    """A channel was given a parameter or data it cannot work with (one-line message)."""


@dataclass(frozen=True)
class Param:
    """One typed channel parameter with a default and an optional validity check.

    ``check`` returns ``None`` when the value is valid and a short reason otherwise.
    """

    name: str
    type: type
    default: Any
    help: str = ""
    check: Callable[[Any], str | None] | None = field(default=None, compare=False)
    choices: tuple[Any, ...] | None = None

    @property
    def constraint(self) -> str:
        """A short human description of the accepted values, e.g. ``"in [0, 1)"`` (for listings).

        Taken from ``choices`` and from a ``constraint`` attribute on ``check`` (set by
        :func:`in_range`, :func:`positive`, :func:`non_negative`; plugins may set their own).
        """
        parts = []
        if self.choices is not None:
            parts.append("one of " + ", ".join(repr(c) for c in self.choices))
        if self.check is not None:
            parts.append(str(getattr(self.check, "constraint", "custom check")))
        return "; ".join(parts)

    def parse(self, value: Any) -> Any:
        """Convert ``value`` (possibly a string from the command line) and validate it."""
        try:
            if self.type is bool and isinstance(value, str):
                low = value.strip().lower()
                if low not in {"true", "false", "1", "0", "yes", "no"}:
                    raise ValueError(value)
                parsed: Any = low in {"true", "1", "yes"}
            elif self.type is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            elif self.type is float and isinstance(value, bool):
                raise ValueError(value)
            else:
                parsed = self.type(value)
        except (TypeError, ValueError):
            raise ChannelError(
                f"parameter {self.name!r} must be of type {self.type.__name__}, got {value!r}"
            ) from None
        if self.type is float and not math.isfinite(parsed):
            raise ChannelError(f"parameter {self.name!r} must be finite, got {value!r}")
        if self.choices is not None and parsed not in self.choices:
            raise ChannelError(f"parameter {self.name!r} must be one of {list(self.choices)}, got {parsed!r}")
        if self.check is not None:
            reason = self.check(parsed)
            if reason:
                raise ChannelError(f"parameter {self.name!r}={parsed!r}: {reason}")
        return parsed


def in_range(
    lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> Callable[[Any], str | None]:
    """A ``Param.check`` accepting values in an interval, e.g. ``in_range(0, 1, hi_open=True)``."""

    def check(v: Any) -> str | None:
        ok_lo = v > lo if lo_open else v >= lo
        ok_hi = v < hi if hi_open else v <= hi
        if ok_lo and ok_hi:
            return None
        return f"must lie in {interval}"

    interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    check.constraint = f"in {interval}"  # type: ignore[attr-defined]
    return check


def positive(v: Any) -> str | None:
    """A ``Param.check`` accepting strictly positive values."""
    return None if v > 0 else "must be > 0"


def non_negative(v: Any) -> str | None:
    """A ``Param.check`` accepting values >= 0."""
    return None if v >= 0 else "must be >= 0"


positive.constraint = "> 0"  # type: ignore[attr-defined]
non_negative.constraint = ">= 0"  # type: ignore[attr-defined]


IMPORT_SOURCES = ("images", "column", "safetensors", "params")
"""Where ``diffem import`` may read an :class:`ImportField` from: a folder of ``images`` named like
the observations, a ``column`` of a data set, a tensor in a ``safetensors`` file (one row per
sample), or a ``params`` table (CSV or JSON keyed by file name; scalars)."""


@dataclass(frozen=True)
class ImportField:
    """One per-sample tensor of an observation beyond ``y``, as ``diffem import`` reads it.

    ``shape`` is the per-sample shape for the data shape it was declared for; ``values`` the
    closed interval its entries lie in (None: any finite value), ``binary`` that only the two ends
    occur (a 0/1 mask); ``sources`` where it may come from (see :data:`IMPORT_SOURCES`); an image
    file's 8-bit pixel ``v`` reads as ``lo + (hi - lo) * v / 255`` of ``values``. ``check``
    returns ``None`` for a valid batch ``(B, *shape)`` and a short reason otherwise.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    values: tuple[float, float] | None = None
    binary: bool = False
    sources: tuple[str, ...] = ("column", "safetensors")
    help: str = ""
    check: Callable[[torch.Tensor], str | None] | None = field(default=None, compare=False)


_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64), so (seed, lap, index) streams never collide."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h & ((1 << 63) - 1)


def sample_seeds(seed: int, indices: torch.Tensor | range | list[int], *tags: int) -> torch.Tensor:
    """Per-sample seeds for the given sample indices under a global ``seed`` (and optional tags)."""
    import torch

    return torch.tensor([mix_seed(seed, *tags, int(i)) for i in indices], dtype=torch.int64)


def per_sample(
    seeds: torch.Tensor, shape: tuple[int, ...], kind: str = "randn", stream: int = 0
) -> torch.Tensor:
    """Draw one tensor of ``shape`` per sample, each from its own generator seeded by ``seeds[i]``.

    ``stream`` separates independent draws of one sample (mask vs noise). The result for sample
    ``i`` depends only on ``seeds[i]`` and ``stream``, never on the batch it sits in, nor on the
    CPU: normal draws are made in float64 and rounded to float32, because torch's float32 normal
    sampler has a vectorised (AVX2) path whose bits differ from its plain path (ARM, older x86).
    """
    import torch

    out = torch.empty((len(seeds), *shape), dtype=torch.float32)
    gen = torch.Generator()
    for i, s in enumerate(seeds.tolist()):
        gen.manual_seed(mix_seed(s, stream))
        if kind == "randn":
            out[i] = torch.randn(shape, generator=gen, dtype=torch.float64)
        elif kind == "rand":
            out[i] = torch.rand(shape, generator=gen)
        else:
            raise ValueError(f"unknown draw kind {kind!r}")
    return out


def data_kind(shape: tuple[int, ...]) -> str:
    """``"vector"`` for shape ``(n,)``, ``"image"`` for ``(C, H, W)``."""
    if len(shape) == 1:
        return "vector"
    if len(shape) == 3:
        return "image"
    raise ChannelError(f"data of shape {tuple(shape)} is neither a vector (n,) nor an image (C, H, W)")


class Channel:
    """Base class of every channel. Subclasses set the class attributes and implement
    ``corrupt``, ``condition`` and ``cond_size``; linear channels also set ``linear = True``
    and implement ``A``, ``At`` and ``noise_std``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    data_kinds: ClassVar[frozenset[str]] = frozenset({"image"})
    linear: ClassVar[bool] = False
    api_version: ClassVar[int] = 1
    differentiable: ClassVar[bool] = False
    """(v2) :meth:`forward` is differentiable in ``x`` for a non-linear channel (linear ones always are)."""
    masked_observation: ClassVar[bool] = False
    """(v2) ``y`` is the data with entries hidden, and :meth:`observation_mask` says which."""
    gaussian_denoising: ClassVar[bool] = False
    """``y = x + s * eps``: ``linear``, ``A`` and ``At`` the identity, ``eps`` standard Gaussian
    independent across entries, ``s = noise_std(obs) > 0`` one known level for every observation."""

    def __init__(self, **values: Any) -> None:
        known = {p.name: p for p in self.params}
        unknown = sorted(set(values) - set(known))
        if unknown:
            names = ", ".join(known) or "none"
            raise ChannelError(f"channel {self.name!r} has no parameter {unknown[0]!r} (parameters: {names})")
        self.values: dict[str, Any] = {
            n: p.parse(values[n]) if n in values else p.default for n, p in known.items()
        }
        self.validate()

    def validate(self) -> None:
        """Cross-parameter checks; raise ``ChannelError``. Single parameters use ``Param.check``."""

    def __getattr__(self, item: str) -> Any:
        values = self.__dict__.get("values")
        if values is not None and item in values:
            return values[item]
        raise AttributeError(item)

    def spec(self) -> dict[str, Any]:
        """A JSON-able description that rebuilds this channel: name, interface version, parameters."""
        return {"name": self.name, "api_version": self.api_version, "params": dict(self.values)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.values.items())
        return f"{type(self).__name__}({args})"

    def check_data(self, shape: tuple[int, ...]) -> None:
        """Refuse data this channel cannot corrupt, with a one-line reason."""
        kind = data_kind(tuple(shape))
        if kind not in self.data_kinds:
            accepted = " or ".join(sorted(self.data_kinds))
            raise ChannelError(
                f"channel {self.name!r} accepts {accepted} data, not {kind} data of shape {tuple(shape)}"
            )

    def corrupt(self, x: torch.Tensor, seeds: torch.Tensor) -> Observation:
        """Draw one observation per sample of the batch ``x``; sample ``i`` uses ``seeds[i]`` only.

        Returns named tensors with a leading batch dimension; ``y`` is always present.
        """
        raise NotImplementedError

    def condition(self, obs: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """The conditioning tensor for a network: ``(B, cond_size, H, W)`` for images,
        ``(B, cond_size)`` for vectors, where ``shape`` is the clean data's shape."""
        raise NotImplementedError

    def cond_size(self, shape: tuple[int, ...]) -> int:
        """Number of conditioning channels (images) or features (vectors) for data ``shape``."""
        raise NotImplementedError

    def A(self, obs: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Linear channels: the noiseless measurement ``A x`` for each sample (same shape as ``y``)."""
        raise ChannelError(f"channel {self.name!r} has no linear form")

    def At(self, obs: Mapping[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """Linear channels: the adjoint ``A^T y``, shaped like the clean data."""
        raise ChannelError(f"channel {self.name!r} has no linear form")

    def noise_std(self, obs: Mapping[str, torch.Tensor]) -> float:
        """Linear channels: the observation noise level ``s``."""
        raise ChannelError(f"channel {self.name!r} has no linear form")

    def forward(self, obs: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """(v2) The noiseless measurement ``F(x)`` of each sample, shaped like ``y`` and
        differentiable in ``x``. Default: ``A x`` for linear channels; a non-linear channel that
        sets ``differentiable = True`` overrides it."""
        if self.linear:
            return self.A(obs, x)
        raise ChannelError(f"channel {self.name!r} has no differentiable forward model")

    def observation_mask(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(v2) For ``masked_observation`` channels: a 0/1 float tensor shaped like the clean data
        batch (1 = the entry is observed in ``y``)."""
        raise ChannelError(f"channel {self.name!r} does not observe a masked image")

    def exact_entries(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """(v2) A 0/1 float tensor shaped like the clean data batch, 1 where the observation ``y``
        holds the entry of ``x`` exactly (noiseless), or None when no entry is exact. Default: the
        observation mask of a noiseless linear ``masked_observation`` channel."""
        if self.masked_observation and self.linear and float(self.noise_std(obs)) == 0.0:
            return self.observation_mask(obs)
        return None

    def import_fields(self, shape: tuple[int, ...]) -> tuple[ImportField, ...]:
        """(v2) What an observation of data ``shape`` holds beyond ``y``, for ``diffem import``.

        Default: every other tensor :meth:`corrupt` returns, with its shape and dtype and any
        finite value, from a data set column or a safetensors file (scalars also from a ``params``
        table). A non-linear channel returning more than ``y`` must declare its own fields: it
        cannot be imported otherwise.
        """
        import torch

        self.check_data(tuple(shape))
        trial = self.corrupt(torch.zeros(1, *shape), sample_seeds(0, [0]))
        extra = {k: v for k, v in trial.items() if k != "y"}
        if extra and not self.linear:
            raise ChannelError(
                f"channel {self.name!r} cannot be imported: it is not linear and does not declare what its "
                f"observation tensors {sorted(extra)} hold (Channel.import_fields)"
            )
        return tuple(
            ImportField(
                k,
                tuple(v.shape[1:]),
                str(v.dtype).removeprefix("torch."),
                sources=("column", "safetensors", "params") if v.dim() == 1 else ("column", "safetensors"),
            )
            for k, v in extra.items()
        )

    def start(self, obs: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """A crude clean-space estimate from the observation, used to start EM when the channel
        has no linear form and no warm start is given. Default: ``y`` itself when it has the
        data's shape."""
        y = obs["y"]
        if tuple(y.shape[1:]) != tuple(shape):
            raise ChannelError(
                f"channel {self.name!r} cannot start EM from its observation; use --warm-start"
            )
        return y.clone()
