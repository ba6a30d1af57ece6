"""The local build of a pool: oracle -> oracle-logit cache -> library -> feature cache -> experts -> pool.json.

Every step is a stage of :class:`~pool_builder.stages.engine.StageEngine`, so a
restarted build reuses what finished and resumes what did not; ``pool.json`` is
written last.  The Ray backend (``ray_backend.py``) subclasses :class:`PoolBuild`
and overrides only where the work runs (caches, experts, library ranks).
"""

from __future__ import annotations

import hashlib
import sys
import zlib
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from edge_runtime.atomic_io import LockBusyError, atomic_write_bytes, exclusive_lock, sha256_bytes, sha256_file

from pool_builder import __version__
from pool_builder.build.config import BuildConfig, resolve_schedule, train_config
from pool_builder.build.experts import ExpertJob, ExpertTestSet, train_expert
from pool_builder.build.progressive import build_progressive_expert_stages, with_stages
from pool_builder.build.teachers import TeacherStages
from pool_builder.data.datasets import Dataset, Normalizer, Split, load_dataset
from pool_builder.data.hierarchy import TaskHierarchy
from pool_builder.distillation.ddp import HelperRanks, LocalRanks, distill_library_parallel, local_cpus
from pool_builder.distillation.losses import kd_loss
from pool_builder.distillation.training import (EarlyStop, TrainConfig, cached_source, distill_student, online_source,
                                                run_batched, train_classifier)
from pool_builder.errors import PoolBuilderError
from pool_builder.models.registry import KIND_LIBRARY, KIND_TORCHSCRIPT, create_model, list_models, named_architecture
from pool_builder.models.weights import load_module, load_user_oracle, save_state_dict
from pool_builder.models.wrn import Library, WideResNet, count_parameters, library_architecture
from pool_builder.pool.checks import build_checks, oracle_warnings
from pool_builder.pool.evaluate import predict_logits
from pool_builder.pool.format import DatasetInfo, ExpertEntry, ModelEntry, PoolMetadata, write_pool_json
from pool_builder.stages.cache import cached_array
from pool_builder.stages.engine import StageEngine, StageRecord, fingerprint_of, seed_stage

Log = Callable[[str], None]


def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def stage_module(arch: dict[str, Any], path: str | Path, what: str) -> torch.nn.Module:
    """A stage's network as every stage after it uses it (the library runs channels-last)."""
    module = load_module(arch, path, what)
    return module.to(memory_format=torch.channels_last) if arch.get("kind") == KIND_LIBRARY else module


class PoolBuild:
    """One build of one pool directory (see module docstring for the stages)."""

    def __init__(self, cfg: BuildConfig, log: Log = log_to_stderr, show_progress: bool = True) -> None:
        self.cfg = cfg
        self.log = log
        self.show_progress = show_progress
        self.out = Path(cfg.out)
        self.stages = StageEngine(self.out, log)
        self.cache_dir = self.out / "cache"
        self.teachers: dict[str, StageRecord] = {}  # members of a multi-teacher oracle
        # torch threads of this build; caches and experts record it, as the thread count changes their bits
        self.threads = cfg.threads or torch.get_num_threads()
        self.val: Split | None = None  # the share held out of the training images for early stopping
        self.val_logits: np.ndarray | None = None  # the oracle's logits on it
        self.warnings: list[str] = []

    # ------------------------------------------------------------------ helpers
    @property
    def ran(self) -> list[str]:
        return self.stages.ran

    @property
    def reused(self) -> list[str]:
        return self.stages.reused

    def _train_cfg(self, epochs: int, lr: float, offset: int) -> TrainConfig:
        return train_config(self.cfg, epochs, lr, offset)

    def _seed(self, offset: int) -> None:
        seed_stage(self.cfg.seed, offset)

    def derived_fingerprint(self, *parts: Any) -> str:
        """Fingerprint of a cache or expert: its inputs plus the thread count, so that a build with other
        --threads recomputes it instead of reusing bits it would not have produced itself."""
        return fingerprint_of(*parts, {"threads": self.threads})

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
        full = load_dataset(cfg.dataset, cfg.data_dir, cfg.color)
        data = full.limited(cfg.train_limit, cfg.test_limit, cfg.seed)
        hierarchy = (TaskHierarchy.from_json(cfg.hierarchy, data.class_names) if cfg.hierarchy
                     else TaskHierarchy.default_for(cfg.dataset, data.class_names))
        rest, self.val = data.train.hold_out(cfg.val_share, cfg.val_max, cfg.seed + 7)
        data = Dataset(data.name, data.class_names, rest, data.test, data.mean, data.std, data.color)
        self.cfg = cfg = resolve_schedule(cfg, len(data.train))
        normalizer = Normalizer(data.mean, data.std)
        self.log(f"data: {cfg.dataset} {len(data.train)} train / {len(self.val) if self.val else 0} validation / "
                 f"{len(data.test)} test images {data.input_shape}, tasks: {', '.join(hierarchy.task_names)}; "
                 f"epochs: oracle {cfg.oracle_epochs}, library {cfg.library_epochs}, experts {cfg.expert_epochs}")
        if hierarchy.uncovered():
            self._warn(f"no task lists the class(es) {', '.join(map(repr, hierarchy.uncovered()))}: no composed model "
                       "can answer them (the device labels such an image as one of the query's classes); add them "
                       "to a task in the hierarchy, or drop their folders")
        # every stage's fingerprint includes this one, so a new pool_builder version rebuilds everything
        data_fp = fingerprint_of(__version__, cfg.dataset, hashlib.sha256(data.train.images).hexdigest(),
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
        self.val_logits = predict_logits(oracle, self.val.images, normalizer) if self.val else None
        for line in oracle_warnings(oracle_rec.metrics["test_accuracy"], train_logits, data.train.labels,
                                    cfg.oracle_floor):
            self._warn(line)

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
        val_features = (torch.from_numpy(np.concatenate([o for _r, o in run_batched(
            library, self.val.images, normalizer, show_progress=False)])) if self.val else None)
        test = ExpertTestSet(test_features, test_logits, data.test.labels, val_features, self.val_logits)
        expert_recs = self._experts(jobs, data, normalizer, oracle, library, train_logits, features, test)
        meta = self._metadata(data, hierarchy, oracle_rec, library_rec, expert_recs)
        meta.checks = build_checks(self.out, data.test, self.log, meta)  # loads the files as `query` does
        meta.checks["warnings"] = self.warnings + meta.checks["warnings"]
        write_pool_json(self.out, meta)
        self.log(f"pool written to {self.out / 'pool.json'} (pool id {meta.pool_id}; "
                 f"ran {', '.join(self.ran) or 'nothing'}; reused {', '.join(self.reused) or 'nothing'})")
        return meta

    def _warn(self, line: str) -> None:
        """A one-line warning: logged now, and kept for pool.json's ``checks``."""
        self.warnings.append(line)
        self.log(f"warning: {line}")

    def _val_parts(self) -> list[dict[str, Any]]:
        """What early stopping adds to a stage's fingerprint (nothing when no share is held out)."""
        return [{"val": len(self.val), "patience": self.cfg.patience}] if self.val else []

    def _early_stop(self, score: Callable[[], float]) -> EarlyStop | None:
        return EarlyStop(score, self.cfg.patience) if self.val else None

    def _oracle(self, data: Dataset, normalizer: Normalizer, data_fp: str) -> tuple[StageRecord, torch.nn.Module]:
        cfg = self.cfg
        if cfg.ensemble is not None:  # K teachers, each run once; the fused logit cache is filled from theirs
            record, ensemble, self.teachers = TeacherStages(self, data, normalizer, data_fp).run()
            return record, ensemble
        if cfg.oracle_file:
            if not Path(cfg.oracle_file).is_file():
                raise PoolBuilderError(f"oracle file {cfg.oracle_file} not found (--oracle-file takes a TorchScript "
                                       "file, or a state dict together with --oracle-arch NAME)")
            user_sha = sha256_file(cfg.oracle_file)
            fingerprint = fingerprint_of("user", user_sha, cfg.oracle_arch)
        else:
            fingerprint = fingerprint_of("train", data_fp, cfg.oracle_arch, cfg.oracle_epochs, cfg.lr,
                                       cfg.batch_size, cfg.seed, *self._val_parts())

        def run() -> StageRecord:
            if cfg.oracle_file:
                model, arch = load_user_oracle(cfg.oracle_file, cfg.oracle_arch, data.input_shape, data.num_classes)
                if arch["kind"] == KIND_TORCHSCRIPT:
                    name, data_bytes = "oracle.torchscript.pt", Path(cfg.oracle_file).read_bytes()
                    atomic_write_bytes(self.out / name, data_bytes)
                    sha = sha256_bytes(data_bytes)
                else:
                    name, sha = "oracle.pt", save_state_dict(model, self.out / "oracle.pt")
                return StageRecord(fingerprint, name, sha, arch, count_parameters(model), 0.0, {"source": "user"})
            self._seed(1)
            model = create_model(cfg.oracle_arch, in_channels=data.input_shape[0], num_classes=data.num_classes)
            stop = self._early_stop(lambda: float(torch.nn.functional.cross_entropy(
                torch.from_numpy(predict_logits(model, self.val.images, normalizer)),
                torch.from_numpy(self.val.labels))))
            loss = train_classifier(model, data.train.images, data.train.labels, normalizer,
                                    self._train_cfg(cfg.oracle_epochs, cfg.lr * 2, 1), show_progress=self.show_progress,
                                    checkpoint=self.stages.checkpoint("oracle", fingerprint), early_stop=stop)
            arch = named_architecture(cfg.oracle_arch, data.input_shape[0], data.num_classes)
            sha = save_state_dict(model, self.out / "oracle.pt")
            return StageRecord(fingerprint, "oracle.pt", sha, arch, count_parameters(model), 0.0,
                               {"source": "trained", "final_train_loss": round(loss, 4),
                                **(stop.metrics() if stop else {})})

        record = self.stages.run("oracle", fingerprint, run)
        return record, load_module(record.architecture, self.out / record.file, "oracle")

    def _library(self, data: Dataset, normalizer: Normalizer, data_fp: str, oracle_rec: StageRecord,
                 oracle: torch.nn.Module, train_logits: np.ndarray | None) -> tuple[StageRecord, torch.nn.Module]:
        cfg = self.cfg
        # cached and online teacher logits are the same numbers, so the library does not depend on the mode;
        # data-parallel training gives other bits, so N > 1 ranks is part of it (N = 1 keeps the old fingerprint)
        parallel = [{"library_workers": cfg.library_workers}] if cfg.library_workers > 1 else []
        fingerprint = fingerprint_of(oracle_rec.sha256, data_fp, cfg.student_arch, cfg.library_epochs, cfg.temperature,
                                   cfg.lr, cfg.batch_size, cfg.seed, *parallel, *self._val_parts())

        def run() -> StageRecord:
            self._seed(2)
            student = create_model(cfg.student_arch, in_channels=data.input_shape[0], num_classes=data.num_classes)
            if not isinstance(student, WideResNet):
                raise PoolBuilderError(f"student {cfg.student_arch!r} must be a WRN (choices: {list_models('wrn_*')})")
            train_cfg = self._train_cfg(cfg.library_epochs, cfg.lr, 2)
            checkpoint = self.stages.checkpoint("library", fingerprint)
            stop = None
            if cfg.library_workers > 1:
                loss = distill_library_parallel(student, data.train.images, normalizer, train_logits, train_cfg,
                                                cfg.temperature, cfg.library_workers, self._rank_threads(),
                                                self._library_helpers(), checkpoint, self.show_progress, self.log)
            else:
                teacher = (online_source(oracle, data.train.images, normalizer) if train_logits is None
                           else cached_source(train_logits))
                stop = self._early_stop(lambda: float(kd_loss(
                    torch.from_numpy(predict_logits(student, self.val.images, normalizer)),
                    torch.from_numpy(self.val_logits), cfg.temperature)))
                loss = distill_student(student, data.train.images, normalizer, teacher, train_cfg, cfg.temperature,
                                       show_progress=self.show_progress, checkpoint=checkpoint, early_stop=stop)
            student_logits = predict_logits(student, data.test.images, normalizer)
            arch = library_architecture(student.cfg, cfg.student_arch)
            sha = save_state_dict(student.library, self.out / "library.pt")
            return StageRecord(fingerprint, "library.pt", sha, arch, count_parameters(student.library), 0.0, {
                "final_kd_loss": round(loss, 4),
                "student_test_accuracy": float((student_logits.argmax(1) == data.test.labels).mean()),
                "student_parameters_with_temporary_head": count_parameters(student), **(stop.metrics() if stop else {})})

        record = self.stages.run("library", fingerprint, run)
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
                                                cfg.expert_lr, cfg.batch_size, cfg.seed, cfg.online, cfg.cache_dtype,
                                                *self._val_parts())
        job = ExpertJob(task, tuple(class_ids), fingerprint, 100 + zlib.crc32(task.encode()) % 100000,
                        library.cfg, cfg)
        if cfg.expert_stages > 1:
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
                records[job.task] = build_progressive_expert_stages(self.stages, job, len(data.train), feat_src,
                                                                    logit_src, test, self.show_progress)
                continue

            def run(job: ExpertJob = job) -> StageRecord:
                head, record = train_expert(job, len(data.train), feat_src, logit_src, test, self.show_progress,
                                            self.stages.checkpoint(job.stage, job.fingerprint))
                record.sha256 = save_state_dict(head, self.out / record.file)
                return record

            records[job.task] = self.stages.run(job.stage, job.fingerprint, run)
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
        settings["color"] = data.color  # as read, so that every reload reads the images the same way
        return PoolMetadata(
            pool_id=hashlib.sha256("".join(shas).encode()).hexdigest()[:16],
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            dataset=DatasetInfo(data.name, list(data.class_names), list(data.input_shape), list(data.mean),
                                list(data.std)),
            tasks=hierarchy.to_json(), oracle=entry(oracle_rec), library=entry(library_rec), experts=expert_entries,
            teachers={name: entry(rec) for name, rec in self.teachers.items()},
            build={"settings": settings, "train_images": len(data.train), "test_images": len(data.test),
                   "validation_images": len(self.val) if self.val else 0,
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


def build_pool(cfg: BuildConfig, log: Log = log_to_stderr, show_progress: bool = True) -> PoolMetadata:
    """Build (or resume building) the pool described by ``cfg``."""
    return PoolBuild(cfg, log, show_progress).run()
