"""``diffem_cli.methods.testing.check_method`` passes every registered method and catches broken
promises with a one-line reason."""

from __future__ import annotations

import pytest
import torch

from diffem_channels.jpeg import JpegChannel
from diffem_channels.mask import MaskChannel
from diffem_channels.noise import NoiseChannel
from diffem_channels.projection import ProjectionChannel
from diffem_cli.diffusion.denoise import Denoiser
from diffem_cli.methods import get_method_class, method_names
from diffem_cli.methods.base import Posterior
from diffem_cli.methods.diffem import DiffEM
from diffem_cli.methods.em_mmps import EMMMPS, MMPSOptions
from diffem_cli.methods.testing import check_method, tiny_data

# (channel, data shape) pairs tried in order: each method is checked with the first it accepts
CANDIDATES = [
    (MaskChannel(rho=0.5), (4,)),
    (NoiseChannel(sigma=0.2), (4,)),
    (JpegChannel(quality=50), (1, 8, 8)),
]
# channels some methods must refuse: non-linear, noisy, another shape than the data
OTHERS = [JpegChannel(quality=50), NoiseChannel(sigma=0.2), MaskChannel(rho=0.5, sigma=0.1)]


def _fit(cls):
    for channel, shape in CANDIDATES:
        data, _ = tiny_data(channel, shape)
        try:
            cls().check(data)
        except Exception:
            continue
        return channel, shape
    pytest.fail(f"no test channel suits method {cls.name!r}")


@pytest.mark.parametrize("name", method_names())
def test_every_registered_method_keeps_the_contract(name):
    cls = get_method_class(name)
    channel, shape = _fit(cls)
    method = cls()
    refuse = []
    for other in OTHERS:
        if other.data_kinds >= {"vector" if len(shape) == 1 else "image"}:
            try:
                method.check(tiny_data(other, shape)[0])
            except Exception:
                refuse.append(other)
    check_method(method, channel, shape, refuse=refuse)


def test_refusals_are_checked():
    check_method(EMMMPS(), ProjectionChannel(), (4,))
    check_method(EMMMPS(), MaskChannel(rho=0.5), (1, 8, 8), refuse=[JpegChannel(quality=50)])
    with pytest.raises(AssertionError, match="accepts channel 'mask', which it should refuse"):
        check_method(DiffEM(), MaskChannel(rho=0.5), (4,), refuse=[MaskChannel(rho=0.3)])


class _Forgetful(EMMMPS):
    """Records its options under another key: they do not come back from a checkpoint."""

    def config_record(self, cfg):
        return {"mmps_options": super().config_record(cfg)["mmps"]}


class _Restless(EMMMPS):
    """Posterior noise from the global generator: not reproducible for a seed."""

    def posterior(self, model, data, aux):
        inner = super().posterior(model, data, aux).make

        class Noisy(Denoiser):
            needs_grad = True

            def __init__(self, den):
                self.den = den

            def __call__(self, x_t, t):
                return self.den(x_t, t) + 0.1 * torch.randn_like(x_t)

        return Posterior(lambda obs: Noisy(inner(obs)))


class _Short(EMMMPS):
    """Drops the last observation from its M-step's conditioning: unaligned rows."""

    def mstep(self, data, prev, lap, laps, clean, cfg):
        step = super().mstep(data, prev, lap, laps, clean, cfg)
        step.tensors["cond"] = step.tensors["x"][:-1]
        return step


@pytest.mark.parametrize(
    ("cls", "match"),
    [
        (_Forgetful, "come back from a checkpoint"),
        (_Restless, "same seed differ"),
        (_Short, "unaligned"),
    ],
)
def test_broken_promises_are_named(cls, match):
    method = cls({"mmps": MMPSOptions(cg_iters=3)})  # options other than the defaults
    with pytest.raises(AssertionError, match=match):
        check_method(method, MaskChannel(rho=0.5), (4,))
