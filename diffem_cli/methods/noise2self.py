"""Noise2Self (Batson & Royer 2019, official code czbiohub-sf/noise2self ``mask.py``): a
J-invariant blind-spot denoiser trained on the noisy observations alone, for the channels that
declare ``gaussian_denoising`` (``noise``, or a plugin's); its outputs are the reconstructions,
and a diffusion model trained on them (``train-uncond``, which ``compare`` runs) is the
baseline's generator (EMDiffusion's Table 1 row).

How it sits in the lap structure (no EM) is shared with ``sure-score``:
:mod:`diffem_cli.methods.denoisers`.

Masking, as the official ``Masker``:

- **Grid.** Images: ``noise2self.width`` (3) gives ``width^2`` (9) phases; phase ``p`` masks the
  pixels whose row is ``p mod width`` and column ``p div width`` modulo ``width``, across all
  colour channels (``pixel_grid_mask``). Each training row draws its phase uniformly (the
  official loop takes phase ``i`` for batch ``i``: the same expected loss).
- **Replacement.** ``noise2self.mode: interpolate`` (the official notebooks' choice, the default)
  puts at each masked pixel the average of its 8 neighbours weighted ``[[0.5, 1, 0.5], [1, 0, 1],
  [0.5, 1, 0.5]] / 6``, zero beyond the border (``interpolate_mask``: a convolution with zero
  padding, per colour channel); ``zero`` puts 0. With ``width >= 2`` no masked pixel's neighbours
  are masked, so the input holds nothing of the masked pixels' values.
- **Mask as input.** The network also sees the mask, in its conditioning slot (the official
  ``include_mask_as_input=True``; the conditional network has that slot anyway): the input to the
  denoiser is ``[masked y, mask]``.
- **Loss.** The squared error between the output and ``y`` on the masked entries only, averaged
  over them: the minimiser is ``E[y_J | y_{J^c}] = E[x_J | y_{J^c}]`` for noise independent
  across entries.
- **Inference** (``noise2self.infer``): ``j-invariant`` (the default, ``infer_full_image``): one
  pass per phase, each entry taken from the pass that masked it, so the estimate at an entry
  never depends on that entry's observation (``width^2`` network passes per observation);
  ``single-pass`` (``infer_single_pass``): one pass on the unmasked ``y`` with an all-zero mask,
  ``width^2`` times cheaper but no longer J-invariant (an input the network never saw in
  training; on digits at noise 0.2 it scored 1.3 dB below the J-invariant estimate).

**Vectors** have no pixel grid: the coordinates are split into ``k = min(width^2, n)`` groups by
index (coordinate ``i`` in group ``i mod k``; leave-one-out when ``n <= width^2``), a group is
masked by 0 (``mode`` has no neighbours to interpolate), and the same loss and inference apply.
The paper defines J-invariance for any partition of the dimensions, so this is the same estimator
on a fixed partition; it can only denoise a coordinate as well as the others predict it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffem_cli.core.checks import choice, int_at_least
from diffem_cli.methods.denoisers import DenoiserMethod, apply_net

MODES = ("interpolate", "zero")
INFERENCES = ("j-invariant", "single-pass")
NEIGHBOURS = ((0.5, 1.0, 0.5), (1.0, 0.0, 1.0), (0.5, 1.0, 0.5))
"""The official ``interpolate_mask`` kernel, normalised by its sum (6)."""


@dataclass
class Noise2SelfOptions:
    """Noise2Self (section ``noise2self``): the grid ``width`` (``width^2`` phases), the value put
    at masked pixels (``interpolate``: the neighbours' weighted average; ``zero``) and the
    inference (``j-invariant``: one pass per phase; ``single-pass``: one pass on ``y``)."""

    width: int = 3
    mode: str = "interpolate"
    infer: str = "j-invariant"

    def validate(self) -> None:
        """One-line DiffemError for a bad value."""
        int_at_least("noise2self.width", self.width, 2, 16)
        choice("noise2self.mode", self.mode, MODES)
        choice("noise2self.infer", self.infer, INFERENCES)


def phase_masks(shape: tuple[int, ...], width: int) -> torch.Tensor:
    """The 0/1 masks of every phase, float ``(k, *shape)``. Images ``(C, H, W)``: ``k = width^2``,
    phase ``p`` masks rows ``= p mod width`` and columns ``= p div width`` (modulo ``width``) in every
    channel. Vectors ``(n,)``: ``k = min(width^2, n)``, phase ``p`` masks coordinates ``= p mod k``.
    Every entry is masked by exactly one phase."""
    if len(shape) == 3:
        c, h, w = shape
        rows = torch.arange(h).view(h, 1) % width
        cols = torch.arange(w).view(1, w) % width
        grid = [(rows == p % width) & (cols == p // width) for p in range(width * width)]
        return torch.stack(grid).unsqueeze(1).expand(-1, c, h, w).float().contiguous()
    n = int(shape[0])
    k = min(width * width, n)
    index = torch.arange(n) % k
    return torch.stack([index == p for p in range(k)]).float()


def neighbour_average(y: torch.Tensor) -> torch.Tensor:
    """Each pixel of images ``y`` ``(B, C, H, W)`` replaced by the weighted average of its 8
    neighbours (:data:`NEIGHBOURS`), zero padding, channel by channel (official ``interpolate_mask``)."""
    c = y.shape[1]
    kernel = torch.tensor(NEIGHBOURS, dtype=y.dtype, device=y.device) / 6.0
    return F.conv2d(y, kernel.view(1, 1, 3, 3).expand(c, 1, 3, 3), padding=1, groups=c)


def masked_input(y: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """``y`` with the entries where ``mask`` is 1 replaced: by the neighbour average (images,
    ``interpolate``) or by 0 (``zero``, and always for vectors)."""
    keep = y * (1 - mask)
    if mode == "interpolate" and y.dim() == 4:
        return keep + neighbour_average(y) * mask
    return keep


class Noise2SelfLoss:
    """The masked loss on ``batch["y"]``: one random phase per row, error on its masked entries."""

    def __init__(self, shape: tuple[int, ...], width: int = 3, mode: str = "interpolate"):
        self.masks = phase_masks(tuple(shape), width)
        self.mode = mode

    def __call__(self, model, batch, scheduler, generator):  # noqa: D102
        y = batch["y"].float()
        masks = self.masks.to(y.device)
        phase = torch.randint(0, len(masks), (len(y),), generator=generator, device=y.device)
        mask = masks[phase]
        out = apply_net(model, masked_input(y, mask, self.mode), mask).float()
        return (((out - y) ** 2) * mask).sum() / mask.sum().clamp_min(1.0)


def j_invariant(model: nn.Module, y: torch.Tensor, width: int, mode: str) -> torch.Tensor:
    """The official ``infer_full_image``: one pass per phase, each entry from the pass masking it."""
    out = torch.zeros_like(y, dtype=torch.float32)
    for mask in phase_masks(tuple(y.shape[1:]), width).to(y.device):
        m = mask.expand_as(y)
        out = out + m * apply_net(model, masked_input(y, m, mode), m).float()
    return out


class Noise2Self(DenoiserMethod):
    name = "noise2self"
    description = "Noise2Self: a J-invariant blind-spot denoiser trained on the noisy observations; no EM"
    order = 80
    option_classes = {"noise2self": Noise2SelfOptions}

    def loss(self, data, cfg) -> Noise2SelfLoss:  # noqa: D102
        o = self.options["noise2self"]
        return Noise2SelfLoss(data.shape, o.width, o.mode)

    def denoise(self, model: nn.Module, y: torch.Tensor) -> torch.Tensor:  # noqa: D102
        o = self.options["noise2self"]
        if o.infer == "single-pass":
            return apply_net(model, y, torch.zeros_like(y)).float()
        return j_invariant(model, y, o.width, o.mode)

    def inference(self) -> str:  # noqa: D102
        return f"noise2self {self.options['noise2self'].infer}"
