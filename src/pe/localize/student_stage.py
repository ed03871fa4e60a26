"""Stage 12: the 3D student trained on the teacher's pseudo-masks (condrea2024 stage 3).

Inputs are cache-frame volumes in the paper's PE window (:func:`pe.localize.frames.pe_window`), the
targets the stage-11 pseudo-masks of the train split (``work/localize/<exp>/teacher/train/masks``).
Training is :func:`pe.localize.student.train_student` (MONAI DynUNet, balanced crops, Generalized
Dice (+ CE), mixup, AdamW warm-up + cosine); every study with a non-empty pseudo-mask is used, plus
as many studies without one (so background crops include whole negative studies). With
``train_boxes`` (a box truth CSV of the train split, e.g. the phantom's ``train_boxes.csv``) the
targets are the true emboli instead: the *oracle* student, which tells how much of the student's gap
to its teacher comes from the pseudo-labels rather than from the student's recipe.

Output under ``work/localize/<exp>/student/``: ``model.pt`` (``{"model", "config", "history"}``,
loads with ``weights_only=True``; an existing one is reused unless ``retrain``), and per split
``<split>/masks/`` (PseudoMaskStore of the predicted clusters, resumable per study),
``<split>/clusters.csv`` (same columns as the teacher's; score = the predicted PE probability) and
``<split>/timings.csv``, and ``predicted_with.json`` (the model(s) behind the predictions, folder and model.pt
hash, and the cluster settings): predictions made by another model or with other settings are removed before
predicting. With ``average`` (a seed ensemble) nothing is trained: the folder has no model.pt and
``predicted_with.json`` lists the member students.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pe.config import resolve_paths
from pe.data.cache import load_index
from pe.io import atomic_path, write_json_atomic
from pe.localize.clusters import ClusterFilter
from pe.localize.frames import lung_boxes, pe_window, study_volume
from pe.localize.pseudo_io import PseudoMaskStore
from pe.localize.student import (
    StudentConfig,
    predict_ensemble,
    predict_volume,
    probability_clusters,
    train_student,
)
from pe.localize.teacher_stage import (
    TeacherStageConfig,
    any_checkpoint,
    finish_outputs,
    localize_dir,
    study_clusters,
    teacher_dir,
)
from pe.models.load import load_cnn
from pe.models.seg3d import Seg3DConfig, build_seg3d


@dataclass
class StudentStageConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    seg: Seg3DConfig = field(default_factory=Seg3DConfig)
    min_voxels_512: float | None = 100.0  # filter of the predicted clusters, as the teacher's
    max_dist_512: float | None = 160.0
    max_studies: int | None = None  # first N (sorted ids) of each split to predict: smoke runs
    retrain: bool = False
    cache_dir: str | None = None  # default: the cache of the stage-04 experiment's config
    # Box truth CSV of the train split: train on it instead of the teacher's pseudo-masks (the oracle
    # student of the benchmark: how much of the student's gap to its teacher the pseudo-labels cause).
    train_boxes: str | None = None
    # Another stage-11 output of the train split to learn from (its masks/ folder; e.g. a teacher run at
    # another operating point written with 11_pseudo_masks.py --out). Default: work/localize/<exp>/teacher/train.
    teacher_out: str | None = None
    # Fine-tuning (condrea2024 Table VI): start from this trained student's model.pt (same network
    # configuration) instead of a fresh network, e.g. a pseudo-label student fine-tuned on box truth.
    init_from: str | None = None
    # Train on the first N training studies (sorted ids) only, e.g. a quarter with human masks.
    train_studies: int | None = None
    # A seed ensemble: predict with the mean probability of these trained students (stage-12 output folders
    # with a model.pt each) instead of training one; the training options above do not apply.
    average: tuple[str, ...] | None = None

    def cluster_filter(self, size: int) -> ClusterFilter:
        return TeacherStageConfig(min_voxels_512=self.min_voxels_512, max_dist_512=self.max_dist_512).cluster_filter(size)


def student_dir(exp: str) -> Path:
    return localize_dir(exp) / "student"


def _tuples(d: dict) -> dict:
    return {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
            for k, v in d.items()}


def load_student(path: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, StudentConfig, Seg3DConfig]:
    """(network in eval mode on ``device``, its StudentConfig set to that device, its Seg3DConfig) of a
    stage-12 model.pt (``weights_only`` load)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    # a checkpoint from before the prior initialisation was trained without it
    scfg = StudentConfig(**{"prior": None, **_tuples(ckpt["config"]["student"]), "device": str(device)})
    seg = Seg3DConfig(**_tuples(ckpt["config"]["seg"]))
    model = build_seg3d(seg)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), scfg, seg


def _teacher_targets(exp: str, teacher_out: str | None = None) -> tuple[str, list[tuple[str, np.ndarray]]]:
    """Every training study the teacher has labelled (its own --max-studies bounds them; the student's
    cap is for the studies it predicts)."""
    store = PseudoMaskStore(Path(teacher_out or teacher_dir(exp, "train")) / "masks")
    studies = sorted(store.done())
    if not studies:
        raise FileNotFoundError(f"{store.root}: no pseudo-masks (run src/11_pseudo_masks.py --split train)")
    return str(store.root), [(s, store.read(s)[0]) for s in studies]


def _truth_targets(train_boxes: str, cache_dir: Path, index, boxes) -> tuple[str, list[tuple[str, np.ndarray]]]:
    """Every cached training study with its box truth as the mask (empty where it has no box)."""
    from pe.localize.frames import Truth
    from pe.rspect import STUDY

    studies = sorted(set(_split_studies("train")) & set(index[STUDY].astype(str)))
    if not studies:
        raise FileNotFoundError(f"{cache_dir}: no study of the train metadata is cached")
    truth = Truth.for_split("train", train_boxes)
    size = study_volume(cache_dir, studies[0], index, boxes).images.shape[1]
    n_slices = index.groupby(STUDY).size()
    return str(train_boxes), [(s, truth.labels(s, (int(n_slices[s]), size, size), keep=False)) for s in studies]


def _training_set(exp: str, cache_dir: Path, index, boxes, train_boxes: str | None = None,
                  teacher_out: str | None = None, train_studies: int | None = None) -> tuple[str, list, list]:
    """(where the targets came from, volumes, masks): every study with a non-empty target plus as many
    without one, among the first ``train_studies`` (sorted ids) when given."""
    if train_boxes is not None and teacher_out is not None:
        raise ValueError("train on box truth or on a teacher's pseudo-masks, not both")
    if train_studies is not None and train_studies < 1:
        raise ValueError(f"train_studies must be >= 1, got {train_studies}")
    source, targets = (_teacher_targets(exp, teacher_out) if train_boxes is None
                       else _truth_targets(train_boxes, cache_dir, index, boxes))
    targets = targets[:train_studies]
    pos = [(s, lab) for s, lab in targets if lab.any()]
    neg = [(s, lab) for s, lab in targets if not lab.any()]
    if not pos:
        raise ValueError(f"{source}: every training mask is empty; nothing to learn from")
    vols, masks = [], []
    for s, labels in pos + neg[: len(pos)]:
        v = pe_window(study_volume(cache_dir, s, index, boxes).images)
        if v.shape != labels.shape:
            raise ValueError(f"study {s}: cache volume {v.shape} but training mask {labels.shape}")
        vols.append(v)
        masks.append(labels > 0)
    return source, vols, masks


def fit_or_load(exp: str, cfg: StudentStageConfig, out: Path, cache_dir: Path, index, boxes):
    """The student of ``out/model.pt`` (trained now when missing or ``cfg.retrain``)."""
    path = out / "model.pt"
    if path.is_file() and not cfg.retrain:
        print(f"{path}: reusing the trained student", file=sys.stderr)
        return load_student(path)[0]
    t0 = time.perf_counter()
    init = _init_weights(cfg)
    source, vols, masks = _training_set(exp, cache_dir, index, boxes, cfg.train_boxes, cfg.teacher_out,
                                        cfg.train_studies)
    with warnings.catch_warnings():  # crops of negative studies: MONAI warns that it cannot balance them
        warnings.filterwarnings("ignore", message="Num foregrounds 0")
        model, history = train_student(vols, masks, cfg.student, cfg.seg, init=init)
    ckpt = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "config": {"student": dataclasses.asdict(cfg.student), "seg": dataclasses.asdict(cfg.seg)},
            "history": [float(h) for h in history], "train_seconds": time.perf_counter() - t0,
            "train_studies": len(vols), "trained_on": source, "init_from": cfg.init_from,
            "train_studies_cap": cfg.train_studies}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # its predictions are redone: the model's hash in predicted_with.json changed
        torch.save(ckpt, tmp)
    print(f"student trained on {len(vols)} studies ({source}) in {ckpt['train_seconds']:.1f} s: loss "
          f"{np.mean(history[:10]):.3f} -> {np.mean(history[-10:]):.3f}", file=sys.stderr)
    return model


PREDICTED_WITH = "predicted_with.json"


def _model_record(path: Path) -> dict:
    return {"folder": str(path.parent.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def keep_or_drop_predictions(out: Path, cfg: StudentStageConfig, models: list[dict]) -> None:
    """Predictions under ``out`` are reused only when ``out/predicted_with.json`` says the same models
    (folder and model.pt hash) and cluster settings made them; otherwise (a retrained student, another
    ensemble, other --high / --low / filter, or no record) they are removed and the record rewritten."""
    record = {"members": models, "high": cfg.student.high, "low": cfg.student.low,
              "min_voxels_512": cfg.min_voxels_512, "max_dist_512": cfg.max_dist_512}
    path = out / PREDICTED_WITH
    if path.is_file() and json.loads(path.read_text()) == record:
        return
    out.mkdir(parents=True, exist_ok=True)
    for stale in sorted(p for p in out.iterdir() if (p / "masks").is_dir()):
        print(f"{stale}: predictions of another model or other cluster settings removed", file=sys.stderr)
        shutil.rmtree(stale)
    write_json_atomic(path, record)


def ensemble_members(cfg: StudentStageConfig, out: Path) -> tuple[list[tuple[torch.nn.Module, StudentConfig]], list]:
    """(the trained students of ``cfg.average`` with their own configurations, their records for
    :func:`keep_or_drop_predictions`); training options and an ``out`` holding a student are refused."""
    trains = {"train_boxes": cfg.train_boxes, "teacher_out": cfg.teacher_out, "init_from": cfg.init_from,
              "train_studies": cfg.train_studies}
    if given := [k for k, v in trains.items() if v is not None] + (["retrain"] if cfg.retrain else []):
        raise ValueError(f"an ensemble (--average) trains nothing; drop {', '.join(given)}")
    if (out / "model.pt").exists():
        raise ValueError(f"{out}: holds a trained student (model.pt); give the ensemble its own --out")
    members, records = [], []
    for folder in cfg.average or ():
        path = Path(folder) / "model.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no trained student to average (a stage-12 output folder)")
        model, scfg, _ = load_student(path, cfg.student.device)
        members.append((model, scfg))
        records.append(_model_record(path))
    if not members:
        raise ValueError("an ensemble (--average) needs at least one trained student folder")
    return members, records


def _init_weights(cfg: StudentStageConfig) -> dict | None:
    """The state dict of ``cfg.init_from`` (None without one); its network must be ``cfg.seg``."""
    if cfg.init_from is None:
        return None
    path = Path(cfg.init_from)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trained student to start from (a stage-12 model.pt)")
    model, _, seg = load_student(path)
    if seg != cfg.seg:
        raise ValueError(f"{path}: its network {seg} differs from this one {cfg.seg}; give the same --filters")
    return model.state_dict()


def _split_studies(split: str) -> list[str]:
    import pandas as pd

    from pe import paths
    from pe.localize.frames import check_uid
    from pe.rspect import STUDY

    p = paths.meta_path(split)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: {split} metadata not found (run src/01_parse_metadata.py)")
    return [check_uid(s) for s in sorted(pd.read_parquet(p, columns=[STUDY])[STUDY].astype(str).unique())]


def run_student(exp: str, splits: tuple[str, ...] = ("test",), cfg: StudentStageConfig | None = None,
                out: Path | None = None) -> Path:
    """Stage 12 (see the module docstring); returns the output folder."""
    cfg = cfg or StudentStageConfig()
    out = Path(out) if out is not None else student_dir(exp)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else resolve_paths(load_cnn(any_checkpoint(exp), "cpu")[1])[0]
    index, boxes = load_index(cache_dir), lung_boxes(cache_dir)
    if cfg.average:
        members, records = ensemble_members(cfg, out)

        def predict(vol: np.ndarray) -> np.ndarray:
            return predict_ensemble(members, vol)
    else:
        model = fit_or_load(exp, cfg, out, cache_dir, index, boxes).to(cfg.student.device)
        records = [_model_record(out / "model.pt")]

        def predict(vol: np.ndarray) -> np.ndarray:
            return predict_volume(model, vol, cfg.student)
    keep_or_drop_predictions(out, cfg, records)
    for split in splits:
        store = PseudoMaskStore(out / split / "masks")
        studies = _split_studies(split)[: cfg.max_studies]
        for study in tqdm(store.pending(studies), desc=f"student {exp}/{split}"):
            t0 = time.perf_counter()
            frames = study_volume(cache_dir, study, index, boxes)
            vol = pe_window(frames.images)
            prob = predict(vol)
            labels = probability_clusters(prob, cfg.student, cfg.cluster_filter(vol.shape[1]))
            extra = {"seconds": time.perf_counter() - t0, "windows": int(len(vol)),
                     "clusters": study_clusters(study, labels, prob, frames.sops).to_dict("records")}
            store.write(study, labels, frames.sops, extra)
        finish_outputs(store, studies, out / split)
    return out
