"""Emulated aarch64 logits against the x86 run on the same images, with the tolerances named in one table.

fp32 kernels on both architectures compute the same float arithmetic up to
summation order, so their logits must agree to ``fp32_max_abs``.  int8 kernels
may round differently (tflite-runtime 2.14 on aarch64 differs from x86 by one
output step in about a fifth of the values), so int8 is judged by top-1
agreement, and every image whose top-1 flips must be a near-tie: the x86
logits of the two classes involved at most ``int8_near_tie_steps``
quantization steps apart.

On the int8 grid exact ties are common (about 4% of the tiny pool's images
have two classes with the same top logit on x86); argmax then takes the
lower class index, and a one-step difference elsewhere picks the other.  Such
an image agrees when the aarch64 top-1 is also a top-1 on x86 (or the other
way round): the gated ``top1_agreement`` counts ties as agreement, the strict
``top1_strict`` (plain argmax equality) is reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TOLERANCES = {
    "fp32_max_abs": 1e-4,  # largest |x86 - aarch64| of any fp32 logit
    "int8_min_top1_agreement": 0.99,  # share of images with the same predicted class
    "int8_near_tie_steps": 2.0,  # a flipped image's x86 top-1 vs aarch64 top-1 logit gap, in output steps
}


@dataclass(frozen=True)
class Comparison:
    """One (interpreter, CPU, precision) cell of the table."""

    precision: str
    images: int
    max_abs: float | None  # None when the logits could not be compared at all
    top1_agreement: float  # the aarch64 top-1 is a top-1 on x86 or vice versa (exact ties count as agreement)
    top1_strict: float = 0.0  # plain argmax equality
    flips: tuple[int, ...] = ()  # images whose argmax differs (ties included)
    max_steps: float | None = None  # int8: largest |Δ| in quantization steps
    failures: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.failures


def compare(reference: np.ndarray, emulated: np.ndarray, precision: str, int8_step: float | None = None,
            tolerances: dict[str, float] = TOLERANCES) -> Comparison:
    """Judge ``emulated`` (N, K) logits against ``reference``; ``failures`` say what is out of tolerance."""
    if precision not in ("fp32", "int8"):
        raise ValueError(f"unknown precision {precision!r}; valid: fp32, int8")
    if reference.shape != emulated.shape:
        return Comparison(precision, len(reference), None, 0.0, 0.0,
                          failures=(f"{precision}: shapes differ, x86 {reference.shape} vs aarch64 {emulated.shape}",))
    if not np.isfinite(emulated).all():
        return Comparison(precision, len(reference), None, 0.0, 0.0,
                          failures=(f"{precision}: aarch64 logits are not all finite",))
    ref_top, emu_top = reference.argmax(axis=1), emulated.argmax(axis=1)
    rows = np.arange(len(reference))
    flips = tuple(int(i) for i in np.flatnonzero(ref_top != emu_top))
    tied = (reference[rows, emu_top] >= reference.max(axis=1)) | (emulated[rows, ref_top] >= emulated.max(axis=1))
    differ = [i for i in flips if not tied[i]]
    n = len(reference)
    agreement = 1.0 - len(differ) / n if n else 1.0
    strict = 1.0 - len(flips) / n if n else 1.0
    max_abs = float(np.abs(reference.astype(np.float64) - emulated).max()) if reference.size else 0.0
    failures: list[str] = []
    if precision == "fp32":
        limit = tolerances["fp32_max_abs"]
        if max_abs > limit:
            failures.append(f"fp32: max |x86 - aarch64| = {max_abs:.3g} > {limit:g}")
        return Comparison(precision, n, max_abs, agreement, strict, flips, None, tuple(failures))
    if not int8_step or int8_step <= 0:
        raise ValueError(f"int8 comparison needs the output quantization step, got {int8_step!r}")
    minimum = tolerances["int8_min_top1_agreement"]
    if agreement < minimum:
        failures.append(f"int8: top-1 agreement {agreement:.2%} < {minimum:.0%} ({len(differ)} of {n} images "
                        f"differ, not counting exact ties)")
    ties = tolerances["int8_near_tie_steps"]
    for i in flips:
        gap = abs(float(reference[i, ref_top[i]] - reference[i, emu_top[i]])) / int8_step
        if gap > ties:
            failures.append(f"int8: image {i} flips from class column {ref_top[i]} to {emu_top[i]} although "
                            f"x86 puts them {gap:.1f} steps apart (> {ties:g}: not a near-tie)")
    return Comparison(precision, n, max_abs, agreement, strict, flips, max_abs / int8_step, tuple(failures))
