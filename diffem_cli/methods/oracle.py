"""The oracle reference: DiffEM's conditional model trained on clean data (evaluation only).

Each lap trains the conditional network on fresh corruptions of the clean data (``--clean``),
with the same network and budget as a DiffEM lap, re-drawn every ``em.recorrupt_every`` epochs as
DiffEM's are; the E-step is the conditional sampler. It bounds what any method can reach from the
observations with this network and budget.
"""

from __future__ import annotations

from diffem_channels import mix_seed
from diffem_cli.core.errors import DiffemError
from diffem_cli.methods.base import MStep
from diffem_cli.methods.diffem import ConditionalMethod, recorruption_mstep

# Sets the oracle's corruption seeds apart from the observed data's and from DiffEM's re-corruptions.
ORACLE_TAG = 1 << 20


class Oracle(ConditionalMethod):
    name = "oracle"
    description = "oracle: the conditional model trained on fresh corruptions of clean data"
    order = 40
    compared_by_default = True
    needs_clean = True

    def mstep(self, data, prev, lap, laps, clean, cfg) -> MStep:  # noqa: D102
        if clean is None:
            raise DiffemError("method 'oracle' needs clean data: pass --clean DIR")
        return recorruption_mstep(data, clean, mix_seed(cfg.seed, ORACLE_TAG), lap, cfg, self.options["cond"])
