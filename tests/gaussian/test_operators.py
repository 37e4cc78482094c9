"""How a channel's operator is materialised and classified: ``A`` read off the channel on basis
vectors, each built-in kind of operator recognised, and a fit's probe reused only for its own
channel and shape."""

from __future__ import annotations

import pytest
import torch
from gaussian_cases import Mask, Proj, SharedProj

from diffem_channels.base import sample_seeds
from diffem_channels.blur import BlurChannel
from diffem_channels.mask import MaskChannel
from diffem_cli.gaussian.operators import Probed, classify, operator_matrix


def test_operator_matrix_reproduces_the_channel():
    ch = Proj(m=3)
    x = torch.randn(5, 4)
    obs = ch.corrupt(x, sample_seeds(0, range(5)))
    torch.testing.assert_close(operator_matrix(ch, obs, (4,)), obs["A"].double())
    img = Mask(rho=0.5).corrupt(torch.randn(3, 1, 2, 3), sample_seeds(0, range(3)))
    a = operator_matrix(Mask(), img, (1, 2, 3))
    torch.testing.assert_close(a, torch.diag_embed(img["mask"].reshape(3, -1).double()))


@pytest.mark.parametrize(
    ("channel", "shape", "kind"),
    [
        (MaskChannel(rho=0.5, sigma=0.1), (3, 4, 4), "diagonal"),
        (BlurChannel(sigma=0.8, noise_sigma=0.05), (2, 4, 4), "symmetric"),
        (SharedProj(m=5, sigma=0.1), (12,), "shared"),
        (Proj(m=3, sigma=0.1), (12,), "general"),
    ],
)
def test_classify_recognises_each_kind_of_operator(channel, shape, kind):
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(0))
    obs = channel.corrupt(x, sample_seeds(1, range(6)))
    op = classify(channel, obs, shape, shared_max_dim=4096)
    assert op.kind == kind
    if kind in ("shared", "symmetric"):
        # the held rows are A itself (float32 copies of exact channel outputs)
        a = operator_matrix(channel, obs, shape)[0].float()
        torch.testing.assert_close(op.rows, a, atol=1e-6, rtol=1e-6)
    if kind != "diagonal":
        assert classify(channel, obs, shape, shared_max_dim=4).kind == "general"  # too large to hold


def test_a_probe_is_reused_only_for_its_channel_and_shape():
    channel = BlurChannel(sigma=0.8)
    shape = (1, 4, 4)
    obs = channel.corrupt(torch.zeros(2, *shape), sample_seeds(0, range(2)))
    probed = Probed(channel, shape, classify(channel, obs, shape, shared_max_dim=4096))
    op = probed.operator_for(channel, (1, 4, 4), torch.device("cpu"))
    assert op is not None and op.kind == "symmetric"
    torch.testing.assert_close(op.rows, probed.operator.rows, atol=0, rtol=0)
    assert probed.operator_for(BlurChannel(sigma=0.8), shape, torch.device("cpu")) is None
    assert probed.operator_for(channel, (1, 2, 8), torch.device("cpu")) is None
