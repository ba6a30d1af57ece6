"""A console script whose extra is not installed says which extra to install, in one line, exit 2.

One distribution installs every console script, so a device with only the
``edge`` extra still has ``pool-builder``, ``poe-convert`` and ``poe-service``.
The missing packages are simulated by blocking their import in the child.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import ROOT

CASES = [
    ("pool_builder.cli", ["info", "--pool", "nowhere"], ("torch",), "pool-builder", "builder"),
    ("converters.cli", ["fuse", "--fragments", "nowhere", "--tasks", "a", "--out", "x.onnx"], ("onnx",),
     "poe-convert", "convert"),
    ("poe_service.cli", ["keygen", "--out", "nowhere/key"], ("cryptography",), "poe-service", "serve"),
    ("poe_service.cli", ["serve", "--fragments", "nowhere"], ("fastapi",), "poe-service", "serve"),
]


@pytest.mark.parametrize("module,argv,blocked,prog,extra", CASES, ids=[c[0] + ":" + c[1][0] for c in CASES])
def test_missing_extra_is_one_line_and_exit_2(module, argv, blocked, prog, extra):
    code = (f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
            f"from {module} import main\nsys.exit(main({argv!r}))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{prog}: error: {blocked[0]} not installed")
    assert f"pool-of-experts-edge[{extra}]" in lines[0]
    assert "Traceback" not in proc.stderr
