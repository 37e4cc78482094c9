"""``diffem_channels.testing.check_channel`` catches each broken promise with a one-line reason."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

from diffem_channels import Channel, Observation, Param, per_sample
from diffem_channels.noise import NoiseChannel
from diffem_channels.testing import check_channel


class Scale(Channel):
    """A correct linear channel, ``y = c x + s eps`` on vectors; subclasses break one promise each."""

    name = "scale-test"
    description = "Scales vectors (test channel)."
    data_kinds = frozenset({"vector"})
    linear = True
    params = (Param("c", float, 0.5), Param("s", float, 0.0))

    def corrupt(self, x: torch.Tensor, seeds: torch.Tensor) -> Observation:
        y = self.c * x
        if self.s > 0:
            y = y + self.s * per_sample(seeds, tuple(x.shape[1:]))
        return {"y": y}

    def condition(self, obs: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        return obs["y"]

    def cond_size(self, shape: tuple[int, ...]) -> int:
        return shape[0]

    def A(self, obs: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return self.c * x

    def At(self, obs: Mapping[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        return self.c * y

    def noise_std(self, obs: Mapping[str, torch.Tensor]) -> float:
        return float(self.s)


class BatchNoise(Scale):
    def corrupt(self, x: torch.Tensor, seeds: torch.Tensor) -> Observation:
        g = torch.Generator().manual_seed(int(seeds[0]))  # one generator per batch: batch-dependent
        return {"y": self.c * x + 0.1 * torch.randn(x.shape, generator=g)}

    def noise_std(self, obs: Mapping[str, torch.Tensor]) -> float:
        return 0.1


class WrongAdjoint(Scale):
    def At(self, obs: Mapping[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        return self.c * y.flip(-1)


class WrongCondSize(Scale):
    def cond_size(self, shape: tuple[int, ...]) -> int:
        return shape[0] + 1


class WrongMeasurement(Scale):
    def A(self, obs: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return 2 * self.c * x  # a fine linear operator, but not the one corrupt applies

    def At(self, obs: Mapping[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        return 2 * self.c * y


class LeaksIndex(Scale):
    def corrupt(self, x: torch.Tensor, seeds: torch.Tensor) -> Observation:
        return {"y": self.c * x, "index": torch.arange(len(x))}


class BadSpec(Scale):
    def spec(self) -> dict:
        return {"name": self.name, "api_version": 2, "params": {"c": torch.tensor(0.5)}}


class FalselyExact(Scale):
    def exact_entries(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.ones_like(obs["y"])  # y = c x is not x


class ExactWrongShape(Scale):
    def exact_entries(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.ones(len(obs["y"]), 1)


def test_a_correct_channel_passes() -> None:
    check_channel(Scale(c=0.5), (7,))
    check_channel(Scale(c=2.0, s=0.1), (7,))
    check_channel(NoiseChannel(sigma=0.1), (1, 8, 8))


@pytest.mark.parametrize(
    ("channel", "match"),
    [
        (BatchNoise(), "changes when the batch is cut"),
        (WrongAdjoint(), "not the adjoint"),
        (WrongCondSize(), "cond_size"),
        (WrongMeasurement(), "y differs from A x"),
        (LeaksIndex(), "'index'"),
        (BadSpec(), "JSON-able"),
        (FalselyExact(), "declared exact"),
        (ExactWrongShape(), "exact_entries returned"),
    ],
)
def test_broken_channels_are_caught(channel: Channel, match: str) -> None:
    with pytest.raises(AssertionError, match=match) as info:
        check_channel(channel, (7,))
    assert "\n" not in str(info.value)


def test_wrong_data_kind_is_reported() -> None:
    with pytest.raises(AssertionError, match="data kinds"):
        check_channel(Scale(), (1, 4, 4))


OBSERVE = """
import hashlib, sys, torch
from diffem_channels.base import sample_seeds
from diffem_cli.io import registry
from diffem_cli.io.sources import load_source

img, vec = load_source("digits").read(0, 24), load_source("manifold:samples=24").read(0, 24)
out = []
for name, params, x in [("mask", {"sigma": 0.1}, img), ("box", {"sigma": 0.1}, img),
                        ("blur", {"noise_sigma": 0.05}, img), ("jpeg", {}, img),
                        ("noise", {"sigma": 0.2}, vec), ("projection", {"sigma": 0.01}, vec)]:
    obs = registry.make_channel(name, params).corrupt(x, sample_seeds(3, range(len(x))))
    out.append(hashlib.sha256(b"".join(obs[k].numpy().tobytes() for k in sorted(obs))).hexdigest())
print(" ".join(out))
"""


def test_observations_do_not_depend_on_the_cpu_kernels() -> None:
    """The same observations, bit for bit, with torch's plain (non-vectorised) CPU kernels as with
    the AVX2/AVX-512 ones this machine picks, and with 1 or 2 threads: what makes corrupted data
    sets identical on Intel and AMD CI machines (and on CPUs without AVX2)."""
    import os
    import subprocess
    import sys

    results = set()
    for env in ({"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}, {"OMP_NUM_THREADS": "2"}):
        proc = subprocess.run(
            [sys.executable, "-c", OBSERVE],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, **env},
        )
        assert proc.returncode == 0, proc.stderr
        results.add(proc.stdout.strip())
    assert len(results) == 1


def test_exact_entries_of_the_built_in_masks() -> None:
    """A noiseless mask pins its observed entries; noise, or no mask at all, pins none."""
    from diffem_channels.box import BoxChannel
    from diffem_channels.mask import MaskChannel

    x = torch.rand(4, 3, 8, 8) * 2 - 1
    seeds = torch.arange(4)
    for channel in (MaskChannel(rho=0.5), BoxChannel()):
        obs = channel.corrupt(x, seeds)
        exact = channel.exact_entries(obs)
        assert exact is not None and torch.equal(exact, channel.observation_mask(obs))
        assert torch.equal(exact * obs["y"], exact * x) and 0 < float(exact.mean()) < 1
        check_channel(channel, (3, 8, 8))
    assert (
        MaskChannel(rho=0.5, sigma=0.1).exact_entries(MaskChannel(rho=0.5, sigma=0.1).corrupt(x, seeds))
        is None
    )
    assert NoiseChannel(sigma=0.1).exact_entries(NoiseChannel(sigma=0.1).corrupt(x, seeds)) is None


class Denoise(Scale):
    """A correct ``gaussian_denoising`` channel: ``y = x + s eps``; subclasses break one promise each."""

    gaussian_denoising = True
    params = (Param("c", float, 1.0), Param("s", float, 0.1))


class WrongLevel(Denoise):
    def noise_std(self, obs: Mapping[str, torch.Tensor]) -> float:
        return 1.1 * self.s  # 10% off: 23 standard errors at 2^14 entries


class Biased(Denoise):
    def corrupt(self, x: torch.Tensor, seeds: torch.Tensor) -> Observation:
        return {"y": super().corrupt(x, seeds)["y"] + 0.01}


class Correlated(Denoise):
    def corrupt(self, x: torch.Tensor, seeds: torch.Tensor) -> Observation:
        eps = per_sample(seeds, tuple(x.shape[1:]))
        return {"y": x + self.s * (eps + eps.roll(1, -1)) / 2**0.5}  # std s, neighbours correlate 0.5


class NotIdentity(Denoise):
    def At(self, obs: Mapping[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        return y * (1 + 2.0**-20)  # an adjoint to rounding, but not the identity


class NotLinear(Denoise):
    linear = False


def test_a_gaussian_denoising_channel_passes() -> None:
    assert NoiseChannel.gaussian_denoising and not Scale.gaussian_denoising
    check_channel(Denoise(), (7,))
    check_channel(Denoise(s=0.3), (1,))  # no neighbours to correlate
    check_channel(NoiseChannel(sigma=0.05), (3, 8, 8))
    check_channel(NoiseChannel(sigma=1e-9), (5,))  # below float32 rounding of y: within tolerance


@pytest.mark.parametrize(
    ("channel", "match"),
    [
        (WrongLevel(), "standard deviation"),
        (Biased(), "has mean"),
        (Correlated(), "correlate"),
        (Denoise(c=0.5), r"A\(obs, x\) is not x"),
        (NotIdentity(), r"At\(obs, y\) is not y"),
        (NotLinear(), "not linear"),
        (Denoise(s=0.0), "not > 0"),
    ],
)
def test_broken_gaussian_denoising_channels_are_caught(channel: Channel, match: str) -> None:
    with pytest.raises(AssertionError, match=match) as info:
        check_channel(channel, (7,))
    assert "\n" not in str(info.value) and "gaussian_denoising" in str(info.value)
