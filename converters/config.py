"""What one export converts and how strictly it judges the result, validated before any work starts.

Formats are checked against the backend registry and precisions against the
manifest's, so a typo stops the run with the list of valid names instead of
after minutes of conversion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from edge_runtime.manifest import PRECISIONS, ManifestError, check_choice
from edge_runtime.query import Query, QueryError, QueryLike

from .agreement import TOLERANCES
from .backends import get_backend, list_formats
from .errors import ConvertError
from .schemes import DEFAULT_SCHEME_ORDER, parse_schemes

LATENCY_CHOICES = ("auto", "always", "never")


def parse_list(kind: str, value: str | Sequence[str], valid: Sequence[str]) -> tuple[str, ...]:
    """A comma list (or sequence) of choices, deduplicated in order; ConvertError naming the valid ones."""
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v) for v in value]
    if not items or not all(items):
        raise ConvertError(f"no {kind} given; valid: {', '.join(valid)}")
    try:
        return tuple(dict.fromkeys(check_choice(kind, v, tuple(valid)) for v in items))
    except ManifestError as exc:
        raise ConvertError(str(exc)) from None


@dataclass(frozen=True)
class ExportConfig:
    """What to convert and how strictly to judge it."""

    pool: str
    out: str
    formats: tuple[str, ...] = list_formats()
    precisions: tuple[str, ...] = PRECISIONS
    calibration_images: int = 200
    calibration_file: str | None = None
    eval_images: int | None = None  # None: every held-out image the pool was evaluated on
    data_dir: str | None = None
    max_accuracy_drop: float = TOLERANCES["int8"]["max_accuracy_drop_points"]
    schemes: tuple[str, ...] = DEFAULT_SCHEME_ORDER
    queries: tuple[QueryLike, ...] = ()  # extra composite queries to gate ("a,b" or ["a", "b"]); order-free
    overwrite: bool = False
    threads: int | None = 2
    check_tflite_runtime: bool = True  # cross-check fragments in each format's second runtime (TFLite: tflite-runtime)
    latency: str = "auto"  # per-fragment latency at batch 1: auto = for progressive pools only, always, never

    def __post_init__(self) -> None:
        if self.latency not in LATENCY_CHOICES:
            raise ConvertError(f"unknown latency mode {self.latency!r}; valid: {', '.join(LATENCY_CHOICES)}")
        object.__setattr__(self, "formats", parse_list("format", self.formats, list_formats()))
        object.__setattr__(self, "precisions", parse_list("precision", self.precisions, PRECISIONS))
        parse_schemes(self.schemes)
        try:
            object.__setattr__(self, "queries", tuple(Query.parse(q).tasks for q in self.queries))
        except QueryError as exc:
            raise ConvertError(f"--query: {exc}") from None
        if not self.variants():
            offers = " and ".join(f"{b.title} offers {', '.join(b.precisions)}"
                                  for b in map(get_backend, list_formats()))
            raise ConvertError(f"nothing to produce: formats {list(self.formats)} with precisions "
                               f"{list(self.precisions)}; {offers}")
        if self.max_accuracy_drop < 0:
            raise ConvertError(f"max accuracy drop must be >= 0 points, got {self.max_accuracy_drop}")
        if self.eval_images is not None and self.eval_images < 1:
            raise ConvertError(f"eval image count must be >= 1, got {self.eval_images}")

    def variants(self) -> list[tuple[str, str]]:
        """Every (format, precision) this export produces, formats in the order asked for."""
        return [(f, p) for f in self.formats for p in self.precisions if p in get_backend(f).precisions]
