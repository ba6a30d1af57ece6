"""Pool -> fragment directory: every fragment converted, checked, measured, gated, then published at once.

The conversion of each format is its backend's job (``converters.backends``,
looked up by format name); this module drives them through the same steps:
torch reference, per variant convert -> check -> measure -> gate (int8 retries
safer schemes), cross-checks, latencies, manifest.  All files are written into
a hidden staging directory beside ``--out``, renamed into place only when every
gate has passed (``publish``).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from edge_runtime.atomic_io import LockBusyError, atomic_write_json, exclusive_lock, sha256_bytes
from edge_runtime.manifest import Fragment, fragment_id, write_manifest
from edge_runtime.query import Query, QueryError
from pool_builder.models.wrn import ProgressiveExpert
from pool_builder.pool.loader import Pool

from .agreement import Reference, gate_failures, measure_variant, query_names
from .backends import Calibration, FormatBackend, UnitKey, create_backend, get_backend
from .backends.base import Log
from .calibration import calibration_images, evaluation_images, torch_outputs
from .config import LATENCY_CHOICES, ExportConfig, parse_list
from .errors import ConvertError, GateError
from .latency import fragment_latencies
from .onnx_export import OnnxSource
from .publish import check_output_dir, publish, remove_stale
from .results import ExportRecord, ExportResult, build_manifest, build_summary
from .schemes import QuantScheme, parse_schemes
from .stages import ExpertUnit, expert_units

__all__ = ["Export", "ExportConfig", "ExportResult", "LATENCY_CHOICES", "Log", "check_output_dir", "export_fragments",
           "parse_list", "publish"]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Export:
    """One run of ``poe-convert export``."""

    def __init__(self, cfg: ExportConfig, log: Log = _stderr) -> None:
        self.cfg = cfg
        self.log = log
        self.out = Path(cfg.out)
        self.pool = Pool.open(cfg.pool)
        self.tasks = {t: tuple(ids) for t, ids in sorted(self.pool.meta.tasks.items())}
        self.queries = query_names(list(self.tasks), [self._check_query(q) for q in cfg.queries])
        self.record = ExportRecord()
        self.units: dict[str, ExpertUnit] = {}
        self.staged = False

    def _check_query(self, query: Sequence[str]) -> tuple[str, ...]:
        try:
            return Query.parse(query).validate(self.tasks).tasks
        except QueryError as exc:
            raise ConvertError(f"--query: {exc}") from None

    # ----------------------------------------------------------------- entry
    def run(self) -> ExportResult:
        start = time.perf_counter()
        self.pool.verify()  # a missing or tampered pool file stops us before any work
        check_output_dir(self.out, self.pool.meta.pool_id, self.cfg.overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        try:
            with exclusive_lock(self.out.parent / f".{self.out.name}.lock"):
                remove_stale(self.out)
                staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.staging-", dir=self.out.parent))
                staging.chmod(0o755)  # mkdtemp's 0700 would hide the published fragments from a file server
                try:
                    result = self._run_in(staging)
                    if result.manifest is not None:
                        publish(staging, self.out)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
        except LockBusyError as busy:
            raise ConvertError(f"another export is writing {self.out} (pid {busy.pid}); wait for it") from None
        result.summary["wall_seconds"] = round(time.perf_counter() - start, 2)
        return result

    def _timed(self, key: str, t0: float) -> None:
        timings = self.record.timings
        timings[key] = round(timings.get(key, 0.0) + time.perf_counter() - t0, 3)

    def _run_in(self, staging: Path) -> ExportResult:
        cfg = self.cfg
        t0 = time.perf_counter()
        library = self.pool.library()
        experts = {t: self.pool.expert(t) for t in self.tasks}
        self.units = expert_units(experts)
        self.staged = any(u.stage is not None for u in self.units.values())
        calib = calibration_images(self.pool, cfg.calibration_images, cfg.data_dir, cfg.calibration_file)
        evaluation = evaluation_images(self.pool, cfg.eval_images, cfg.data_dir)
        calibration = Calibration(calib.images, torch_outputs(library, calib.images))
        eval_features = torch_outputs(library, evaluation.images)
        self.ref = Reference(evaluation.images, evaluation.labels, eval_features,
                             {t: torch_outputs(m, eval_features) for t, m in experts.items()}, self.tasks,
                             {t: [torch_outputs(m.partial(k), eval_features) for k in range(1, m.num_stages + 1)]
                              for t, m in experts.items() if isinstance(m, ProgressiveExpert)})
        self._timed("torch_reference", t0)
        self.log(f"pool {self.pool.meta.pool_id}: {len(self.tasks)} experts, {len(calib)} calibration and "
                 f"{len(evaluation)} held-out images; variants {', '.join(f'{f}/{p}' for f, p in cfg.variants())}")
        failures: list[str] = []
        for fmt in cfg.formats:
            backend = create_backend(fmt, calibration, self.log)  # one per format and run: its caches go with it
            sources = self._sources(backend, library, calibration)
            for precision in backend.wanted(cfg.precisions):
                failures += self._variant(staging, backend, precision, sources)
        if not failures and cfg.check_tflite_runtime:
            failures += self._cross_check(staging)
        if not failures and (cfg.latency == "always" or (cfg.latency == "auto" and self.staged)):
            t0 = time.perf_counter()
            self.record.latencies = fragment_latencies(staging, self.record.fragments)
            self._timed("latency", t0)
        manifest = None if failures else build_manifest(self.pool.meta, self.tasks, self.record, self.staged)
        if manifest is not None:
            write_manifest(staging, manifest)
        return ExportResult(manifest, build_summary(self.pool.meta.pool_id, self.out, self.record, failures))

    # ----------------------------------------------------------------- conversion
    def _sources(self, backend: FormatBackend, library: nn.Module,
                 calibration: Calibration) -> dict[UnitKey, OnnxSource]:
        """ONNX graphs of the library (key None) and of every expert unit (key: task, or task.stageK)."""
        t0 = time.perf_counter()
        sources = backend.sources(library, self.units, tuple(self.pool.meta.dataset.input_shape),
                                  tuple(calibration.features_nchw.shape[1:]))
        self._timed(f"{backend.name}_torch_export", t0)
        return sources

    def _fragment(self, staging: Path, backend: FormatBackend, precision: str, key: UnitKey, source: OnnxSource,
                  scheme: QuantScheme | None, library_sha: str | None) -> Fragment:
        """Convert one graph (library: key None; else an expert unit), check it and write it into staging."""
        fmt = backend.name
        data = backend.fragment_bytes(precision, key, source, scheme)
        in_spec, out_spec = backend.tensor_specs(data, key, source)
        unit = None if key is None else self.units[key]
        task, stage = (None, None) if unit is None else (unit.task, unit.stage)
        what = "library" if key is None else f"expert {key!r}"
        backend.check(data, f"{fmt} {precision} {what}")
        rel = backend.file(precision, key)
        path = staging / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)  # the whole staging directory is published atomically
        role = "library" if task is None else "expert"
        return Fragment(id=fragment_id(role, task, fmt, precision, stage), role=role, format=fmt, precision=precision,
                        file=rel, sha256=sha256_bytes(data), bytes=len(data), inputs=(in_spec,), outputs=(out_spec,),
                        task=task, class_ids=self.tasks[task] if task else (), library_sha256=library_sha,
                        scheme=scheme.to_json() if scheme else {}, stage=stage)

    def _variant(self, staging: Path, backend: FormatBackend, precision: str,
                 sources: dict[UnitKey, OnnxSource]) -> list[str]:
        """Convert, check and measure one format/precision; int8 retries safer schemes until the gate passes."""
        fmt, record = backend.name, self.record
        schemes: list[QuantScheme | None] = list(parse_schemes(self.cfg.schemes)) if precision == "int8" else [None]
        attempts: list[dict[str, Any]] = []
        for scheme in schemes:
            label = f"{fmt}/{precision}" + (f" ({scheme.name})" if scheme else "")
            t0 = time.perf_counter()
            lib = self._fragment(staging, backend, precision, None, sources[None], scheme, None)
            units = {key: self._fragment(staging, backend, precision, key, sources[key], scheme, lib.sha256)
                     for key in self.units}
            experts = {t: tuple(units[k] for k, u in self.units.items() if u.task == t) for t in self.tasks}
            self._timed(f"{fmt}_{precision}_convert", t0)
            t0 = time.perf_counter()
            agreement = measure_variant(staging, lib, experts, self.ref, self.queries, self.cfg.threads)
            self._timed(f"{fmt}_{precision}_measure", t0)
            failures = gate_failures(precision, agreement, self.cfg.max_accuracy_drop)
            worst = agreement.worst_drop_points()
            attempts.append({"scheme": scheme.name if scheme else None, "passed": not failures,
                             "worst_drop_points": round(worst, 3), "failures": failures})
            self.log(f"  {label}: {'ok' if not failures else 'FAILED'} - library+experts "
                     f"{lib.bytes + sum(e.bytes for e in units.values()):,} bytes, worst composite drop "
                     f"{worst:+.2f} points vs torch" + ("" if not failures else f"; {failures[0]}"))
            if not failures:
                record.fragments += [lib, *units.values()]
                record.agreements[f"{fmt}.{precision}"] = agreement
                record.chosen_schemes[f"{fmt}.{precision}"] = {"scheme": scheme.name if scheme else None,
                                                                "attempts": attempts}
                return []
        record.chosen_schemes[f"{fmt}.{precision}"] = {"scheme": None, "attempts": attempts}
        return [f"{fmt}/{precision}: {a['scheme'] or 'conversion'}: {'; '.join(a['failures'][:2])}" for a in attempts]

    def _cross_check(self, staging: Path) -> list[str]:
        """Run each format's fragments in its second device runtime, where it has one (TFLite: tflite-runtime)."""
        failures: list[str] = []
        for fmt in self.cfg.formats:
            backend = get_backend(fmt)
            if backend.second_runtime is None:
                continue
            t0 = time.perf_counter()
            failures += backend.cross_check(staging, self.record.fragments, self.ref, self.cfg.threads)
            self._timed(f"{fmt}_runtime_check", t0)
        return failures


def export_fragments(cfg: ExportConfig, log: Log = _stderr, summary_path: str | None = None) -> ExportResult:
    """Run an export; write the JSON summary to ``summary_path`` (pass or fail); raise GateError on failure."""
    result = Export(cfg, log).run()
    if summary_path:
        atomic_write_json(summary_path, result.summary)
    if result.manifest is None:
        raise GateError(f"export failed its gates, nothing was published to {cfg.out}: "
                        + "; ".join(result.summary["failures"][:3]))
    return result
