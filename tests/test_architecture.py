"""The package's shape (DESIGN.md section 1), read from the source: every import, at module level and
inside functions, of every module. Fails on an arrow DESIGN.md forbids and on any import circle.

    python -m pytest tests/test_architecture.py
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# source folder -> the package it installs as (pyproject.toml's package-dir)
FOLDERS = {"moecap": "moecap", "runners": "moecap.runners", "metrics": "moecap.metrics",
           "leaderboard": "moecap.leaderboard"}

# (importer prefix, imported prefix, module level only): DESIGN.md's forbidden arrows
FORBIDDEN = [
    ("moecap.metrics", "moecap.runners", True),
    ("moecap.metrics", "moecap.engine", True),
    ("moecap.metrics", "gradio", True),
    ("moecap.metrics", "torch", True),
    ("moecap.runners", "moecap.leaderboard", False),
    ("moecap.leaderboard", "moecap.runners", False),
    ("moecap.leaderboard", "moecap.engine", False),
    ("moecap.leaderboard", "torch", False),
    ("moecap.engine", "moecap.leaderboard", False),
    ("moecap.engine", "moecap.studies", False),
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = list(rel.with_suffix("").parts)
    parts[0] = FOLDERS[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _source_files() -> list[Path]:
    out = []
    for folder in FOLDERS:
        for p in sorted((ROOT / folder).rglob("*.py")):
            if "space" in p.relative_to(ROOT).parts:  # the Hugging Face Space's own entry point
                continue
            out.append(p)
    return out


class _Imports(ast.NodeVisitor):
    """Every import of a module: (imported module, line, at module level)."""

    def __init__(self, module: str, is_package: bool):
        self.module, self.is_package = module, is_package
        self.depth = 0
        self.found: list[tuple[str, int, bool]] = []

    def _resolve(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = self.module.split(".")
        base = base if self.is_package else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
        if name == "TYPE_CHECKING":  # annotations only: never imported at run time
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def _scoped(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _scoped

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, node.lineno, self.depth == 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        mod = self._resolve(node)
        for alias in node.names:
            # ``from pkg import sub`` imports the submodule when there is one
            self.found.append((f"{mod}.{alias.name}" if mod else alias.name, node.lineno, self.depth == 0))
            self.found.append((mod, node.lineno, self.depth == 0))


def _graph() -> tuple[dict[str, list[tuple[str, int, bool]]], dict[str, Path]]:
    files = {_module_name(p): p for p in _source_files()}
    imports: dict[str, list[tuple[str, int, bool]]] = {}
    for name, path in files.items():
        v = _Imports(name, path.name == "__init__.py")
        v.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        imports[name] = v.found
    return imports, files


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_every_source_file_is_read():
    imports, files = _graph()
    assert {"moecap.figures", "moecap.run.driver", "moecap.run.local_executor", "moecap.studies.pareto",
            "moecap.runners.openai_client", "moecap.metrics.latency", "moecap.leaderboard.app"} <= set(files)
    assert any(mod == "moecap.figures" for mod, _, _ in imports["moecap.report"])


@pytest.mark.parametrize("src,dst,module_level", FORBIDDEN, ids=[f"{a}->{b}" for a, b, _ in FORBIDDEN])
def test_no_forbidden_arrow(src, dst, module_level):
    imports, files = _graph()
    bad = [f"{files[m].relative_to(ROOT)}:{line} imports {imp}"
           for m, found in imports.items() if _under(m, src)
           for imp, line, top in found if _under(imp, dst) and (top or not module_level)]
    assert not bad, f"DESIGN.md forbids {src} -> {dst}:\n" + "\n".join(bad)


def test_no_import_circle():
    """No module reaches itself through imports (module level or inside functions): Tarjan's strongly
    connected components over the package's own modules. A package's ``__init__`` importing its
    submodules is not an arrow back from them (Python imports the parent first by design)."""
    imports, files = _graph()
    edges: dict[str, set[str]] = {m: set() for m in files}
    for m, found in imports.items():
        for imp, _, _ in found:
            if imp in files and imp != m and not _under(m, imp):
                edges[m].add(imp)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for v in sorted(edges):
            if v not in index:
                connect(v)
    finally:
        sys.setrecursionlimit(limit)
    detail = []
    for comp in circles:
        members = set(comp)
        detail.append(" <-> ".join(comp) + "\n    " + "\n    ".join(
            f"{m} -> {w}" for m in comp for w in sorted(edges[m] & members)))
    assert not circles, "import circles:\n" + "\n".join(detail)


def test_a_circle_and_a_forbidden_arrow_are_caught(tmp_path, monkeypatch):
    """The checker itself: a planted circle and a planted arrow are found."""
    pkg = tmp_path / "moecap"
    (pkg / "metrics").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from moecap import b\n")
    (pkg / "b.py").write_text("import moecap.a\n")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "__init__.py").write_text("import torch\n")
    for folder in ("runners", "leaderboard"):
        (tmp_path / folder).mkdir()
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path, raising=False)
    globals()["ROOT"] = tmp_path
    try:
        with pytest.raises(AssertionError, match="moecap.a <-> moecap.b"):
            test_no_import_circle()
        with pytest.raises(AssertionError, match="metrics/__init__.py:1 imports torch"):
            test_no_forbidden_arrow("moecap.metrics", "torch", True)
    finally:
        globals()["ROOT"] = Path(__file__).resolve().parent.parent
