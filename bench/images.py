"""Procedural RGB images for the image benchmarks: smooth gradients, soft blobs and shapes.

Each image is a random linear colour gradient with two to four shapes with soft or sharp edges on it (Gaussian
blobs, discs and axis-aligned rectangles, each of one random colour), in [-1, 1]. Everything is
drawn from one ``torch.Generator`` seeded by ``seed``, so a set is the same on every machine.
:func:`write_png_folder` saves a set as PNG files (an image folder ``diffem corrupt`` reads).

    python -m bench.images OUT [--n 1024] [--size 16] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def shapes_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """``n`` procedural RGB images ``(n, 3, size, size)`` in [-1, 1], deterministic in ``seed``."""
    if n < 1 or size < 4:
        raise ValueError(f"need n >= 1 and size >= 4, got n={n}, size={size}")
    g = torch.Generator().manual_seed(int(seed))
    coords = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")

    def u(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=g, dtype=torch.float64)

    # background: colour a + (b - a) * projection on a random direction
    angle = u(n) * 2 * torch.pi
    proj = (xx[None] - 0.5) * torch.cos(angle)[:, None, None] + (yy[None] - 0.5) * torch.sin(angle)[
        :, None, None
    ]
    ramp = (proj / 1.42 + 0.5).clamp(0, 1)
    c0, c1 = u(n, 3) * 0.8 - 0.4, u(n, 3) * 0.8 - 0.4
    img = c0[:, :, None, None] + (c1 - c0)[:, :, None, None] * ramp[:, None]
    count = 2 + (u(n) * 3).long()  # 2..4 shapes
    for k in range(4):
        active = (k < count).double()[:, None, None]
        kind = (u(n) * 3).long()
        cx, cy = u(n) * 0.8 + 0.1, u(n) * 0.8 + 0.1
        r = u(n) * 0.2 + 0.1
        w, h = u(n) * 0.3 + 0.1, u(n) * 0.3 + 0.1
        soft = 0.01 + u(n) * 0.03
        dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
        blob = torch.exp(-(dx**2 + dy**2) / (2 * r[:, None, None] ** 2))
        disc = torch.sigmoid((r[:, None, None] - (dx**2 + dy**2).sqrt()) / soft[:, None, None])
        rect = torch.sigmoid((w[:, None, None] - dx.abs()) / soft[:, None, None]) * torch.sigmoid(
            (h[:, None, None] - dy.abs()) / soft[:, None, None]
        )
        alpha = torch.where(kind[:, None, None] == 0, blob, torch.where(kind[:, None, None] == 1, disc, rect))
        alpha = alpha * active
        colour = (u(n, 3) * 2 - 1)[:, :, None, None]
        img = img * (1 - alpha[:, None]) + colour * alpha[:, None]
    return img.clamp(-1, 1).float()


def write_png_folder(x: torch.Tensor, out: Path) -> Path:
    """Save images ``(n, 3, H, W)`` in [-1, 1] as ``out/img_NNNNN.png`` (8-bit RGB)."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, a in enumerate(arr):
        Image.fromarray(np.ascontiguousarray(a), mode="RGB").save(out / f"img_{i:05d}.png")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    write_png_folder(shapes_images(args.n, args.size, args.seed), args.out)
    print(f"{args.n} images of {args.size}x{args.size} in {args.out}")


if __name__ == "__main__":
    main()
