"""The library's layers: imports only go down, deferred imports included, and nothing cycles.

Every import statement in a module counts, at top level or inside a function, so a cycle cannot
hide behind a deferred import. A module may import from its own layer or any layer below it;
inside a layer the module graph has no cycle either. ``diffem_channels`` (the channel interface)
sits below all of ``diffem_cli``; only its contract kit ``testing`` may reach into diffem_cli.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "diffem_cli"
LAYERS = ("core", "io", "metrics", "diffusion", "gaussian", "config", "methods", "pipeline", "cli")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every diffem_cli module ``path`` imports, anywhere in the file (absolute imports only)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("diffem_cli")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffem_cli"):
            assert node.level == 0, f"{path}: relative import"
            for alias in node.names:  # ``from diffem_cli.io import store`` imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _exists(sub) else node.module)
    return found


def _exists(module: str) -> bool:
    base = ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        return None
    return LAYERS.index(parts[1])


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_belongs_to_a_layer() -> None:
    loose = [m for m in _graph() if _layer(m) is None and m not in {"diffem_cli", "diffem_cli.__main__"}]
    assert not loose, f"modules outside the layers {LAYERS}: {loose}"


def test_imports_only_go_down() -> None:
    upward = []
    for module, targets in _graph().items():
        mine = _layer(module)
        for target in targets:
            theirs = _layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that reach up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph or nxt == node or nxt in ("diffem_cli",):
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_channels_do_not_import_diffem_cli() -> None:
    for path in (ROOT / "channels" / "diffem_channels").glob("*.py"):
        if path.stem == "testing":
            continue
        assert not _imports(path), f"{path.name} imports diffem_cli"


def test_no_private_name_crosses_a_module() -> None:
    crossing = []
    for path in list(PACKAGE.rglob("*.py")) + list((ROOT / "channels").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffem"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        crossing.append(f"{_module_name(path)}: from {node.module} import {alias.name}")
    assert not crossing, "private names imported across modules:\n" + "\n".join(crossing)
