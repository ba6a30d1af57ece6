"""The import directions of docs/architecture.md hold, no module imports another in a loop, and the check bites."""

from __future__ import annotations

from pathlib import Path

from tools.import_graph import direction_violations, import_loops, main

ROOT = Path(__file__).resolve().parents[1]


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_tree_respects_the_directions() -> None:
    assert direction_violations(ROOT) == []


def test_the_tree_has_no_import_loops() -> None:
    assert import_loops(ROOT) == []


def test_a_forbidden_import_is_reported(tmp_path: Path) -> None:
    root = _write(tmp_path, {
        "edge_runtime/__init__.py": "",
        "edge_runtime/runtime.py": "def f():\n    from pool_builder.models import registry\n",  # lazy counts too
        "pool_builder/__init__.py": "",
        "pool_builder/serve.py": "import converters.fuse\n",
        "pool_builder/models/__init__.py": "",
        "pool_builder/models/registry.py": "",
        "converters/__init__.py": "",
        "converters/fuse.py": "from benchmarks import common\n",
    })
    found = "\n".join(direction_violations(root))
    assert "edge_runtime.runtime imports pool_builder.models" in found
    assert "pool_builder.serve imports converters.fuse" in found
    assert "nothing in a package may import benchmarks" in found
    assert main([str(root)]) == 1


def test_type_checking_imports_are_not_edges(tmp_path: Path) -> None:
    root = _write(tmp_path, {
        "pool_builder/__init__.py": "",
        "pool_builder/a.py": "from pool_builder import b\n",
        "pool_builder/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pool_builder import a\n",
    })
    assert import_loops(root) == []


def test_an_import_loop_is_reported(tmp_path: Path) -> None:
    root = _write(tmp_path, {
        "pool_builder/__init__.py": "",
        "pool_builder/build.py": "from .teachers import run\n",
        "pool_builder/teachers.py": "def run():\n    from .build import stage\n",
        "edge_runtime/__init__.py": "",
        "edge_runtime/x.py": "import torch\n",
    })
    assert import_loops(root) == [["pool_builder.build", "pool_builder.teachers"]]
    assert any("edge_runtime must never import" in v for v in direction_violations(root))
