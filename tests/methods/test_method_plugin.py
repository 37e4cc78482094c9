"""The third-party method plugin ``plugins/diffem-mean-shrink`` through real entry-point discovery
(no pip), as ``tests/channels/test_channel_plugin.py`` does for the channel plugin.

An installed distribution is simulated by a ``diffem_mean_shrink-0.1.0.dist-info`` folder
(METADATA and entry_points.txt, as pip writes them) under ``tmp_path``; the plugin's source folder
goes on ``sys.path``. Also: a broken plugin, a name claimed twice, an option section clash.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import QUICK, TINY_MLP, forget_modules, run_ok, sets

from diffem_channels.mask import MaskChannel
from diffem_cli.cli.app import run
from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.checkpoint import load_checkpoint
from diffem_cli.io.observations import load_recon
from diffem_cli.methods import get_method_class, list_methods, method_for_checkpoint, method_names

PLUGIN_SRC = Path(__file__).resolve().parents[2] / "plugins" / "diffem-mean-shrink" / "src"


def method_dist(
    root: Path, dist: str, entries: dict[str, str], modules: dict[str, str] | None = None
) -> None:
    """Write an installed-distribution record for ``dist`` declaring methods ``entries``."""
    info = root / f"{dist.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entries.items())
    (info / "entry_points.txt").write_text(f"[diffem.methods]\n{lines}")
    for module, source in (modules or {}).items():
        (root / f"{module}.py").write_text(source)


@pytest.fixture
def shrink(site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The mean-shrink plugin, "installed" as distribution diffem-mean-shrink."""
    method_dist(site, "diffem-mean-shrink", {"mean-shrink": "diffem_mean_shrink:MeanShrink"})
    monkeypatch.syspath_prepend(str(PLUGIN_SRC))
    monkeypatch.syspath_prepend(str(site))
    yield site
    forget_modules(PLUGIN_SRC)


def test_plugin_is_listed_with_its_options_and_channels(shrink: Path, capsys: pytest.CaptureFixture[str]):
    assert method_names()[-1] == "mean-shrink"  # after the built-ins
    assert run(["methods"]) == 0
    out = capsys.readouterr().out
    assert "mean-shrink" in out and "diffem-mean-shrink" in out and "em-mmps" in out
    assert run(["methods", "--json"]) == 0
    [shown] = [m for m in json.loads(capsys.readouterr().out) if m["name"] == "mean-shrink"]
    assert shown["ok"] and shown["dist"] == "diffem-mean-shrink" and shown["kind"] == "unconditional"
    assert shown["options"] == {"shrink": {"weight": 0.5}, "mmps": {"cg_iters": 1, "covariance": "tweedie"}}
    assert "mask" in shown["channels"] and "jpeg" not in shown["channels"]


def test_plugin_keeps_the_method_contract(shrink: Path):
    from diffem_channels.jpeg import JpegChannel
    from diffem_cli.methods.testing import check_method

    cls = get_method_class("mean-shrink")
    check_method(cls(), MaskChannel(rho=0.5), (1, 8, 8), refuse=[JpegChannel(quality=50)])


def test_plugin_trains_through_em_train_and_reconstructs(shrink: Path, tmp_path: Path):
    run_ok("corrupt", "manifold:samples=64", tmp_path / "obs", "--channel", "mask", "-p", "rho=0.3")
    run_ok(
        "em-train",
        tmp_path / "obs",
        tmp_path / "run",
        "--laps",
        1,
        "--method",
        "mean-shrink",
        *TINY_MLP,
        *sets("train.batch_size=32", "train.epochs=1", "shrink.weight=0.25", "mmps.cg_iters=2"),
        *QUICK,
    )
    ckpt = load_checkpoint(tmp_path / "run/checkpoints/lap_001.safetensors")
    assert ckpt.meta["method"] == "mean-shrink" and ckpt.kind == "unconditional"
    assert ckpt.meta["method_config"] == {  # the manifold preset's MMPS uses Gaussian moments
        "shrink": {"weight": 0.25},
        "mmps": {"cg_iters": 2, "covariance": "gaussian"},
    }
    assert "moments.mean" in ckpt.aux
    assert method_for_checkpoint(ckpt.meta).options["shrink"].weight == 0.25
    x, _ = load_recon(tmp_path / "run/recon/lap_001")
    assert x.shape == (64, 5) and bool(torch.isfinite(x).all())
    run_ok(
        "reconstruct", tmp_path / "run/checkpoints/lap_001.safetensors", tmp_path / "obs", tmp_path / "rec"
    )
    with pytest.raises(DiffemError, match=r"'shrink.weight' must be in \[0, 1\]"):
        from diffem_cli.config.run import load_config
        from diffem_cli.methods import extensions

        load_config("manifold", ["shrink.weight=2"], extensions=extensions())


BROKEN = "raise ImportError('no such thing')\n"
OTHER_MMPS = """
from dataclasses import dataclass

from diffem_cli.methods.em_mmps import EMMMPS


@dataclass
class Mine:
    cg_iters: int = 9


class Clash(EMMMPS):
    name = "clash"
    description = "Takes the mmps section with another class."
    option_classes = {"mmps": Mine}
"""


def test_broken_and_clashing_plugins_are_listed_not_fatal(site: Path, monkeypatch, capsys):
    method_dist(site, "broken-dist", {"broken": "broken_mod:Nope"}, {"broken_mod": BROKEN})
    method_dist(site, "clash-dist", {"clash": "clash_mod:Clash"}, {"clash_mod": OTHER_MMPS})
    method_dist(site, "twin-dist", {"em-mmps": "diffem_cli.methods.em_mmps:EMMMPS"})
    monkeypatch.syspath_prepend(str(site))
    infos = {(i.name, i.dist): i for i in list_methods()}
    assert "no such thing" in infos["broken", "broken-dist"].error
    assert "option section 'mmps'" in infos["clash", "clash-dist"].error
    assert "several distributions" in infos["em-mmps", "twin-dist"].error
    assert run(["methods"]) == 0
    out = capsys.readouterr().out
    assert "broken" in out and "no such thing" in out
    assert "diffem" in method_names() and "broken" not in method_names()
    with pytest.raises(DiffemError, match="'broken' from broken-dist is broken"):
        get_method_class("broken")
    with pytest.raises(DiffemError, match=r"unknown method 'difem'; did you mean 'diffem'\? \(known: "):
        get_method_class("difem")
