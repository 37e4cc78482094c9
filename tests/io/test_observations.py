"""Clean data are paired with the observations by their index column, never by position."""

from __future__ import annotations

import pytest
import torch
from helpers import read_x, run_ok

from diffem_cli.core.errors import DiffemError
from diffem_cli.io.observations import Observations, load_clean, save_recon
from diffem_cli.io.store import write_dataset


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("obs")
    run_ok("corrupt", "manifold:samples=32", root / "obs", "-c", "projection", "--clean-out", root / "clean")
    return root


def test_clean_rows_follow_the_observations_index(folders, tmp_path):
    data = Observations(folders / "obs")
    clean = read_x(folders / "clean")
    assert torch.equal(load_clean(folders / "clean", data), clean)
    perm = torch.randperm(len(clean), generator=torch.Generator().manual_seed(0))
    save_recon(tmp_path / "shuffled", clean[perm], data.index[perm], {})
    assert torch.equal(load_clean(tmp_path / "shuffled", data), clean)


@pytest.mark.parametrize("case", ["missing", "shifted"])
def test_clean_folders_with_other_indices_are_refused(folders, tmp_path, case):
    data = Observations(folders / "obs")
    clean = read_x(folders / "clean")
    x, index = (clean[1:], data.index[1:]) if case == "missing" else (clean, data.index + 1)
    save_recon(tmp_path / "other", x, index, {})
    with pytest.raises(DiffemError, match="other indices than the observations"):
        load_clean(tmp_path / "other", data)


def test_an_unpaired_reference_set_comes_back_as_it_is(folders, tmp_path):
    """Vector metrics compare distributions: a held-out clean set of other samples is a reference."""
    data = Observations(folders / "obs")
    clean = read_x(folders / "clean")
    save_recon(tmp_path / "heldout", clean[:5], data.index[:5] + 1000, {})
    assert torch.equal(load_clean(tmp_path / "heldout", data, paired=False), clean[:5])
    perm = torch.randperm(len(clean), generator=torch.Generator().manual_seed(0))
    save_recon(tmp_path / "shuffled", clean[perm], data.index[perm], {})
    assert torch.equal(load_clean(tmp_path / "shuffled", data, paired=False), clean)


def test_clean_folders_without_index_pair_by_position_of_the_same_length(folders, tmp_path):
    data = Observations(folders / "obs")
    clean = read_x(folders / "clean")
    write_dataset(tmp_path / "plain", iter([{"x": clean}]), {"kind": "clean"})
    assert torch.equal(load_clean(tmp_path / "plain", data), clean)
    write_dataset(tmp_path / "short", iter([{"x": clean[:-1]}]), {"kind": "clean"})
    with pytest.raises(DiffemError, match="no index column"):
        load_clean(tmp_path / "short", data)
