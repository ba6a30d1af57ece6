"""Anytime inference: run only as many stages of each progressive expert as a latency budget allows.

A progressive expert (B-DISTIL) is a sequence of small fragments whose logits
add up; stopping after any stage gives a usable expert.  The planner turns
per-fragment latencies (measured at batch 1 on the export machine and stored
in the manifest, or measured here with ``calibrate``) into a stage count per
expert: the library always, then stage 1 of every expert (a query needs all
its classes), then further stages round-robin while the budget allows - so no
expert's logits fall far behind the others' in refinement.

A budget covers the whole call, not only the fragments: preprocessing, the
softmax and the glue between fragments (feeding, dequantising, summing) are
measured on this device when the runtime opens (:func:`measure_overhead`) and
counted by the planner as a fixed part plus a part per fragment call.

Early exit is a measured option, not a default: with ``early_exit=P`` a sample
stops receiving further stages once its composite softmax is at least ``P``.

``Runtime.open`` builds its composer with :func:`open_composer` and owns it;
this module never touches a ``Runtime``, it only sees the selection and the
opened runners.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .manifest import Manifest, ManifestError
from .runners import Runner, dequantize, pass_between
from .selection import Selection

CALIBRATION_WARMUP = 3
CALIBRATION_ITERATIONS = 15


OVERHEAD_ITERATIONS = 15


@dataclass(frozen=True)
class Overhead:
    """What a call costs beyond the fragments' interpreters (ms, batch 1): counted by the planner.

    ``fixed_ms``: preprocessing and softmax, once per call; ``per_call_ms``: the
    glue around each fragment call (feeding, dequantising, summing).
    """

    fixed_ms: float = 0.0
    per_call_ms: float = 0.0


NO_OVERHEAD = Overhead()


@dataclass(frozen=True)
class StagePlan:
    """How many stages of each expert run, and the latency the plan expects (batch 1, overhead included)."""

    stages: dict[str, int]
    available: dict[str, int]
    predicted_ms: float
    budget_ms: float | None = None
    latency_source: str = "manifest"  # or "calibrated" (measured on this device)
    latencies_ms: dict[str, float] = field(default_factory=dict)
    overhead_fixed_ms: float = 0.0
    overhead_per_call_ms: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()
                if k != "latencies_ms"} | {"latencies_ms": {k: round(v, 4) for k, v in self.latencies_ms.items()}}


def plan_stages(library_ms: float, stage_ms: Mapping[str, Sequence[float]], budget_ms: float | None = None,
                stages: int | None = None, overhead: Overhead = NO_OVERHEAD) -> tuple[dict[str, int], float]:
    """Stage count per task and the predicted time of the call.

    With ``stages=K`` every expert runs ``min(K, S)`` stages.  With ``budget_ms``
    the library and stage 1 of every expert always run (even over budget: the
    query needs every class), then stage 2 of each expert in task order, then
    stage 3, ..., each only if it still fits; an expert whose next stage did not
    fit gets no later ones.  With neither, every stage runs.  ``overhead`` adds
    its fixed part once and its per-call part to every fragment call (library
    included), so a budget is spent on what the caller waits for.
    """
    if budget_ms is not None and stages is not None:
        raise ValueError("give a latency budget or a stage count, not both")
    if budget_ms is not None and not budget_ms > 0:
        raise ValueError(f"the latency budget must be a positive number of ms, got {budget_ms}")
    if stages is not None and stages < 1:
        raise ValueError(f"the stage count must be >= 1, got {stages}")
    tasks = sorted(stage_ms)
    if budget_ms is None:
        chosen = {t: min(stages or len(stage_ms[t]), len(stage_ms[t])) for t in tasks}
    else:
        chosen = {t: 1 for t in tasks}
        total = overhead.fixed_ms + library_ms + sum(stage_ms[t][0] for t in tasks) \
            + overhead.per_call_ms * (1 + len(tasks))
        growing = [t for t in tasks if len(stage_ms[t]) > 1]
        level = 2
        while growing:
            for task in list(growing):
                cost = stage_ms[task][level - 1] + overhead.per_call_ms
                if total + cost <= budget_ms:
                    chosen[task] = level
                    total += cost
                    if level == len(stage_ms[task]):
                        growing.remove(task)
                else:
                    growing.remove(task)
            level += 1
    calls = 1 + sum(chosen.values())
    predicted = overhead.fixed_ms + library_ms + sum(sum(stage_ms[t][:chosen[t]]) for t in tasks) \
        + overhead.per_call_ms * calls
    return chosen, predicted


def manifest_latencies(manifest: Manifest, selection: Selection) -> dict[str, float]:
    """Per-fragment ms from the manifest; a clear error names the first fragment that has none."""
    out = {}
    for frag in selection.fragments:
        if frag.latency is None:
            raise ManifestError(f"fragment {frag.id!r} has no measured latency in the manifest (only progressive "
                                "bundles carry them); pass --calibrate to measure latencies on this device, or "
                                "use --stages K")
        out[frag.id] = float(frag.latency)
    return out


def measure_latencies(runners: Sequence[Runner], library: Runner, encoded: np.ndarray,
                      warmup: int = CALIBRATION_WARMUP, iterations: int = CALIBRATION_ITERATIONS) -> dict[str, float]:
    """Median ms per call of every runner at batch 1, fed what it gets at run time (the library's output)."""
    x = encoded[:1]
    features = library.run_raw(x)
    out = {}
    for runner in [library, *runners]:
        fed = x if runner is library else pass_between(features, library.output, runner.input)
        times = []
        for i in range(warmup + iterations):
            start = time.perf_counter()
            runner.run_raw(fed)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000.0)
        out[runner.fragment.id] = float(np.median(times))
    return out


def measure_overhead(composer: "AnytimeComposer", pre: Callable[[], np.ndarray], post: Callable[[np.ndarray], Any],
                     warmup: int = CALIBRATION_WARMUP, iterations: int = OVERHEAD_ITERATIONS) -> Overhead:
    """Median cost of ``pre`` (encode one image) + ``post`` (softmax, labels), and of the glue per fragment call.

    ``composer`` should run every stage, so the glue is averaged over as many
    calls as possible: (call time - time inside the interpreters) / calls.
    """
    fixed, glue = [], []
    for i in range(warmup + iterations):
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        encoded = pre()
        t1 = time.perf_counter()
        logits = composer(encoded, timings)
        t2 = time.perf_counter()
        post(logits)
        t3 = time.perf_counter()
        if i >= warmup:
            fixed.append((t1 - t0 + t3 - t2) * 1000.0)
            calls = 1 + sum(composer.counts)
            glue.append(max(0.0, (t2 - t1 - sum(timings.values())) * 1000.0) / calls)
    return Overhead(float(np.median(fixed)), float(np.median(glue)))


class AnytimeComposer:
    """Sums the planned stages of every expert; optionally stops refining confident samples early."""

    def __init__(self, library: Runner, stage_runners: Sequence[Sequence[Runner]], counts: Sequence[int],
                 order: Sequence[int] | np.ndarray, early_exit: float | None = None,
                 plan: StagePlan | None = None) -> None:
        if early_exit is not None and not 0 < early_exit <= 1:
            raise ValueError(f"early exit threshold must be a probability in (0, 1], got {early_exit}")
        self.library = library
        self.stage_runners = [list(r) for r in stage_runners]
        self.counts = list(counts)  # per expert (task order): stages to run
        self.order = np.asarray(order, dtype=np.int64)
        self.early_exit = early_exit
        self.plan = plan  # the planner's record (for describe() and reports); ``counts`` is what runs
        self._passthrough = [[r.input.same_encoding(library.output) for r in runners] for runners in stage_runners]
        self.stages_run: list[int] = []  # per sample of the last call: stages run in all (for reports)

    def rebind(self, runners: Sequence[Runner]) -> "AnytimeComposer":
        """The same plan on other runners of the same fragments (a per-thread copy of a Runtime)."""
        by_id = {r.fragment.id: r for r in runners}
        return AnytimeComposer(by_id[self.library.fragment.id],
                               [[by_id[r.fragment.id] for r in rs] for rs in self.stage_runners], self.counts,
                               self.order, self.early_exit, self.plan)

    def with_counts(self, counts: Sequence[int], plan: StagePlan | None = None) -> "AnytimeComposer":
        """The same runners with other stage counts (e.g. every stage, to measure the overhead)."""
        return AnytimeComposer(self.library, self.stage_runners, counts, self.order, self.early_exit, plan)

    def replanned(self, overhead: Overhead) -> "AnytimeComposer":
        """This composer's budget planned again with ``overhead`` counted (latencies as already found)."""
        plan = self.plan
        if plan is None or plan.budget_ms is None:
            return self
        tasks = list(plan.available)  # selection order
        lat = plan.latencies_ms
        stage_ms = {t: [lat.get(r.fragment.id, 0.0) for r in rs] for t, rs in zip(tasks, self.stage_runners)}
        chosen, predicted = plan_stages(lat.get(self.library.fragment.id, 0.0), stage_ms, plan.budget_ms, None,
                                        overhead)
        new = StagePlan(chosen, plan.available, predicted, plan.budget_ms, plan.latency_source, plan.latencies_ms,
                        overhead.fixed_ms, overhead.per_call_ms)
        return self.with_counts([chosen[t] for t in tasks], new)

    def _stage(self, task: int, stage: int, raw: np.ndarray, timings: dict[str, float] | None) -> np.ndarray:
        runner = self.stage_runners[task][stage]
        fed = raw if self._passthrough[task][stage] else pass_between(raw, self.library.output, runner.input)
        start = time.perf_counter()
        out = runner.run_raw(fed)
        if timings is not None:
            timings[runner.fragment.id] = timings.get(runner.fragment.id, 0.0) + time.perf_counter() - start
        return dequantize(out, runner.output)

    def __call__(self, encoded: np.ndarray, timings: dict[str, float] | None = None) -> np.ndarray:
        start = time.perf_counter()
        raw = self.library.run_raw(encoded)
        if timings is not None:
            timings[self.library.fragment.id] = timings.get(self.library.fragment.id, 0.0) + time.perf_counter() - start
        parts = [self._stage(t, 0, raw, timings) for t in range(len(self.counts))]
        run = np.full(len(encoded), len(self.counts), dtype=np.int64)
        active = np.arange(len(encoded))
        for level in range(1, max(self.counts)):
            if self.early_exit is not None:
                logits = np.concatenate(parts, axis=1)[active]
                e = np.exp(logits - logits.max(axis=1, keepdims=True))
                confident = (e / e.sum(axis=1, keepdims=True)).max(axis=1) >= self.early_exit
                active = active[~confident]
                if not len(active):
                    break
            for task, planned in enumerate(self.counts):
                if level < planned:
                    parts[task][active] += self._stage(task, level, raw[active], timings)
                    run[active] += 1
        self.stages_run = run.tolist()
        return np.concatenate(parts, axis=1)[:, self.order]


def open_composer(manifest: Manifest, selection: Selection, runners: Sequence[Runner], stages: int | None = None,
                  budget_ms: float | None = None, early_exit: float | None = None,
                  calibrate: bool = False) -> AnytimeComposer:
    """Plan how many stages of each expert run, and bind the composer to ``runners`` (those of
    ``selection.fragments``, in any order)."""
    by_id = {r.fragment.id: r for r in runners}
    library = by_id[selection.library.id]
    stage_runners = [[by_id[f.id] for f in frags] for frags in selection.stages]
    most = max(len(rs) for rs in stage_runners)
    if stages is not None and stages > most:
        raise ManifestError(f"--stages {stages}: the experts of this query have at most {most} stage(s) in this "
                            f"bundle; valid: 1..{most}")
    if calibrate:
        encoded = np.zeros((1, *library.input.shape[1:]), dtype=library.input.dtype)
        latencies, source = measure_latencies([r for rs in stage_runners for r in rs], library, encoded), "calibrated"
    elif budget_ms is not None:
        latencies, source = manifest_latencies(manifest, selection), "manifest"
    else:
        latencies = {f.id: f.latency for f in selection.fragments if f.latency is not None}
        source = "manifest"
    stage_ms = {t: [latencies.get(f.id, 0.0) for f in frags] for t, frags in zip(selection.tasks, selection.stages)}
    chosen, predicted = plan_stages(latencies.get(library.fragment.id, 0.0), stage_ms, budget_ms, stages)
    plan = StagePlan(chosen, {t: len(f) for t, f in zip(selection.tasks, selection.stages)}, predicted,
                     budget_ms, source, latencies)
    return AnytimeComposer(library, stage_runners, [chosen[t] for t in selection.tasks], selection.column_order,
                           early_exit, plan)
