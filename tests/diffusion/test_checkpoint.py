"""Checkpoints: save -> load -> build_model round trips, metadata, and broken or foreign files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from diffem_cli import __version__
from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.checkpoint import (
    FORMAT,
    build_model,
    load_checkpoint,
    load_tensors,
    save_checkpoint,
    save_tensors,
)
from diffem_cli.diffusion.nets import build_network, default_unet_config
from diffem_cli.io.store import DiskError

MLP = {"type": "mlp", "width": 32, "depth": 2, "emb_dim": 16}


def _meta(network, shape, cond_size, kind="conditional"):
    return {
        "kind": kind,
        "network": network,
        "cond_size": cond_size,
        "data": {
            "shape": list(shape),
            "kind": "vector" if len(shape) == 1 else "image",
            "value_range": [-2, 2],
        },
        "channel": {"name": "projection", "params": {"m": 2}},
        "lap": 3,
        "metrics": {"sinkhorn": 0.5},
    }


@pytest.mark.parametrize(
    ("network", "shape", "cond_size"),
    [(MLP, (5,), 12), (MLP, (5,), 0), (default_unet_config((1, 8, 8), channels=(16, 32)), (1, 8, 8), 2)],
)
def test_round_trip_gives_identical_outputs(tmp_path, network, shape, cond_size):
    torch.manual_seed(0)
    net = build_network(network, shape, cond_size).eval()
    # move the weights off their initial values so a rebuilt fresh net would not match by chance
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "m.safetensors"
    meta = _meta(network, shape, cond_size)
    save_checkpoint(path, net, meta)
    ckpt = load_checkpoint(path)
    assert ckpt.meta["format"] == FORMAT and ckpt.meta["diffem_version"] == __version__
    # JSON metadata comes back decoded, with its types
    assert (
        ckpt.meta["network"] == network
        and ckpt.meta["lap"] == 3
        and ckpt.meta["metrics"] == {"sinkhorn": 0.5}
    )
    assert ckpt.kind == "conditional" and ckpt.shape == shape
    model = build_model(ckpt)
    assert not model.training
    x = torch.randn(4, *shape)
    cond = torch.randn(4, cond_size, *shape[1:]) if cond_size else None
    t = torch.tensor([123])
    with torch.no_grad():
        assert torch.equal(net(x, t, cond), model(x, t, cond))
    # nothing but the target file is left behind (atomic write)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_save_tensors_overwrites_atomically(tmp_path):
    path = tmp_path / "s.safetensors"
    save_tensors(path, {"a": torch.zeros(2)}, {"epoch": 1, "tag": {"lap": 1}, "name": "plain"})
    save_tensors(path, {"a": torch.ones(2)}, {"epoch": 2, "tag": {"lap": 1}, "name": "plain"})
    tensors, meta = load_tensors(path)
    assert torch.equal(tensors["a"], torch.ones(2))
    assert meta == {"epoch": 2, "tag": {"lap": 1}, "name": "plain"}
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


def _one_line(err: DiffemError) -> str:
    msg = str(err)
    assert "\n" not in msg
    return msg


def test_bad_files_are_one_line_errors(tmp_path):
    net = build_network(MLP, (5,), 0)
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, net, _meta(MLP, (5,), 0, "unconditional"))
    raw = good.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    random_bytes = tmp_path / "random.safetensors"
    random_bytes.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy().tobytes()
    )
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")

    for path, match in [
        (truncated, "not a readable safetensors file"),
        (random_bytes, "not a readable safetensors file"),
        (empty, "not a readable safetensors file"),
        (foreign, "not a diffem checkpoint"),
        (tmp_path / "missing.safetensors", "does not exist"),
        (tmp_path, "is a folder"),
    ]:
        with pytest.raises(DiffemError) as info:
            load_checkpoint(path)
        assert match in _one_line(info.value), (path, str(info.value))


def test_metadata_missing_keys_and_mismatched_weights(tmp_path):
    net = build_network(MLP, (5,), 0)
    path = tmp_path / "m.safetensors"
    save_tensors(path, net.state_dict(), {"format": FORMAT, "kind": "unconditional", "data": {"shape": [5]}})
    with pytest.raises(DiffemError, match="lacks checkpoint metadata 'network'"):
        load_checkpoint(path)
    # weights of one network under the config of another
    save_checkpoint(path, net, _meta({**MLP, "width": 64}, (5,), 0, "unconditional"))
    with pytest.raises(DiffemError) as info:
        build_model(load_checkpoint(path))
    assert "do not match its network config" in _one_line(info.value)


def test_metadata_strings_stay_strings(tmp_path):
    path = tmp_path / "m.safetensors"
    save_tensors(path, {"a": torch.zeros(1)}, {"note": "not json {", "n": 3})
    _, meta = load_tensors(path)
    assert meta == {"note": "not json {", "n": 3}
    assert json.loads(json.dumps(meta)) == meta


def _data_offset(path) -> int:
    """Where the tensor bytes of a safetensors file start (after the 8-byte length and the header)."""
    raw = path.read_bytes()
    return 8 + int.from_bytes(raw[:8], "little")


def test_flipped_bytes_and_edited_metadata_fail_the_checksum(tmp_path):
    net = build_network(MLP, (5,), 0)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, net, _meta(MLP, (5,), 0, "unconditional"))
    assert "checksum" not in load_checkpoint(path).meta  # verified, then dropped from the metadata
    raw = bytearray(path.read_bytes())
    start = _data_offset(path)
    for offset in (start, start + 1000, len(raw) - 1):  # first, middle, last byte of the weights
        bad = bytearray(raw)
        bad[offset] ^= 0x10
        flipped = tmp_path / f"flip{offset}.safetensors"
        flipped.write_bytes(bytes(bad))
        with pytest.raises(DiffemError) as info:
            load_checkpoint(flipped)
        assert _one_line(info.value) == f"{flipped}: checksum mismatch (the file was modified or corrupted)"
    # a metadata value edited in place (same length, so the header still parses)
    header = raw[8:start].decode()
    assert '"sinkhorn\\": 0.5' in header
    edited = tmp_path / "edited.safetensors"
    edited.write_bytes(
        bytes(raw[:8]) + header.replace('"sinkhorn\\": 0.5', '"sinkhorn\\": 0.1').encode() + raw[start:]
    )
    with pytest.raises(DiffemError, match="checksum mismatch"):
        load_checkpoint(edited)


def test_files_without_a_checksum_load_only_when_trusted(tmp_path, monkeypatch):
    net = build_network(MLP, (5,), 0)
    path = tmp_path / "old.safetensors"
    meta = {"format": FORMAT, **_meta(MLP, (5,), 0, "unconditional")}
    save_file(net.state_dict(), str(path), metadata={k: json.dumps(v) for k, v in meta.items()})
    monkeypatch.delenv("DIFFEM_TRUST_UNVERIFIED", raising=False)
    with pytest.raises(DiffemError, match="carries no checksum.*DIFFEM_TRUST_UNVERIFIED=1"):
        load_checkpoint(path)
    monkeypatch.setenv("DIFFEM_TRUST_UNVERIFIED", "1")
    assert build_model(load_checkpoint(path)) is not None


def test_a_removed_checksum_key_with_changed_weights_is_refused(tmp_path, monkeypatch):
    from safetensors import safe_open

    monkeypatch.delenv("DIFFEM_TRUST_UNVERIFIED", raising=False)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, build_network(MLP, (5,), 0), _meta(MLP, (5,), 0, "unconditional"))
    with safe_open(str(path), framework="pt") as f:
        raw = dict(f.metadata())
        tensors = {k: f.get_tensor(k) + 1 for k in f.keys()}
    del raw["checksum"]
    save_file(tensors, str(path), metadata=raw)
    with pytest.raises(DiffemError, match="carries no checksum"):
        load_checkpoint(path)
    # a foreign file is still named as such, not as unverified
    save_file(tensors, str(path))
    with pytest.raises(DiffemError, match="not a diffem checkpoint"):
        load_checkpoint(path)


def test_non_finite_weights_are_refused(tmp_path):
    net = build_network(MLP, (5,), 0)
    with torch.no_grad():
        next(net.parameters())[0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_checkpoint(path, net, _meta(MLP, (5,), 0, "unconditional"))
    with pytest.raises(DiffemError) as info:
        load_checkpoint(path)
    assert "non-finite value(s) (NaN or infinity)" in _one_line(info.value)


def test_a_lying_width_fails_without_allocating(tmp_path):
    import resource

    net = build_network(MLP, (5,), 0)
    path = tmp_path / "huge.safetensors"
    save_checkpoint(path, net, _meta({**MLP, "width": 10**8}, (5,), 0, "unconditional"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DiffemError) as info:
        build_model(load_checkpoint(path))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    # width 1e8, depth 2: the real network would hold about 1e16 weights (4e16 bytes)
    assert "shape" in _one_line(info.value) and "do not match its network config" in str(info.value)
    assert grown_mb < 100, grown_mb  # the real network would need about 4e7 GB


def test_invalid_network_configs_are_one_line(tmp_path):
    net = build_network(MLP, (5,), 0)
    path = tmp_path / "m.safetensors"
    for network, match in [
        ({"type": "unet", "bogus": 1}, "invalid network config|network.type=unet needs images"),
        ({"type": "mlp", "width": "wide"}, "invalid network config"),
        ({"type": "transformer"}, "unknown network type"),
        ("mlp", "invalid network config"),
    ]:
        save_checkpoint(path, net, _meta(network, (5,), 0, "unconditional"))
        with pytest.raises(DiffemError, match=match) as info:
            build_model(load_checkpoint(path))
        _one_line(info.value)


def test_full_disk_while_saving_leaves_no_temporary(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    path = tmp_path / "m.safetensors"
    with pytest.raises(DiskError) as info:  # a one-line DiffemError (exit 2) and still an OSError
        save_tensors(path, {"a": torch.zeros(2)}, {})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert isinstance(info.value, OSError) and str(info.value) == f"{path}: No space left on device"
    assert list(tmp_path.iterdir()) == []


def test_auxiliary_tensors_round_trip_apart_from_the_weights(tmp_path):
    net = build_network(MLP, (5,), 0)
    path = tmp_path / "m.safetensors"
    moments = {"moments.mean": torch.arange(5.0, dtype=torch.float64), "moments.cov": torch.eye(5)}
    save_checkpoint(path, net, _meta(MLP, (5,), 0, kind="unconditional"), aux=moments)
    ckpt = load_checkpoint(path)
    assert set(ckpt.aux) == set(moments) and all(torch.equal(ckpt.aux[k], v) for k, v in moments.items())
    assert set(ckpt.weights) == set(net.state_dict())
    build_model(ckpt)  # the auxiliary tensors are not taken for unexpected weights
    # a stray tensor outside the aux. namespace still is
    tensors = {**net.state_dict(), "extra": torch.zeros(1)}
    save_tensors(path, tensors, {"format": FORMAT, **_meta(MLP, (5,), 0, kind="unconditional")})
    with pytest.raises(DiffemError, match="unexpected weight 'extra'"):
        build_model(load_checkpoint(path))
