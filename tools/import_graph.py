"""The project's import graph, read from the source (nothing is imported): allowed directions and no loops.

Packages are layered toward the device (docs/architecture.md):

    poe_service  ->  converters  ->  pool_builder  ->  edge_runtime

A package may import the ones to its right, never to its left; ``benchmarks``
and ``tools`` may import anything and nothing imports them.  Every import
counts, also one inside a function (a lazy import is still a dependency);
only imports under ``if TYPE_CHECKING:`` are left out, as they never run.
Run ``python -m tools.import_graph`` to print the violations of a tree.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

LAYERS = ("edge_runtime", "pool_builder", "converters", "poe_service")  # each may import only those before it
FREE = ("benchmarks", "tools", "tests")  # may import anything; no package may import them
HEAVY = {"edge_runtime": ("torch", "tensorflow", "onnx2tf")}  # third-party packages a layer must never import


@dataclass(frozen=True)
class Edge:
    """``source`` (a module of the tree) imports ``target`` (a module or package name) at ``path:line``."""

    source: str
    target: str
    path: Path
    line: int


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` blocks."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    return skipped


def imports_of(root: Path, path: Path) -> Iterator[Edge]:
    """Every import in one file, relative ones resolved against its package."""
    source = module_name(root, path)
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    skipped = _type_checking_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Edge(source, alias.name, path, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield Edge(source, target, path, node.lineno)
            for alias in node.names:  # ``from pkg import submodule`` depends on the submodule too
                yield Edge(source, f"{target}.{alias.name}", path, node.lineno)


def project_files(root: Path, packages: Iterable[str] = LAYERS) -> list[Path]:
    return sorted(p for pkg in packages if (root / pkg).is_dir() for p in (root / pkg).rglob("*.py"))


def direction_violations(root: Path) -> list[str]:
    """Imports that point the wrong way between packages, or into a free folder, or at a banned heavy package."""
    found = []
    for path in project_files(root):
        for edge in imports_of(root, path):
            top, target_top = edge.source.split(".")[0], edge.target.split(".")[0]
            allowed = LAYERS[: LAYERS.index(top) + 1]
            where = f"{edge.path.relative_to(root)}:{edge.line}"
            if target_top in LAYERS and target_top not in allowed:
                found.append(f"{where}: {edge.source} imports {edge.target}, but {top} may import only "
                             f"{', '.join(allowed)}")
            elif target_top in FREE:
                found.append(f"{where}: {edge.source} imports {edge.target}; nothing in a package may import {target_top}")
            elif target_top in HEAVY.get(top, ()):
                found.append(f"{where}: {edge.source} imports {edge.target}, which {top} must never import")
    return found


def module_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports (a package import counts as importing its __init__)."""
    files = project_files(root)
    modules = {module_name(root, p) for p in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for path in files:
        for edge in imports_of(root, path):
            if edge.target in modules and edge.target != edge.source:
                graph[edge.source].add(edge.target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _is_package_init_edge(source: str, target: str) -> bool:
    """A package's __init__ importing its own submodules, or a submodule importing its package: not a loop
    Python can trip on when the __init__ only re-exports (Python imports the package first anyway)."""
    return target.startswith(source + ".") or source.startswith(target + ".")


def import_loops(root: Path) -> list[list[str]]:
    graph = {m: {t for t in targets if not _is_package_init_edge(m, t)} for m, targets in module_graph(root).items()}
    return cycles(graph)


def main(argv: list[str] | None = None) -> int:
    root = Path(argv[0] if argv else ".").resolve()
    problems = direction_violations(root) + [f"import loop: {' <-> '.join(c)}" for c in import_loops(root)]
    print("\n".join(problems) or "import graph ok: directions respected, no loops")
    return 1 if problems else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
