"""``make test-arm``: the edge runtime run as a Raspberry Pi 4 / 5 would, under aarch64 user-mode emulation.

An arm64 Debian Python (no chroot), the aarch64 wheels of each interpreter, a
fake Pi ``/proc/cpuinfo``, then ``qemu-aarch64-static`` with ``QEMU_CPU`` set to
the board's CPU.  Predictions are compared with the x86 run on the same images.
Entry point: ``python -m tools.arm64`` (:mod:`tools.arm64.check`).
"""
