"""The contract diffem relies on from every channel, as one call for plugin authors' tests.

``check_channel(channel, shape)`` corrupts a small random batch of clean data of ``shape`` and
raises ``AssertionError`` (with a one-line reason) at the first broken promise:

- observations: a dict of tensors with the batch as leading dimension, holding ``y`` and no
  ``index``, finite, reproducible from the seeds;
- per-sample seeding: sample ``i`` depends on ``seeds[i]`` only, bit for bit, whatever batch it
  sits in (split, permuted, alone), so data sets do not depend on the chunk size;
- ``condition`` returns ``(B, cond_size, H, W)`` for images and ``(B, cond_size)`` for vectors;
- linear channels: ``A x`` has ``y``'s shape, ``A^T v`` has ``x``'s, ``A`` is linear, the adjoint
  is exact (``<A x, v> == <x, A^T v>`` to rounding), ``noise_std`` is a number >= 0 and, when it
  is 0, ``y == A x`` to rounding;
- ``gaussian_denoising`` channels: linear, ``A x == x`` and ``A^T y == y`` bit for bit,
  ``noise_std`` > 0, and the residuals ``y - x`` of a fixed batch of at least
  :data:`DENOISING_ENTRIES` entries have mean 0, standard deviation ``noise_std`` and no
  correlation between neighbouring entries, each to 5 standard errors (see ``_check_denoising``);
- entries declared exact (``exact_entries``) form a 0/1 tensor shaped like the data, and ``y``
  equals ``x`` there bit for bit;
- import fields (``import_fields``, unless the channel cannot be imported): one per tensor
  besides ``y``, with its per-sample shape, and the drawn observations within their declared values;
- the spec round trip: ``spec()`` is JSON-able and rebuilds an equal channel (through the
  registry when the channel is installed, else through its class) that gives the same output;
- data kinds the channel does not accept are refused by ``check_data`` with a ``ChannelError``.

Tolerances follow from float32 arithmetic: a sum of ``K`` float32 products is exact to
``K * 2^-24`` times the sum of the magnitudes of its terms; see ``_tolerance``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from diffem_channels.base import API_VERSION, Channel, ChannelError, data_kind, sample_seeds

BATCH = 6
U32 = 2.0**-24  # float32 unit roundoff
U64 = 2.0**-53

_OTHER_SHAPES = {"vector": (6,), "image": (3, 8, 8)}
DENOISING_ENTRIES = 2**14
"""Noise entries drawn, at least, to check a ``gaussian_denoising`` channel's noise statistics."""


def _fail(channel: Channel, message: str) -> AssertionError:
    return AssertionError(f"channel {channel.name!r}: {message}")


def _data(shape: tuple[int, ...], batch: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((batch, *shape), generator=g, dtype=torch.float64).mul(2).sub(1).to(dtype)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> str | None:
    if set(a) != set(b):
        return f"keys {sorted(a)} vs {sorted(b)}"
    for k in a:
        if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k]):
            return k
    return None


def _tolerance(terms: int, scale: float, dtype: torch.dtype) -> float:
    """Rounding bound of a computation that sums ``terms`` products of total size ``scale``.

    ``terms * u * scale`` with ``u`` the unit roundoff of ``dtype`` (float32 unless the channel
    computed in float64), times 4 for the handful of operations around each sum.
    """
    u = U64 if dtype == torch.float64 else U32
    return 4.0 * terms * u * scale + 1e-30


def _check_observation(channel: Channel, obs: Any, batch: int) -> None:
    if not isinstance(obs, dict) or "y" not in obs:
        raise _fail(channel, "corrupt must return a dict of tensors holding 'y'")
    if "index" in obs:
        raise _fail(channel, "corrupt must not return an 'index' entry (diffem adds it)")
    for k, v in obs.items():
        if not isinstance(v, torch.Tensor):
            raise _fail(channel, f"observation {k!r} is a {type(v).__name__}, not a tensor")
        if v.ndim < 1 or v.shape[0] != batch:
            raise _fail(
                channel, f"observation {k!r} has shape {tuple(v.shape)}, not a leading batch of {batch}"
            )
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise _fail(channel, f"observation {k!r} holds non-finite values")


def _check_seeding(channel: Channel, x: torch.Tensor, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
    whole = channel.corrupt(x, seeds)
    _check_observation(channel, whole, len(x))
    again = channel.corrupt(x.clone(), seeds.clone())
    if (bad := _same(whole, again)) is not None:
        raise _fail(channel, f"the same samples and seeds gave another observation ({bad})")
    n = len(x)
    cuts = [0, 1, min(4, n), n]  # one sample alone, then uneven chunks
    parts = [channel.corrupt(x[a:b], seeds[a:b]) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
    joined = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    if (bad := _same(whole, joined)) is not None:
        raise _fail(
            channel,
            f"observation {bad!r} changes when the batch is cut into chunks: sample i must depend on "
            "seeds[i] only (draw with diffem_channels.per_sample; compute batched reductions in float64)",
        )
    perm = torch.arange(n - 1, -1, -1)
    shuffled = channel.corrupt(x[perm], seeds[perm])
    if (bad := _same({k: v[perm] for k, v in whole.items()}, shuffled)) is not None:
        raise _fail(channel, f"observation {bad!r} changes with the order of the batch")
    return whole


def _check_condition(channel: Channel, obs: dict[str, torch.Tensor], shape: tuple[int, ...]) -> None:
    size = channel.cond_size(shape)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _fail(channel, f"cond_size must be an int >= 0, got {size!r}")
    cond = channel.condition(obs, shape)
    batch = len(obs["y"])
    want = (batch, size, *shape[1:]) if len(shape) == 3 else (batch, size)
    if not isinstance(cond, torch.Tensor) or tuple(cond.shape) != want:
        got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
        raise _fail(channel, f"condition returned {got}, expected {want} (cond_size = {size})")
    if cond.dtype != torch.float32 or not torch.isfinite(cond).all():
        raise _fail(channel, f"condition must be finite float32, got {cond.dtype}")


def _check_exact(channel: Channel, x: torch.Tensor, obs: dict[str, torch.Tensor]) -> None:
    """Entries declared exact hold ``x`` itself in ``y``, bit for bit: methods write ``y`` there."""
    exact = channel.exact_entries(obs)
    if exact is None:
        return
    if not isinstance(exact, torch.Tensor) or tuple(exact.shape) != tuple(x.shape):
        got = tuple(exact.shape) if isinstance(exact, torch.Tensor) else type(exact).__name__
        raise _fail(channel, f"exact_entries returned {got}, expected the data batch's {tuple(x.shape)}")
    if not bool(((exact == 0) | (exact == 1)).all()):
        raise _fail(channel, "exact_entries must hold only 0 and 1")
    y = obs["y"]
    if tuple(y.shape) != tuple(x.shape):
        raise _fail(channel, "exact_entries needs observations 'y' shaped like the data")
    if not torch.equal(exact * y.to(x), exact * x):
        raise _fail(channel, "an entry declared exact by exact_entries differs between y and x")


def _check_import(channel: Channel, obs: dict[str, torch.Tensor], shape: tuple[int, ...]) -> None:
    """``import_fields`` describes the tensors ``corrupt`` draws, and those satisfy it."""
    try:
        fields = channel.import_fields(shape)
    except ChannelError:  # a channel that cannot be imported says so
        return
    names = sorted(f.name for f in fields)
    if names != sorted(k for k in obs if k != "y"):
        held = sorted(k for k in obs if k != "y")
        raise _fail(channel, f"import_fields declares {names}, the observations hold {held} besides 'y'")
    for f in fields:
        t = obs[f.name]
        if tuple(t.shape[1:]) != tuple(f.shape):
            got = tuple(t.shape[1:])
            raise _fail(channel, f"import field {f.name!r} has shape {f.shape}, the observations {got}")
        if f.values is not None:
            lo, hi = f.values
            ok = ((t == lo) | (t == hi)) if f.binary else ((t >= lo) & (t <= hi))
            if not bool(ok.all()):
                raise _fail(channel, f"observations of {f.name!r} break its declared values {f.values}")
        reason = f.check(t) if f.check is not None else None
        if reason:
            raise _fail(channel, f"observations of {f.name!r} fail its import check: {reason}")


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() * b.double()).flatten(1).sum(1)


def _check_linear(
    channel: Channel, x: torch.Tensor, obs: dict[str, torch.Tensor], shape: tuple[int, ...]
) -> None:
    y = obs["y"]
    ax = channel.A(obs, x)
    if tuple(ax.shape) != tuple(y.shape):
        raise _fail(channel, f"A(obs, x) has shape {tuple(ax.shape)}, y has {tuple(y.shape)}")
    v = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
    atv = channel.At(obs, v)
    if tuple(atv.shape) != tuple(x.shape):
        raise _fail(channel, f"At(obs, v) has shape {tuple(atv.shape)}, x has {tuple(x.shape)}")
    n, m = x[0].numel(), y[0].numel()
    # <A x, v> == <x, A^T v>: each side is exact but for the rounding of A x (or A^T v), sums of at
    # most n (or m) float32 products, and of the inner product itself (accumulated in float64 here).
    lhs, rhs = _dot(ax, v), _dot(x, atv)
    scale = (ax.double().flatten(1).norm(dim=1) * v.double().flatten(1).norm(dim=1)) + (
        x.double().flatten(1).norm(dim=1) * atv.double().flatten(1).norm(dim=1)
    )
    tol = torch.tensor([_tolerance(n + m, float(s), ax.dtype) for s in scale], dtype=torch.float64)
    if ((lhs - rhs).abs() > tol).any():
        worst = int(((lhs - rhs).abs() / tol).argmax())
        raise _fail(
            channel,
            f"At is not the adjoint of A: <A x, v> = {float(lhs[worst]):.9g} but <x, A^T v> = "
            f"{float(rhs[worst]):.9g} (sample {worst}, tolerance {float(tol[worst]):.2g})",
        )
    # linearity: A(2 x1 - x2) == 2 A x1 - A x2 to rounding
    x2 = _data(shape, len(x), seed=2)
    lin = channel.A(obs, 2 * x - x2) - (2 * ax - channel.A(obs, x2))
    bound = _tolerance(n, 3.0 * float(ax.abs().max() + channel.A(obs, x2).abs().max()) + 1.0, ax.dtype)
    if lin.abs().max() > bound:
        raise _fail(channel, f"A is not linear in x (error {float(lin.abs().max()):.3g})")
    s = channel.noise_std(obs)
    if not isinstance(s, int | float) or isinstance(s, bool) or not s >= 0:
        raise _fail(channel, f"noise_std must be a number >= 0, got {s!r}")
    if s == 0:
        err = (y.double() - ax.double()).abs().max()
        if err > _tolerance(n, float(y.abs().max()) + 1.0, torch.float32):
            raise _fail(channel, f"noise_std is 0 but y differs from A x by {float(err):.3g}")


def _check_denoising(channel: Channel, shape: tuple[int, ...], seed: int) -> None:
    """A ``gaussian_denoising`` channel is ``y = x + s * eps``: ``A`` and ``At`` the identity bit for
    bit, and the residuals ``r = y - x`` of ``n`` entries look like ``n`` independent ``N(0, s^2)``.

    Each statistic gets 5 standard errors of ``n`` such draws: the mean ``s / sqrt(n)``; the root
    mean square (the standard deviation about the promised mean 0) ``s sqrt(1 / (2 n))``, as for a
    sample standard deviation; the mean product of horizontal neighbours over ``s^2`` (their
    correlation) ``1 / sqrt(pairs)``. The float32 rounding of ``y``, up to ``u max|y|`` per entry,
    is added to the first two (and, relative to ``s``, to the third).
    """
    if not channel.linear:
        raise _fail(channel, "declares gaussian_denoising but is not linear (set linear = True)")
    batch = max(BATCH, math.ceil(DENOISING_ENTRIES / math.prod(shape)))
    x = _data(shape, batch, seed=3)
    obs = channel.corrupt(x, sample_seeds(seed, range(batch)))
    y = obs["y"]
    if not torch.equal(channel.A(obs, x), x):
        raise _fail(channel, "declares gaussian_denoising but A(obs, x) is not x bit for bit")
    if not torch.equal(channel.At(obs, y), y):
        raise _fail(channel, "declares gaussian_denoising but At(obs, y) is not y bit for bit")
    s = float(channel.noise_std(obs))
    if not s > 0:
        raise _fail(channel, f"declares gaussian_denoising but noise_std is {s:g}, not > 0")
    r = y.double() - x.double()
    n = r.numel()
    rounding = 2.0 * U32 * float(y.abs().max())
    mean, rms = float(r.mean()), float(r.pow(2).mean().sqrt())
    if abs(mean) > (tol := 5.0 * s / math.sqrt(n) + rounding):
        raise _fail(
            channel, f"declares gaussian_denoising but y - x has mean {mean:.3g} (tolerance {tol:.2g})"
        )
    if abs(rms - s) > (tol := 5.0 * s * math.sqrt(1.0 / (2 * n)) + rounding):
        raise _fail(
            channel,
            f"declares gaussian_denoising with noise_std {s:.6g} but y - x has standard deviation "
            f"{rms:.6g} about 0 (tolerance {tol:.2g} over {n} entries)",
        )
    pairs = r[..., 1:] * r[..., :-1]
    if pairs.numel():
        corr = float(pairs.mean()) / (s * s)
        if abs(corr) > (tol := 5.0 / math.sqrt(pairs.numel()) + 2.0 * rounding / s):
            raise _fail(
                channel,
                f"declares gaussian_denoising but neighbouring entries of y - x correlate ({corr:.3g}, "
                f"tolerance {tol:.2g}): the noise must be independent across entries",
            )


def _check_spec(
    channel: Channel, x: torch.Tensor, seeds: torch.Tensor, whole: dict[str, torch.Tensor]
) -> None:
    spec = channel.spec()
    try:
        text = json.dumps(spec, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise _fail(channel, f"spec() is not JSON-able ({e})") from None
    spec = json.loads(text)
    rebuilt: Channel | None = None
    try:
        from diffem_cli.core.errors import DiffemError
        from diffem_cli.io.registry import channel_from_spec
    except ImportError:  # the channel package alone, without diffem's CLI
        pass
    else:
        try:
            rebuilt = channel_from_spec(spec)
        except DiffemError:
            rebuilt = None  # not installed under its name (a test of an uninstalled class)
    if rebuilt is None:
        rebuilt = type(channel)(**spec["params"])
    if rebuilt.spec() != channel.spec():
        raise _fail(channel, f"spec round trip changed the channel: {rebuilt.spec()} vs {channel.spec()}")
    if (bad := _same(whole, rebuilt.corrupt(x, seeds))) is not None:
        raise _fail(channel, f"the channel rebuilt from its spec observes differently ({bad})")


def check_channel(channel: Channel, shape: tuple[int, ...], *, seed: int = 0) -> None:
    """Check ``channel`` against diffem's channel contract on clean data of ``shape``.

    Raises ``AssertionError`` naming the first broken promise (see the module docstring); returns
    None when every check passes. Data are uniform in [-1, 1] (diffem's image scale).
    """
    if not isinstance(channel, Channel):
        raise AssertionError(f"{channel!r} is not a diffem_channels.Channel")
    if not channel.name or not isinstance(channel.name, str):
        raise _fail(channel, "the class needs a non-empty name")
    if not channel.description or "\n" in channel.description:
        raise _fail(channel, "the class needs a one-line description")
    if not isinstance(channel.api_version, int) or not 1 <= channel.api_version <= API_VERSION:
        raise _fail(channel, f"api_version {channel.api_version!r} is not in [1, {API_VERSION}]")
    shape = tuple(int(s) for s in shape)
    kind = data_kind(shape)
    if kind not in channel.data_kinds:
        raise _fail(
            channel, f"{kind} data of shape {shape} is not among its data kinds {sorted(channel.data_kinds)}"
        )
    channel.check_data(shape)
    for other, example in _OTHER_SHAPES.items():
        if other not in channel.data_kinds:
            try:
                channel.check_data(example)
            except ChannelError:
                pass
            else:
                raise _fail(
                    channel, f"check_data accepts {other} data of shape {example}, not among its kinds"
                )
    x = _data(shape, BATCH, seed)
    seeds = sample_seeds(seed, range(BATCH))
    whole = _check_seeding(channel, x, seeds)
    _check_condition(channel, whole, shape)
    _check_exact(channel, x, whole)
    _check_import(channel, whole, shape)
    if channel.linear:
        _check_linear(channel, x, whole, shape)
    if channel.gaussian_denoising:
        _check_denoising(channel, shape, seed)
    _check_spec(channel, x, seeds, whole)
