"""The package's imports point one way (docs/architecture.md) and never reach another module's private names."""
import ast
import os

import pytest

from conftest import ROOT

PKG = os.path.join(ROOT, "d2_defects")
# a part may import the parts of lower rank and itself only
RANK = {"engine": 4, "inference": 3, "evaluation": 2, "modeling": 2, "data": 2, "checkpoint": 1, "config": 1,
        "layers": 0, "utils": 0}


def _imports():
    """(module, part of d2_defects it lives in, imported module, imported names) for every import in the package."""
    for dirpath, _, files in os.walk(PKG):
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
            module = rel[:-1] if f == "__init__.py" else rel
            package = module if f == "__init__.py" else module[:-1]
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if isinstance(node, ast.ImportFrom):
                    if node.level:
                        target = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
                    elif node.module and node.module.split(".")[0] == "d2_defects":
                        target = node.module.split(".")
                    else:
                        continue
                    yield ".".join(module), module, target, [a.name for a in node.names]
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        if a.name.split(".")[0] == "d2_defects":
                            yield ".".join(module), module, a.name.split("."), []


def _part(parts):
    return parts[1] if len(parts) > 1 else None


def test_the_scan_sees_the_package():
    found = list(_imports())
    assert len({m for m, *_ in found}) > 50
    assert any(_part(m) == "engine" and _part(t) == "data" for _, m, t, _ in found)  # a real downward import


def test_imports_point_one_way():
    wrong = []
    for name, module, target, _ in _imports():
        src, dst = _part(module), _part(target)
        if src is None or dst is None or src == dst:
            continue
        assert src in RANK and dst in RANK, f"{name}: part {src} or {dst} has no rank in this test"
        if RANK[dst] >= RANK[src]:
            wrong.append(f"{name} imports {'.'.join(target)}")
    assert wrong == []


def test_no_private_names_across_modules():
    wrong = [f"{name} imports {'.'.join(target)}.{n}" for name, module, target, names in _imports()
             for n in names if n.startswith("_") and not n.startswith("__") and target != module]
    assert wrong == []


@pytest.mark.parametrize("tool", sorted(f for f in os.listdir(os.path.join(ROOT, "tools")) if f.endswith(".py")))
def test_tools_are_thin(tool):
    """A tool is a command line over library functions: its own code stays short."""
    tree = ast.parse(open(os.path.join(ROOT, "tools", tool), encoding="utf-8").read())
    lines = sum(n.end_lineno - n.lineno + 1 for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)))
    assert lines <= 120, f"tools/{tool}: {lines} lines of functions; move the logic into d2_defects/"
