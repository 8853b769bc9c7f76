"""The house rules, read from the source: imports point one way, the core never imports torch,
no module imports another through a string, and no source file grows past 500 lines.

Layers, lowest first: the core (`mtl_edge/` but the CLI), train, export, bench, workflows,
and the CLI (`mtl_edge/cli.py`, `mtl_edge/commands/`) above all. A module may import its own
layer and those below, never one above, not even inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Folder -> (installed package, layer).
FOLDERS = {
    "mtl_edge": ("mtl_edge", 0),
    "train": ("mtl_edge.train", 1),
    "export": ("mtl_edge.export", 2),
    "bench": ("mtl_edge.bench", 3),
    "workflows": ("mtl_edge.workflows", 4),
}
CLI = 5
LAYER_NAMES = ["core", "train", "export", "bench", "workflows", "cli"]
MAX_LINES = 500


def sources() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (REPO / folder).rglob("*.py"))


def module_of(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    package, _ = FOLDERS[rel.parts[0]]
    parts = [p for p in rel.parts[1:] if p != "__init__"]
    return ".".join([package, *parts])


def layer_of_module(name: str) -> int | None:
    """The layer of an mtl_edge module name, None for third-party modules."""
    if name != "mtl_edge" and not name.startswith("mtl_edge."):
        return None
    if name == "mtl_edge.cli" or name.startswith("mtl_edge.commands"):
        return CLI
    for _, (package, layer) in FOLDERS.items():
        if layer and (name == package or name.startswith(package + ".")):
            return layer
    return 0


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement of a file, nested ones too."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # `from mtl_edge.commands import train` imports the submodule train
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def string_imports(path: Path) -> list[int]:
    """Lines that import by name at run time (importlib.import_module, __import__, find_spec)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("import_module", "__import__", "find_spec"):
                lines.append(node.lineno)
    return lines


def test_the_source_tree_is_what_the_layers_expect() -> None:
    files = sources()
    assert len(files) > 50
    assert layer_of_module("mtl_edge.train.grid") == 1
    assert layer_of_module("mtl_edge.commands.train") == CLI
    assert layer_of_module("mtl_edge.fewshot.heads") == 0
    assert layer_of_module("torch") is None


def test_imports_point_down_only() -> None:
    upward = []
    for path in sources():
        own = layer_of_module(module_of(path))
        assert own is not None
        for line, name in imports(path):
            target = layer_of_module(name)
            if target is not None and target > own:
                upward.append(
                    f"{path.relative_to(REPO)}:{line} ({LAYER_NAMES[own]}) imports {name} "
                    f"({LAYER_NAMES[target]})"
                )
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_core_never_imports_torch() -> None:
    found = [
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for path in sources()
        if layer_of_module(module_of(path)) == 0
        for line, name in imports(path)
        if name == "torch" or name.startswith("torch.")
    ]
    assert not found, "\n".join(found)


def test_no_string_imports() -> None:
    found = [f"{p.relative_to(REPO)}:{line}" for p in sources() for line in string_imports(p)]
    assert not found, "imports by name at run time:\n" + "\n".join(found)


def test_no_source_file_over_500_lines() -> None:
    long = {
        str(p.relative_to(REPO)): n
        for p in sources()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize(
    ("source", "bad"),
    [
        ("import torch\n", "the core imports torch"),
        ("def f():\n    from mtl_edge.train import grid\n", "an upward import in a function"),
    ],
)
def test_the_checks_catch_a_violation(tmp_path: Path, source: str, bad: str) -> None:
    """The contract's own reader sees a torch import and a nested upward import."""
    path = tmp_path / "core_module.py"
    path.write_text(source)
    names = [name for _, name in imports(path)]
    if "torch" in source:
        assert "torch" in names, bad
    else:
        assert layer_of_module(names[-1]) == 1, bad
    assert string_imports(tmp_path / "core_module.py") == []
    (tmp_path / "s.py").write_text("import importlib\nimportlib.import_module('mtl_edge.x')\n")
    assert string_imports(tmp_path / "s.py") == [2]
