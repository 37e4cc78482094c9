"""Channel discovery through real entry points, error reporting, specs and the ``channels`` command.

Third-party plugins are simulated with a ``*.dist-info`` folder (METADATA + entry_points.txt) and a
module written under ``tmp_path``, which is put on ``sys.path``: the same metadata pip installs.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from helpers import fake_dist

from diffem_channels import API_VERSION, ChannelError
from diffem_cli.cli.app import run
from diffem_cli.core.errors import DiffemError
from diffem_cli.io import registry

BUILTINS = {"mask", "box", "blur", "jpeg", "noise", "projection"}

GOOD = """
from diffem_channels import Channel


class Chan(Channel):
    name = "{name}"
    description = "A test channel."
    api_version = {version}
"""


def activate(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(root))


def test_builtins_are_registered_by_the_diffem_distribution() -> None:
    infos = {i.name: i for i in registry.list_channels()}
    assert BUILTINS <= set(infos)
    for name in BUILTINS:
        info = infos[name]
        assert info.ok and info.dist == "diffem" and info.cls is not None and info.cls.name == name
        assert info.value.startswith(f"diffem_channels.{name}:")
        assert registry.get_channel_class(name) is info.cls


def test_listing_names_imports_nothing(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dist(
        site,
        "diffem-lazy",
        {"lazy": "fake_lazy_mod:Chan"},
        {"fake_lazy_mod": GOOD.format(name="lazy", version=1)},
    )
    activate(site, monkeypatch)
    assert [i.dist for i in registry.discover()["lazy"]] == ["diffem-lazy"]
    unloaded = [i for i in registry.list_channels(load=False) if i.name == "lazy"]
    assert unloaded[0].cls is None and unloaded[0].error is None
    assert "fake_lazy_mod" not in sys.modules
    assert registry.get_channel_class("lazy").__module__ == "fake_lazy_mod"


BROKEN = {
    "import": ("raise ImportError('needs libfoo')", "cannot import.*needs libfoo"),
    "attribute": ("X = 1", "cannot import.*Chan"),
    "not-a-channel": ("class Chan:\n    pass", "not a subclass"),
    "no-description": (GOOD.format(name="bad", version=1).replace('"A test channel."', '""'), "description"),
    "newer-api": (GOOD.format(name="bad", version=API_VERSION + 1), "interface version"),
    "name-mismatch": (GOOD.format(name="other", version=1), "whose name is 'other'"),
    "bad-params": (GOOD.format(name="bad", version=1) + "    params = 3\n", "invalid channel class"),
    "bad-kinds": (
        GOOD.format(name="bad", version=1) + "    data_kinds = frozenset({'audio'})\n",
        "data_kinds",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_plugins_are_listed_with_their_error(
    case: str, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, pattern = BROKEN[case]
    module = f"fake_broken_{case.replace('-', '_')}"
    fake_dist(site, "diffem-bad", {"bad": f"{module}:Chan"}, {module: source})
    activate(site, monkeypatch)
    [info] = [i for i in registry.list_channels() if i.name == "bad"]
    assert info.dist == "diffem-bad" and not info.ok
    assert info.error is not None
    assert re.search(pattern, info.error), info.error
    with pytest.raises(DiffemError, match="channel 'bad' from diffem-bad is broken"):
        registry.get_channel_class("bad")
    assert registry.make_channel("mask", {"rho": 0.5}).rho == 0.5  # the rest keeps working


def test_same_distribution_twice_on_the_path_is_not_a_clash(
    tmp_path: Path, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "copy"
    other.mkdir()
    fake_dist(
        site,
        "diffem-twice",
        {"twice": "fake_twice_mod:Chan"},
        {"fake_twice_mod": GOOD.format(name="twice", version=1)},
    )
    fake_dist(other, "diffem-twice", {"twice": "fake_twice_mod:Chan"})
    activate(other, monkeypatch)
    activate(site, monkeypatch)
    assert len(registry.discover()["twice"]) == 1
    assert registry.get_channel_class("twice").name == "twice"


def test_unknown_names_suggest_the_closest() -> None:
    with pytest.raises(
        DiffemError, match=r"unknown channel 'msk'; did you mean 'mask'\? \(available: .*projection"
    ):
        registry.get_channel_class("msk")
    with pytest.raises(DiffemError) as e:
        registry.make_channel("zzzzzz", {})
    assert "did you mean" not in str(e.value) and "available: " in str(e.value)


def test_make_channel_converts_command_line_strings() -> None:
    channel = registry.make_channel(
        "mask", registry.parse_assignments(["rho=0.5", "per_channel=yes", "sigma= 0.01"])
    )
    assert channel.values == {"rho": 0.5, "sigma": 0.01, "per_channel": True}
    with pytest.raises(ChannelError, match="'rho'"):
        registry.make_channel("mask", {"rho": "1.0"})
    with pytest.raises(ChannelError, match="no parameter 'rh'"):
        registry.make_channel("mask", {"rh": "0.5"})


def test_spec_round_trip_and_refusals() -> None:
    for name, params in [
        ("projection", {"m": 3, "normalize": False}),
        ("box", {"max_size": 0.75}),
        ("jpeg", {}),
    ]:
        channel = registry.make_channel(name, params)
        spec = json.loads(json.dumps(channel.spec()))
        again = registry.channel_from_spec(spec)
        assert type(again) is type(channel) and again.values == channel.values
    spec = registry.make_channel("mask", {}).spec()
    with pytest.raises(DiffemError, match="interface version"):
        registry.channel_from_spec({**spec, "api_version": API_VERSION + 1})
    with pytest.raises(DiffemError, match="unknown channel 'mask_v9'"):
        registry.channel_from_spec({**spec, "name": "mask_v9"})
    with pytest.raises(DiffemError, match="invalid channel spec"):
        registry.channel_from_spec({"params": {}})
    with pytest.raises(DiffemError, match="params"):
        registry.channel_from_spec({"name": "mask", "params": [1]})


def test_parse_assignments() -> None:
    assert registry.parse_assignments([]) == {}
    assert registry.parse_assignments(["a=1", "b = x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    for bad in (["rho"], ["=3"], ["1x=2"], ["a b=1"]):
        with pytest.raises(DiffemError, match="expected KEY=VALUE"):
            registry.parse_assignments(bad)
    with pytest.raises(DiffemError, match="given twice"):
        registry.parse_assignments(["a=1", "a=2"])


def test_channels_command_lists_everything(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["channels"]) == 0
    out = capsys.readouterr().out
    for name in BUILTINS:
        assert name in out
    assert "rho=0.75" in out and "diffem" in out
    assert run(["channels", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    by_name = {d["name"]: d for d in listed}
    assert BUILTINS <= set(by_name)
    assert by_name["jpeg"]["linear"] is False and by_name["projection"]["data_kinds"] == ["vector"]


def test_channels_command_shows_one_in_full(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["channels", "mask"]) == 0
    out = capsys.readouterr().out
    for text in ("rho", "in [0, 1)", "probability that an entry is missing", "per_channel", "bool"):
        assert text in out
    assert run(["channels", "box", "--json"]) == 0
    box = json.loads(capsys.readouterr().out)
    assert box["dist"] == "diffem" and box["ok"] and box["linear"]
    assert [p["name"] for p in box["params"]] == ["min_size", "max_size", "sigma"]
    assert box["params"][0] == {
        "name": "min_size",
        "type": "float",
        "default": 0.25,
        "help": "smallest box side, as a fraction of the image side",
        "constraint": "in (0, 1]",
    }
    assert run(["channels", "blurr"]) == 2
    assert "did you mean 'blur'" in capsys.readouterr().err


def test_unreadable_metadata_of_another_package_is_skipped(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_dist(site, "diffem-junk", {})
    (site / "diffem_junk-0.1.0.dist-info" / "entry_points.txt").write_text(
        "[diffem.channels]\nnot an entry\n"
    )
    activate(site, monkeypatch)
    assert BUILTINS <= set(registry.discover())
    assert registry.make_channel("noise", {"sigma": "0.2"}).sigma == 0.2
