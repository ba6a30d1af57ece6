"""The CLI on bad input: one line on stderr naming the problem, exit code 2."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from pool_builder.cli import main

from ..conftest import FMNIST_DIR, ROOT, run_cli_env, tiny_cli_args


def _one_line_error(capsys, argv, expected):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("pool-builder: error:")]
    assert len(errors) == 1 and err[-1] == errors[0] and "Traceback" not in "\n".join(err), err
    assert expected in errors[0], errors[0]


def test_query_bad_tasks(capsys, tiny_pool_dir):
    pool = str(tiny_pool_dir)
    _one_line_error(capsys, ["query", "--pool", pool, "--tasks", "shoes"],
                    "unknown task 'shoes'; valid: bags, bottoms, footwear, tops")
    _one_line_error(capsys, ["query", "--pool", pool, "--tasks", ","], "no tasks given")
    _one_line_error(capsys, ["query", "--pool", pool, "--tasks", "tops,bags,tops"], "duplicate task 'tops'")


def test_query_missing_pool(capsys, tmp_path):
    _one_line_error(capsys, ["info", "--pool", str(tmp_path)], "pool.json is missing")


def test_info_detects_tampering(capsys, pool_copy):
    (pool_copy / "library.pt").write_bytes(b"not the library")
    _one_line_error(capsys, ["info", "--pool", str(pool_copy)], "library weights")


def test_info_and_query_json(capsys, tiny_pool_dir):
    assert main(["info", "--pool", str(tiny_pool_dir)]) == 0
    assert "all checksums verified" in capsys.readouterr().out
    assert main(["query", "--pool", str(tiny_pool_dir), "--tasks", "footwear,tops", "--tasks", "bags,bottoms",
                 "--data-dir", str(FMNIST_DIR), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [q["tasks"] for q in out["queries"]] == [["footwear", "tops"], ["bags", "bottoms"]]
    assert out["queries"][0]["test_images"] == 7 * 30


def test_build_bad_settings(capsys, tmp_path):
    _one_line_error(capsys, ["build", "--profile", "huge", "--out", str(tmp_path)],
                    "unknown profile 'huge'; valid profiles: full, quick")
    _one_line_error(capsys, ["build", "--oracle-arch", "vgg", "--out", str(tmp_path)], "unknown architecture 'vgg'")
    _one_line_error(capsys, ["build", "--dataset", "fashion_mnist", "--data-dir", str(tmp_path), "--out",
                             str(tmp_path / "p")], "apt-get install dataset-fashion-mnist")
    _one_line_error(capsys, ["build", "--color", "rgb", "--out", str(tmp_path)],
                    "--color only applies to --dataset image_folder")
    _one_line_error(capsys, ["build", "--val-share", "0.7", "--out", str(tmp_path)], "validation share must be in")
    _one_line_error(capsys, ["build", "--expert-steps", "0", "--out", str(tmp_path)], "expert steps must be >= 1")
    _one_line_error(capsys, ["build", "--min-epochs", "9", "--max-epochs", "3", "--out", str(tmp_path)],
                    "min epochs (9) exceed max epochs (3)")


def test_build_hierarchy_task_as_a_string(capsys, tmp_path):
    h = tmp_path / "h.json"
    h.write_text(json.dumps({"bags": "Bag"}))
    _one_line_error(capsys, ["build", "--hierarchy", str(h), "--out", str(tmp_path / "p"),
                             "--data-dir", str(FMNIST_DIR)], "task 'bags' must be a list of class names")


def test_build_hierarchy_with_unknown_class(capsys, tmp_path):
    h = tmp_path / "h.json"
    h.write_text(json.dumps({"shoes": ["Sneakers"]}))
    _one_line_error(capsys, ["build", "--hierarchy", str(h), "--out", str(tmp_path / "p"),
                             "--data-dir", str(FMNIST_DIR)], "unknown class 'Sneakers'; valid classes: Ankle boot")


class _SevenWay(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(784, 7)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_user_oracle_with_wrong_output_width(capsys, tmp_path):
    path = tmp_path / "oracle.ts"
    torch.jit.script(_SevenWay()).save(str(path))
    _one_line_error(capsys, ["build", "--oracle-file", str(path), "--out", str(tmp_path / "p"),
                             "--data-dir", str(FMNIST_DIR), "--train-limit", "100"],
                    "outputs (2, 7) for 2 images, but the data set has 10 classes")


def test_user_state_dict_needs_an_architecture(capsys, tmp_path):
    path = tmp_path / "oracle.pt"
    torch.save(_SevenWay().state_dict(), path)
    _one_line_error(capsys, ["build", "--oracle-file", str(path), "--out", str(tmp_path / "p"),
                             "--data-dir", str(FMNIST_DIR), "--train-limit", "100"], "pass --oracle-arch NAME")
    _one_line_error(capsys, ["build", "--oracle-file", str(path), "--oracle-arch", "wrn_10_1", "--out",
                             str(tmp_path / "p"), "--data-dir", str(FMNIST_DIR), "--train-limit", "100"],
                    "weights do not fit the architecture")


def test_debug_shows_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pool_builder", "--debug", "info", "--pool", str(tmp_path)],
                          capture_output=True, text=True, env=run_cli_env(), cwd=ROOT)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_user_oracles_torchscript_and_state_dict(tmp_path, tiny_pool_dir):
    """A trained oracle given back as TorchScript or as a state dict becomes the pool's oracle as is."""
    from pool_builder.pool.loader import Pool

    oracle = Pool.open(tiny_pool_dir).oracle()
    script = tmp_path / "oracle.ts"
    torch.jit.trace(oracle, torch.zeros(1, 1, 28, 28)).save(str(script))
    args = ["build", "--out", str(tmp_path / "ts"), "--oracle-file", str(script), *tiny_cli_args(skip=("oracle_arch",)),
            "--library-epochs", "1", "--expert-epochs", "1"]
    assert main(args) == 0
    meta = json.loads((tmp_path / "ts" / "pool.json").read_text())
    assert meta["oracle"]["architecture"] == {"kind": "torchscript"}
    assert meta["oracle"]["metrics"]["test_accuracy"] == pytest.approx(
        Pool.open(tiny_pool_dir).meta.oracle.metrics["test_accuracy"])
    state = tmp_path / "oracle.pt"
    shutil.copy(tiny_pool_dir / "oracle.pt", state)
    assert main(["build", "--out", str(tmp_path / "sd"), "--oracle-file", str(state), *tiny_cli_args(),
                 "--library-epochs", "1", "--expert-epochs", "1"]) == 0
    meta = json.loads((tmp_path / "sd" / "pool.json").read_text())
    assert meta["oracle"]["architecture"]["name"] == "wrn_10_1"


def test_concurrent_build_into_the_same_directory_is_refused(capsys, tmp_path):
    import fcntl

    out = tmp_path / "p"
    out.mkdir()
    with open(out / ".build.lock", "a+") as held:
        held.write("4242")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        _one_line_error(capsys, ["build", "--out", str(out), "--data-dir", str(FMNIST_DIR)],
                        "another build is writing")
