"""EM-MMPS (Rozet et al. 2024): EM with an unconditional prior and MMPS posterior sampling.

M-step: the prior fine-tuned on the previous lap's reconstructions (optimiser and EMA restart
each lap). E-step: moment-matching posterior sampling (Tweedie mean and covariance, a few
conjugate-gradient iterations, ``mmps.cg_iters``) through the channel's linear form.
"""

from __future__ import annotations

from diffem_cli.methods.base import PriorMethod


class EMMMPS(PriorMethod):
    name = "em-mmps"
    description = "EM-MMPS: unconditional prior, E-step by moment-matching posterior sampling"
