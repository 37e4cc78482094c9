"""The channel-plugin example of docs/plugins.md works when copied, as a new user would copy it."""

import re
import tomllib
from pathlib import Path

from helpers import fake_dist

PLUGINS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", PLUGINS_PAGE.read_text(), flags=re.S)


def test_documented_plugin_example_is_discovered_and_corrupts(site, monkeypatch, cli, tmp_path):
    pyproject = tomllib.loads(_blocks("toml")[0])
    entries = pyproject["project"]["entry-points"]["diffem.channels"]
    module_name = pyproject["tool"]["setuptools"]["py-modules"][0]
    source = next(b for b in _blocks("python") if "class " in b and "Channel" in b)
    fake_dist(site, pyproject["project"]["name"], entries, {module_name: source})
    monkeypatch.syspath_prepend(str(site))

    (name,) = entries
    code, out, err = cli("channels", name)
    assert code == 0, err
    assert pyproject["project"]["name"] in out
    from diffem_channels.testing import check_channel
    from diffem_cli.io import registry

    check_channel(registry.make_channel(name), (1, 8, 8))  # what the page tells plugin authors to run

    obs = tmp_path / "obs"
    code, out, err = cli("corrupt", "digits", obs, "--channel", name, "--limit", "16", "--seed", "0")
    assert code == 0, err
    import datasets

    ds = datasets.load_from_disk(str(obs))
    assert len(ds) == 16 and "y" in ds.column_names
