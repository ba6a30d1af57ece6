"""An arm64 Debian Python and the aarch64 wheels of each interpreter, built without running anything emulated.

``mmdebstrap --variant=extract`` unpacks bookworm's python3 and libstdc++6 (the
interpreters' C++ runtime) into a folder, no chroot and no binfmt needed; the
host's pip installs aarch64 wheels into per-interpreter folders with
``--platform``/``--target``.  qemu-user then runs that Python with
``QEMU_LD_PREFIX`` pointing at a per-CPU folder of links to the sysroot plus a
fake Pi ``/proc/cpuinfo``: qemu shows the host's x86 cpuinfo otherwise, and
ai-edge-litert crashes in ``allocate_tensors()`` after reading it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .cache import cached_folder

Log = Callable[[str], None]
SUITE = "bookworm"
PYTHON_VERSION = "3.11"  # bookworm's python3
DEBIAN_PACKAGES = ("python3", "libstdc++6")
PLATFORMS = ("manylinux_2_34_aarch64", "manylinux_2_28_aarch64", "manylinux_2_27_aarch64",
             "manylinux_2_17_aarch64", "manylinux2014_aarch64")
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
MIRROR_ENV = "ARM64_MIRROR"
QEMU = "qemu-aarch64-static"


@dataclass(frozen=True)
class WheelSet:
    """What pip installs for one interpreter: requirement specifiers, with or without their dependencies."""

    requirements: tuple[str, ...]
    deps: bool = True


# Pinned so that a cache folder's key determines its content.
WHEELS = {
    "ai_edge_litert": WheelSet(("ai-edge-litert==2.3.0",)),  # brings numpy 2
    "tflite_runtime": WheelSet(("tflite-runtime==2.14.0", "numpy<2")),  # its only dependency; breaks under numpy 2
    "onnxruntime": WheelSet(("onnxruntime==1.23.0",)),
}

# Board -> qemu CPU model and the cpuinfo file beside this module (QEMU_CPU must always be set: with
# qemu's default model ai-edge-litert's int8 results are wrong).
CPUS = {"cortex-a72": "rpi4", "cortex-a76": "rpi5"}
BOARDS = {"cortex-a72": "Raspberry Pi 4", "cortex-a76": "Raspberry Pi 5"}
CPUINFO_DIR = Path(__file__).resolve().parent / "cpuinfo"


class SetupError(RuntimeError):
    """The emulated environment could not be built; the message says why and what to do."""


def require_tools() -> None:
    """qemu-user-static and mmdebstrap on PATH, or the command that installs them."""
    missing = [tool for tool in (QEMU, "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        raise SetupError(f"{', '.join(missing)} not found: run `make arm-tools` "
                         f"(apt-get install qemu-user-static mmdebstrap)")


def mirror_from_sources(texts: Iterable[str], suite: str = SUITE) -> str | None:
    """The first ``deb`` mirror serving ``suite`` in apt sources (one-line or deb822 format)."""
    for text in texts:
        for stanza in text.split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                if line.startswith("deb ") or line.startswith("deb\t"):  # one-line: deb [opts] URI suite comps
                    words = line.split()[1:]
                    if words and words[0].startswith("["):
                        while words and not words[0].endswith("]"):
                            words.pop(0)
                        words = words[1:]
                    if len(words) >= 2 and words[1] == suite:
                        return words[0].rstrip("/")
                elif ":" in line and not line.startswith(("deb-src", "http")):
                    key, value = line.split(":", 1)
                    fields[key.strip().lower()] = value.strip()
            if (fields.get("enabled", "yes").lower() != "no" and "deb" in fields.get("types", "").split()
                    and suite in fields.get("suites", "").split() and fields.get("uris")):
                return fields["uris"].split()[0].rstrip("/")
    return None


def debian_mirror() -> str:
    """``$ARM64_MIRROR``, else the Debian mirror the host's apt already uses (never a hard-coded host)."""
    override = os.environ.get(MIRROR_ENV, "").strip()
    if override:
        return override.rstrip("/")
    texts = []
    for source in APT_SOURCES:
        files = sorted(source.glob("*.list")) + sorted(source.glob("*.sources")) if source.is_dir() else [source]
        for path in files:
            try:
                texts.append(path.read_text(encoding="utf-8", errors="replace"))
            except OSError:
                continue
    mirror = mirror_from_sources(texts)
    if mirror is None:
        raise SetupError(f"no Debian {SUITE} mirror in /etc/apt/sources.list or /etc/apt/sources.list.d/: "
                         f"set {MIRROR_ENV}=http://<mirror>/debian")
    return mirror


def _run(cmd: list[str], what: str, log: Log) -> None:
    log("$ " + " ".join(cmd))
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        tail = " | ".join(done.stdout.strip().splitlines()[-4:])
        raise SetupError(f"{what} failed (exit {done.returncode}): {tail}")


def sysroot(cache: Path, log: Log) -> Path:
    """The cached arm64 Python sysroot (bookworm python3 + libstdc++6)."""
    mirror = debian_mirror()
    inputs = {"suite": SUITE, "mirror": mirror, "packages": list(DEBIAN_PACKAGES), "arch": "arm64"}

    def build(tmp: Path) -> None:
        _run(["mmdebstrap", "--quiet", "--variant=extract", "--architectures=arm64",
              "--include=" + ",".join(DEBIAN_PACKAGES), SUITE, str(tmp), f"deb {mirror} {SUITE} main"],
             f"mmdebstrap of an arm64 {SUITE} Python from {mirror}", log)
        if not (tmp / "usr/bin" / f"python{PYTHON_VERSION}").is_file():
            raise SetupError(f"the arm64 sysroot has no usr/bin/python{PYTHON_VERSION} ({SUITE} from {mirror})")

    return cached_folder(cache, "sysroot", inputs, build, log)


def wheels(cache: Path, interpreter: str, log: Log) -> Path:
    """The cached folder of aarch64 wheels for one interpreter, installed for PYTHON_VERSION."""
    spec = WHEELS[interpreter]
    inputs = {"interpreter": interpreter, "requirements": list(spec.requirements), "deps": spec.deps,
              "python": PYTHON_VERSION, "platforms": list(PLATFORMS)}

    def build(tmp: Path) -> None:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--only-binary=:all:",
               "--python-version", PYTHON_VERSION, "--implementation", "cp",
               "--abi", "cp" + PYTHON_VERSION.replace(".", "")]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
        cmd += ["--target", str(tmp)] + ([] if spec.deps else ["--no-deps"]) + list(spec.requirements)
        _run(cmd, f"pip install of the aarch64 wheels {' '.join(spec.requirements)}", log)

    return cached_folder(cache, f"wheels-{interpreter}", inputs, build, log)


def cpu_root(root: Path, cpu: str, work: Path) -> Path:
    """A folder of links to the sysroot's entries plus the board's ``/proc/cpuinfo`` (for QEMU_LD_PREFIX)."""
    if cpu not in CPUS:
        raise SetupError(f"unknown CPU model {cpu!r}; valid: {', '.join(CPUS)}")
    folder = work / f"root-{cpu}"
    folder.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():
        if entry.name not in ("proc",) and not (folder / entry.name).exists():
            (folder / entry.name).symlink_to(entry.resolve() if not entry.is_symlink() else os.readlink(entry))
    (folder / "proc").mkdir(exist_ok=True)
    shutil.copyfile(CPUINFO_DIR / CPUS[cpu], folder / "proc" / "cpuinfo")
    return folder


def guest_command(cpu: str, root: Path, python_path: Iterable[Path], argv: list[str]) -> tuple[list[str], dict]:
    """Command and clean environment that run ``python3.11 argv...`` emulated on ``cpu``."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "QEMU_CPU": cpu, "QEMU_LD_PREFIX": str(root),
           "PYTHONPATH": os.pathsep.join(str(p) for p in python_path), "PYTHONDONTWRITEBYTECODE": "1"}
    return [shutil.which(QEMU) or QEMU, str(root / "usr/bin" / f"python{PYTHON_VERSION}")] + argv, env
