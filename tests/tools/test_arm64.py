"""``make test-arm``'s own logic, fast and without emulation: tolerances, near-ties, cache, mirror, set-up errors.

The emulated runs themselves are ``make test-arm`` (run by .ci/run after ``make test``).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tools.arm64.cache import STAMP, cached_folder, is_complete
from tools.arm64.check import BROKEN_MESSAGE, main
from tools.arm64.compare import TOLERANCES, compare
from tools.arm64.sysroot import SetupError, cpu_root, debian_mirror, mirror_from_sources, require_tools

from ..edge_runtime.test_lean_imports import HEAVY, _imported_after

STEP = 0.25  # an int8 output step


def _logits(n: int = 100, k: int = 10, seed: int = 0) -> np.ndarray:
    """Logits on the int8 grid whose top-1 leads by at least 8 steps."""
    rng = np.random.default_rng(seed)
    x = np.round(rng.normal(0, 2, (n, k)) / STEP) * STEP
    x[np.arange(n), rng.integers(0, k, n)] = x.max(axis=1) + 8 * STEP
    return x.astype(np.float32)


def _near_tie(x: np.ndarray, i: int, steps: float) -> tuple[int, int]:
    """Make image ``i``'s runner-up ``steps`` below its top-1 on x86; return (top-1, runner-up) columns."""
    top = int(x[i].argmax())
    other = (top + 1) % x.shape[1]
    x[i, other] = x[i, top] - steps * STEP
    return top, other


def test_fp32_within_the_named_tolerance_passes_and_beyond_fails_with_the_numbers():
    ref = _logits()
    assert compare(ref, ref + 0.5 * TOLERANCES["fp32_max_abs"], "fp32").ok
    bad = ref.copy()
    bad[3, 2] += 3e-3
    result = compare(ref, bad, "fp32")
    assert not result.ok and result.max_abs == pytest.approx(3e-3, rel=1e-3)
    assert result.failures == ("fp32: max |x86 - aarch64| = 0.003 > 0.0001",)


def test_int8_one_near_tie_flip_in_100_images_passes_at_99_percent():
    ref = _logits()
    top, other = _near_tie(ref, 7, 1)
    emu = ref.copy()
    emu[7, other] += 2 * STEP  # one step of rounding each way flips it
    result = compare(ref, emu, "int8", STEP)
    assert result.ok, result.failures
    assert result.flips == (7,) and result.top1_agreement == pytest.approx(0.99) and result.max_steps == 2


def test_int8_below_99_percent_agreement_fails():
    ref = _logits()
    emu = ref.copy()
    for i in (1, 2):
        _, other = _near_tie(ref, i, 1)
        emu[i] = ref[i]
        emu[i, other] += 2 * STEP
    result = compare(ref, emu, "int8", STEP)
    assert not result.ok
    assert result.failures == ("int8: top-1 agreement 98.00% < 99% (2 of 100 images differ, not counting exact ties)",)


def test_int8_exact_ties_on_x86_count_as_agreement_but_show_in_the_strict_figure():
    ref = _logits()
    emu = ref.copy()
    for i in (10, 11):
        top, other = _near_tie(ref, i, 0)  # the int8 grid makes exact ties common; argmax takes the lower column
        emu[i] = ref[i]
        emu[i, max(top, other)] += STEP  # one step elsewhere picks the other tied class
    result = compare(ref, emu, "int8", STEP)
    assert result.ok, result.failures
    assert result.flips == (10, 11) and result.top1_agreement == 1.0 and result.top1_strict == pytest.approx(0.98)


def test_int8_flip_that_is_not_a_near_tie_fails_even_above_99_percent():
    ref = _logits()
    top, other = _near_tie(ref, 5, 3)  # 3 steps apart: more than one step of rounding on each side
    emu = ref.copy()
    emu[5, other] += 4 * STEP
    result = compare(ref, emu, "int8", STEP)
    assert not result.ok and result.top1_agreement == pytest.approx(0.99)
    assert result.failures == (f"int8: image 5 flips from class column {top} to {other} although x86 puts them "
                               f"3.0 steps apart (> {TOLERANCES['int8_near_tie_steps']:g}: not a near-tie)",)


def test_mismatched_or_non_finite_logits_fail_and_bad_arguments_are_refused():
    ref = _logits()
    assert compare(ref, ref[:, :9], "int8", STEP).failures[0].startswith("int8: shapes differ")
    nan = ref.copy()
    nan[0, 0] = np.nan
    assert compare(ref, nan, "fp32").failures == ("fp32: aarch64 logits are not all finite",)
    with pytest.raises(ValueError, match="valid: fp32, int8"):
        compare(ref, ref, "fp16")
    with pytest.raises(ValueError, match="quantization step"):
        compare(ref, ref, "int8")


def test_cache_builds_once_and_reuses_only_stamped_folders(tmp_path):
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "payload").write_text("x")

    inputs = {"interpreter": "tflite_runtime", "requirements": ["tflite-runtime==2.14.0"]}
    first = cached_folder(tmp_path, "wheels", inputs, build)
    assert cached_folder(tmp_path, "wheels", inputs, build) == first and len(calls) == 1
    assert is_complete(first, inputs) and (first / "payload").read_text() == "x"
    other = cached_folder(tmp_path, "wheels", {**inputs, "python": "3.12"}, build)
    assert other != first and len(calls) == 2
    (first / STAMP).unlink()  # e.g. a folder left by an older, non-atomic build
    assert cached_folder(tmp_path, "wheels", inputs, build) == first and len(calls) == 3
    (first / STAMP).write_text(json.dumps({"other": "inputs"}))
    assert not is_complete(first, inputs)


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    def build(folder):
        (folder / "half").write_text("half")
        raise SetupError("mirror unreachable")

    with pytest.raises(SetupError, match="mirror unreachable"):
        cached_folder(tmp_path, "sysroot", {"suite": "bookworm"}, build)
    assert list(tmp_path.iterdir()) == []


DEB822 = """Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
"""


def test_mirror_is_read_from_deb822_and_one_line_sources():
    assert mirror_from_sources([DEB822]) == "http://deb.debian.org/debian"
    one_line = "# comment\ndeb-src http://src.example/debian bookworm main\n" \
               "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian/ bookworm main contrib\n"
    assert mirror_from_sources([one_line]) == "http://mirror.example/debian"
    disabled = DEB822.replace("Types: deb\n#", "Enabled: no\nTypes: deb\n#", 1)
    assert mirror_from_sources(["deb http://x.example/debian bullseye main", disabled]) is None


def test_mirror_override_and_the_error_when_apt_names_none(monkeypatch, tmp_path):
    import tools.arm64.sysroot as sysroot

    monkeypatch.setattr(sysroot, "APT_SOURCES", (tmp_path / "sources.list", tmp_path / "sources.list.d"))
    monkeypatch.delenv("ARM64_MIRROR", raising=False)
    with pytest.raises(SetupError, match="no Debian bookworm mirror .* set ARM64_MIRROR="):
        debian_mirror()
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    assert debian_mirror() == "http://deb.debian.org/debian"
    monkeypatch.setenv("ARM64_MIRROR", "http://local.example/debian/")
    assert debian_mirror() == "http://local.example/debian"


def test_missing_emulator_is_a_setup_error_naming_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SetupError, match=r"qemu-aarch64-static, mmdebstrap not found: run `make arm-tools`"):
        require_tools()


def test_cpu_root_links_the_sysroot_and_carries_the_boards_cpuinfo(tmp_path):
    root = tmp_path / "sysroot"
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "lib").symlink_to("usr/lib")
    (root / "proc").mkdir()
    parts = {}
    for cpu in ("cortex-a72", "cortex-a76"):
        folder = cpu_root(root, cpu, tmp_path / "work")
        assert (folder / "usr").resolve() == (root / "usr").resolve()
        assert os.readlink(folder / "lib") == "usr/lib" and (folder / "lib").resolve() == (root / "usr/lib")
        parts[cpu] = [line for line in (folder / "proc/cpuinfo").read_text().splitlines() if "CPU part" in line][0]
    assert parts["cortex-a72"].endswith("0xd08") and parts["cortex-a76"].endswith("0xd0b")
    with pytest.raises(SetupError, match="valid: cortex-a72, cortex-a76"):
        cpu_root(root, "cortex-a53", tmp_path / "work")


def test_check_cli_refuses_unknown_choices_in_one_line(capsys):
    assert main(["--cpus", "cortex-a72,cortex-a53"]) == 2
    assert capsys.readouterr().err == "test-arm: error: unknown CPU model 'cortex-a53'; valid: cortex-a72, cortex-a76\n"
    assert main(["--interpreters", "tensorflow"]) == 2
    assert "valid: ai_edge_litert, tflite_runtime, onnxruntime" in capsys.readouterr().err


def test_the_broken_case_expects_the_runtimes_own_message(monkeypatch):
    """The message test-arm asserts on aarch64 is the one the runtime gives on x86 for the same combination."""
    import edge_runtime.backends as backends

    monkeypatch.setattr(backends, "numpy_major", lambda: 2)
    monkeypatch.setattr(backends.np, "__version__", "2.4.6")
    reason = backends.unusable_reason("tflite_runtime")
    assert BROKEN_MESSAGE.format(numpy="2.4.6") == f"edge-runtime: error: {reason}"


def test_guest_imports_only_what_a_device_has():
    assert not {m for m in _imported_after("import tools.arm64.guest") if m.split(".")[0] in HEAVY}


def test_table_shows_every_cell_including_runs_that_failed():
    from tools.arm64.check import Cell, format_table

    ref = _logits()
    good = Cell("cortex-a76", "tflite_runtime", "2.14.0", "1.26.4", 60.0,
                (compare(ref, ref, "fp32"), compare(ref, ref, "int8", STEP)))
    broken = Cell("cortex-a72", "ai_edge_litert", "", "", 3.0, (), "emulated run exited -11: Segmentation fault")
    lines = format_table([good, broken]).splitlines()
    assert len(lines) == 4 and good.ok and not broken.ok
    assert "Raspberry Pi 5 (cortex-a76)" in lines[1] and lines[2].split()[-6:] == \
        ["(0", "step)", "100.00%", "100.00%", "0", "ok"]
    assert lines[3].startswith("Raspberry Pi 4 (cortex-a72)") and lines[3].endswith("FAIL")
