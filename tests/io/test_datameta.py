"""Data metadata: the kind follows from the shape, and both JSON forms (a checkpoint's ``data``
entry, a folder manifest's ``data_*`` entries) round-trip byte for byte."""

from __future__ import annotations

import json

import pytest

from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.checkpoint import CheckpointMeta
from diffem_cli.io.datameta import DataMeta, data_kind


def test_kind_follows_the_shape():
    assert data_kind((5,)) == "vector" and data_kind([1, 8, 8]) == "image"
    meta = DataMeta.from_shape([3, 16, 16], [-1, 1])
    assert meta.shape == (3, 16, 16) and meta.kind == "image" and meta.value_range == (-1, 1)
    assert DataMeta.from_shape((5,)).kind == "vector"


@pytest.mark.parametrize(
    "data",
    [
        {"shape": [5], "kind": "vector", "value_range": None, "fingerprint": "abc", "source": None},
        {
            "shape": [1, 8, 8],
            "kind": "image",
            "value_range": [-1, 1],
            "fingerprint": "f0",
            "source": {"spec": "digits", "n": 32, "range": [-1.0, 1.0]},
        },
        {"shape": [2], "kind": "vector", "value_range": [-2.0, 2.0], "fingerprint": None, "source": "x"},
    ],
)
def test_checkpoint_data_entry_round_trips_byte_for_byte(data):
    text = json.dumps(data, sort_keys=True)
    assert json.dumps(DataMeta.from_dict(json.loads(text)).to_dict(), sort_keys=True) == text


def test_manifest_entries_round_trip_byte_for_byte():
    manifest = {"data_shape": [1, 8, 8], "data_kind": "image", "value_range": [-1.0, 1.0], "seed": 0}
    meta = DataMeta.from_manifest(manifest)
    entries = meta.manifest_entries()
    assert json.dumps(entries) == json.dumps({k: manifest[k] for k in entries})
    # an old manifest without data_kind: the kind is derived from the shape
    assert DataMeta.from_manifest({"data_shape": [5]}).kind == "vector"


def test_tolerant_reading_and_one_line_refusals():
    assert DataMeta.from_dict({"shape": [5]}) == DataMeta((5,), "vector")
    for bad in ({}, {"shape": "five"}, [5]):
        with pytest.raises(DiffemError, match="invalid data metadata"):
            DataMeta.from_dict(bad)


def test_checkpoint_meta_reads_old_and_new_metadata():
    old = {"kind": "unconditional", "network": {"type": "mlp"}, "data": {"shape": [5], "kind": "vector"}}
    info = CheckpointMeta.from_dict(old)
    assert (info.kind, info.cond_size, info.channel, info.lap, info.method) == (
        "unconditional",
        0,
        None,
        None,
        None,
    )
    assert info.data == DataMeta((5,), "vector")
    new = {
        **old,
        "kind": "conditional",
        "cond_size": 7,
        "channel": {"name": "mask", "params": {}},
        "lap": 3,
        "method": "diffem",
        "method_config": {"em": {}},
    }
    info = CheckpointMeta.from_dict(new)
    assert (info.cond_size, info.lap, info.method, info.channel["name"]) == (7, 3, "diffem", "mask")
    for meta, match in [
        ({**old, "network": "mlp"}, "invalid network config"),
        ({**old, "data": {"shape": [0]}}, "invalid data shape"),
        ({**old, "cond_size": -1}, "invalid data shape"),
        ({**old, "data": "five"}, "invalid data shape or cond_size"),
    ]:
        with pytest.raises(DiffemError, match=match):
            CheckpointMeta.from_dict(meta)
