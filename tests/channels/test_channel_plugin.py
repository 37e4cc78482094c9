"""The third-party plugin ``plugins/diffem-downsample`` through real entry-point discovery (no pip).

An installed distribution is simulated by a ``diffem_downsample-0.1.0.dist-info`` folder (METADATA
and entry_points.txt, as pip writes them) under ``tmp_path``; the plugin's source folder goes on
``sys.path``. Also: a broken plugin and a name claimed by two distributions.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, fake_dist, forget_modules

from diffem_channels import Channel, ChannelError, sample_seeds
from diffem_cli.cli.app import run
from diffem_cli.core.errors import DiffemError
from diffem_cli.io import registry

PLUGIN_SRC = Path(__file__).resolve().parents[2] / "plugins" / "diffem-downsample" / "src"

GOOD = """
from diffem_channels import Channel


class Chan(Channel):
    name = "mask2"
    description = "A test channel."
"""


@pytest.fixture
def downsample(site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The downsample plugin, "installed" as distribution diffem-downsample; its modules are forgotten
    afterwards (as ``site`` forgets those of the fake distributions)."""
    fake_dist(site, "diffem-downsample", {"downsample": "diffem_downsample:DownsampleChannel"})
    monkeypatch.syspath_prepend(str(PLUGIN_SRC))
    monkeypatch.syspath_prepend(str(site))
    yield site
    forget_modules(PLUGIN_SRC)


def images(batch: int, shape: tuple[int, int, int] = (3, 8, 12), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((batch, *shape), generator=g, dtype=torch.float64) * 2 - 1


def test_plugin_is_discovered_with_its_distribution(
    downsample: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    [info] = [i for i in registry.list_channels() if i.name == "downsample"]
    assert info.ok and info.dist == "diffem-downsample" and info.cls is not None
    assert info.cls.__module__ == "diffem_downsample"
    assert run(["channels"]) == 0
    out = capsys.readouterr().out
    assert "downsample" in out and "diffem-downsample" in out and "mask" in out
    assert run(["channels", "downsample", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["dist"] == "diffem-downsample" and shown["linear"] is True
    assert [p["name"] for p in shown["params"]] == ["factor", "sigma"]


def test_downsample_channel_is_a_correct_linear_channel(downsample: Path) -> None:
    from diffem_channels.testing import check_channel

    channel = registry.make_channel("downsample", {"factor": "2", "sigma": "0.05"})
    check_channel(channel, (3, 8, 12))  # the contract, spec round trip through the registry included
    check_channel(registry.make_channel("downsample", {"factor": 4, "sigma": 0}), (1, 16, 16))
    x = images(8)
    seeds = sample_seeds(1, range(8))
    obs = channel.corrupt(x, seeds)
    y = obs["y"]
    assert y.shape == (8, 3, 4, 6)
    # per-sample seeding: the same samples in other batches give the same observations
    parts = [channel.corrupt(x[:3], seeds[:3])["y"], channel.corrupt(x[3:], seeds[3:])["y"]]
    assert torch.equal(y, torch.cat(parts))
    # y = avgpool(x) + sigma * eps
    ax = channel.A(obs, x)
    assert_close(ax, F.avg_pool2d(x, 2))
    assert abs((y - ax).std().item() - 0.05) < 0.01
    # exact adjoint: float64 sums of 288 (and 72) products of size <= 4, equal to ~1e-13
    v = torch.randn(ax.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert_close((ax * v).sum(), (x * channel.At(obs, v)).sum(), 1e-10)
    cond = channel.condition(obs, (3, 8, 12))
    assert cond.shape == (8, channel.cond_size((3, 8, 12)), 8, 12)
    assert_close(cond[:, :, ::2, ::2], y)
    with pytest.raises(ChannelError, match="divisible"):
        registry.make_channel("downsample", {"factor": 3}).check_data((3, 8, 12))
    with pytest.raises(ChannelError, match="'factor'"):
        registry.make_channel("downsample", {"factor": 0})


def test_cli_corrupt_with_the_plugin(
    downsample: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if importlib.util.find_spec("diffem_cli.cli.commands.corrupt_cmd") is None:
        pytest.skip("the corrupt command is not written yet")
    from diffem_cli.io.store import read_dataset

    out = tmp_path / "obs"
    argv = [
        "corrupt",
        "digits",
        str(out),
        "-c",
        "downsample",
        "-p",
        "factor=2",
        "--limit",
        "16",
        "--seed",
        "4",
    ]
    assert run(argv) == 0, capsys.readouterr().err
    ds, manifest = read_dataset(out)
    assert len(ds) == 16
    y = torch.as_tensor(np.stack(ds.with_format("numpy")["y"]))
    assert tuple(y.shape) == (16, 1, 4, 4)
    assert json.dumps(manifest).count("downsample") >= 1


def test_broken_plugin_does_not_break_the_rest(
    site: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = "raise ImportError('this plugin needs libmissing')\n"
    fake_dist(
        site, "diffem-broken", {"broken": "fake_broken_plugin:BrokenChannel"}, {"fake_broken_plugin": source}
    )
    monkeypatch.syspath_prepend(str(site))
    [info] = [i for i in registry.list_channels() if i.name == "broken"]
    assert info.dist == "diffem-broken" and not info.ok and "libmissing" in (info.error or "")
    assert isinstance(registry.make_channel("mask", {"rho": "0.5"}), Channel)
    with pytest.raises(DiffemError, match="libmissing"):
        registry.make_channel("broken", {})
    assert run(["channels"]) == 0
    out = capsys.readouterr().out
    assert "broken" in out and "libmissing" in out and "projection" in out
    assert run(["channels", "broken"]) == 0
    assert "libmissing" in capsys.readouterr().out
    if importlib.util.find_spec("diffem_cli.cli.commands.corrupt_cmd") is not None:
        argv = ["corrupt", "digits", str(tmp_path / "obs"), "-c", "mask", "--limit", "4"]
        assert run(argv) == 0, capsys.readouterr().err


def test_two_distributions_claiming_one_name(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dist(site, "diffem-alpha", {"mask2": "fake_mask2_mod:Chan"}, {"fake_mask2_mod": GOOD})
    fake_dist(site, "diffem-beta", {"mask2": "fake_mask2_mod:Chan"})
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(DiffemError, match="mask2.*diffem-alpha.*diffem-beta"):
        registry.get_channel_class("mask2")
    listed = [i for i in registry.list_channels() if i.name == "mask2"]
    assert [i.dist for i in listed] == ["diffem-alpha", "diffem-beta"]
    assert all(not i.ok and "several distributions" in (i.error or "") for i in listed)
    assert registry.get_channel_class("mask").name == "mask"
