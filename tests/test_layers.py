"""The layers of docs/ARCHITECTURE.md hold: import-linter's contracts (pyproject.toml) and no cycle."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[test]' (import-linter)")
    res = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def _imports(path: Path) -> set[str]:
    import ast

    out = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for top in ast.walk(tree) if isinstance(top, ast.If)
                   and getattr(top.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(top)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: no import at run time
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmfuse"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("lmfuse"))
    return out


def test_no_import_cycle_in_the_package():
    """Every import counts, those inside functions too: a cycle is a cycle wherever it is written."""
    src = ROOT / "src" / "lmfuse"
    mods = {f"lmfuse.{p.stem}": p for p in src.glob("*.py") if p.stem != "__init__"}
    graph = {m: {i if i in mods else i.rpartition(".")[0] for i in _imports(p)} & set(mods) - {m}
             for m, p in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    sys.setrecursionlimit(10_000)
    for m in sorted(mods):
        if m not in state:
            visit(m)


def test_the_run_lock_is_taken_in_one_module():
    src = ROOT / "src" / "lmfuse"
    users = sorted(p.name for p in src.glob("*.py") if "run_lock(" in p.read_text() and p.name != "lock.py")
    assert users == ["runner.py"], users
