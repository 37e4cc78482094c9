"""The oracle reference: DiffEM's conditional model trained on clean data (evaluation only).

Each lap trains the conditional network on fresh corruptions of the clean data (``--clean``),
with the same network and budget as a DiffEM lap; the E-step is the conditional sampler. It
bounds what any method can reach from the observations with this network and budget.
"""

from __future__ import annotations

import torch

from diffem_cli.core.errors import DiffemError
from diffem_cli.methods.base import ConditionalMethod
from diffem_cli.methods.diffem import fresh_conditioning

# Offsets the oracle's corruption seeds from the observed data's and from DiffEM's re-corruptions.
ORACLE_TAG = 1 << 20


class Oracle(ConditionalMethod):
    name = "oracle"
    description = "oracle: the conditional model trained on fresh corruptions of clean data"
    needs_clean = True

    def training_data(self, data, prev, lap, clean):  # noqa: D102
        if clean is None:
            raise DiffemError("method 'oracle' needs clean data: pass --clean DIR")
        index = torch.arange(len(clean))
        return {
            "x": clean,
            "cond": fresh_conditioning(data, clean, self.cfg.seed, ORACLE_TAG + lap, index),
        }, None
