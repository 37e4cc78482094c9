"""Noise2Self, SURE-Score and Ambient-Tweedie serve any channel declaring ``gaussian_denoising``
(a plugin's too, whatever its name and parameters), read its level from ``noise_std``, and refuse a
channel without the declaration, even one named ``noise``, in one line naming the capability."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

from diffem_channels import Channel, Observation, Param, per_sample, positive
from diffem_channels.blur import BlurChannel
from diffem_channels.mask import MaskChannel
from diffem_channels.noise import NoiseChannel
from diffem_channels.testing import check_channel
from diffem_cli.core.errors import DiffemError
from diffem_cli.methods import default_config, get_method
from diffem_cli.methods.ambient_tweedie import AmbientTweedie
from diffem_cli.methods.sure_score import SureScore
from diffem_cli.methods.testing import check_method, tiny_data

METHODS = ("noise2self", "sure-score", "ambient-tweedie")


class Hiss(Channel):
    """A third-party denoising channel: its own name, its level under another parameter name."""

    name = "hiss-test"
    description = "Identity plus white Gaussian noise of std level (test channel)."
    data_kinds = frozenset({"image", "vector"})
    linear = True
    gaussian_denoising = True
    params = (Param("level", float, 0.3, "noise std", positive),)

    def corrupt(self, x: torch.Tensor, seeds: torch.Tensor) -> Observation:
        return {"y": x + self.level * per_sample(seeds, tuple(x.shape[1:])).to(x)}

    def condition(self, obs: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        return obs["y"]

    def cond_size(self, shape: tuple[int, ...]) -> int:
        return shape[0]

    def A(self, obs: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return x

    def At(self, obs: Mapping[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        return y

    def noise_std(self, obs: Mapping[str, torch.Tensor]) -> float:
        return float(self.level)


class Undeclared(NoiseChannel):
    """The built-in noise channel, its name and all, without the declaration."""

    gaussian_denoising = False


def test_the_methods_read_the_declaration_not_the_name():
    check_channel(Hiss(), (1, 8, 8))
    cfg = default_config()
    for name in METHODS:
        method = get_method(name, cfg)
        assert method.accepts(Hiss) is None and method.accepts(NoiseChannel(sigma=0.1)) is None
        for channel in (Undeclared, MaskChannel, BlurChannel()):
            reason = method.accepts(channel)
            assert reason is not None and "\n" not in reason
            assert f"{name!r} needs a denoising channel" in reason and "gaussian_denoising" in reason
        with pytest.raises(DiffemError, match=r"gaussian_denoising.*'noise' does not"):
            method.check(tiny_data(Undeclared(sigma=0.1), (4,))[0])


@pytest.mark.parametrize("name", METHODS)
def test_the_methods_keep_their_contract_on_a_plugin_channel(name):
    check_method(get_method(name, default_config()), Hiss(level=0.2), (5,), refuse=[Undeclared()])


def test_the_noise_level_comes_from_noise_std():
    data, _ = tiny_data(Hiss(level=0.25), (4,))
    assert SureScore().loss(data, default_config()).sigma == pytest.approx(0.25)
    tweedie = AmbientTweedie()
    assert tweedie.mstep(data, None, 1, 1, None, default_config()).loss.sigma_n == pytest.approx(0.25)
    assert tweedie.checkpoint_meta(data) == {"ambient_tweedie": {"noise_std": pytest.approx(0.25)}}


def test_ambient_tweedie_samples_from_the_recorded_level_or_an_older_noise_checkpoint():
    model = torch.nn.Linear(1, 1)
    plugin = {"channel": Hiss(level=0.25).spec(), "ambient_tweedie": {"noise_std": 0.25}}
    older = {"channel": NoiseChannel(sigma=0.25).spec()}  # written before the record
    floors = [AmbientTweedie().prior(model, meta, 0).make(0, 1).t_min for meta in (plugin, older)]
    assert floors[0] == floors[1] > 0
