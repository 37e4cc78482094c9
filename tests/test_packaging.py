"""pyproject.toml declares every third-party module diffem imports, with ranges the installed set meets."""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib.metadata import packages_distributions, version
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(extras: bool) -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    if extras:
        for group in PYPROJECT["project"]["optional-dependencies"].values():
            reqs += [Requirement(r) for r in group]
    return {r.name.lower().replace("_", "-"): r for r in reqs}


def _imported_modules() -> set[str]:
    found = set()
    for folder in ("diffem_cli", "channels"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and not m.startswith("diffem")}


def test_every_imported_module_is_declared() -> None:
    declared = _requirements(extras=True)
    dists = packages_distributions()
    for module in sorted(_imported_modules()):
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        assert names & set(declared), f"module {module!r} (distribution {names}) is not in pyproject.toml"


def test_installed_versions_meet_the_declared_ranges() -> None:
    for name, req in _requirements(extras=False).items():
        assert req.specifier.contains(version(name), prereleases=True), (name, version(name), str(req))
    datasets = _requirements(extras=False)["datasets"]
    assert not datasets.specifier.contains("3.6") and datasets.specifier.contains("4.0")  # datasets.List
