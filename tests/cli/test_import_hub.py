"""``diffem import hf:NAME[:SPLIT]``: a Hub data set is read as ``corrupt`` reads it (here
``datasets.load_dataset`` returns a small in-memory data set: no network), its name recorded in the
manifest and provenance; a Hub that cannot be reached is one line naming the data set, exit 2."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
from helpers import cut_network, error_line
from PIL import Image

from diffem_cli.io.provenance import read_chain
from diffem_cli.io.store import read_manifest


def _noisy_digits() -> datasets.Dataset:
    """Six 8x8 grey images (as if already noisy) with labels and file names, like a Hub split."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)) for _ in range(6)]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=["cat", "dog"]),
            "file_name": datasets.Value("string"),
        }
    )
    rows = {"image": images, "label": [0, 1] * 3, "file_name": [f"img_{i}.png" for i in range(6)]}
    return datasets.Dataset.from_dict(rows, features=features)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """``datasets.load_dataset`` answering ``someone/noisy`` from memory; the calls it got."""
    calls: list[tuple[str, str]] = []

    def load_dataset(name: str, split: str | None = None, **kwargs: object) -> datasets.Dataset:
        calls.append((name, split))
        if name != "someone/noisy":
            raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)\nmore")
        return _noisy_digits()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_a_hub_data_set_imports_with_its_name_in_the_provenance(cli, hub, tmp_path: Path) -> None:
    code, out, err = cli(
        "import", "hf:someone/noisy:test", tmp_path / "obs", "-c", "noise", "-p", "sigma=0.1"
    )
    assert code == 0, err
    assert hub == [("someone/noisy", "test")]
    assert "imported 6 observations (y, index, file_name, label)" in out
    manifest = read_manifest(tmp_path / "obs")
    assert manifest["source"]["spec"] == "hf:someone/noisy:test" and manifest["data_shape"] == [1, 8, 8]
    assert manifest["files"] == [f"img_{i}.png" for i in range(6)]
    ds = datasets.load_from_disk(str(tmp_path / "obs"))
    assert ds.features["label"].names == ["cat", "dog"]
    chain = read_chain(tmp_path / "obs")
    assert [s["command"] for s in chain] == ["import"]
    step = chain[0]
    assert step["inputs"] == [{"path": "hf:someone/noisy:test"}]
    assert step["params"]["source"]["spec"] == "hf:someone/noisy:test"
    assert step["channel"]["name"] == "noise" and step["channel"]["params"]["sigma"] == 0.1
    # the split defaults to train, as for corrupt
    code, _, err = cli("import", "hf:someone/noisy", tmp_path / "train", "-c", "noise", "-p", "sigma=0.1")
    assert code == 0, err
    assert hub[-1] == ("someone/noisy", "train")
    assert read_manifest(tmp_path / "train")["source"]["spec"] == "hf:someone/noisy:train"


def test_an_unreachable_hub_is_one_line_naming_the_data_set(cli, hub, tmp_path: Path) -> None:
    code, _, err = cli("import", "hf:someone/elsewhere", tmp_path / "obs", "-c", "noise", "-p", "sigma=0.1")
    assert code == 2
    line = error_line(err)
    assert "could not load hf:someone/elsewhere split 'train'" in line and "save_to_disk" in line
    assert not (tmp_path / "obs").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_no_connection_at_all_is_said_before_any_download(cli, hub, tmp_path, monkeypatch) -> None:
    cut_network(monkeypatch)
    code, _, err = cli("import", "hf:someone/noisy", tmp_path / "obs", "-c", "noise")
    assert code == 2
    assert "could not load hf:someone/noisy: no connection to the Hugging Face Hub" in error_line(err)
    assert hub == [] and not (tmp_path / "obs").exists()
