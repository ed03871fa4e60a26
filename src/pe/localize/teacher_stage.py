"""Stage 11: the explainability teacher over whole studies → per-study pseudo-masks (condrea2024 stage 2).

For every study of a split the trained slice CNN of stage 04 classifies each 2.5D window; each
window it calls positive goes through :func:`pe.localize.teacher.refine_window` (captum IG,
hysteresis clusters, iterative masking); the windows' masks are aggregated (Gaussian σ = 0.8 over
the slice offset), pasted from the CNN's lung-crop input frame back into the cache frame
(:mod:`pe.localize.frames`), labelled in 3D and filtered (size, 2D distance from the image centre).

Models: on train each study is explained by its out-of-fold model (``folds.csv``: the fold-k model
never saw fold k), on test by the mean logit of every fold model (:class:`FoldEnsemble`; IG is
linear in the function, so this is the mean of the folds' attributions).

Output under ``work/localize/<exp>/teacher/<split>/`` (see CONTRACTS.md, stage 11):
- ``masks/``: :class:`~pe.localize.pseudo_io.PseudoMaskStore` of the filtered pseudo-masks (cluster
  ids), the study's done-marker (written last, so a rerun skips finished studies);
- ``iters/``: the unfiltered masks as *iteration maps* (value k = the voxel joined the aggregated
  mask after refinement round k; the mask of "rounds <= k" is ``0 < v <= k``): Table II/III input;
- ``clusters.csv``: one row per kept 3D cluster (box in cache voxels, score = the highest window
  probability on its slices); ``timings.csv``: seconds, windows and positive windows per study.

Neutral fill: a CNN trained with CutOut (``aug`` and ``aug_cutout_p > 0``) gets its own hole value
(:func:`pe.localize.teacher.cutout_fill`, in distribution as in the paper); one that never saw holes
gets each channel's window mean (see :mod:`pe.localize.teacher`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from torch import nn
from tqdm import tqdm

from pe import paths
from pe.config import CNNConfig, resolve_paths
from pe.data.cache import load_index
from pe.data.folds import load_folds
from pe.explain.cam import logit_of
from pe.io import write_csv_atomic
from pe.localize.clusters import ClusterFilter, cluster_table, filter_clusters, label_clusters
from pe.localize.frames import check_uid, crop_region, input_to_cache, lung_boxes, study_volume
from pe.localize.pseudo_io import PseudoMaskStore
from pe.localize.teacher import (
    TeacherConfig,
    TeacherResult,
    classify_windows,
    cutout_fill,
    refine_window,
    slice_offsets,
    windows_to_explain,
)
from pe.models.load import load_cnn
from pe.models.slice_cnn import preprocess_study
from pe.rspect import IMAGE_LABEL, SOP, STUDY

CLUSTER_COLUMNS = [STUDY, "cluster", "voxels", "z0", "y0", "x0", "z1", "y1", "x1", "score_max", "score_mean",
                   "sop_first", "sop_last"]


@dataclass
class TeacherStageConfig:
    """The teacher's options plus the pseudo-label filter at the paper's 512 px scale (sizes scale
    with the cache: voxel counts by (S/512)², distances by S/512)."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    min_voxels_512: float | None = 100.0
    max_dist_512: float | None = 160.0
    max_studies: int | None = None  # first N studies (sorted ids) only: smoke runs
    device: str = "cpu"
    gate_labels: bool = False  # train split: explain only slices labelled positive (pe_present_on_image)

    def cluster_filter(self, size: int) -> ClusterFilter:
        mv = None if self.min_voxels_512 is None else max(1, int(round(self.min_voxels_512 * (size / 512) ** 2)))
        return ClusterFilter(min_voxels=mv, max_dist_px=self.max_dist_512, ref_size=512)


def localize_dir(exp: str) -> Path:
    return paths.work_dir() / "localize" / check_uid(exp, "experiment name")


def teacher_dir(exp: str, split: str) -> Path:
    return localize_dir(exp) / "teacher" / split


class FoldEnsemble(nn.Module):
    """Mean PE logit of several fold models (``{"logit": (B,)}``)."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logit": torch.stack([logit_of(m(x)) for m in self.models]).mean(0)}


def study_folds(exp: str, split: str, cfg: CNNConfig) -> dict[str, list[int]]:
    """StudyInstanceUID → the folds whose models explain it (see the module docstring)."""
    from pe.infer.embeddings import model_folds

    found = model_folds(exp)
    if not found:
        raise FileNotFoundError(f"{paths.models_dir() / exp}: no fold*/best.pt found (run src/04_train_cnn.py)")
    if split == "test":
        meta = pd.read_parquet(_meta_path(split), columns=[STUDY])
        use = [k for k in found if k >= 0] or found
        return {str(s): use for s in sorted(meta[STUDY].astype(str).unique())}
    folds = load_folds(resolve_paths(cfg)[2])
    missing = sorted(set(folds["fold"].astype(int)) - set(found))
    if missing:
        raise FileNotFoundError(f"{paths.models_dir() / exp}: no best.pt for fold(s) {missing}: train studies "
                                "need their out-of-fold model")
    return {str(s): [int(k)] for s, k in sorted(zip(folds[STUDY].astype(str), folds["fold"], strict=True))}


def _meta_path(split: str) -> Path:
    p = paths.meta_path(split)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: {split} metadata not found (run src/01_parse_metadata.py)")
    return p


def _fill(cfg: CNNConfig) -> str | list[float]:
    return cutout_fill(cfg.neighbors) if cfg.aug and cfg.aug_cutout_p > 0 else "mean"


def explain_frames(model: nn.Module, cfg: CNNConfig, images: np.ndarray, box, tcfg: TeacherConfig,
                   gate: np.ndarray | None = None) -> TeacherResult:
    """The teacher over one study without holding every window in memory: windows are classified
    in batches and rebuilt one at a time for the positive ones (with a ``gate``, only those on
    slices labelled positive: :func:`pe.localize.teacher.windows_to_explain`)."""
    n, dev = len(images), next(model.parameters()).device
    probs = np.concatenate([
        classify_windows(model, preprocess_study(images, cfg, box, range(s, min(s + tcfg.batch_size, n))).to(dev),
                         tcfg.batch_size) for s in range(0, n, tcfg.batch_size)])
    offsets = slice_offsets(cfg.neighbors)
    windows = {}
    for i in windows_to_explain(probs, tcfg.clf_threshold, gate):
        x = preprocess_study(images, cfg, box, [int(i)])
        windows[int(i)] = refine_window(model, x.to(dev), tcfg, offsets)
    return TeacherResult(probs=probs, windows=windows, offsets=np.unique(offsets), shape=(n, cfg.img_size, cfg.img_size),
                         cfg=tcfg, gate=gate)


def iteration_map(res: TeacherResult) -> np.ndarray:
    """uint8 (n, h, w): the refinement round after which each voxel joined the aggregated mask."""
    rounds = max((int(w.iterations.max()) for w in res.windows.values()), default=0)
    out = np.zeros(res.shape, np.uint8)
    for k in range(1, rounds + 1):
        out[res.mask(up_to_iter=k) & (out == 0)] = k
    return out


def study_clusters(study: str, labels: np.ndarray, score: np.ndarray, sops: list[str]) -> pd.DataFrame:
    """The localisation rows of one study (CLUSTER_COLUMNS)."""
    t = cluster_table(labels, score)
    t.insert(0, STUDY, study)
    t["sop_first"] = [sops[int(z)] for z in t["z0"]] if len(t) else []
    t["sop_last"] = [sops[int(z) - 1] for z in t["z1"]] if len(t) else []
    return t[CLUSTER_COLUMNS]


def _teach_one(model, cfg, frames, tcfg: TeacherStageConfig, size: int,
               gate: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    t0 = time.perf_counter()
    res = explain_frames(model, cfg, frames.images, frames.box, tcfg.teacher, gate)
    itmap = input_to_cache(iteration_map(res), crop_region(frames.box, size, cfg.crop_lung), size)
    labels = filter_clusters(label_clusters(itmap > 0), tcfg.cluster_filter(size))
    stops = pd.Series([w.stop for w in res.windows.values()], dtype=object).value_counts().to_dict()
    info = {"seconds": time.perf_counter() - t0, "windows": int(len(res.probs)), "positive_windows": len(res.windows),
            "rounds": int(itmap.max(initial=0)), "stops": {str(k): int(v) for k, v in stops.items()},
            "probs": [round(float(p), 5) for p in res.probs]}
    if gate is not None:
        info["gated_slices"] = int((~gate).sum())
    return labels, itmap, info


def run_teacher(exp: str, split: str, tcfg: TeacherStageConfig | None = None, out: Path | None = None) -> Path:
    """Stage 11 for one split (see the module docstring); returns the output folder."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    tcfg = tcfg or TeacherStageConfig()
    out = Path(out) if out is not None else teacher_dir(exp, split)
    masks, iters = PseudoMaskStore(out / "masks"), PseudoMaskStore(out / "iters")
    _, cfg = load_cnn(any_checkpoint(exp), "cpu")
    assignment = study_folds(exp, split, cfg)
    studies = [check_uid(s) for s in assignment][: tcfg.max_studies]
    labels_of = slice_labels(split) if tcfg.gate_labels else None
    todo = masks.pending(studies)
    if len(todo) < len(studies):
        print(f"{out}: {len(studies) - len(todo)} of {len(studies)} studies already done, skipped", file=sys.stderr)
    if todo:
        cache_dir = resolve_paths(cfg)[0]
        index, boxes = load_index(cache_dir), lung_boxes(cache_dir)
        loaded: dict[tuple[int, ...], nn.Module] = {}
        for study in tqdm(todo, desc=f"teacher {exp}/{split}"):
            key = tuple(assignment[study])
            if key not in loaded:
                loaded.clear()
                ms = [load_cnn(paths.run_dir(exp, k) / "best.pt", tcfg.device)[0].float() for k in key]
                loaded[key] = (ms[0] if len(ms) == 1 else FoldEnsemble(ms)).eval()
            frames = study_volume(cache_dir, study, index, boxes)
            size = frames.images.shape[1]
            tc = dataclasses.replace(tcfg, teacher=dataclasses.replace(tcfg.teacher, fill=_fill(cfg)))
            gate = None if labels_of is None else study_gate(labels_of, frames.sops, study)
            labels, itmap, info = _teach_one(loaded[key], cfg, frames, tc, size, gate)
            score = np.broadcast_to(np.asarray(info["probs"], np.float32)[:, None, None], labels.shape)
            info["clusters"] = study_clusters(study, labels, np.ascontiguousarray(score), frames.sops).to_dict("records")
            info["folds"] = list(key)
            iters.write(study, itmap, frames.sops, {"seconds": info["seconds"]})
            masks.write(study, labels, frames.sops, info)  # last: marks the study done
    finish_outputs(masks, studies, out)
    return out


def train_image_labels(meta_path: Path | None = None) -> pd.DataFrame:
    """(SOPInstanceUID, pe_present_on_image as bool) of the train metadata: the slice labels that
    the operating point and label gating read."""
    p = Path(meta_path) if meta_path is not None else _meta_path("train")
    if IMAGE_LABEL not in pq.read_schema(p).names:
        raise ValueError(f"{p}: no {IMAGE_LABEL} column (slice labels)")
    meta = pd.read_parquet(p, columns=[SOP, IMAGE_LABEL])
    return pd.DataFrame({SOP: meta[SOP].astype(str), IMAGE_LABEL: meta[IMAGE_LABEL].to_numpy() > 0.5})


def slice_labels(split: str) -> dict[str, bool]:
    """SOPInstanceUID → image label of ``split``'s metadata: the gate of label gating. Only the train
    split has labels (the real test split has none)."""
    if split != "train":
        raise ValueError(f"label gating needs image labels: train split only, got {split!r}")
    t = train_image_labels()
    return dict(zip(t[SOP], t[IMAGE_LABEL], strict=True))


def study_gate(labels_of: dict[str, bool], sops: list[str], study: str) -> np.ndarray:
    """(N,) bool gate of one study's slices in z order; a slice without a label is an error."""
    missing = [s for s in sops if s not in labels_of]
    if missing:
        raise ValueError(f"study {study}: {len(missing)} cached slice(s) without an image label in the train "
                         f"metadata (first {missing[0]}); rerun stages 01-02")
    return np.array([labels_of[s] for s in sops], bool)


def any_checkpoint(exp: str) -> Path:
    from pe.infer.embeddings import model_folds

    folds = model_folds(exp)
    if not folds:
        raise FileNotFoundError(f"{paths.models_dir() / exp}: no fold*/best.pt found (run src/04_train_cnn.py)")
    return paths.run_dir(exp, folds[0]) / "best.pt"


def finish_outputs(store: PseudoMaskStore, studies: list[str], out: Path) -> None:
    """index.parquet of the store, ``clusters.csv`` and ``timings.csv`` from the parts' metadata."""
    store.write_index()
    rows, times = [], []
    for s in studies:
        extra = store.extra(s)
        rows.extend(extra.get("clusters", []))
        times.append({STUDY: s, "seconds": extra.get("seconds", float("nan")), "windows": extra.get("windows"),
                      "positive_windows": extra.get("positive_windows"), "rounds": extra.get("rounds")})
    write_csv_atomic(pd.DataFrame(rows, columns=CLUSTER_COLUMNS), out / "clusters.csv", index=False)
    write_csv_atomic(pd.DataFrame(times), out / "timings.csv", index=False)


def sensitivity_threshold(exp: str, sensitivity: float, meta_path: Path | None = None) -> tuple[float, dict]:
    """The classifier threshold of the paper's high-sensitivity operating point: the largest window
    probability that still calls ``sensitivity`` of the positive training slices positive, from the
    CNN's out-of-fold slice probabilities (``oof/<exp>/cnn_fold*.parquet``, no slice seen by its own
    model) and the slice labels of ``work/meta/train.parquet``. Returns (threshold, figures)."""
    if not 0 < sensitivity <= 1:
        raise ValueError(f"sensitivity must be in (0, 1], got {sensitivity}")
    files = sorted(paths.exp_oof_dir(exp).glob("cnn_fold*.parquet"))
    if not files:
        raise FileNotFoundError(f"{paths.exp_oof_dir(exp)}: no cnn_fold*.parquet (stage 04's out-of-fold "
                                "probabilities) to choose the operating point from")
    oof = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True).drop_duplicates(SOP)
    oof[SOP] = oof[SOP].astype(str)
    y = oof.merge(train_image_labels(meta_path), on=SOP, how="inner")
    pos = np.sort(y.loc[y[IMAGE_LABEL], "prob"].to_numpy(np.float64))
    if len(pos) == 0:
        raise ValueError(f"{paths.exp_oof_dir(exp)}: no positive slice among the out-of-fold probabilities")
    # calling p >= t positive: the k-th smallest positive probability keeps len(pos) - k of them
    k = int(np.floor(len(pos) * (1.0 - sensitivity) + 1e-9))
    thr = float(pos[min(k, len(pos) - 1)])
    neg = y.loc[~y[IMAGE_LABEL], "prob"].to_numpy(np.float64)
    figures = {"threshold": thr, "target_sensitivity": sensitivity,
               "slice_sensitivity": float((pos >= thr).mean()),
               "slice_specificity": float((neg < thr).mean()) if len(neg) else float("nan"),
               "positive_slices": int(len(pos)), "negative_slices": int(len(neg))}
    return thr, figures
