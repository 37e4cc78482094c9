"""The Student-t interval of ``compare --seeds``, checked against quantiles known in closed form."""

from __future__ import annotations

import math

import pytest

from diffem_cli.core.errors import DiffemError
from diffem_cli.metrics.intervals import t_interval


def test_two_values_use_the_cauchy_quantile():
    # one degree of freedom: Student t is Cauchy, quantile tan(pi (p - 1/2)); s = sqrt(2), n = 2
    iv = t_interval([0.0, 2.0])
    t = math.tan(math.pi * (0.975 - 0.5))
    assert iv.mean == 1.0 and iv.n == 2
    assert iv.half_width == pytest.approx(t * math.sqrt(2) / math.sqrt(2), rel=1e-9)
    assert (iv.low, iv.high) == pytest.approx((1.0 - t, 1.0 + t), rel=1e-9)


def test_three_values_use_the_two_degree_quantile():
    # two degrees of freedom: quantile (2p - 1) / sqrt(2 p (1 - p)); values 1, 2, 3: s = 1, n = 3
    p = 0.975
    t = (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    iv = t_interval([3.0, 1.0, 2.0])
    assert iv.mean == 2.0
    assert iv.half_width == pytest.approx(t / math.sqrt(3), rel=1e-9)
    wider = t_interval([3.0, 1.0, 2.0], level=0.99)
    assert wider.half_width > iv.half_width


def test_one_value_has_no_interval_and_bad_input_is_refused():
    iv = t_interval([4.5])
    assert iv.mean == 4.5 and iv.half_width is None and iv.low is None
    assert iv.to_dict() == {"mean": 4.5, "half_width": None, "n": 1, "level": 0.95, "low": None, "high": None}
    assert t_interval([1.0, 1.0, 1.0]).half_width == 0.0
    assert math.isnan(t_interval([1.0, math.nan]).mean)
    with pytest.raises(DiffemError):
        t_interval([])
    with pytest.raises(DiffemError):
        t_interval([1.0, 2.0], level=1.0)
