"""JSON from a peer: deep nesting refused before the C decoder recurses, even where the recursion limit was raised."""

import subprocess
import sys

import pytest

from edge_runtime.manifest_types import MAX_JSON_DEPTH, nesting_depth, strict_loads

from ..conftest import ROOT


def test_nesting_depth_ignores_brackets_inside_strings():
    assert nesting_depth('{"a": "[[[[\\" [", "b": [[1]]}') == 3
    assert strict_loads(b'{"a": [1, {"b": "x]"}]}', "answer") == {"a": [1, {"b": "x]"}]}


def test_limit_is_the_boundary():
    strict_loads("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH, "answer")
    with pytest.raises(ValueError, match="answer is nested too deeply"):
        strict_loads("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), "answer")


def test_deep_json_with_a_raised_recursion_limit_is_an_error_not_a_crash():
    """100,000 levels overflowed the C stack (SIGSEGV) once a library had raised the recursion limit."""
    code = ("import sys; sys.setrecursionlimit(10**6)\n"
            "from edge_runtime.manifest_types import strict_loads\n"
            "try:\n    strict_loads(b'[' * 100000 + b']' * 100000, 'answer')\n"
            "except ValueError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-500:]
    assert "nested too deeply" in done.stdout
