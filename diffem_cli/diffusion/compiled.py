"""``torch.compile`` for the training and sampling loops, with a one-line fallback to eager.

``train.compile`` and ``sample.compile`` choose: ``on``, ``off``, or ``auto``: compiled on CUDA
for convolutional networks (the UNets), where Triton fuses the normalisations and activations
between the convolutions; eager for the MLP on CUDA, where compiled steps ran slower, and eager on
CPU, where the C++ code generation did not beat eager for diffem's networks (figures in
``bench/results/speed-cuda.md`` and ``bench/results/speed.md``). Every lap wraps its network
anew, and torch's caches do the rest: a later lap's network of the same structure reuses the code
dynamo compiled for the first (no new graph), and Inductor's on-disk cache can serve later
processes; diffem keeps no compiled state.

A compiler can be missing or fail (no C++ toolchain, an unsupported operation): the first call
then logs one line and the network runs eagerly from there on. Compiled and eager results agree
to float rounding, not bitwise: fused kernels sum in another order.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from diffem_cli.core.logs import get_logger

COMPILE_MODES = ("auto", "on", "off")

log = get_logger(__name__)


def compile_wanted(mode: str, device: torch.device, net: nn.Module | None = None) -> bool:
    """Whether ``mode`` (one of :data:`COMPILE_MODES`) compiles ``net`` on ``device``: ``auto``
    compiles on CUDA a network with convolutions (any network when ``net`` is not given)."""
    if mode == "auto":
        return device.type == "cuda" and (net is None or _convolutional(net))
    return mode == "on"


def _convolutional(net: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) for m in net.modules())


class CompiledNetwork(nn.Module):
    """``net`` run through ``torch.compile``; eager for good when the first compiled call fails.

    Holds ``net`` itself as its one submodule, so its parameters are the wrapped network's and
    its ``state_dict`` keys those of ``net`` under ``net.``; callers keep their handle on ``net``
    for saving and for the network's own attributes."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        # not a registered submodule: parameters and state_dict stay those of ``net`` alone
        object.__setattr__(self, "_compiled", torch.compile(net))
        self._state = "untried"
        # dynamo warns, while tracing, that it looks through diffusers' lru_cache'd version check:
        # harmless (a constant), and one warning per traced graph in every user's output. One
        # filter for that message alone (adding it again replaces it), none on the call path.
        warnings.filterwarnings("ignore", message=r"Dynamo detected a call to a `functools\.lru_cache`")

    @property
    def compiled(self) -> bool:
        """True once a compiled call has succeeded; False before, or after a fallback."""
        return self._state == "ok"

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        if self._state == "eager":
            return self.net(*args, **kwargs)
        if self._state == "ok":
            return self._compiled(*args, **kwargs)
        try:
            out = self._compiled(*args, **kwargs)
        except Exception as e:  # any compiler failure; an error of the network itself recurs eagerly
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            log.warning("torch.compile failed (%s: %s); running eagerly", type(e).__name__, first[:200])
            self._state = "eager"
            return self.net(*args, **kwargs)
        self._state = "ok"
        return out


def maybe_compile(net: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """``net`` wrapped in :class:`CompiledNetwork` when ``mode`` asks for it on ``device``, else
    ``net`` itself."""
    return CompiledNetwork(net) if compile_wanted(mode, device, net) else net
