"""The built-in channels: shapes, statistics, per-sample seeding, linear forms and parameter checks."""

from __future__ import annotations

import math

import kornia
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from diffem_channels import Channel, ChannelError, Param, in_range, non_negative, positive, sample_seeds
from diffem_channels.blur import BlurChannel
from diffem_channels.box import BoxChannel
from diffem_channels.jpeg import JpegChannel
from diffem_channels.mask import MaskChannel
from diffem_channels.noise import NoiseChannel
from diffem_channels.projection import ProjectionChannel
from diffem_channels.testing import check_channel

IMAGE = (3, 12, 12)
VECTOR = (5,)

# (channel, data shape): every built-in on every data kind it accepts.
CASES = [
    (MaskChannel(sigma=0.1), IMAGE),
    (MaskChannel(per_channel=True), IMAGE),
    (MaskChannel(sigma=0.1), VECTOR),
    (BoxChannel(sigma=0.05), IMAGE),
    (BlurChannel(sigma=1.5, noise_sigma=0.1), IMAGE),
    (BlurChannel(sigma=0.8), (1, 28, 28)),
    (JpegChannel(quality=30), IMAGE),
    (JpegChannel(quality=30), (1, 16, 16)),
    (NoiseChannel(sigma=0.2), IMAGE),
    (NoiseChannel(sigma=0.2), VECTOR),
    (ProjectionChannel(m=2, sigma=0.1), VECTOR),
]
IDS = [f"{c.name}-{'x'.join(map(str, s))}-{i}" for i, (c, s) in enumerate(CASES)]
LINEAR = [(c, s) for c, s in CASES if c.linear]


def data(
    shape: tuple[int, ...], batch: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Uniform random data in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((batch, *shape), generator=g, dtype=dtype) * 2 - 1).clamp(-1, 1)


@pytest.mark.parametrize(("channel", "shape"), CASES, ids=IDS)
def test_sample_depends_only_on_its_seed(channel: Channel, shape: tuple[int, ...]) -> None:
    x = data(shape)
    seeds = sample_seeds(7, range(8))
    whole = channel.corrupt(x, seeds)
    first, rest = channel.corrupt(x[:3], seeds[:3]), channel.corrupt(x[3:], seeds[3:])
    assert set(whole) == set(first) == set(rest) and "y" in whole
    for key, value in whole.items():
        assert torch.equal(value, torch.cat([first[key], rest[key]])), key
    again = channel.corrupt(x, seeds)
    assert all(torch.equal(whole[k], again[k]) for k in whole)
    deterministic = channel.name == "jpeg" or (channel.name == "blur" and channel.noise_sigma == 0)
    if not deterministic:
        other = channel.corrupt(x, sample_seeds(8, range(8)))
        assert not torch.equal(whole["y"], other["y"])


@pytest.mark.parametrize(("channel", "shape"), CASES, ids=IDS)
def test_channel_contract(channel: Channel, shape: tuple[int, ...]) -> None:
    """What plugin authors run: seeding per sample, cond_size, exact adjoint, spec round trip."""
    check_channel(channel, shape)
    x = data(shape, batch=4)
    obs = channel.corrupt(x, sample_seeds(0, range(4)))
    cond = channel.condition(obs, shape)
    assert cond.dtype == torch.float32
    if len(shape) == 3:
        assert cond.shape == (4, channel.cond_size(shape), *shape[1:])
    else:
        assert cond.shape == (4, channel.cond_size(shape))


@pytest.mark.parametrize(("channel", "shape"), LINEAR, ids=[f"{c.name}-{len(s)}d" for c, s in LINEAR])
def test_adjoint_and_measurement(channel: Channel, shape: tuple[int, ...]) -> None:
    x = data(shape, seed=1, dtype=torch.float64)
    obs = channel.corrupt(x.float(), sample_seeds(3, range(8)))
    ax = channel.A(obs, x)
    assert ax.shape == obs["y"].shape
    y = torch.randn(ax.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    aty = channel.At(obs, y)
    assert aty.shape == x.shape
    lhs = (ax * y).flatten(1).sum(1)
    rhs = (x * aty).flatten(1).sum(1)
    # float64 throughout: each side is a sum of at most 3 * 12 * 12 products of size <= 1, so the
    # two agree to ~432 * 2^-53 ~ 5e-14; 1e-9 (relative and absolute) leaves a wide margin.
    assert_close(lhs, rhs, 1e-9)
    # y = A x + s * eps: the residual is at most noise of the declared level
    resid = obs["y"].double() - ax
    s = channel.noise_std(obs)
    # |noise| <= 6 s for all 3456 Gaussian draws (P(|z| > 6) ~ 2e-9 each); 1e-5 covers y's float32
    # rounding (|y| <= ~2, half an ulp ~ 1.2e-7) and A's float64 arithmetic.
    assert resid.abs().max() <= 6 * s + 1e-5


def test_mask_statistics_and_shared_colour_mask() -> None:
    rho, sigma = 0.6, 0.2
    channel = MaskChannel(rho=rho, sigma=sigma)
    x = data((3, 32, 32), batch=32)
    obs = channel.corrupt(x, sample_seeds(0, range(32)))
    mask, y = obs["mask"], obs["y"]
    assert mask.shape == (32, 1, 32, 32) and set(mask.unique().tolist()) <= {0.0, 1.0}
    missing = 1 - mask.mean().item()
    assert abs(missing - rho) < 4 * math.sqrt(rho * (1 - rho) / mask.numel())
    hidden = (mask == 0).expand_as(y)
    assert torch.all(y[hidden] == 0)
    noise = (y - x)[~hidden]
    assert abs(noise.std().item() - sigma) < 0.01 and abs(noise.mean().item()) < 0.01


def test_mask_per_channel_and_vectors() -> None:
    obs = MaskChannel(rho=0.5, per_channel=True).corrupt(data((3, 16, 16), 16), sample_seeds(0, range(16)))
    mask = obs["mask"]
    assert mask.shape == (16, 3, 16, 16)
    assert not torch.equal(mask[:, 0], mask[:, 1])  # independent masks per colour channel
    vec = MaskChannel(rho=0.25).corrupt(data((64,), 64), sample_seeds(0, range(64)))
    assert vec["mask"].shape == (64, 64)
    assert abs((1 - vec["mask"].mean().item()) - 0.25) < 0.03
    assert MaskChannel(rho=0.0).corrupt(data((64,), 4), sample_seeds(0, range(4)))["mask"].min() == 1


def test_box_masks_one_rectangle_within_the_size_range() -> None:
    lo, hi, side = 0.25, 0.5, 20
    obs = BoxChannel(min_size=lo, max_size=hi).corrupt(data((1, side, side), 64), sample_seeds(0, range(64)))
    heights = []
    for m in obs["mask"][:, 0]:
        hidden = (m == 0).nonzero()
        (r0, c0), (r1, c1) = hidden.min(0).values, hidden.max(0).values
        h, w = int(r1 - r0 + 1), int(c1 - c0 + 1)
        assert len(hidden) == h * w  # the hidden set is exactly its bounding rectangle
        assert round(lo * side) <= h <= round(hi * side) and round(lo * side) <= w <= round(hi * side)
        heights.append(h)
    assert len(set(heights)) > 2  # sizes vary
    full = BoxChannel(min_size=1.0, max_size=1.0).corrupt(data((3, 8, 8), 2), sample_seeds(0, range(2)))
    assert full["mask"].sum() == 0 and full["y"].abs().sum() == 0


def test_blur_matches_an_explicit_gaussian_convolution() -> None:
    sigma = 1.3
    channel = BlurChannel(sigma=sigma)
    k = channel.kernel_size
    assert k % 2 == 1 and k == 2 * math.ceil(3 * sigma) + 1
    r = torch.arange(k, dtype=torch.float64) - k // 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(3, 1, k, k)
    x = data((3, 16, 16), 4, dtype=torch.float64)
    expected = F.conv2d(x, kernel, padding=k // 2, groups=3)  # zero padding
    got = channel.corrupt(x, sample_seeds(0, range(4)))["y"]
    # float64 data give float64 blurs: sums of k^2 = 81 terms of size <= 1, equal to ~1e-14
    assert_close(got, expected)
    by_kornia = kornia.filters.gaussian_blur2d(x, (k, k), (sigma, sigma), border_type="constant")
    assert_close(got, by_kornia)


def test_jpeg_round_trip_quality_and_range() -> None:
    x = F.avg_pool2d(data((3, 32, 32), 4, seed=5), 3, stride=1, padding=1)  # smooth-ish images
    seeds = sample_seeds(0, range(4))
    errors = []
    for q in (5, 30, 95):
        y = JpegChannel(quality=q).corrupt(x, seeds)["y"]
        assert y.shape == x.shape and y.min() >= -1 - 1e-5 and y.max() <= 1 + 1e-5
        errors.append((y - x).pow(2).mean().item())
    assert errors[0] > errors[1] > errors[2] > 0
    odd = JpegChannel().corrupt(data((1, 13, 21), 2), seeds[:2])["y"]
    assert odd.shape == (2, 1, 13, 21)
    with pytest.raises(ChannelError, match="linear"):
        JpegChannel().A({"y": odd}, odd)


def test_noise_statistics() -> None:
    x = data((4, 16, 16), 16)
    y = NoiseChannel(sigma=0.3).corrupt(x, sample_seeds(0, range(16)))["y"]
    assert abs((y - x).std().item() - 0.3) < 0.01


def test_projection_rows_and_noise_level() -> None:
    n, m, sigma, b = 5, 2, 0.05, 2048
    x = data((n,), b)
    obs = ProjectionChannel(m=m, sigma=sigma).corrupt(x, sample_seeds(0, range(b)))
    a, y = obs["A"], obs["y"]
    assert a.shape == (b, m, n) and y.shape == (b, m)
    # rows normalised in float64, then rounded to float32 (2^-24 relative each) and their norm
    # summed in float32 over n = 5 terms: |norm - 1| <= ~(n + 2) 2^-24 ~ 4e-7 < 1e-6
    assert_close(a.norm(dim=-1), torch.ones(b, m))
    resid = y - torch.einsum("bmn,bn->bm", a, x)
    assert abs(resid.std().item() - sigma) < 0.003
    raw = ProjectionChannel(m=3, normalize=False).corrupt(x, sample_seeds(0, range(b)))["A"]
    assert abs(raw.std().item() - 1) < 0.03 and not torch.allclose(raw.norm(dim=-1), torch.ones(b, 3))
    assert_close(
        ProjectionChannel(m=m, features=False).condition(obs, (n,)), torch.cat([y, a.reshape(b, -1)], 1)
    )
    cond = ProjectionChannel(m=m).condition(obs, (n,))
    assert cond.shape == (b, m + m * n + n + n * n)
    assert_close(cond[:, : m + m * n], torch.cat([y, a.reshape(b, -1)], 1))
    x_ls, proj = cond[:, m + m * n : m + m * n + n], cond[:, m + m * n + n :].reshape(b, n, n)
    # A^+ y reproduces the measurements, and A^+ A is the orthogonal projector onto A's row space.
    # A^+ is computed in float64 and rounded to float32, then used in float32 sums of n = 5 terms:
    # errors ~ (n + 2) 2^-24 kappa(A) |y| with kappa(A) <= 21 for these seeded A (float64 draws,
    # the same on every CPU) and |y| <= 1.7, i.e. <= 1.5e-5 < 1e-4.
    assert_close(torch.einsum("bmn,bn->bm", a, x_ls), y, tol=1e-4)
    assert_close(proj @ proj, proj, tol=1e-4)
    assert_close(proj, proj.transpose(1, 2), tol=1e-4)


@pytest.mark.parametrize(
    ("channel", "shape", "match"),
    [
        (ProjectionChannel(), (3, 8, 8), "vector"),
        (ProjectionChannel(m=6), (5,), "m <= n"),
        (JpegChannel(), (5,), "image"),
        (JpegChannel(), (2, 8, 8), "1 or 3"),
        (BlurChannel(), (5,), "image"),
        (BoxChannel(), (5,), "image"),
        (MaskChannel(), (2, 3), "neither"),
    ],
)
def test_wrong_data_is_refused(channel: Channel, shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ChannelError, match=match):
        channel.check_data(shape)
    with pytest.raises(ChannelError):
        channel.corrupt(torch.zeros((2, *shape)), sample_seeds(0, range(2)))


@pytest.mark.parametrize(
    ("cls", "values", "param"),
    [
        (MaskChannel, {"rho": 1.0}, "rho"),
        (MaskChannel, {"rho": -0.1}, "rho"),
        (MaskChannel, {"rho": "abc"}, "rho"),
        (MaskChannel, {"sigma": -1}, "sigma"),
        (MaskChannel, {"per_channel": "maybe"}, "per_channel"),
        (MaskChannel, {"bogus": 1}, "bogus"),
        (NoiseChannel, {"sigma": -1}, "sigma"),
        (NoiseChannel, {"sigma": 0}, "sigma"),
        (BlurChannel, {"sigma": 0}, "sigma"),
        (BlurChannel, {"noise_sigma": float("nan")}, "noise_sigma"),
        (BoxChannel, {"min_size": 0.6, "max_size": 0.5}, "min_size"),
        (BoxChannel, {"max_size": 1.5}, "max_size"),
        (JpegChannel, {"quality": 0}, "quality"),
        (JpegChannel, {"quality": 2.5}, "quality"),
        (ProjectionChannel, {"m": 0}, "m"),
        (ProjectionChannel, {"m": "two"}, "m"),
    ],
)
def test_invalid_parameters_name_the_parameter(cls: type[Channel], values: dict, param: str) -> None:
    with pytest.raises(ChannelError, match=f"'{param}'"):
        cls(**values)


def test_string_parameters_and_spec_round_trip() -> None:
    channel = MaskChannel(rho="0.5", sigma="0.01", per_channel="true")
    assert channel.values == {"rho": 0.5, "sigma": 0.01, "per_channel": True}
    spec = channel.spec()
    assert spec == {"name": "mask", "api_version": 2, "params": channel.values}
    assert MaskChannel(**spec["params"]).values == channel.values
    assert JpegChannel(quality="40").quality == 40


def test_param_constraints_are_described() -> None:
    assert Param("a", float, 0.5, check=in_range(0, 1, hi_open=True)).constraint == "in [0, 1)"
    assert Param("b", float, 1.0, check=positive).constraint == "> 0"
    assert Param("c", float, 0.0, check=non_negative).constraint == ">= 0"
    assert Param("d", str, "x", choices=("x", "y")).constraint == "one of 'x', 'y'"
    assert Param("e", int, 1, check=lambda v: None).constraint == "custom check"
    assert Param("f", bool, True).constraint == ""
