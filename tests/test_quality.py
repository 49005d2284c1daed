"""The codebase's own checks: ruff on package and tests, mypy --strict on the package, and no
import cycles between modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "backfill"


def test_ruff() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "backfill", "tests", "benchmarks"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_mypy_strict() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "backfill"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _module(path: Path) -> str:
    """``backfill/throttling/gates.py`` -> ``backfill.throttling.gates``."""
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def _is_module(name: str) -> bool:
    return (REPO / (name.replace(".", "/") + ".py")).exists()


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("backfill"):
            names = [f"{node.module}.{a.name}" for a in node.names]
            found |= {n for n in names if _is_module(n)} or {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("backfill")}
    return {name for name in found if name != "backfill"}


def test_no_import_cycles() -> None:
    graph = {
        _module(p): {i for i in _imports(p) if i != _module(p)}
        for p in PACKAGE.rglob("*.py")
        if p.stem not in ("__init__", "__main__")
    }
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_only_the_edge_imports_asyncpg() -> None:
    # The loop and its values talk to protocols; asyncpg stays at the edge.
    for name in ("loop", "protocols", "checkpoint", "sizing", "job", "errors", "progress",
                 "observers", "shutdown", "control", "throttling/governor", "throttling/pacing",
                 "throttling/gates", "throttling/impact", "throttling/statements",
                 "throttling/canary"):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(m.split(".")[0] == "asyncpg" for m in modules), name


def test_every_static_statement_says_what_it_does() -> None:
    """Each named statement in backfill/sql has a one-line description (a comment) above it,
    like the named queries of procrastinate's sql folder."""
    missing = []
    for path in sorted((PACKAGE / "sql").glob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.parse(path.read_text()).body:
            if not (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)):
                continue
            name = node.targets[0].id
            sql = isinstance(node.value, ast.Constant | ast.JoinedStr)
            if name.lstrip("_").isupper() and sql and name != "SCHEMA":
                if not lines[node.lineno - 2].lstrip().startswith("#"):
                    missing.append(f"{path.name}:{node.lineno} {name}")
    assert not missing, missing
