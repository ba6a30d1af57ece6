"""One ``Query`` type: parse forms, canonical order, refusals, and the CLI's one-line exit 2 for a bad query."""

import subprocess
import sys

import numpy as np
import pytest

from edge_runtime import Query, QueryError
from edge_runtime.fetch import FetchConfig
from edge_runtime.manifest import ManifestError
from edge_runtime.selection import select

from ..conftest import ROOT, run_cli_env
from .test_manifest import _manifest, _write_dir


@pytest.mark.parametrize("form", ["footwear,tops", " tops , footwear ", ["tops", "footwear"], ("footwear", "tops"),
                                  [" footwear", "tops "]])
def test_every_form_parses_to_the_same_sorted_query(form):
    query = Query.parse(form)
    assert query.tasks == ("footwear", "tops")
    assert query.canonical == str(query) == "footwear,tops"
    assert list(query) == ["footwear", "tops"] and len(query) == 2


def test_order_does_not_matter_and_parse_is_idempotent():
    a, b = Query.parse("tops,bags"), Query.parse(["bags", "tops"])
    assert a == b and hash(a) == hash(b) and {a, b} == {a}
    assert Query(("tops", "bags")) == a  # the constructor sorts too: one canonical form however it is built
    assert Query.parse(a) is a
    assert Query.parse("x.1,A-b_2").tasks == ("A-b_2", "x.1")


@pytest.mark.parametrize("form, message", [
    ("tops,tops", "duplicate task 'tops' in query 'tops,tops'"),
    (["bags", " bags"], "duplicate task 'bags'"),
    ("", "no tasks given"),
    (" , ", "no tasks given"),
    ([], "no tasks given"),
    ("tops,,bags", "empty task name in query 'tops,,bags'"),
    ("tops,", "empty task name"),
    ("tops,../etc", "invalid task name '../etc'"),
    ("a/b", "invalid task name 'a/b'"),
    ("_hidden", "invalid task name '_hidden'"),
    ("x" * 65, "invalid task name"),
    ("tops bags", "invalid task name 'tops bags'"),
    (["tops", 3], "task names must be strings, got 3 (int)"),
    (["tops", None], "task names must be strings, got None (NoneType)"),
    (7, "a query is a comma-separated string or a list of task names"),
    ({"tops"}, "got set"),
    (b"tops", "got bytes"),
])
def test_bad_queries_are_refused_with_a_clear_message(form, message):
    with pytest.raises(QueryError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Query.parse(form)


def test_query_error_is_a_manifest_error_and_a_value_error():
    """Existing ``except ManifestError`` handlers (and run_command's ValueError -> exit 2) keep working."""
    assert issubclass(QueryError, ManifestError) and issubclass(QueryError, ValueError)


def test_validate_lists_the_unknown_and_the_valid_tasks_sorted():
    valid = ["tops", "bags", "footwear"]
    query = Query.parse("tops,bags")
    assert query.validate(valid) is query
    with pytest.raises(QueryError, match="unknown task 'hats'; valid: bags, footwear, tops$") as info:
        Query.parse("tops,hats").validate(valid)
    assert info.value.valid == ("bags", "footwear", "tops")
    with pytest.raises(QueryError, match="unknown tasks 'caps', 'hats'; valid: bags, footwear, tops"):
        Query.parse("hats,tops,caps").validate(iter(valid))


def test_select_and_fetch_config_take_any_form():
    manifest = _manifest()
    for form in ("tops", ["tops"], Query.parse(" tops ")):
        assert select(manifest, form, "tflite", "int8").query == Query(("tops",))
    with pytest.raises(QueryError, match="unknown task 'hats'; valid: tops"):
        select(manifest, "hats,tops", "tflite", "int8")
    with pytest.raises(QueryError, match="duplicate task 'tops'"):
        select(manifest, ["tops", "tops"], "tflite", "int8")
    cfg = FetchConfig(server="http://h", tasks="tops, bags", bundle="b", insecure=True)
    assert cfg.tasks == ("bags", "tops") and cfg.query == Query.parse("bags,tops")
    with pytest.raises(QueryError, match="duplicate task 'bags'"):
        FetchConfig(server="http://h", tasks=("bags", "tops", "bags"), bundle="b", insecure=True)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edge_runtime", *map(str, args)], capture_output=True, text=True,
                          env=run_cli_env(), cwd=ROOT, timeout=300)


def _one_line_exit_2(out, message):
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("edge-runtime: error: ") and message in out.stderr


def test_cli_refuses_a_duplicate_task_in_one_line_before_reading_anything(tmp_path):
    absent = tmp_path / "no-bundle"
    _one_line_exit_2(_cli("run", "--bundle", absent, "--tasks", "tops,bags,tops", absent / "x.npy"),
                     "duplicate task 'tops' in query 'tops,bags,tops'")
    _one_line_exit_2(_cli("bench", "--bundle", absent, "--tasks", "bags,bags"), "duplicate task 'bags'")
    _one_line_exit_2(_cli("fetch", "--server", "http://127.0.0.1:1", "--tasks", "bags,,tops", "--bundle", absent,
                          "--insecure"), "empty task name")
    assert not absent.exists()


def test_cli_names_an_unknown_task_and_the_valid_ones(tmp_path):
    _write_dir(tmp_path / "bundle", _manifest())
    np.save(tmp_path / "x.npy", np.zeros((1, 28, 28, 1), np.uint8))
    _one_line_exit_2(_cli("run", "--bundle", tmp_path / "bundle", "--tasks", "hats,tops", tmp_path / "x.npy"),
                     "unknown task 'hats'; valid: tops")
