"""The label-free monitor's distance: what it compares, and its value where it is known exactly."""

from __future__ import annotations

import pytest
import torch

from diffem_cli.metrics.monitor import halves, observation_distance, observation_vectors, real_side
from diffem_cli.metrics.sliced import projections


def test_observation_vectors_join_every_tensor_by_key():
    obs = {"y": torch.tensor([[1.0, 2.0]]), "A": torch.tensor([[[3.0], [4.0]]])}
    assert observation_vectors(obs).tolist() == [[3.0, 4.0, 1.0, 2.0]]  # "A" sorts before "y"


def test_halves_are_disjoint_fixed_and_capped():
    a, b = halves(11, 100)
    assert len(a) == len(b) == 5 and not set(a.tolist()) & set(b.tolist())
    assert torch.equal(halves(11, 100)[0], a)  # the same rows every lap
    assert [len(h) for h in halves(11, 3)] == [3, 3]


def test_a_shifted_model_scores_its_shift_over_a_zero_floor():
    # both halves hold the same observations, so the floor is 0; the model's observations are
    # those shifted by c, so on each direction theta the 1-D W2 is |theta . c| exactly
    torch.manual_seed(0)
    rows = torch.randn(8, 3, dtype=torch.float64)
    real = {"y": torch.cat([rows, rows])}
    first, second = torch.arange(8), torch.arange(8, 16)
    c = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    out = observation_distance(real, {"y": torch.cat([rows, rows]) + c}, first, second)
    theta = projections(3)
    expected = float(((c @ theta) ** 2).mean().sqrt())
    assert out["obs_sw2_floor"] == 0.0
    assert out["obs_sw2"] == pytest.approx(expected, rel=1e-9)
    same = observation_distance(real, real, first, second)
    assert same["obs_sw2"] == 0.0


def test_a_kept_real_side_gives_the_numbers_of_a_fresh_one():
    # a run computes the real observations' side once and reuses it every lap: the same bits
    gen = torch.Generator().manual_seed(1)
    real = {"y": torch.randn(40, 3, generator=gen), "A": torch.randn(40, 3, 2, generator=gen)}
    first, second = halves(40, 100)
    side = real_side(real, first, second)
    for shift in (0.0, 0.3):
        simulated = {k: v[torch.cat([first, second])] + shift for k, v in real.items()}
        fresh = observation_distance(real, simulated, first, second)
        assert observation_distance(real, simulated, first, second, side=side) == fresh
    assert side.floor == fresh["obs_sw2_floor"] > 0
