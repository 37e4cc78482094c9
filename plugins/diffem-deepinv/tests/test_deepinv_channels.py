"""diffem-deepinv's channels: diffem's channel contract, per-sample seeding, exact adjoints, and
agreement with the deepinv operators they wrap."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

deepinv = pytest.importorskip("deepinv")

import torch  # noqa: E402
from deepinv.physics.functional import gaussian_blur  # noqa: E402
from deepinv.physics.generator import BernoulliSplittingMaskGenerator  # noqa: E402
from dinv_helpers import file_bytes, run_ok  # noqa: E402

from diffem_channels import ChannelError, mix_seed, per_sample, sample_seeds  # noqa: E402
from diffem_channels.testing import check_channel  # noqa: E402
from diffem_cli.io.registry import list_channels, make_channel  # noqa: E402
from diffem_cli.io.sources import TensorSource  # noqa: E402
from diffem_cli.pipeline.corrupt import corrupt_dataset  # noqa: E402

NAMES = ["dinv-inpainting", "dinv-blur", "dinv-downsampling", "dinv-cs", "dinv-denoising"]

CASES = [
    pytest.param("dinv-inpainting", {}, (1, 8, 8), id="inpainting"),
    pytest.param("dinv-inpainting", {"mask": 0.3, "noise_sigma": 0.1}, (3, 8, 8), id="inpainting-noisy-rgb"),
    pytest.param(
        "dinv-inpainting", {"pixelwise": False, "noise_sigma": 0.05}, (3, 8, 6), id="inpainting-chan"
    ),
    pytest.param("dinv-inpainting", {"mask": 0.7}, (12,), id="inpainting-vector"),
    pytest.param("dinv-blur", {}, (1, 8, 8), id="blur"),
    pytest.param(
        "dinv-blur",
        {"sigma": 1.5, "sigma2": 0.5, "angle": 30, "padding": "reflect", "noise_sigma": 0.05},
        (3, 16, 12),
        id="blur-anisotropic-reflect",
    ),
    pytest.param("dinv-blur", {"padding": "valid", "kernel_size": 3}, (1, 8, 8), id="blur-valid"),
    pytest.param("dinv-blur", {"padding": "replicate", "kernel_size": 5}, (2, 8, 8), id="blur-replicate"),
    pytest.param("dinv-blur", {"padding": "constant"}, (1, 8, 8), id="blur-constant"),
    pytest.param("dinv-downsampling", {}, (1, 8, 8), id="downsampling"),
    pytest.param(
        "dinv-downsampling", {"filter": "gaussian", "noise_sigma": 0.05}, (3, 16, 16), id="downsampling-gauss"
    ),
    pytest.param("dinv-downsampling", {"filter": "none", "factor": 4}, (1, 8, 8), id="downsampling-bare"),
    pytest.param(
        "dinv-downsampling", {"filter": "sinc", "padding": "reflect"}, (1, 8, 8), id="downsampling-sinc"
    ),
    pytest.param(
        "dinv-downsampling", {"filter": "bilinear", "padding": "replicate"}, (2, 8, 8), id="ds-bilin"
    ),
    pytest.param("dinv-cs", {}, (1, 8, 8), id="cs"),
    pytest.param(
        "dinv-cs", {"m": 20, "channelwise": True, "noise_sigma": 0.1}, (3, 8, 8), id="cs-channelwise"
    ),
    pytest.param(
        "dinv-cs", {"m": 80, "matrix_seed": 3, "noise_sigma": 0.01}, (1, 8, 8), id="cs-overcomplete"
    ),
    pytest.param("dinv-denoising", {}, (1, 8, 8), id="denoising"),
    pytest.param("dinv-denoising", {"noise_sigma": 0.3}, (5,), id="denoising-vector"),
]


def _x(
    shape: tuple[int, ...], batch: int = 6, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((batch, *shape), generator=g, dtype=torch.float64).mul(2).sub(1).to(dtype)


def test_the_five_channels_are_installed_entry_points_of_this_distribution() -> None:
    found = {i.name: i for i in list_channels(load=True) if i.name.startswith("dinv-")}
    assert sorted(found) == sorted(NAMES)
    for info in found.values():
        assert info.error is None, info.error
        assert info.dist.replace("_", "-") == "diffem-deepinv"
        assert info.value.startswith("diffem_deepinv.channels:")


def test_listing_the_channels_does_not_import_deepinv() -> None:
    code = (
        "import sys; from diffem_cli.io.registry import list_channels; "
        "names = [i.name for i in list_channels(load=True) if i.name.startswith('dinv-')]; "
        "assert len(names) == 5, names; assert 'deepinv' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize(("name", "params", "shape"), CASES)
def test_contract(name: str, params: dict, shape: tuple[int, ...]) -> None:
    check_channel(make_channel(name, params), shape)


@pytest.mark.parametrize(("name", "params", "shape"), CASES)
def test_adjoint_to_float32_rounding(name: str, params: dict, shape: tuple[int, ...]) -> None:
    """<A x, v> = <x, A^T v> for each sample, within a tolerance derived from float32 arithmetic.

    Every entry of ``A x`` (or ``A^T v``) is a float32 sum of at most N = n + m products, each
    rounded with relative error at most u = 2^-24. Modelling these roundings as independent, the
    error of such a sum grows like sqrt(N) u times its magnitude, and by Cauchy-Schwarz the error of
    <A x, v> is at most ||error of A x|| ||v||. So we allow 8 sqrt(N) u (||A x|| ||v|| + ||x|| ||A^T v||)
    (the inner products themselves are summed in float64). In float64 the same bound with
    u = 2^-53 checks that the adjoint is exact mathematics, not an approximation that float32 hides.
    """
    channel = make_channel(name, params)
    for dtype, u in ((torch.float32, 2.0**-24), (torch.float64, 2.0**-53)):
        x = _x(shape, 4, seed=5, dtype=dtype)
        obs = channel.corrupt(x.float(), sample_seeds(7, range(4)))
        obs = {k: v.to(dtype) for k, v in obs.items()}
        ax = channel.A(obs, x)
        v = torch.randn(ax.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(dtype)
        atv = channel.At(obs, v)
        assert ax.dtype == dtype and atv.dtype == dtype and atv.shape == x.shape

        def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return (a.double() * b.double()).flatten(1).sum(1)

        def norm(a: torch.Tensor) -> torch.Tensor:
            return a.double().flatten(1).norm(dim=1)

        n_terms = x[0].numel() + ax[0].numel()
        tol = 8 * math.sqrt(n_terms) * u * (norm(ax) * norm(v) + norm(x) * norm(atv))
        err = (dot(ax, v) - dot(x, atv)).abs()
        assert (err <= tol).all(), f"{dtype}: adjoint error {err.max():.3g} > tolerance {tol.min():.3g}"


@pytest.mark.parametrize("name", NAMES)
def test_corrupt_is_byte_identical_whatever_the_chunk_size(name: str, tmp_path: Path, monkeypatch) -> None:
    """The same observation folder, byte for byte, whether the data are corrupted 7 or 1024 at a time."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")  # pins the provenance's time, the one byte that moves
    noisy = ["-p", "noise_sigma=0.05"] if name != "dinv-denoising" else []
    args = ["digits", "--channel", name, *noisy, "--limit", 40, "--seed", 3]
    run_ok("corrupt", args[0], tmp_path / "whole", *args[1:])
    run_ok("corrupt", args[0], tmp_path / "chunks", *args[1:], "--chunk-size", 7)
    whole, chunks = file_bytes(tmp_path / "whole"), file_bytes(tmp_path / "chunks")
    assert whole == chunks
    run_ok("corrupt", args[0], tmp_path / "other", *args[1:-1], 4)
    assert file_bytes(tmp_path / "other") != whole  # another seed, other observations


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("dinv-inpainting", {"pixelwise": False, "noise_sigma": 0.1}),
        ("dinv-blur", {"sigma": 0.7, "padding": "reflect", "noise_sigma": 0.1}),
        ("dinv-downsampling", {"filter": "gaussian", "noise_sigma": 0.1}),
        ("dinv-cs", {"m": 100, "channelwise": True, "noise_sigma": 0.1}),
        ("dinv-denoising", {}),
    ],
)
def test_colour_images_in_chunks_and_alone(name: str, params: dict, tmp_path: Path, monkeypatch) -> None:
    """RGB 16x16 images through the library: chunks of 5 or 64 give the same bytes; each sample
    corrupted alone gives its row."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    src = TensorSource(_x((3, 16, 16), 23, seed=2))
    channel = make_channel(name, params)
    corrupt_dataset(src, channel, tmp_path / "a", seed=1, chunk_size=64, progress=False)
    corrupt_dataset(src, make_channel(name, params), tmp_path / "b", seed=1, chunk_size=5, progress=False)
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")
    seeds = sample_seeds(1, range(23))
    batch = channel.corrupt(src.x, seeds)
    for i in (0, 11, 22):
        alone = channel.corrupt(src.x[i : i + 1], seeds[i : i + 1])
        for k in batch:
            assert torch.equal(alone[k][0], batch[k][i]), k


@pytest.mark.parametrize("name", NAMES)
def test_corrupt_leaves_the_global_generators_alone(name: str) -> None:
    """No draw comes from torch's global generator (nor deepinv's): its state is untouched."""
    params = {"noise_sigma": 0.1}
    channel = make_channel(name, params)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    channel.corrupt(_x((1, 8, 8)), sample_seeds(0, range(6)))
    assert torch.equal(torch.get_rng_state(), before)


def test_noise_level_is_the_deepinv_gaussian_noise_models() -> None:
    from deepinv.physics import GaussianNoise

    for name in NAMES:
        channel = make_channel(name, {"noise_sigma": 0.07})
        x = _x((1, 8, 8))
        channel.corrupt(x, sample_seeds(0, range(6)))
        phys = channel.physics((1, 8, 8), x)
        assert isinstance(phys.noise_model, GaussianNoise)
        assert channel.noise_std({}) == 0.07 == float(phys.noise_model.sigma)


def test_inpainting_is_deepinvs_mask_generator_and_operator() -> None:
    channel = make_channel("dinv-inpainting", {"mask": 0.6, "noise_sigma": 0.1})
    x = _x((3, 8, 8))
    seeds = sample_seeds(4, range(6))
    obs = channel.corrupt(x, seeds)
    # each sample's mask is deepinv's BernoulliSplittingMaskGenerator run on a generator seeded for it
    gen = BernoulliSplittingMaskGenerator(img_size=(3, 8, 8), split_ratio=0.6, rng=torch.Generator())
    for i, s in enumerate(seeds.tolist()):
        want = gen.step(batch_size=None, seed=mix_seed(s, 0))["mask"]
        assert torch.equal(want, obs["mask"][i].expand(3, 8, 8))
    # y = N(A x) as deepinv's Inpainting computes it, with diffem's per-sample noise
    mask = obs["mask"]
    eps = per_sample(seeds, (3, 8, 8), "randn", 1)
    assert torch.equal(obs["y"], (mask * x + torch.tensor(0.1) * eps) * mask)
    noiseless = make_channel("dinv-inpainting", {"mask": 0.6}).corrupt(x, seeds)
    assert torch.equal(noiseless["y"], deepinv.physics.Inpainting(img_size=(3, 8, 8), mask=mask)(x))
    # the kept fraction is the mask parameter
    many = make_channel("dinv-inpainting", {"mask": 0.6}).corrupt(
        torch.zeros(400, 1, 8, 8), sample_seeds(0, range(400))
    )
    assert abs(many["mask"].mean().item() - 0.6) < 0.01


def test_blur_is_deepinvs_blur_with_its_gaussian_filter() -> None:
    x = _x((2, 12, 12))
    for padding in ("valid", "circular", "reflect", "replicate", "constant"):
        channel = make_channel("dinv-blur", {"sigma": 1.2, "padding": padding})
        phys = deepinv.physics.Blur(filter=gaussian_blur(sigma=(1.2, 1.2)), padding=padding)
        torch.testing.assert_close(channel.kernel(torch.float32), phys.filter, rtol=0, atol=1e-7)
        want = phys(x)
        got = channel.corrupt(x, sample_seeds(0, range(6)))["y"]
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # float64 inside vs deepinv's float32
        torch.testing.assert_close(channel.A({}, x), want, rtol=0, atol=1e-6)


def test_downsampling_is_deepinvs_downsampling() -> None:
    x = _x((3, 16, 16))
    for filt in ("bicubic", "gaussian", "bilinear", "sinc", "none"):
        channel = make_channel("dinv-downsampling", {"filter": filt, "factor": 2})
        phys = deepinv.physics.Downsampling(
            img_size=(3, 16, 16), filter=None if filt == "none" else filt, factor=2, padding="circular"
        )
        assert torch.equal(channel.A({}, x), phys.A(x))
        v = _x((3, 8, 8), seed=3)
        assert torch.equal(channel.At({"y": v}, v), phys.A_adjoint(v))
        y = channel.corrupt(x, sample_seeds(0, range(6)))["y"]
        torch.testing.assert_close(y, phys(x), rtol=0, atol=1e-6)


def test_cs_matrix_is_gaussian_of_variance_one_over_m_and_fixed_by_its_seed() -> None:
    channel = make_channel("dinv-cs", {"m": 48, "matrix_seed": 5})
    x = _x((1, 8, 8))
    channel.check_data((1, 8, 8))
    a = channel.matrix((1, 8, 8))
    assert a.shape == (48, 64) and a.dtype == torch.float32
    assert abs(a.mean().item()) < 0.02 and abs(a.var().item() * 48 - 1) < 0.15  # A_ij ~ N(0, 1/m)
    phys = channel.physics((1, 8, 8), x)
    assert isinstance(phys, deepinv.physics.CompressedSensing) and torch.equal(phys._A, a)
    torch.testing.assert_close(channel.A({}, x), x.flatten(1) @ a.T, rtol=0, atol=1e-5)
    assert torch.equal(make_channel("dinv-cs", {"m": 48, "matrix_seed": 5}).matrix((1, 8, 8)), a)
    assert not torch.equal(make_channel("dinv-cs", {"m": 48, "matrix_seed": 6}).matrix((1, 8, 8)), a)
    # the pseudo-inverse recovers an image from m >= n measurements (the conditioning of the network)
    over = make_channel("dinv-cs", {"m": 100})
    y = over.corrupt(x, sample_seeds(0, range(6)))["y"]
    torch.testing.assert_close(over.condition({"y": y}, (1, 8, 8)), x, rtol=0, atol=1e-4)


def test_cs_adjoint_needs_the_image_shape_first() -> None:
    channel = make_channel("dinv-cs", {"m": 16})
    y = torch.randn(2, 16)
    with pytest.raises(ChannelError, match="check_data"):
        channel.At({"y": y}, y)
    channel.check_data((1, 8, 8))
    assert channel.At({"y": y}, y).shape == (2, 1, 8, 8)
    channel.check_data((4, 4, 4))  # another shape with as many measurements: ambiguous
    with pytest.raises(ChannelError, match="cannot tell"):
        channel.At({"y": y}, y)


def test_denoising_is_x_plus_sigma_eps() -> None:
    channel = make_channel("dinv-denoising", {"noise_sigma": 0.2})
    x = _x((1, 8, 8))
    seeds = sample_seeds(0, range(6))
    eps = per_sample(seeds, (1, 8, 8), "randn", 1)
    assert torch.equal(channel.corrupt(x, seeds)["y"], x + torch.tensor(0.2) * eps)
    assert torch.equal(channel.A({}, x), x) and torch.equal(channel.At({}, x), x)
    assert channel.gaussian_denoising and not any(
        make_channel(name, {}).gaussian_denoising for name in NAMES if name != "dinv-denoising"
    )


@pytest.mark.parametrize(
    ("name", "params", "shape", "match"),
    [
        ("dinv-blur", {"sigma": 3.0}, (1, 8, 8), "lower sigma"),
        ("dinv-blur", {"kernel_size": 9, "padding": "valid"}, (1, 8, 8), "at least 9x9"),
        ("dinv-downsampling", {"factor": 3}, (1, 8, 8), "divisible"),
        ("dinv-downsampling", {"factor": 4, "filter": "gaussian"}, (1, 8, 8), "wide"),
        ("dinv-cs", {}, (64,), "accepts image"),
        ("dinv-blur", {}, (64,), "accepts image"),
    ],
)
def test_data_the_operator_cannot_take_are_refused(name, params, shape, match) -> None:
    with pytest.raises(ChannelError, match=match):
        make_channel(name, params).check_data(shape)


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("dinv-inpainting", {"mask": 0.0}, "mask"),
        ("dinv-inpainting", {"mask": 1.5}, "mask"),
        ("dinv-blur", {"kernel_size": 4}, "odd"),
        ("dinv-blur", {"padding": "zeros"}, "one of"),
        ("dinv-downsampling", {"filter": "lanczos"}, "one of"),
        ("dinv-cs", {"m": 0}, ">= 1"),
        ("dinv-denoising", {"noise_sigma": 0}, "> 0"),
        ("dinv-blur", {"noise_sigma": -1}, ">= 0"),
    ],
)
def test_bad_parameters_are_refused_in_one_line(name, params, match) -> None:
    with pytest.raises(ChannelError, match=match):
        make_channel(name, params)
