"""Denoising networks: an MLP for vectors and a diffusers ``UNet2DModel`` for images.

A network takes ``(x_t, t, cond)`` and predicts the diffusion target (``v``). A conditional
network sees the channel's conditioning tensor concatenated to its input; an unconditional one
has ``cond_size = 0``. Networks are built from a JSON-able config dict, the one stored in
checkpoints, so a checkpoint file alone is enough to rebuild its model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from diffem_cli.core.errors import DiffemError
from diffem_cli.io.datameta import VECTOR, data_kind


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps in [0, 1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class VectorMLP(nn.Module):
    """MLP denoiser on ``[x_t, embedding(t), cond]`` with LayerNorm and SiLU (the manifold recipe)."""

    def __init__(self, dim: int, cond_size: int = 0, width: int = 256, depth: int = 3, emb_dim: int = 64):
        super().__init__()
        self.dim, self.cond_size, self.emb_dim = dim, cond_size, emb_dim
        layers: list[nn.Module] = []
        size = dim + cond_size + emb_dim
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.LayerNorm(width), nn.SiLU()]
            size = width
        layers.append(nn.Linear(size, dim))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        parts = [x, timestep_embedding(t.expand(x.shape[0]), self.emb_dim).to(x.dtype)]
        if self.cond_size:
            parts.append(cond)
        return self.body(torch.cat(parts, dim=-1))


class ImageUNet(nn.Module):
    """A diffusers ``UNet2DModel`` taking ``[x_t, cond]`` along channels and returning the target."""

    def __init__(self, unet: nn.Module, cond_size: int = 0):
        super().__init__()
        self.unet = unet
        self.cond_size = cond_size

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        inp = torch.cat([x, cond], dim=1) if self.cond_size else x
        return self.unet(inp, t.expand(x.shape[0])).sample


def default_unet_config(
    shape: tuple[int, ...], channels: tuple[int, ...] = (32, 64), layers: int = 1, attention: bool = False
) -> dict[str, Any]:
    """A small UNet config for images of ``shape`` (C, H, W); presets override it for paper scale."""
    down = ["DownBlock2D"] * len(channels)
    up = ["UpBlock2D"] * len(channels)
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return {
        "type": "unet",
        "block_out_channels": list(channels),
        "layers_per_block": layers,
        "down_block_types": down,
        "up_block_types": up,
        "norm_num_groups": min(32, min(channels) // 2 if min(channels) < 32 else 32),
        "dropout": 0.0,
    }


def check_network_shape(network: dict[str, Any], shape: tuple[int, ...]) -> None:
    """Refuse data of ``shape`` the ``network`` config cannot model, in one DiffemError line: an MLP
    takes vectors ``(n,)``; a UNet square images ``(C, H, W)`` whose size halves exactly at each
    of its ``len(block_out_channels) - 1`` downsamplings. Other network types pass."""
    shape = tuple(int(s) for s in shape)
    kind = network.get("type")
    if kind == "mlp" and data_kind(shape) != VECTOR:
        raise DiffemError(f"network.type=mlp needs vector data, but the data have shape {shape}; use a unet")
    if kind != "unet":
        return
    if len(shape) != 3:
        raise DiffemError(f"network.type=unet needs images (C, H, W), but the data have shape {shape}")
    if shape[1] != shape[2]:
        raise DiffemError(f"network.type=unet needs square images, got {shape[1]}x{shape[2]}")
    levels = len(network["block_out_channels"])
    if shape[1] % 2 ** (levels - 1):
        raise DiffemError(
            f"image size {shape[1]} is not divisible by 2^{levels - 1} for the {levels}-level UNet "
            "of network.block_out_channels"
        )


def build_network(config: dict[str, Any], shape: tuple[int, ...], cond_size: int) -> nn.Module:
    """Build the network described by ``config`` for clean data ``shape`` and ``cond_size``."""
    kind = config.get("type")
    check_network_shape(config, shape)
    if kind == "mlp":
        return VectorMLP(
            shape[0],
            cond_size,
            int(config.get("width", 256)),
            int(config.get("depth", 3)),
            int(config.get("emb_dim", 64)),
        )
    if kind == "unet":
        from diffusers import UNet2DModel

        c, h, _ = shape
        kwargs = {k: v for k, v in config.items() if k != "type"}
        kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
        kwargs["down_block_types"] = tuple(kwargs["down_block_types"])
        kwargs["up_block_types"] = tuple(kwargs["up_block_types"])
        unet = UNet2DModel(sample_size=h, in_channels=c + cond_size, out_channels=c, **kwargs)
        return ImageUNet(unet, cond_size)
    raise DiffemError(f"unknown network type {kind!r} (known: mlp, unet)")


def default_network(shape: tuple[int, ...]) -> dict[str, Any]:
    """The default network config for data of ``shape``."""
    if data_kind(shape) == VECTOR:
        return {"type": "mlp", "width": 256, "depth": 3, "emb_dim": 64}
    return default_unet_config(tuple(shape))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
