"""The package's layering rules (docs/architecture.md), checked on the source tree itself."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sambay"
MAX_LINES = 600


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (packages by their __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules a module imports at its top level (not inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in tree.body:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks only annotate
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n.startswith("sambay"):
                found.add(n)
    return found


def test_importing_the_models_loads_no_kernels_and_no_quantization():
    code = ("import sys, sambay.models; "
            "print(sorted(m for m in sys.modules if m.startswith(('sambay.kernels', 'sambay.quant'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_the_models_and_ops_never_import_kernels_or_quant():
    known = modules()
    for name, path in known.items():
        if name.startswith(("sambay.models", "sambay.ops")):
            bad = {m for m in imports_of(path, known) if m.startswith(("sambay.kernels", "sambay.quant"))}
            assert not bad, f"{name} imports {bad}"


def test_no_import_cycles():
    """Between modules (a package's __init__ re-exporting its own submodules is not a cycle)."""
    known = modules()
    graph = {name: {m for m in imports_of(path, known) if m != name and not name.startswith(m + ".")}
             for name, path in known.items()}
    done, stack = set(), []

    def visit(node):
        if node in stack:
            cycle = stack[stack.index(node):] + [node]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        stack.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)


def test_argparse_only_in_the_cli():
    for name, path in modules().items():
        if not name.startswith("sambay.cli"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            used = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            used |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert "argparse" not in used, f"{name} imports argparse"


def test_files_stay_small():
    for name, path in modules().items():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {lines} lines (at most {MAX_LINES})"


def test_no_module_global_switches_for_the_kernels():
    """Native dispatch is a per-model choice (model.ops), never a flag on a module."""
    source = (PACKAGE / "kernels" / "native.py").read_text(encoding="utf-8")
    for switch in ("\nSTEP =", "\nBLOCKS ="):
        assert switch not in source


@pytest.mark.parametrize("helper", ["_read_json", "_umask", "_RequestText"])
def test_shared_helpers_are_not_copied(helper):
    """These exist once, in sambay.files and sambay.runtime.text; a private copy must not come back."""
    for name, path in modules().items():
        text = path.read_text(encoding="utf-8")
        defines = f"def {helper}(" in text or f"class {helper}" in text
        assert not defines or name == "sambay.files", f"{name} defines its own {helper}"
