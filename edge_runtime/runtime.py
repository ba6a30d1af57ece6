"""One composite model on the device: the library once per batch, then the queried experts.

``Runtime.open`` verifies and loads only the fragments the query needs (other
experts' files may be missing or damaged), creates each interpreter once, and
``predict`` composes them: library features go to every expert as they are
when the encodings match (int8 straight through), else via float; each
expert's logits land at their global class ids (ascending) and a softmax runs
over the union - the same order the torch ComposedModel and the fused ONNX
graph use.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .anytime import AnytimeComposer, Overhead, StagePlan, measure_overhead, open_composer
from .authenticity import Authenticity, authenticate
from .backends import Backend, resolve_backend
from .device_compose import BoundComposer
from .encoding import InputEncoder
from .images import ImageInput, load_inputs
from .loading import load_runner
from .manifest import Manifest, ManifestError, read_manifest
from .providers import ProviderError, ProvidersLike, parse_providers
from .query import Query, QueryLike
from .runners import Runner, dequantize, pass_between, quantize
from .selection import Selection, select

DEFAULT_MAX_BATCH = 64  # larger inputs run in chunks of this many images, bounding memory


@dataclass(frozen=True)
class Prediction:
    """Per image: the predicted class and probabilities over the union of the queried classes."""

    class_ids: np.ndarray  # (N,) global class id of the top class
    labels: tuple[str, ...]  # (N,) its name
    probabilities: np.ndarray  # (N, K) softmax over ``classes``
    logits: np.ndarray  # (N, K)
    classes: tuple[int, ...]  # K global class ids, ascending
    class_names: tuple[str, ...]  # their names

    def __len__(self) -> int:
        return len(self.class_ids)

    def top(self, k: int = 1) -> list[list[tuple[str, float]]]:
        """The ``k`` most probable classes of every image, as (name, probability)."""
        k = max(1, min(k, len(self.classes)))
        order = np.argsort(-self.probabilities, axis=1, kind="stable")[:, :k]
        return [[(self.class_names[j], float(self.probabilities[i, j])) for j in row] for i, row in enumerate(order)]

    def to_json(self, top_k: int | None = None) -> list[dict[str, Any]]:
        rows = []
        for i, (cid, label) in enumerate(zip(self.class_ids, self.labels)):
            probs = {name: round(float(p), 6) for name, p in zip(self.class_names, self.probabilities[i])}
            if top_k:
                probs = dict(self.top(top_k)[i])
            rows.append({"index": i, "class_id": int(cid), "label": label, "probability": round(float(
                self.probabilities[i, self.classes.index(int(cid))]), 6), "probabilities": probs})
        return rows


class Runtime:
    """A loaded composite query; interpreters are built once and reused for every call.

    ``runners`` are those of ``selection.fragments`` (library first).  With progressive experts the
    runtime owns an :class:`~edge_runtime.anytime.AnytimeComposer` (built by ``open``) that runs the
    planned stages; ``experts`` are then each task's first stage.
    """

    def __init__(self, bundle_dir: Path, manifest: Manifest, selection: Selection, backend: Backend,
                 runners: Sequence[Runner], max_batch: int = DEFAULT_MAX_BATCH,
                 composer: AnytimeComposer | None = None, io_binding: bool = False) -> None:
        self.bundle_dir, self.manifest, self.selection, self.backend = bundle_dir, manifest, selection, backend
        by_id = {r.fragment.id: r for r in runners}
        self.library, self.experts = runners[0], tuple(by_id[f.id] for f in selection.experts)
        self.composer = composer
        self._lock = threading.Lock()  # one interpreter set: one call at a time (see clone() for parallel threads)
        self.authenticity: Authenticity | None = None
        self.load_options: dict[str, Any] = {}  # how open() built the runners, for clone()
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.classes = selection.class_ids
        self.class_names = tuple(manifest.class_names[c] for c in self.classes)
        self._class_array = np.asarray(self.classes, dtype=np.int64)
        self._all_names = manifest.class_names
        self._order = np.asarray(selection.column_order, dtype=np.int64)  # concat order -> ascending ids
        self._passthrough = tuple(e.input.same_encoding(self.library.output) for e in self.experts)
        self._encoder = InputEncoder(manifest.preprocessing, self.library.input)
        if io_binding and composer is not None:
            raise ValueError("io_binding composes library + experts on the device; progressive experts (stages) run "
                             "through the anytime planner instead: open without io_binding")
        self._bound = BoundComposer(self.library, self.experts) if io_binding else None
        # Dequantize all experts' outputs in one step: per-column zero point and scale, in output order.
        outputs = [(e.output, len(f.class_ids)) for e, f in zip(self.experts, selection.experts)]
        self._quantized_out = all(o.quantized for o, _ in outputs)
        if self._quantized_out:
            self._zero_point = np.concatenate([np.full(n, o.zero_point, np.float32) for o, n in outputs])[self._order]
            self._scale = np.concatenate([np.full(n, o.scale, np.float32) for o, n in outputs])[self._order]

    @classmethod
    def open(cls, bundle_dir: str | Path, tasks: QueryLike, backend: str = "auto",
             precision: str = "int8", num_threads: int | None = 1, providers: ProvidersLike = None,
             max_batch: int = DEFAULT_MAX_BATCH, stages: int | None = None, budget_ms: float | None = None,
             early_exit: float | None = None, calibrate: bool = False, overhead: Overhead | None = None,
             public_key: Any = None, warmup: bool = False, io_binding: bool = False) -> "Runtime":
        """Verify and load the library and the experts of ``tasks`` (a :class:`Query`, ``"a,b"`` or a list).

        Progressive bundles (experts as stages) run every stage unless ``stages`` (a count) or
        ``budget_ms`` (fragment latency at batch 1, from the manifest or, with ``calibrate``,
        measured here) says fewer; ``early_exit`` stops refining samples whose softmax reaches it.
        A budget counts preprocessing, softmax and the glue between fragments too: ``overhead`` gives them, or
        (None) they are measured here on blank images when a budget is given.
        A fetched bundle's manifest must match its saved signed manifest, whose signature is checked with
        ``public_key`` (an Ed25519 key or PEM path) or the bundle's pinned key.  Every interpreter runs once
        at load; ``warmup`` also runs the whole pipeline (:meth:`warmup`).

        ``providers`` (``"cuda,cpu"`` or a list; onnxruntime only, ``backend="auto"`` then means onnxruntime)
        go to onnxruntime in that order, each must be available, and none falls back to the CPU unless ``cpu``
        is listed (``edge_runtime/providers.py``).  ``io_binding`` keeps the library's output on the
        providers' device for the experts (``edge_runtime/device_compose.py``).
        """
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        if budget_ms is not None and stages is not None:
            raise ValueError("give a latency budget (budget_ms) or a stage count (stages), not both")
        query = Query.parse(tasks)  # a malformed query fails before any file is read
        providers = parse_providers(providers)
        if providers is not None or io_binding:
            if backend == "auto":
                backend = "onnxruntime"  # the only interpreter with execution providers and I/O binding
            elif backend != "onnxruntime" and providers is not None:
                raise ProviderError(f"execution providers apply to the onnxruntime backend only, not {backend} "
                                    f"(TFLite interpreters run on the CPU): use --backend onnxruntime")
        root = Path(bundle_dir)
        manifest = read_manifest(root)
        every_format = sorted({fmt for fmt, _ in manifest.variants()})
        with_precision = sorted({fmt for fmt, p in manifest.variants() if p == precision})
        chosen = resolve_backend(backend, (with_precision or every_format) if backend == "auto" else every_format)
        if io_binding and chosen.name != "onnxruntime":
            raise ValueError(f"io_binding needs the onnxruntime backend (ONNX fragments), not {chosen.name}: "
                             f"use --backend onnxruntime")
        selection = select(manifest, query, chosen.format, precision)
        auth = authenticate(root, manifest, public_key, selection.fragments)
        if auth.problems:
            raise ManifestError(auth.problems[0] + (f" (and {len(auth.problems) - 1} more problem(s): edge-runtime "
                                                    f"verify lists them)" if len(auth.problems) > 1 else ""))
        runners = [load_runner(root, frag, num_threads, chosen.name, providers) for frag in selection.fragments]
        composer = None
        if manifest.staged or stages is not None or budget_ms is not None or early_exit is not None or calibrate:
            composer = open_composer(manifest, selection, runners, stages, budget_ms, early_exit, calibrate)
        runtime = cls(root, manifest, selection, chosen, runners, max_batch, composer, io_binding)
        if budget_ms is not None and composer is not None:
            runtime.composer = composer.replanned(overhead or runtime.measure_overhead())
        runtime.authenticity = auth
        runtime.load_options = {"threads": num_threads, "providers": providers, "io_binding": io_binding}
        if warmup:
            runtime.warmup()
        return runtime

    def clone(self) -> "Runtime":
        """The same query on its own interpreters (files read and checked again), for one more thread.

        A Runtime is safe to share (calls are serialized by a lock); give each worker thread its own clone
        to run them in parallel instead - measured in docs/results/edge_stream.md.
        """
        opts = self.load_options
        runners = [load_runner(self.bundle_dir, f, opts.get("threads"), self.backend.name, opts.get("providers"))
                   for f in self.selection.fragments]
        composer = self.composer.rebind(runners) if self.composer is not None else None
        twin = type(self)(self.bundle_dir, self.manifest, self.selection, self.backend, runners, self.max_batch,
                          composer, bool(opts.get("io_binding")))
        twin.authenticity, twin.load_options = self.authenticity, dict(opts)
        return twin

    def measure_overhead(self) -> Overhead:
        """Preprocessing + softmax, and the glue per fragment call, on blank images with every stage running."""
        if self.composer is None:
            return Overhead()
        c = self.composer
        every = AnytimeComposer(c.library, c.stage_runners, [len(r) for r in c.stage_runners], c.order)
        blank = np.zeros((1, *self.manifest.preprocessing.input_shape), dtype=np.uint8)
        return measure_overhead(every, lambda: self.encode(blank, "NHWC"), self.prediction)

    def warmup(self, iterations: int = 3, batch: int = 1) -> None:
        """Run the whole pipeline on blank images so the first real frame does not pay for first-call setup."""
        h, w, c = self.manifest.preprocessing.input_shape
        blank = np.zeros((batch, h, w, c), dtype=np.uint8)
        for _ in range(iterations):
            self.predict(blank, "NHWC")

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.selection.tasks

    @property
    def query(self) -> Query:
        return self.selection.query

    @property
    def plan(self) -> StagePlan | None:
        """Progressive experts: how many stages of each run, and why (None without a composer)."""
        return self.composer.plan if self.composer is not None else None

    def encode(self, images: np.ndarray | Sequence[ImageInput], layout: str = "auto",
               resize: bool = False) -> np.ndarray:
        """Images in any accepted form -> the library's input tensor (its dtype, layout and quantization)."""
        return self._encoder(load_inputs(images, self.manifest.preprocessing, layout, resize))

    def logits(self, x: np.ndarray, timings: dict[str, float] | None = None) -> np.ndarray:
        """Composite logits (N, K) in ascending class-id order from float library input ``x``."""
        return self.logits_from_encoded(quantize(x, self.library.input), timings)

    def logits_from_encoded(self, encoded: np.ndarray, timings: dict[str, float] | None = None) -> np.ndarray:
        """Composite logits (N, K) from the library's raw input tensor (``encode``).

        With ``timings``, seconds spent in each fragment's interpreter are added under its id.  Thread-safe:
        TFLite interpreters must not be invoked from two threads at once, so calls take turns.
        """
        with self._lock:
            return self._logits_unlocked(encoded, timings)

    def _logits_unlocked(self, encoded: np.ndarray, timings: dict[str, float] | None = None) -> np.ndarray:
        if len(encoded) > self.max_batch:
            return np.concatenate([self._logits_unlocked(encoded[i:i + self.max_batch], timings)
                                   for i in range(0, len(encoded), self.max_batch)])
        if self.composer is not None:
            return self.composer(encoded, timings)
        if self._bound is not None:
            return self._ordered(self._bound(encoded, timings))
        lib = self.library
        start = time.perf_counter()
        raw = lib.run_raw(encoded)
        if timings is not None:
            _add(timings, lib.fragment.id, time.perf_counter() - start)
        parts = []
        for expert, passthrough in zip(self.experts, self._passthrough):
            fed = raw if passthrough else pass_between(raw, lib.output, expert.input)
            start = time.perf_counter()
            out = expert.run_raw(fed)
            if timings is not None:
                _add(timings, expert.fragment.id, time.perf_counter() - start)
            parts.append(out)
        return self._ordered(parts)

    def _ordered(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """Experts' raw outputs -> float logits in ascending class-id order."""
        if not self._quantized_out:
            parts = [dequantize(out, e.output) for out, e in zip(parts, self.experts)]
        ordered = np.concatenate(parts, axis=1)[:, self._order]
        if not self._quantized_out:
            return ordered
        logits = ordered.astype(np.float32)  # same arithmetic as dequantize(), all columns at once
        logits -= self._zero_point
        logits *= self._scale
        return logits

    def predict(self, images: np.ndarray | Sequence[ImageInput], layout: str = "auto",
                resize: bool = False) -> Prediction:
        """Class ids, labels and probabilities over the union of the queried classes, one row per image."""
        return self.prediction(self.logits_from_encoded(self.encode(images, layout, resize)))

    def prediction(self, logits: np.ndarray) -> Prediction:
        probs = softmax(logits)
        class_ids = self._class_array[np.argmax(logits, axis=1)]
        return Prediction(class_ids=class_ids, labels=tuple(self._all_names[c] for c in class_ids),
                          probabilities=probs, logits=logits, classes=self.classes, class_names=self.class_names)

    def describe(self) -> dict[str, Any]:
        """What is loaded, for logs and benchmark records."""
        return {"pool_id": self.manifest.pool_id, "backend": self.backend.name, "format": self.selection.format,
                "precision": self.selection.precision, "tasks": list(self.tasks), "classes": list(self.classes),
                "fragments": {f.id: f.bytes for f in self.selection.fragments}, "bytes": self.selection.bytes,
                "int8_passthrough": dict(zip(self.tasks, self._passthrough)),
                **({"providers": list(self.library.providers), "io_binding": self._bound is not None}
                   if hasattr(self.library, "providers") else {}),
                **({"plan": self.composer.plan.to_json(), "early_exit": self.composer.early_exit}
                   if self.composer is not None and self.composer.plan is not None else {})}


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True), dtype=np.float32)
    e /= e.sum(axis=1, keepdims=True)
    return e


def _add(timings: dict[str, float], key: str, seconds: float) -> None:
    timings[key] = timings.get(key, 0.0) + seconds


__all__ = ["Prediction", "Runtime", "softmax", "ManifestError"]
