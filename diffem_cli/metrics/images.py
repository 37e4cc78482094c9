"""PSNR and SSIM of reconstructions against the clean images they should recover (paired metrics).

Both compare image ``i`` of ``x`` with image ``i`` of ``ref`` (same shape, (B, C, H, W)) and
average the per-pair values; callers pair rows by observation index (``diffem_cli.metrics.evaluate``).
"""

from __future__ import annotations

import torch

from diffem_cli.core.errors import DiffemError

MAX_PSNR = 100.0  # dB: identical images score this instead of infinity (keeps JSON finite)


def _check(x: torch.Tensor, ref: torch.Tensor, value_range: tuple[float, float]) -> float:
    if x.ndim != 4 or ref.ndim != 4:
        raise DiffemError(
            f"PSNR/SSIM compare images (B, C, H, W); got shapes {tuple(x.shape)} and {tuple(ref.shape)}"
        )
    if x.shape != ref.shape:
        raise DiffemError(
            f"PSNR/SSIM pair images one to one; shapes differ: {tuple(x.shape)} vs {tuple(ref.shape)}"
        )
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise DiffemError(f"value range must be (low, high) with high > low, got {value_range}")
    return hi - lo


def psnr_per_image(
    x: torch.Tensor, ref: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)
) -> torch.Tensor:
    """``10 log10(range^2 / MSE)`` for each pair, in dB, capped at ``MAX_PSNR``."""
    span = _check(x, ref, value_range)
    mse = ((x.double() - ref.double()) ** 2).flatten(1).mean(1)
    floor = span**2 * 10 ** (-MAX_PSNR / 10)
    return 10 * torch.log10(span**2 / mse.clamp_min(floor))


def psnr(x: torch.Tensor, ref: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    """Mean per-pair PSNR in dB (equal to ``kornia.metrics.psnr`` applied to each pair, then averaged)."""
    return float(psnr_per_image(x, ref, value_range).mean())


def ssim_window(height: int, width: int) -> int:
    """Gaussian window for SSIM: the usual 11, smaller for small images (3 for 8x8 digits).

    The largest odd size up to ``min(H, W) // 2`` (at least 3, at most 11), so the 'valid' SSIM map
    still has several positions to average.
    """
    size = min(11, min(height, width) // 2)
    size = size if size % 2 else size - 1
    return max(3, size)


def ssim_per_image(
    x: torch.Tensor,
    ref: torch.Tensor,
    value_range: tuple[float, float] = (-1.0, 1.0),
    window_size: int | None = None,
) -> torch.Tensor:
    """Mean SSIM map (``kornia.metrics.ssim``, Gaussian window, 'valid' padding) of each pair.

    Images are shifted to ``[0, high - low]`` first: SSIM's luminance term assumes non-negative
    intensities, and its constants scale with the range.
    """
    span = _check(x, ref, value_range)
    import kornia

    window = window_size or ssim_window(x.shape[-2], x.shape[-1])
    if window > min(x.shape[-2:]):
        raise DiffemError(f"SSIM window {window} is larger than the {x.shape[-2]}x{x.shape[-1]} images")
    lo = float(value_range[0])
    # float64: SSIM takes variances as E[x^2] - E[x]^2 over the window, a cancellation that turns
    # float32 rounding (which depends on the batch and the CPU's kernels) into errors up to
    # ~ window^2 * 2^-24 * (range^2 / C2) ~ 1e-2; in float64 the same bound is ~ 1e-11.
    ssim_map = kornia.metrics.ssim(x.double() - lo, ref.double() - lo, window, max_val=span, padding="valid")
    return ssim_map.flatten(1).mean(1)


def ssim(
    x: torch.Tensor,
    ref: torch.Tensor,
    value_range: tuple[float, float] = (-1.0, 1.0),
    window_size: int | None = None,
) -> float:
    """Mean per-pair SSIM (1 for identical images)."""
    return float(ssim_per_image(x, ref, value_range, window_size).mean())
