"""A deepinv operator this plugin does not ship, wrapped the way a new user would: ``Tomography``.

The user subclasses :class:`diffem_deepinv.DeepinvChannel`, says which physics to build for a data
shape and which data shape a measurement comes from, and runs diffem's ``check_channel``. What
happened on the way (see the plugin's README):

1. ``Tomography(angles, img_width)`` as in deepinv's examples warns that ``normalize`` is not set;
   with ``circle=False`` the sinogram has ceil(sqrt(2) W) detector rows, so the image width cannot be
   read back from ``y`` without that formula: ``circle=True`` (W rows) keeps it simple;
2. the channel computes ``corrupt`` in float64 (batch-size-independent rounding), so the physics must
   be built in the dtype asked for (``dtype=dtype``); ``Tomography(dtype=torch.float64,
   normalize=True)`` then fails inside deepinv 0.5.0 (its power iteration starts from a float32
   tensor), so ``normalize=False``;
3. with deepinv's default ``adjoint_via_backprop=True`` the adjoint is exact and ``check_channel``
   passes; with ``False`` deepinv's inverse Radon transform is used as ``A^T``, which is not the
   adjoint (deepinv's docs say so), and ``check_channel`` refuses the channel.
"""

from __future__ import annotations

import pytest

pytest.importorskip("deepinv")

import torch  # noqa: E402
from diffem_deepinv import DeepinvChannel  # noqa: E402

from diffem_channels import ChannelError, Param, non_negative, positive  # noqa: E402
from diffem_channels.testing import check_channel  # noqa: E402


class TomographyChannel(DeepinvChannel):
    """deepinv's parallel-beam ``Tomography`` (Radon transform) on square images."""

    name = "dinv-tomography"  # not installed: check_channel rebuilds it from its class
    description = "deepinv Tomography: a parallel-beam Radon transform, plus Gaussian noise."
    data_kinds = frozenset({"image"})
    params = (
        Param("angles", int, 12, "number of projection angles in [0, 180)", positive),
        Param("adjoint_via_backprop", bool, True, "deepinv's exact adjoint (else its inverse Radon)"),
        Param("noise_sigma", float, 0.0, "std of deepinv's GaussianNoise model", non_negative),
    )

    def check_data(self, shape: tuple[int, ...]) -> None:
        super().check_data(shape)
        if shape[1] != shape[2]:
            raise ChannelError(f"channel {self.name!r} needs square images, got {shape[1]}x{shape[2]}")

    def make_physics(self, shape, dtype):
        from deepinv.physics import Tomography

        return Tomography(
            angles=self.angles,
            img_width=shape[-1],
            circle=True,  # as many detector rows as the image is wide
            normalize=False,
            adjoint_via_backprop=self.adjoint_via_backprop,
            dtype=dtype,
        )

    def data_shape_of(self, y_shape):
        channels, width, _angles = y_shape
        return (channels, width, width)

    def condition(self, obs, shape):
        y = obs["y"]
        with torch.no_grad():
            return self.physics(tuple(shape), y).A_adjoint(y)


@pytest.mark.parametrize(("shape", "sigma"), [((1, 8, 8), 0.0), ((1, 12, 12), 0.05)])
def test_tomography_with_its_exact_adjoint_passes_the_contract(shape, sigma) -> None:
    channel = TomographyChannel(noise_sigma=sigma)
    check_channel(channel, shape)
    y = channel.corrupt(torch.zeros(2, *shape), torch.tensor([1, 2]))["y"]
    assert y.shape == (2, 1, shape[1], 12)  # detector rows x angles


def test_tomography_with_the_inverse_radon_as_adjoint_is_refused() -> None:
    with pytest.raises(AssertionError, match="not the adjoint"):
        check_channel(TomographyChannel(adjoint_via_backprop=False), (1, 8, 8))
