"""Networks: output shapes with and without conditioning, config errors, embeddings."""

from __future__ import annotations

import pytest
import torch

from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.nets import (
    ImageUNet,
    VectorMLP,
    build_network,
    count_parameters,
    default_network,
    default_unet_config,
    timestep_embedding,
)

TINY_UNET = default_unet_config((1, 8, 8), channels=(16, 32))


@pytest.mark.parametrize("cond_size", [0, 12])
def test_mlp_shapes_and_conditioning(cond_size):
    torch.manual_seed(0)
    net = build_network({"type": "mlp", "width": 32, "depth": 2, "emb_dim": 16}, (5,), cond_size)
    assert isinstance(net, VectorMLP)
    x = torch.randn(7, 5)
    cond = torch.randn(7, cond_size) if cond_size else None
    out = net(x, torch.tensor([10]), cond)
    assert out.shape == (7, 5) and torch.isfinite(out).all()
    # first layer sees [x, embedding, cond]
    assert net.body[0].in_features == 5 + 16 + cond_size
    # per-sample timesteps work too, and the output depends on t
    out_t = net(x, torch.arange(7) * 100, cond)
    assert out_t.shape == (7, 5) and not torch.allclose(out, out_t)
    if cond_size:
        assert not torch.allclose(out, net(x, torch.tensor([10]), cond + 1))


@pytest.mark.parametrize("cond_size", [0, 2])
def test_unet_shapes_and_conditioning(cond_size):
    torch.manual_seed(0)
    net = build_network(TINY_UNET, (1, 8, 8), cond_size)
    assert isinstance(net, ImageUNet)
    assert net.unet.config.in_channels == 1 + cond_size and net.unet.config.out_channels == 1
    x = torch.randn(3, 1, 8, 8)
    cond = torch.randn(3, cond_size, 8, 8) if cond_size else None
    with torch.no_grad():
        out = net(x, torch.tensor([500]), cond)
        assert out.shape == x.shape and torch.isfinite(out).all()
        if cond_size:
            assert not torch.allclose(out, net(x, torch.tensor([500]), cond * 0))


def test_unet_rgb_with_attention():
    cfg = default_unet_config((3, 16, 16), channels=(16, 32), attention=True)
    assert cfg["down_block_types"][-1] == "AttnDownBlock2D" and cfg["up_block_types"][0] == "AttnUpBlock2D"
    net = build_network(cfg, (3, 16, 16), 4)
    with torch.no_grad():
        assert net(torch.randn(2, 3, 16, 16), torch.tensor([1]), torch.randn(2, 4, 16, 16)).shape == (
            2,
            3,
            16,
            16,
        )


def test_defaults_and_parameter_count():
    assert default_network((5,))["type"] == "mlp"
    assert default_network((1, 8, 8))["type"] == "unet"
    net = build_network({"type": "mlp", "width": 8, "depth": 1, "emb_dim": 4}, (3,), 2)
    # Linear(3+4+2 -> 8) + LayerNorm(8) + Linear(8 -> 3)
    assert count_parameters(net) == (9 * 8 + 8) + 16 + (8 * 3 + 3)


def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0.0, 10.0, 999.0]), 16)
    assert e.shape == (3, 16)
    assert torch.allclose(e[0, :8], torch.ones(8)) and torch.allclose(e[0, 8:], torch.zeros(8))
    assert torch.allclose(e[:, :8] ** 2 + e[:, 8:] ** 2, torch.ones(3, 8), atol=1e-6)


@pytest.mark.parametrize(
    ("config", "shape", "match"),
    [
        ({"type": "mlp"}, (1, 8, 8), "network.type=mlp needs vector data"),
        (TINY_UNET, (5,), "network.type=unet needs images"),
        (TINY_UNET, (1, 8, 4), "needs square images"),
        (default_unet_config((1, 6, 6), channels=(8, 16, 32)), (1, 6, 6), "not divisible"),
        ({"type": "transformer"}, (5,), "unknown network type 'transformer'"),
        ({}, (5,), "unknown network type None"),
    ],
)
def test_build_network_errors(config, shape, match):
    with pytest.raises(DiffemError, match=match):
        build_network(config, shape, 0)
