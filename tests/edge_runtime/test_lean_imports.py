"""The device package must not pull in torch, tensorflow or the server-side packages."""

import subprocess
import sys

from ..conftest import ROOT, run_cli_env

HEAVY = ("torch", "tensorflow", "pool_builder", "converters")


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(','.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=run_cli_env(), cwd=ROOT).stdout
    return set(out.strip().split(","))


def test_edge_runtime_imports_nothing_heavy():
    modules = _imported_after("import edge_runtime, edge_runtime.atomic_io, edge_runtime.manifest, edge_runtime.runners, "
                              "edge_runtime.signing, edge_runtime.download, edge_runtime.fetch, edge_runtime.cli, "
                              "edge_runtime.anytime, edge_runtime.runtime, edge_runtime.selection, edge_runtime.query, "
                              "edge_runtime.verify, edge_runtime.stream, edge_runtime.authenticity, "
                              "edge_runtime.loading, edge_runtime.manifest_types")
    assert not {m for m in modules if m.split(".")[0] in HEAVY}


def test_fetch_modules_import_neither_server_libraries_nor_cryptography_until_used():
    modules = _imported_after("import edge_runtime.fetch, edge_runtime.download, edge_runtime.signing, "
                              "edge_runtime.verify")
    assert not {m for m in modules if m.split(".")[0] in ("fastapi", "uvicorn", "starlette", "cryptography",
                                                              "requests")}


def test_pool_builder_package_import_is_cheap():
    assert "torch" not in _imported_after("import pool_builder")
