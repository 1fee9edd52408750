"""The package layout as a contract: imports point down the layers and no module is part of an import circle.

    serving   profiler      the HTTP front end; the offline profiler (neither imports the other)
         \\   /
      integration           everything that touches vLLM
        /     \\
    routing   budget        the rule (torch, numba); the budget file (pydantic)
       |
    kernels                 Triton
       \\    |    /
         base               vllm_alloc.values, .envs, .metrics: imported by every layer

The entry points (`vllm_alloc` itself, `cli`, `demo`, `tiny` and the deprecated alias `server`) sit above
everything. Read from the source with `ast`, every import counts, the lazy ones inside functions too
(they run as soon as the function does); only imports under `if TYPE_CHECKING:` are left out of the
circle check, since they never run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "vllm_alloc"

BASE = frozenset({"vllm_alloc.values", "vllm_alloc.envs", "vllm_alloc.metrics"})
ENTRY = frozenset({"vllm_alloc", "vllm_alloc.cli", "vllm_alloc.demo", "vllm_alloc.tiny", "vllm_alloc.server"})
# What each layer may import (itself included); the entry points may import anything.
ALLOWED: dict[str, frozenset[str]] = {
    "base": frozenset({"base"}),
    "kernels": frozenset({"base", "kernels"}),
    "budget": frozenset({"base", "budget"}),
    "routing": frozenset({"base", "kernels", "routing"}),
    "integration": frozenset({"base", "kernels", "budget", "routing", "integration"}),
    "serving": frozenset({"base", "budget", "routing", "integration", "serving"}),
    "profiler": frozenset({"base", "budget", "routing", "integration", "profiler"}),
}


def layer_of(module: str) -> str:
    """The layer of a module of this package: base, a subpackage's name, or entry."""
    if module in BASE:
        return "base"
    if module in ENTRY:
        return "entry"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in ALLOWED:
        return parts[1]
    raise ValueError(
        f"{module} belongs to no layer: put it in a subpackage, or name it in BASE or ENTRY of {__file__}"
    )


def source_modules(root: Path) -> dict[str, Path]:
    """Every module of the package as installed: vllm_alloc/ plus the top-level kernels/ folder, which
    ships as vllm_alloc.kernels (pyproject.toml)."""
    modules: dict[str, Path] = {}
    for folder, dotted in ((root / PACKAGE, PACKAGE), (root / "kernels", f"{PACKAGE}.kernels")):
        for path in sorted(folder.rglob("*.py")):
            parts = [dotted, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, typing_only: bool = False) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """(import statement, under `if TYPE_CHECKING:`) for every import anywhere in the tree."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, typing_only
        elif isinstance(child, ast.If) and _type_checking_only(child):
            for stmt in child.body:
                yield from _imports(ast.Module(body=[stmt], type_ignores=[]), True)
            for stmt in child.orelse:
                yield from _imports(ast.Module(body=[stmt], type_ignores=[]), typing_only)
        else:
            yield from _imports(child, typing_only)


def import_edges(modules: dict[str, Path]) -> list[tuple[str, str, int, bool]]:
    """(importer, imported module of the package, line, typing only) for every import in the package."""
    edges = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node, typing_only in _imports(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the importer's package, `level` steps up
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod itself.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules and "." in target:
                    target = target.rpartition(".")[0]  # `import vllm_alloc.x.y` names x.y; a name in x.y
                if target in modules and target != name:
                    edges.append((name, target, node.lineno, typing_only))
    return edges


def wrong_way(modules: dict[str, Path], edges: list[tuple[str, str, int, bool]]) -> list[str]:
    """Every import that points up or sideways between layers, as `importer:line -> imported`."""
    found = []
    for src, dst, line, _ in edges:
        src_layer, dst_layer = layer_of(src), layer_of(dst)
        if src_layer != "entry" and dst_layer not in ALLOWED[src_layer]:
            found.append(
                f"{modules[src].relative_to(ROOT) if modules[src].is_relative_to(ROOT) else src}"
                f":{line} ({src_layer}) imports {dst} ({dst_layer})"
            )
    return found


def circles(edges: list[tuple[str, str, int, bool]]) -> list[list[str]]:
    """The import circles among modules (strongly connected components of two or more), typing-only
    imports left out."""
    graph: dict[str, set[str]] = {}
    for src, dst, _, typing_only in edges:
        if not typing_only:
            graph.setdefault(src, set()).add(dst)
            graph.setdefault(dst, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the package is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_imports_point_down_the_layers() -> None:
    modules = source_modules(ROOT)
    assert "vllm_alloc.routing.alloc_t" in modules and "vllm_alloc.kernels.moe" in modules
    assert wrong_way(modules, import_edges(modules)) == []


def test_no_import_circles() -> None:
    modules = source_modules(ROOT)
    assert circles(import_edges(modules)) == []


def test_every_module_has_a_layer() -> None:
    for module in source_modules(ROOT):
        layer_of(module)  # raises, naming the module, for one outside every layer


def test_modules_stay_small() -> None:
    """STYLE.md 13: no module over ~400 lines without a reason."""
    long = {m: n for m, p in source_modules(ROOT).items() if (n := len(p.read_text().splitlines())) > 420}
    assert long == {}


# -- the checker itself: it must find what it is for ------------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        path = tmp_path / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "kernels").mkdir(exist_ok=True)
    (tmp_path / "kernels" / "__init__.py").write_text("")
    return source_modules(tmp_path)


def test_checker_finds_a_lazy_circle(tmp_path: Path) -> None:
    modules = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "serving/__init__.py": "",
            "serving/a.py": "def f():\n    from vllm_alloc.serving.b import g\n",
            "serving/b.py": "from vllm_alloc.serving import a\n",
        },
    )
    assert circles(import_edges(modules)) == [["vllm_alloc.serving.a", "vllm_alloc.serving.b"]]


def test_checker_ignores_a_typing_only_circle(tmp_path: Path) -> None:
    modules = _tree(
        tmp_path,
        {
            "serving/__init__.py": "",
            "serving/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n",
            "serving/b.py": "from vllm_alloc.serving.a import f\n",
        },
    )
    assert circles(import_edges(modules)) == []


@pytest.mark.parametrize(
    ("importer", "statement", "layer"),
    [
        ("integration/x.py", "from vllm_alloc.serving.asgi import send_json", "serving"),  # up
        ("routing/x.py", "import vllm_alloc.integration.state", "integration"),  # up, as `import`
        ("serving/x.py", "from vllm_alloc.profiler import show", "profiler"),  # sideways
        ("budget/x.py", "def f():\n    from vllm_alloc.routing.cap import SCALE", "routing"),  # lazy
        ("values.py", "from vllm_alloc.budget import BudgetFile", "budget"),  # base imports a layer
    ],
)
def test_checker_finds_an_import_the_wrong_way(
    tmp_path: Path, importer: str, statement: str, layer: str
) -> None:
    modules = _tree(
        tmp_path,
        {
            **{f"{p}/__init__.py": "" for p in ALLOWED if p not in ("base", "kernels")},
            "serving/asgi.py": "def send_json(): ...\n",
            "integration/state.py": "",
            "profiler/show.py": "",
            "routing/cap.py": "SCALE = 1\n",
            "budget/file.py": "",
            importer: statement + "\n",
        },
    )
    (found,) = wrong_way(modules, import_edges(modules))
    assert found.endswith(f"({layer})")
