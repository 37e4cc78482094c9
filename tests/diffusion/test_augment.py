"""Augmentation of training batches: every column of a row gets the same flip, and only images."""

import pytest
import torch

from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.augment import augment_batch, check_augment
from diffem_cli.diffusion.nets import VectorMLP
from diffem_cli.diffusion.train import TrainConfig, train_denoiser, validate_train


def _dihedral(img: torch.Tensor) -> list[torch.Tensor]:
    """The eight images of ``img`` (C, H, W) under the square's symmetries."""
    out = []
    for t in (img, img.transpose(-2, -1)):
        out += [t, t.flip(-1), t.flip(-2), t.flip(-1).flip(-2)]
    return out


def _which(row: torch.Tensor, candidates: list[torch.Tensor]) -> int:
    hits = [i for i, c in enumerate(candidates) if torch.equal(row, c)]
    assert len(hits) >= 1
    return hits[0]


@pytest.mark.parametrize("mode, group", [("hflip", 2), ("dihedral", 8)])
def test_each_row_gets_one_transform_of_the_group_on_every_column(mode, group):
    x = torch.randn(256, 2, 5, 5)
    batch = {"x": x, "cond": torch.randn(256, 3, 5, 5), "weight": torch.rand(256, 2, 5, 5)}
    out = augment_batch(batch, mode, torch.Generator().manual_seed(0))

    def images(t: torch.Tensor) -> list[torch.Tensor]:
        return _dihedral(t) if mode == "dihedral" else [t, t.flip(-1)]

    seen = set()
    for i in range(len(x)):
        k = _which(out["x"][i], images(x[i]))
        seen.add(k)
        for name in ("cond", "weight"):
            assert torch.equal(out[name][i], images(batch[name][i])[k])
    assert len(seen) == group  # 256 rows draw every transform (each misses with odds under 1e-14)


def test_none_leaves_the_batch_and_the_generator_alone():
    batch = {"x": torch.randn(8, 1, 4, 4)}
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    out = augment_batch(batch, "none", gen)
    assert torch.equal(out["x"], batch["x"]) and torch.equal(gen.get_state(), state)


def test_the_draws_follow_the_generator():
    batch = {"x": torch.randn(64, 1, 4, 4)}
    a = augment_batch(batch, "dihedral", torch.Generator().manual_seed(5))
    b = augment_batch(batch, "dihedral", torch.Generator().manual_seed(5))
    assert torch.equal(a["x"], b["x"])


@pytest.mark.parametrize(
    "mode, data, words",
    [
        ("hflip", {"x": torch.zeros(2, 1, 4, 4), "cond": torch.zeros(2, 6)}, "cond"),
        ("hflip", {"x": torch.zeros(2, 5)}, "x"),
        ("hflip", {"x": torch.zeros(2, 1, 4, 4), "cond": torch.zeros(2, 1, 8, 8)}, "sizes differ"),
        ("dihedral", {"x": torch.zeros(2, 1, 4, 6)}, "square"),
        ("rot90", {"x": torch.zeros(2, 1, 4, 4)}, "unknown"),
    ],
)
def test_what_cannot_be_augmented_is_refused_in_one_line(mode, data, words):
    with pytest.raises(DiffemError, match=words) as err:
        check_augment(mode, data)
    assert "\n" not in str(err.value)


def test_validate_train_names_the_key():
    with pytest.raises(DiffemError, match="train.augment"):
        validate_train(TrainConfig(augment="vflip"))


class _Spy:
    """A loss that keeps each batch it is given and moves no weight."""

    def __init__(self):
        self.batches = []

    def __call__(self, net, batch, sched, gen):
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return sum(p.sum() for p in net.parameters()) * 0.0


def test_training_flips_the_image_and_its_conditioning_together():
    x = torch.randn(64, 1, 4, 4)
    spy = _Spy()
    train_denoiser(
        VectorMLP(16, 0, width=8, depth=1, emb_dim=4),
        {"x": x, "cond": 2 * x},
        TrainConfig(batch_size=32, epochs=2, warmup=0, augment="hflip"),
        loss=spy,
        seed=0,
        device=torch.device("cpu"),
    )
    rows = torch.cat([b["x"] for b in spy.batches])
    conds = torch.cat([b["cond"] for b in spy.batches])
    assert torch.equal(conds, 2 * rows)  # the pairing survives
    original = {tuple(r.flatten().tolist()) for r in x}
    flipped = sum(tuple(r.flatten().tolist()) not in original for r in rows)
    assert 0 < flipped < len(rows)


def test_training_refuses_vector_conditioning_before_any_step():
    spy = _Spy()
    with pytest.raises(DiffemError, match="train.augment"):
        train_denoiser(
            VectorMLP(3, 2, width=8, depth=1, emb_dim=4),
            {"x": torch.randn(8, 3), "cond": torch.randn(8, 2)},
            TrainConfig(batch_size=4, epochs=1, warmup=0, augment="hflip"),
            loss=spy,
            seed=0,
            device=torch.device("cpu"),
        )
    assert spy.batches == []
