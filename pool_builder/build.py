"""Offline pool building: oracle -> oracle-logit cache -> library -> feature cache -> experts.

Every stage ends by writing its weights atomically and then a small record in
``<pool>/stages/`` (fingerprint of its inputs and settings, sha256, metrics).
A restarted build - after Ctrl-C or SIGKILL - reuses each stage whose record,
fingerprint and checksum match, so finished work is never redone and a
half-written file is never mistaken for a finished one.  ``pool.json`` is
written last.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from edge_runtime.atomic_io import (LockBusyError, atomic_write_bytes, atomic_write_json, exclusive_lock, sha256_bytes,
                                    sha256_file)

from . import __version__
from .cache import CACHE_DTYPES, cached_array
from .data import Dataset, Normalizer, load_dataset
from .ddp import HelperRanks, LocalRanks, distill_library_parallel, local_cpus, validate_library_workers
from .ensemble import EnsembleConfig
from .errors import PoolBuilderError, unknown_name
from .evaluate import ExpertReport, expert_report, predict_logits
from .hierarchy import TaskHierarchy
from .models import Library, WideResNet, WRNConfig, build_expert_head, count_parameters, create_model, list_models
from .pool_format import DatasetInfo, ExpertEntry, ModelEntry, PoolMetadata, write_pool_json
from .training import (Checkpoint, Source, TrainConfig, cached_source, distill_student, extract_expert,
                       online_source, run_batched, train_classifier)
from .weights import load_module, load_user_oracle, save_state_dict

Log = Callable[[str], None]


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides what a build produces; recorded in ``pool.json``."""

    out: str = "runs/pool"
    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    hierarchy: str | None = None
    profile: str = "quick"
    train_limit: int | None = 12000
    test_limit: int | None = 5000
    oracle_arch: str | None = "wrn_16_2"  # with oracle_file: None = TorchScript, a name = state dict
    oracle_file: str | None = None
    oracle_epochs: int = 3
    student_arch: str = "wrn_16_1"
    library_epochs: int = 6
    expert_epochs: int = 15
    expert_width: float = 0.25
    temperature: float = 4.0
    alpha: float = 0.3
    batch_size: int = 128
    lr: float = 0.05
    expert_lr: float = 0.05
    cache_dtype: str = "float16"
    online: bool = False
    seed: int = 0
    threads: int | None = None
    ensemble: EnsembleConfig | None = None  # K teachers fused into the oracle (replaces oracle_arch / oracle_file)
    library_workers: int = 1  # > 1: the library's KD runs as torch DDP over that many ranks (ddp.py)
    expert_stages: int = 1  # > 1: progressive experts, S stages whose logits add up (progressive.py)
    stage_width: float | None = None  # width factor of each stage (default: expert_width)

    def __post_init__(self) -> None:
        if isinstance(self.ensemble, dict):  # as read back from pool.json's build settings
            object.__setattr__(self, "ensemble", EnsembleConfig(**self.ensemble))
        if self.ensemble is not None:
            if self.oracle_file is not None:
                raise PoolBuilderError("give either an oracle file or an ensemble of teachers, not both")
            object.__setattr__(self, "oracle_arch", None)  # the ensemble is the oracle
        if self.cache_dtype not in CACHE_DTYPES:
            raise unknown_name("cache dtype", self.cache_dtype, list(CACHE_DTYPES))
        if self.temperature <= 0:
            raise PoolBuilderError(f"temperature must be positive, got {self.temperature}")
        if self.alpha < 0:
            raise PoolBuilderError(f"alpha must be >= 0, got {self.alpha}")
        if not 0 < self.expert_width <= 1:
            raise PoolBuilderError(f"expert width must be in (0, 1], got {self.expert_width}")
        if self.expert_stages < 1:
            raise PoolBuilderError(f"expert stages must be >= 1 (1 = one expert head, as in the paper), "
                                   f"got {self.expert_stages}")
        if self.stage_width is None:
            object.__setattr__(self, "stage_width", self.expert_width)
        if not 0 < self.stage_width <= 1:
            raise PoolBuilderError(f"stage width must be in (0, 1], got {self.stage_width}")
        for name in ("oracle_epochs", "library_epochs", "expert_epochs"):
            if getattr(self, name) < 1:
                raise PoolBuilderError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if self.student_arch not in list_models("wrn_*"):
            raise unknown_name("student architecture", self.student_arch, list_models("wrn_*"))
        if self.oracle_file is None and self.oracle_arch is None and self.ensemble is None:
            raise PoolBuilderError("name an oracle architecture to train, or pass an oracle file")
        if self.oracle_arch is not None and self.oracle_arch not in list_models():
            raise unknown_name("architecture", self.oracle_arch, list_models())
        validate_library_workers(self.library_workers, self.batch_size)
        if self.library_workers > 1 and self.online:
            raise PoolBuilderError("--library-workers > 1 trains the library from the cached oracle logits; "
                                   "drop --online (or use --library-workers 1)")


PROFILES: dict[str, dict[str, Any]] = {
    # ~5 min of compute on 2 cores: a 12k-image stratified subset, short schedules.
    "quick": dict(train_limit=12000, test_limit=5000, oracle_arch="wrn_16_2", oracle_epochs=3,
                  library_epochs=6, expert_epochs=15),
    # All 60k training and 10k test images (~40 min on 2 cores).
    "full": dict(train_limit=None, test_limit=None, oracle_arch="wrn_16_2", oracle_epochs=6,
                 library_epochs=8, expert_epochs=15),
}


def config_for(profile: str, **overrides: Any) -> BuildConfig:
    """A profile's settings with explicit overrides (``None`` overrides are ignored)."""
    if profile not in PROFILES:
        raise unknown_name("profile", profile, list(PROFILES))
    valid = {f.name for f in fields(BuildConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise unknown_name("build setting", unknown[0], sorted(valid))
    settings = {**PROFILES[profile], **{k: v for k, v in overrides.items() if v is not None}}
    if overrides.get("ensemble") is not None:
        if overrides.get("oracle_file") or overrides.get("oracle_arch"):
            raise PoolBuilderError("give either one oracle (--oracle-file / --oracle-arch) or teachers "
                                   "(--teachers / --teacher-archs), not both")
        settings["oracle_arch"] = None
    if overrides.get("oracle_file") and overrides.get("oracle_arch") is None:
        settings["oracle_arch"] = None  # a user oracle without an architecture is TorchScript
    return BuildConfig(profile=profile, **settings)


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class StageRecord:
    """What a finished stage left behind; the file's checksum is re-checked on reuse."""

    fingerprint: str
    file: str
    sha256: str
    architecture: dict[str, Any]
    parameters: int
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)


def train_config(cfg: BuildConfig, epochs: int, lr: float, offset: int) -> TrainConfig:
    """A stage's optimiser settings; its seed derives from the build seed and the stage's offset."""
    return TrainConfig(epochs=epochs, batch_size=cfg.batch_size, lr=lr, seed=cfg.seed * 7919 + offset)


@dataclass(frozen=True)
class ExpertJob:
    """One expert extraction, self-contained so that any process (this one or a Ray worker) reruns it bitwise."""

    task: str
    class_ids: tuple[int, ...]
    fingerprint: str
    offset: int
    student: WRNConfig
    cfg: BuildConfig

    @property
    def stage(self) -> str:
        return f"expert-{self.task}"

    @property
    def file(self) -> str:
        return f"experts/{self.task}.pt"


@dataclass(frozen=True)
class ExpertTestSet:
    """What an expert is scored on after training: the library's test features and the oracle's test logits."""

    features: torch.Tensor
    oracle_logits: np.ndarray
    labels: np.ndarray


def train_expert(job: ExpertJob, n: int, features: Source, oracle_logits: Source, test: ExpertTestSet,
                 show_progress: bool = True,
                 checkpoint: Checkpoint | None = None) -> tuple[torch.nn.Module, StageRecord]:
    """Seed, build, train and score one expert; the record's sha256 is filled in by whoever writes the weights."""
    cfg = job.cfg
    torch.manual_seed(cfg.seed * 7919 + job.offset)
    head = build_expert_head(job.student, cfg.expert_width, len(job.class_ids))
    loss = extract_expert(head, n, features, oracle_logits, job.class_ids,
                          train_config(cfg, cfg.expert_epochs, cfg.expert_lr, job.offset), cfg.temperature,
                          cfg.alpha, desc=f"expert {job.task}", show_progress=show_progress, checkpoint=checkpoint)
    report: ExpertReport = expert_report(job.task, head, test.features, test.oracle_logits, test.labels,
                                         job.class_ids)
    arch = {"kind": "wrn_expert", "student": asdict(job.student), "width_factor": cfg.expert_width,
            "num_outputs": len(job.class_ids)}
    metrics = {k: v for k, v in asdict(report).items() if k not in ("task", "parameters")}
    metrics["final_ckd_loss"] = round(loss, 4)
    return head, StageRecord(job.fingerprint, job.file, "", arch, count_parameters(head), 0.0, metrics)


def stage_module(arch: dict[str, Any], path: str | Path, what: str) -> torch.nn.Module:
    """A stage's network as every stage after it uses it (the library runs channels-last)."""
    module = load_module(arch, path, what)
    return module.to(memory_format=torch.channels_last) if arch.get("kind") == "wrn_library" else module


class PoolBuild:
    """One build of one pool directory (see module docstring for the stages)."""

    def __init__(self, cfg: BuildConfig, log: Log = _stderr, show_progress: bool = True) -> None:
        self.cfg = cfg
        self.log = log
        self.show_progress = show_progress
        self.out = Path(cfg.out)
        self.stages_dir = self.out / "stages"
        self.cache_dir = self.out / "cache"
        self.ran: list[str] = []
        self.reused: list[str] = []
        self.teachers: dict[str, StageRecord] = {}  # members of a multi-teacher oracle
        # torch threads of this build; caches and experts record it, as the thread count changes their bits
        self.threads = cfg.threads or torch.get_num_threads()

    # ------------------------------------------------------------------ records
    def _record_path(self, stage: str) -> Path:
        return self.stages_dir / f"{stage}.json"

    def _finished(self, stage: str, fingerprint: str) -> StageRecord | None:
        try:
            record = StageRecord(**json.loads(self._record_path(stage).read_text()))
        except (OSError, ValueError, TypeError):
            return None
        path = self.out / record.file
        if record.fingerprint != fingerprint or not path.is_file() or sha256_file(path) != record.sha256:
            return None
        return record

    def _commit(self, stage: str, record: StageRecord) -> StageRecord:
        atomic_write_json(self._record_path(stage), asdict(record))
        return record

    def _stage(self, stage: str, fingerprint: str, run: Callable[[], StageRecord]) -> StageRecord:
        record = self._finished(stage, fingerprint)
        if record is not None:
            self.log(f"[{stage}] done earlier, reusing {record.file}")
            self.reused.append(stage)
            return record
        self._record_path(stage).unlink(missing_ok=True)
        partial = self._checkpoint(stage, fingerprint).load()
        self.log(f"[{stage}] running" + (f" (resuming after epoch {partial['epoch']})" if partial else ""))
        start = time.perf_counter()
        record = run()
        record.seconds = round(time.perf_counter() - start, 2)
        self._checkpoint(stage, fingerprint).remove()
        self.ran.append(stage)
        self.log(f"[{stage}] finished in {record.seconds:.1f}s {json.dumps(record.metrics, sort_keys=True)}")
        return self._commit(stage, record)

    # ------------------------------------------------------------------ helpers
    def _checkpoint(self, stage: str, fingerprint: str) -> Checkpoint:
        """Per-epoch progress of a stage that is still running (removed when it finishes)."""
        return Checkpoint(self.stages_dir / f"{stage}.epoch.pt", fingerprint)

    def _train_cfg(self, epochs: int, lr: float, offset: int) -> TrainConfig:
        return train_config(self.cfg, epochs, lr, offset)

    def _seed(self, offset: int) -> None:
        torch.manual_seed(self.cfg.seed * 7919 + offset)

    def derived_fingerprint(self, *parts: Any) -> str:
        """Fingerprint of a cache or expert: its inputs plus the thread count, so that a build with other
        --threads recomputes it instead of reusing bits it would not have produced itself."""
        return _fingerprint(*parts, {"threads": self.threads})

    # ------------------------------------------------------------------ data-parallel library (ddp.py)
    def _check_library_workers(self) -> None:
        """Refuse, before anything trains, more library ranks than this machine can run at once."""
        workers, cpus = self.cfg.library_workers, local_cpus()
        if workers > cpus:
            raise PoolBuilderError(f"--library-workers {workers} would start {workers} processes on this machine, "
                                   f"which has {cpus} CPU(s): use at most {cpus}, or --backend ray to spread the "
                                   "ranks over a cluster")

    def _library_helpers(self) -> HelperRanks:
        """Who runs library ranks 1..N-1: processes spawned here (the Ray backend uses Ray actors)."""
        return LocalRanks()

    def _rank_threads(self) -> int:
        """Torch threads per library rank: this build's threads shared by the ranks on this machine."""
        return max(1, self.threads // self.cfg.library_workers)

    # ------------------------------------------------------------------ stages
    def run(self) -> PoolMetadata:
        self.out.mkdir(parents=True, exist_ok=True)
        with exclusive_build_lock(self.out):
            removed = remove_stale_temporaries(self.out)
            if removed:
                self.log(f"removed {removed} temporary file(s) left by an interrupted build")
            return self._run()

    def _run(self) -> PoolMetadata:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.library_workers > 1:
            self._check_library_workers()
        full = load_dataset(cfg.dataset, cfg.data_dir)
        data = full.limited(cfg.train_limit, cfg.test_limit, cfg.seed)
        hierarchy = (TaskHierarchy.from_json(cfg.hierarchy, data.class_names) if cfg.hierarchy
                     else TaskHierarchy.default_for(cfg.dataset, data.class_names))
        normalizer = Normalizer(data.mean, data.std)
        self.log(f"data: {cfg.dataset} {len(data.train)} train / {len(data.test)} test images "
                 f"{data.input_shape}, tasks: {', '.join(hierarchy.task_names)}")
        # every stage's fingerprint includes this one, so a new pool_builder version rebuilds everything
        data_fp = _fingerprint(__version__, cfg.dataset, hashlib.sha256(data.train.images).hexdigest(),
                               hashlib.sha256(data.train.labels).hexdigest(), data.mean, data.std)

        oracle_rec, oracle = self._oracle(data, normalizer, data_fp)
        train_logits = None
        if not cfg.online:
            train_logits = self._cached_outputs(
                "oracle_logits", self.derived_fingerprint(oracle_rec.sha256, data_fp, "float32"),
                (len(data.train), data.num_classes), "float32", oracle_rec, oracle, data.train.images, normalizer,
                "oracle logits")
        test_logits = predict_logits(oracle, data.test.images, normalizer)
        oracle_rec.metrics["test_accuracy"] = float((test_logits.argmax(1) == data.test.labels).mean())

        library_rec, library = self._library(data, normalizer, data_fp, oracle_rec, oracle, train_logits)
        features = None
        if not cfg.online:
            with torch.no_grad():
                shape = (len(data.train), *library(normalizer(data.train.images[:2])).shape[1:])
            features = self._cached_outputs(
                "library_features", self.derived_fingerprint(library_rec.sha256, data_fp, cfg.cache_dtype), shape,
                cfg.cache_dtype, library_rec, library, data.train.images, normalizer, "library features")
        test_features = torch.from_numpy(
            np.concatenate([o for _r, o in run_batched(library, data.test.images, normalizer, show_progress=False)]))

        jobs = [self._expert_job(task, hierarchy.class_ids(task), data_fp, oracle_rec, library_rec, library)
                for task in hierarchy.task_names]
        test = ExpertTestSet(test_features, test_logits, data.test.labels)
        expert_recs = self._experts(jobs, data, normalizer, oracle, library, train_logits, features, test)
        meta = self._metadata(data, hierarchy, oracle_rec, library_rec, expert_recs)
        write_pool_json(self.out, meta)
        self.log(f"pool written to {self.out / 'pool.json'} (pool id {meta.pool_id}; "
                 f"ran {', '.join(self.ran) or 'nothing'}; reused {', '.join(self.reused) or 'nothing'})")
        return meta

    def _oracle(self, data: Dataset, normalizer: Normalizer, data_fp: str) -> tuple[StageRecord, torch.nn.Module]:
        cfg = self.cfg
        if cfg.ensemble is not None:  # K teachers, each run once; the fused logit cache is filled from theirs
            from .teachers import TeacherStages

            record, ensemble, self.teachers = TeacherStages(self, data, normalizer, data_fp).run()
            return record, ensemble
        if cfg.oracle_file:
            if not Path(cfg.oracle_file).is_file():
                raise PoolBuilderError(f"oracle file {cfg.oracle_file} not found (--oracle-file takes a TorchScript "
                                       "file, or a state dict together with --oracle-arch NAME)")
            user_sha = sha256_file(cfg.oracle_file)
            fingerprint = _fingerprint("user", user_sha, cfg.oracle_arch)
        else:
            fingerprint = _fingerprint("train", data_fp, cfg.oracle_arch, cfg.oracle_epochs, cfg.lr,
                                       cfg.batch_size, cfg.seed)

        def run() -> StageRecord:
            if cfg.oracle_file:
                model, arch = load_user_oracle(cfg.oracle_file, cfg.oracle_arch, data.input_shape, data.num_classes)
                if arch["kind"] == "torchscript":
                    name, data_bytes = "oracle.torchscript.pt", Path(cfg.oracle_file).read_bytes()
                    atomic_write_bytes(self.out / name, data_bytes)
                    sha = sha256_bytes(data_bytes)
                else:
                    name, sha = "oracle.pt", save_state_dict(model, self.out / "oracle.pt")
                return StageRecord(fingerprint, name, sha, arch, count_parameters(model), 0.0, {"source": "user"})
            self._seed(1)
            model = create_model(cfg.oracle_arch, in_channels=data.input_shape[0], num_classes=data.num_classes)
            loss = train_classifier(model, data.train.images, data.train.labels, normalizer,
                                    self._train_cfg(cfg.oracle_epochs, cfg.lr * 2, 1), show_progress=self.show_progress,
                                    checkpoint=self._checkpoint("oracle", fingerprint))
            arch = {"kind": "registry", "name": cfg.oracle_arch, "in_channels": data.input_shape[0],
                    "num_classes": data.num_classes}
            sha = save_state_dict(model, self.out / "oracle.pt")
            return StageRecord(fingerprint, "oracle.pt", sha, arch, count_parameters(model), 0.0,
                               {"source": "trained", "final_train_loss": round(loss, 4)})

        record = self._stage("oracle", fingerprint, run)
        return record, load_module(record.architecture, self.out / record.file, "oracle")

    def _library(self, data: Dataset, normalizer: Normalizer, data_fp: str, oracle_rec: StageRecord,
                 oracle: torch.nn.Module, train_logits: np.ndarray | None) -> tuple[StageRecord, torch.nn.Module]:
        cfg = self.cfg
        # cached and online teacher logits are the same numbers, so the library does not depend on the mode;
        # data-parallel training gives other bits, so N > 1 ranks is part of it (N = 1 keeps the old fingerprint)
        parallel = [{"library_workers": cfg.library_workers}] if cfg.library_workers > 1 else []
        fingerprint = _fingerprint(oracle_rec.sha256, data_fp, cfg.student_arch, cfg.library_epochs, cfg.temperature,
                                   cfg.lr, cfg.batch_size, cfg.seed, *parallel)

        def run() -> StageRecord:
            self._seed(2)
            student = create_model(cfg.student_arch, in_channels=data.input_shape[0], num_classes=data.num_classes)
            if not isinstance(student, WideResNet):
                raise PoolBuilderError(f"student {cfg.student_arch!r} must be a WRN (choices: {list_models('wrn_*')})")
            train_cfg = self._train_cfg(cfg.library_epochs, cfg.lr, 2)
            checkpoint = self._checkpoint("library", fingerprint)
            if cfg.library_workers > 1:
                loss = distill_library_parallel(student, data.train.images, normalizer, train_logits, train_cfg,
                                                cfg.temperature, cfg.library_workers, self._rank_threads(),
                                                self._library_helpers(), checkpoint, self.show_progress, self.log)
            else:
                teacher = (online_source(oracle, data.train.images, normalizer) if train_logits is None
                           else cached_source(train_logits))
                loss = distill_student(student, data.train.images, normalizer, teacher, train_cfg, cfg.temperature,
                                       show_progress=self.show_progress, checkpoint=checkpoint)
            student_logits = predict_logits(student, data.test.images, normalizer)
            arch = {"kind": "wrn_library", "student": asdict(student.cfg), "student_arch": cfg.student_arch}
            sha = save_state_dict(student.library, self.out / "library.pt")
            return StageRecord(fingerprint, "library.pt", sha, arch, count_parameters(student.library), 0.0, {
                "final_kd_loss": round(loss, 4),
                "student_test_accuracy": float((student_logits.argmax(1) == data.test.labels).mean()),
                "student_parameters_with_temporary_head": count_parameters(student)})

        record = self._stage("library", fingerprint, run)
        return record, stage_module(record.architecture, self.out / record.file, "library")

    def _cached_outputs(self, name: str, fingerprint: str, shape: tuple[int, ...], dtype: str,
                        producer: StageRecord, module: torch.nn.Module, images: np.ndarray,
                        normalizer: Normalizer, desc: str) -> np.ndarray:
        """``module`` over all training images, cached in ``cache/<name>.npy`` (the Ray backend shards this)."""
        return cached_array(self.cache_dir / f"{name}.npy", fingerprint, shape, dtype,
                            lambda: run_batched(module, images, normalizer, dtype=dtype, desc=desc,
                                                show_progress=self.show_progress), self.log)

    def _expert_job(self, task: str, class_ids: tuple[int, ...], data_fp: str, oracle_rec: StageRecord,
                    library_rec: StageRecord, library: Library) -> ExpertJob:
        cfg = self.cfg
        fingerprint = self.derived_fingerprint(oracle_rec.sha256, library_rec.sha256, data_fp, class_ids,
                                                cfg.expert_width, cfg.expert_epochs, cfg.temperature, cfg.alpha,
                                                cfg.expert_lr, cfg.batch_size, cfg.seed, cfg.online, cfg.cache_dtype)
        job = ExpertJob(task, tuple(class_ids), fingerprint, 100 + zlib.crc32(task.encode()) % 100000,
                        library.cfg, cfg)
        if cfg.expert_stages > 1:
            from .progressive import with_stages

            job = with_stages(job)
        return job

    def _experts(self, jobs: Sequence[ExpertJob], data: Dataset, normalizer: Normalizer, oracle: torch.nn.Module,
                 library: Library, train_logits: np.ndarray | None, features: np.ndarray | None,
                 test: ExpertTestSet) -> dict[str, StageRecord]:
        """Extract every expert, one after the other in this process (the Ray backend spreads them out)."""
        if self.cfg.online:
            feat_src = online_source(library, data.train.images, normalizer)
            logit_src = online_source(oracle, data.train.images, normalizer)
        else:
            feat_src, logit_src = cached_source(features), cached_source(train_logits)
        records = {}
        for job in jobs:
            if self.cfg.expert_stages > 1:
                from .progressive import build_progressive_expert_stages

                records[job.task] = build_progressive_expert_stages(self, job, len(data.train), feat_src, logit_src,
                                                                    test)
                continue

            def run(job: ExpertJob = job) -> StageRecord:
                head, record = train_expert(job, len(data.train), feat_src, logit_src, test, self.show_progress,
                                            self._checkpoint(job.stage, job.fingerprint))
                record.sha256 = save_state_dict(head, self.out / record.file)
                return record

            records[job.task] = self._stage(job.stage, job.fingerprint, run)
        return records

    def _metadata(self, data: Dataset, hierarchy: TaskHierarchy, oracle_rec: StageRecord, library_rec: StageRecord,
                  experts: dict[str, StageRecord]) -> PoolMetadata:
        def entry(rec: StageRecord) -> ModelEntry:
            return ModelEntry(rec.file, rec.sha256, rec.architecture, rec.parameters,
                              {**rec.metrics, "build_seconds": rec.seconds})

        expert_entries = {
            t: ExpertEntry(r.file, r.sha256, r.architecture, r.parameters, {**r.metrics, "build_seconds": r.seconds},
                           task=t, class_ids=list(hierarchy.class_ids(t)), library_sha256=library_rec.sha256)
            for t, r in experts.items()}
        shas = [oracle_rec.sha256, library_rec.sha256] + [experts[t].sha256 for t in sorted(experts)]
        settings = {k: v for k, v in asdict(self.cfg).items() if k not in ("out", "threads")}
        if self.cfg.ensemble is None:
            del settings["ensemble"]  # single-oracle pool.json stays as it was
        if self.cfg.library_workers == 1:
            del settings["library_workers"]  # so does a one-process library's
        if self.cfg.expert_stages == 1:
            del settings["expert_stages"], settings["stage_width"]  # and a one-stage expert's
        return PoolMetadata(
            pool_id=hashlib.sha256("".join(shas).encode()).hexdigest()[:16],
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            dataset=DatasetInfo(data.name, list(data.class_names), list(data.input_shape), list(data.mean),
                                list(data.std)),
            tasks=hierarchy.to_json(), oracle=entry(oracle_rec), library=entry(library_rec), experts=expert_entries,
            teachers={name: entry(rec) for name, rec in self.teachers.items()},
            build={"settings": settings, "train_images": len(data.train), "test_images": len(data.test),
                   "pool_builder": __version__, "torch": torch.__version__})



@contextmanager
def exclusive_build_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out/.build.lock``; a second concurrent build fails at once."""
    try:
        with exclusive_lock(out / ".build.lock"):
            yield
    except LockBusyError as busy:
        raise PoolBuilderError(f"another build is writing {out} (pid {busy.pid}); "
                               "wait for it or choose another --out") from None


def remove_stale_temporaries(out: Path) -> int:
    """Delete ``.<name>.<random>.tmp`` files that a killed build left (safe under the build lock)."""
    stale = [p for p in out.rglob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def build_pool(cfg: BuildConfig, log: Log = _stderr, show_progress: bool = True) -> PoolMetadata:
    """Build (or resume building) the pool described by ``cfg``."""
    return PoolBuild(cfg, log, show_progress).run()
