"""``jpeg``: JPEG compression at a fixed quality (kornia's differentiable codec); not linear."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from diffem_channels._same_shape import SameShapeChannel
from diffem_channels.base import ChannelError, Observation, Param, in_range

if TYPE_CHECKING:
    import torch

BLOCK = 16  # 8x8 DCT blocks on 2x-subsampled chroma


class JpegChannel(SameShapeChannel):
    """``y = decode(encode(x, quality))`` for images in [-1, 1]; grayscale goes through RGB and back."""

    name = "jpeg"
    description = "JPEG compression at a fixed quality (deterministic, not linear)."
    data_kinds = frozenset({"image"})
    params = (Param("quality", int, 25, "JPEG quality, 1 (worst) to 100 (best)", in_range(1, 100)),)
    api_version = 2
    differentiable = True

    def check_data(self, shape: tuple[int, ...]) -> None:
        super().check_data(shape)
        if shape[0] not in (1, 3):
            raise ChannelError(f"channel 'jpeg' needs 1 or 3 colour channels, got {shape[0]}")

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        """JPEG round trip of a batch ``(B, C, H, W)`` in [-1, 1]; differentiable in ``x``.

        Computed in float64 and returned in ``x``'s dtype: kornia's float32 codec rounds
        differently with the batch size, and an observation must depend on its own sample only.
        """
        import kornia
        import torch
        import torch.nn.functional as F

        b, c, h, w = x.shape
        img = ((x.double() + 1) / 2).clamp(0, 1)
        if c == 1:
            img = img.expand(b, 3, h, w)
        pad_h, pad_w = -h % BLOCK, -w % BLOCK
        if pad_h or pad_w:
            img = F.pad(img, (0, pad_w, 0, pad_h), mode="replicate")
        quality = torch.tensor([float(self.quality)], dtype=img.dtype, device=img.device)
        out = kornia.enhance.jpeg_codec_differentiable(img, quality)[:, :, :h, :w]
        if c == 1:
            out = out.mean(dim=1, keepdim=True)
        return (out * 2 - 1).to(x.dtype)

    def corrupt(self, x: torch.Tensor, seeds: torch.Tensor) -> Observation:
        self.check_data(tuple(x.shape[1:]))
        return {"y": self.compress(x)}

    def forward(self, obs: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The JPEG round trip of ``x``, differentiable (kornia's codec rounds with a smooth proxy)."""
        return self.compress(x)
