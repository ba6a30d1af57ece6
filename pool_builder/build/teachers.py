"""Build stages of a multi-teacher oracle: teachers -> their logits, cached once -> fusion -> fused cache.

Each teacher is a resumable stage of its own (``stages/teacher-<i>.json``),
trained on the training split less a stratified validation share, or taken
from the user's file.  Each teacher runs over the training images once; its
logits are cached (``cache/teacher-<i>_logits.npy``), so a different fusion
re-fuses the caches without re-running any teacher.  The fusion stage writes
``ensemble.json`` (teachers with sha256, fusion, weights - fitted on the
validation share when not given); its checksum identifies the fused teacher in
every later fingerprint and in the pool id.  The fused training logits are
written to ``cache/oracle_logits.npy`` under the fingerprint the single-oracle
build checks, so that it finds them there; library and experts then train
exactly as they would from one oracle.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from edge_runtime.atomic_io import atomic_write_bytes, atomic_write_json, sha256_bytes, sha256_file

from pool_builder.data.datasets import Dataset, Normalizer
from pool_builder.distillation.training import TrainConfig, batched, run_batched, train_classifier
from pool_builder.models.ensemble import (ENSEMBLE_FILE, Ensemble, EnsembleRecord, TeacherSpec, check_teachers_agree,
                                          resolve_fusion, stack_logits, validation_indices)
from pool_builder.models.registry import KIND_ENSEMBLE, KIND_TORCHSCRIPT, create_model, named_architecture
from pool_builder.models.weights import load_module, load_user_oracle, save_state_dict
from pool_builder.models.wrn import count_parameters
from pool_builder.pool.evaluate import predict_logits
from pool_builder.stages.cache import cached_array
from pool_builder.stages.engine import StageRecord, fingerprint_of, stage_seed

if TYPE_CHECKING:  # the build that owns these stages (local.py imports this module, not the other way round)
    from pool_builder.build.local import PoolBuild


def _accuracy(logits: np.ndarray | torch.Tensor, labels: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(1) == labels).mean())


class TeacherStages:
    """The ensemble part of one :class:`~pool_builder.build.local.PoolBuild`."""

    def __init__(self, build: "PoolBuild", data: Dataset, normalizer: Normalizer, data_fp: str) -> None:
        self.build = build
        self.cfg = build.cfg
        self.spec = build.cfg.ensemble
        self.data = data
        self.normalizer = normalizer
        self.data_fp = data_fp

    def run(self) -> tuple[StageRecord, Ensemble, dict[str, StageRecord]]:
        """The fused teacher's record and module, and each teacher's record (metrics filled in)."""

        data, cfg = self.data, self.cfg
        val_rows = validation_indices(data.train.labels, self.spec.val_fraction, cfg.seed + 2)
        fit_rows = np.setdiff1d(np.arange(len(data.train)), val_rows)
        split_fp = fingerprint_of(self.data_fp, hashlib.sha256(val_rows.tobytes()).hexdigest())
        records, modules = {}, []
        for i, spec in enumerate(self.spec.teachers):
            name = f"t{i}:{spec.label}"
            records[name], model = self._teacher(i, name, spec, fit_rows, split_fp)
            modules.append(model)
        names = list(records)
        check_teachers_agree(modules, names, data.input_shape, data.num_classes)
        val_labels = data.train.labels[val_rows]
        member_val = stack_logits([predict_logits(m, data.train.images[val_rows], self.normalizer) for m in modules],
                                  names)
        member_test = stack_logits([predict_logits(m, data.test.images, self.normalizer) for m in modules], names)
        for k, rec in enumerate(records.values()):
            rec.metrics["val_accuracy"] = _accuracy(member_val[k], val_labels)
            rec.metrics["test_accuracy"] = _accuracy(member_test[k], data.test.labels)

        record = self._fusion(records, member_val, val_labels, split_fp)
        ensemble = load_module(record.architecture, self.build.out / record.file, "oracle")
        record.metrics["val_accuracy"] = _accuracy(ensemble.fusion.fuse(member_val), val_labels)
        record.metrics["validation_images"] = int(len(val_rows))
        if not cfg.online:
            self._fused_cache(record, ensemble, records, modules)
        return record, ensemble, records

    def _teacher(self, index: int, name: str, spec: TeacherSpec, fit_rows: np.ndarray,
                 split_fp: str) -> tuple[StageRecord, torch.nn.Module]:

        cfg, data, out = self.cfg, self.data, self.build.out
        stage = f"teacher-{index}"
        if spec.file:
            fingerprint = fingerprint_of("user", sha256_file(spec.file) if Path(spec.file).is_file() else spec.file,
                                       spec.arch)
        else:
            fingerprint = fingerprint_of("train", split_fp, spec.arch, cfg.oracle_epochs, cfg.lr, cfg.batch_size,
                                       spec.seed)

        def run() -> StageRecord:
            if spec.file:
                model, arch = load_user_oracle(spec.file, spec.arch, data.input_shape, data.num_classes,
                                               what=f"teacher {name}")
                if arch["kind"] == KIND_TORCHSCRIPT:
                    file = f"teachers/t{index}.torchscript.pt"
                    raw = Path(spec.file).read_bytes()
                    atomic_write_bytes(out / file, raw)
                    sha = sha256_bytes(raw)
                else:
                    file = f"teachers/t{index}.pt"
                    sha = save_state_dict(model, out / file)
                return StageRecord(fingerprint, file, sha, arch, count_parameters(model), 0.0,
                                   {"source": "user", "given_file": spec.file})
            seed = stage_seed(spec.seed, 1)
            torch.manual_seed(seed)
            model = create_model(spec.arch, in_channels=data.input_shape[0], num_classes=data.num_classes)
            loss = train_classifier(model, data.train.images[fit_rows], data.train.labels[fit_rows], self.normalizer,
                                    TrainConfig(cfg.oracle_epochs, cfg.batch_size, cfg.lr * 2, seed=seed),
                                    show_progress=self.build.show_progress,
                                    checkpoint=self.build.stages.checkpoint(stage, fingerprint))
            arch = named_architecture(spec.arch, data.input_shape[0], data.num_classes)
            file = f"teachers/t{index}.pt"
            sha = save_state_dict(model, out / file)
            return StageRecord(fingerprint, file, sha, arch, count_parameters(model), 0.0,
                               {"source": "trained", "seed": spec.seed, "train_images": int(len(fit_rows)),
                                "final_train_loss": round(loss, 4)})

        record = self.build.stages.run(stage, fingerprint, run)
        return record, load_module(record.architecture, out / record.file, f"teacher {name}")

    def _fusion(self, teachers: dict[str, StageRecord], member_val: np.ndarray, val_labels: np.ndarray,
                split_fp: str) -> StageRecord:

        fusion = self.spec.fusion
        fingerprint = fingerprint_of([r.sha256 for r in teachers.values()], list(teachers), fusion.name,
                                   fusion.weights, split_fp if fusion.needs_fitting else None)

        def run() -> StageRecord:
            resolved, source = resolve_fusion(fusion, member_val, val_labels)
            content = EnsembleRecord(
                fusion={"name": resolved.name, "weights": list(resolved.weights) if resolved.weights else None,
                        "weights_source": source},
                teachers=[{"name": n, "file": r.file, "sha256": r.sha256, "architecture": r.architecture,
                           "parameters": r.parameters} for n, r in teachers.items()])
            atomic_write_json(self.build.out / ENSEMBLE_FILE, content.to_json())
            arch = {"kind": KIND_ENSEMBLE, "fusion": resolved.name, "weights": content.fusion["weights"],
                    "teachers": list(teachers)}
            return StageRecord(fingerprint, ENSEMBLE_FILE, sha256_file(self.build.out / ENSEMBLE_FILE), arch,
                               sum(r.parameters for r in teachers.values()), 0.0,
                               {"source": "ensemble", "weights_source": source})

        return self.build.stages.run("ensemble", fingerprint, run)

    def _fused_cache(self, record: StageRecord, ensemble: Ensemble, teachers: dict[str, StageRecord],
                     modules: list[torch.nn.Module]) -> None:
        """Each teacher's training logits cached once; the fused logits cached from them."""
        data, build = self.data, self.build
        shape = (len(data.train), data.num_classes)
        member = []
        for i, ((name, rec), model) in enumerate(zip(teachers.items(), modules)):
            member.append(cached_array(
                build.cache_dir / f"teacher-{i}_logits.npy",
                build.derived_fingerprint(rec.sha256, self.data_fp, "float32"), shape, "float32",
                lambda model=model, name=name: run_batched(model, data.train.images, self.normalizer,
                                                           desc=f"teacher {name} logits",
                                                           show_progress=build.show_progress), build.log))

        def fuse_chunks():
            for rows in batched(shape[0], 8192):
                yield rows, ensemble.fusion.fuse(np.stack([m[rows] for m in member])).numpy()

        fused_fp = build.derived_fingerprint(record.sha256, self.data_fp, "float32")
        cached_array(build.cache_dir / "oracle_logits.npy", fused_fp, shape, "float32", fuse_chunks, build.log)

