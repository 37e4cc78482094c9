"""diffem's channel interface and its built-in channels (import name ``diffem_channels``).

Third-party plugins subclass :class:`Channel` and declare it under the ``diffem.channels``
entry-point group; the built-ins here are declared the same way.
"""

from diffem_channels.base import (
    API_VERSION,
    Channel,
    ChannelError,
    ImportField,
    Observation,
    Param,
    data_kind,
    in_range,
    mix_seed,
    non_negative,
    per_sample,
    positive,
    sample_seeds,
)

__all__ = [
    "API_VERSION",
    "Channel",
    "ChannelError",
    "ImportField",
    "Observation",
    "Param",
    "data_kind",
    "in_range",
    "mix_seed",
    "non_negative",
    "per_sample",
    "positive",
    "sample_seeds",
]
