"""Confidence intervals over repeated runs (seeds), so a table's differences can be read as such.

A metric measured once per seed is summarised by its mean and the Student-t interval
``mean +- t(1 - (1 - level) / 2, n - 1) * s / sqrt(n)`` (``s``: the sample standard deviation):
with few seeds the t quantile, not the normal one, gives the interval its stated coverage when
the per-seed values are roughly normal. Two methods whose intervals overlap are not ordered by
that table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from diffem_cli.core.errors import DiffemError


@dataclass(frozen=True)
class Interval:
    """The mean of ``n`` values and its two-sided Student-t interval at ``level``; one value
    has no interval (``half_width`` None)."""

    mean: float
    half_width: float | None
    n: int
    level: float

    @property
    def low(self) -> float | None:
        """The interval's lower end (None with one value)."""
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        """The interval's upper end (None with one value)."""
        return None if self.half_width is None else self.mean + self.half_width

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: mean, half_width, low, high, n, level."""
        return {**asdict(self), "low": self.low, "high": self.high}


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """The mean of ``values`` and its two-sided Student-t interval at ``level`` (in (0, 1))."""
    from scipy import stats

    if not 0 < level < 1:
        raise DiffemError(f"confidence level must lie in (0, 1), got {level}")
    xs = [float(v) for v in values]
    if not xs:
        raise DiffemError("an interval needs at least one value")
    if not all(math.isfinite(v) for v in xs):
        return Interval(math.nan, None if len(xs) == 1 else math.nan, len(xs), level)
    n = len(xs)
    mean = math.fsum(xs) / n
    if n == 1:
        return Interval(mean, None, 1, level)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in xs) / (n - 1))
    quantile = float(stats.t.ppf(1 - (1 - level) / 2, n - 1))
    return Interval(mean, quantile * sd / math.sqrt(n), n, level)
