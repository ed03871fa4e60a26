"""Anatomically aware pretraining (papers/condrea2023_anatomically_aware_dual_hop.txt): the slice CNN
learns to regress anatomical landmarks from a 2.5D input before it learns PE.

Targets (:func:`pe.anatomy.landmarks.landmark_targets`): per landmark x and y in the model's input
frame normalised to [0, 1] (the crop the CNN sees: the lung box when ``crop_lung``), and the
distance in slices from the sample's centre slice to the landmark's slice divided by 600; a presence
mask drops landmarks the study does not have. Loss: MSE over present landmarks
(:func:`pe.anatomy.landmarks.landmark_loss`) on targets standardised per coordinate
(:class:`LandmarkNet` says why); figures are in the paper's units and in mm. The landmark CSV is the phantom's
``phantom_landmarks.csv`` or, for real data, the classical finder's output in the same columns
(``src/13_pretrain_landmarks.py --find-landmarks``).

Model: the experiment's :class:`pe.models.slice_cnn.SliceCNN` (same backbone, neighbours, input
size and crop as the PE CNN it will initialise) with a linear head on its embedding. No PE label is
read, so every training study takes part; a seeded share of studies is held out to measure the
error against the baseline that predicts each landmark's training mean (a learning check).

Run folder ``work/models/<name>/`` (no fold): ``config.yaml``, ``metrics.jsonl`` (per epoch: train
and validation MSE, baseline MSE, mean error in mm), ``last.pt`` (resume), ``backbone.pt`` (the
backbone's state_dict: ``init_from: <name>`` in a CNN config loads it) and ``summary.json``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from pe import paths
from pe.anatomy.landmarks import LANDMARKS, Z_SCALE, landmark_loss, landmark_targets
from pe.anatomy.roi import roi_mode
from pe.config import CNNConfig, resolve_paths, save_config
from pe.data.cache import load_boxes, load_index
from pe.data.slices import SliceDataset, SliceTable, build_slice_table, clip_box, normalize
from pe.data.tables import read_table
from pe.io import write_json_atomic
from pe.models.slice_cnn import build_model
from pe.rspect import STUDY
from pe.train.core import (
    MetricsLog,
    cpu_state_dict,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
    save_checkpoint,
    seed_everything,
)

LANDMARK_COLUMNS: tuple[str, ...] = (STUDY, "landmark", "x", "y", "slice_index", "present")


def read_landmarks(path: str | Path, names: Sequence[str] = LANDMARKS) -> pd.DataFrame:
    """The present rows of a landmark CSV (x, y in original pixels, slice_index in pipeline order);
    a clear error naming the file for a missing column or an unknown landmark name."""
    p = Path(path)
    df = read_table(p, LANDMARK_COLUMNS)
    unknown = sorted(set(df["landmark"]) - set(names))
    if unknown:
        raise ValueError(f"{p}: unknown landmark(s) {unknown}; known: {list(names)}")
    df = df[df["present"].astype(bool)]
    if not np.isfinite(df[["x", "y", "slice_index"]].to_numpy(np.float64)).all():
        raise ValueError(f"{p}: a present landmark has a non-finite x, y or slice_index")
    return df


def study_points(lm: pd.DataFrame, names: Sequence[str] = LANDMARKS) -> dict[str, np.ndarray]:
    """StudyInstanceUID -> (L, 3) x, y, slice_index in ``names`` order, NaN for absent landmarks."""
    out: dict[str, np.ndarray] = {}
    row = {n: i for i, n in enumerate(names)}
    for study, g in lm.groupby(STUDY, sort=False):
        a = np.full((len(names), 3), np.nan)
        for r in g.itertuples(index=False):
            a[row[r.landmark]] = (r.x, r.y, r.slice_index)
        out[str(study)] = a
    return out


def _crop_frame(table: SliceTable, code: int, cfg: CNNConfig) -> tuple[float, tuple[int, int, int, int] | None]:
    """(cache image size, the clipped lung box the dataset crops to or None) of study ``code``: the
    frame the model's input covers, as :func:`pe.data.slices.crop_resize` clips it."""
    size = float(table.box_size[code]) if cfg.crop_lung and table.box_size[code] > 0 else 0.0
    crop = table.box(code, int(size)) if size > 0 else None
    return size, (clip_box(crop, int(size), int(size)) if crop is not None else None)


def sample_targets(table: SliceTable, meta: pd.DataFrame, points: dict[str, np.ndarray], cfg: CNNConfig,
                   n_landmarks: int = len(LANDMARKS)) -> tuple[np.ndarray, np.ndarray]:
    """(targets (n, L, 3) float32, present (n, L) bool) of every sample of ``table``: landmark x, y
    moved from original pixels (``meta``'s rows/columns) into the crop the dataset feeds the model
    (the lung box in cache pixels, clipped exactly as :func:`pe.data.slices.crop_resize` clips it)."""
    if roi_mode(cfg) is not None:
        raise ValueError(f"crop_mode={cfg.crop_mode}: landmark pretraining follows the lung box only; "
                         "pretrain with crop_mode=lung (the backbone then initialises any crop mode)")
    shape = meta.drop_duplicates(STUDY).set_index(STUDY)[["rows", "columns"]]
    tgt = np.zeros((len(table), n_landmarks, 3), np.float32)
    present = np.zeros((len(table), n_landmarks), bool)
    for code, study in enumerate(table.studies):
        pts = points.get(str(study))
        if pts is None:
            continue
        rows, cols = (float(v) for v in shape.loc[study])
        size, frame = _crop_frame(table, code, cfg)
        if frame is None:  # the whole image: normalised coordinates do not depend on the cache size
            pix, w, h = pts, cols, rows
        else:
            pix = pts.copy()
            pix[:, 0] *= size / cols
            pix[:, 1] *= size / rows
            w = h = size
        # x, y do not depend on the sample; z is the landmark's slice minus the sample's centre
        base, here = landmark_targets(pix, 0, int(w), int(h), frame)
        idx = np.flatnonzero(table.sample_study == code)
        tgt[idx] = base
        tgt[np.ix_(idx, np.flatnonzero(here), [2])] -= (table.sample_slice[idx, None, None] / Z_SCALE).astype(np.float32)
        present[idx] = here
    return tgt, present


class LandmarkNet(nn.Module):
    """A slice CNN with a linear landmark head on its embedding: (B, C, H, W) -> (B, L, 3) targets.

    The head predicts standardised targets, ``mean + std * head(embedding)``, with the training
    set's per-coordinate mean and std, and starts at zero: the untrained model is the mean-target
    baseline, and the z distance (/600, a spread of ~0.03) weighs in the loss as much as x and y
    (spread ~0.1) instead of ~10x less. The loss reads the standardised scale
    (:meth:`standardised_loss`); figures are reported in the paper's units."""

    def __init__(self, cnn: nn.Module, n_landmarks: int, mean: np.ndarray | None = None,
                 std: np.ndarray | None = None) -> None:
        super().__init__()
        self.cnn = cnn
        self.n_landmarks = n_landmarks
        self.head = nn.Linear(int(cnn.embedding_dim), 3 * n_landmarks)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        shape = (n_landmarks, 3)
        self.register_buffer("mean", torch.zeros(shape) if mean is None else torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.ones(shape) if std is None else torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.head(self.cnn(x)["embedding"]).view(len(x), self.n_landmarks, 3)
        return self.mean + self.std * z

    def standardised_loss(self, pred: torch.Tensor, target: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return landmark_loss(pred / self.std, target / self.std, present)


def target_moments(tgt: np.ndarray, present: np.ndarray, min_std: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Per landmark and coordinate, the mean and std (floored at ``min_std``) over present samples."""
    w = present[..., None].astype(np.float64)
    n = np.maximum(w.sum(0), 1.0)
    mean = (tgt * w).sum(0) / n
    var = (((tgt - mean) ** 2) * w).sum(0) / n
    return mean.astype(np.float32), np.maximum(np.sqrt(var), min_std).astype(np.float32)


def split_studies(studies: Sequence[str], val_frac: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, validation) studies: a seeded share ``val_frac`` held out (at least 1 when > 0)."""
    s = sorted(map(str, studies))
    rng = np.random.default_rng(seed)
    rng.shuffle(s)
    n_val = max(1, round(len(s) * val_frac)) if val_frac > 0 and len(s) > 1 else 0
    return s[n_val:], s[:n_val]


def _batches(n: int, batch: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    order = np.arange(n) if rng is None else rng.permutation(n)
    return [order[i:i + batch] for i in range(0, n, batch)]


def _to_input(ds: SliceDataset, idx: np.ndarray, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = torch.stack([torch.as_tensor(ds[int(i)]["image"]) for i in idx]).to(device)
    x = normalize(x)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def _evaluate(model: nn.Module, ds: SliceDataset, tgt: np.ndarray, present: np.ndarray, mean: np.ndarray,
              spacing: np.ndarray, batch: int, device: torch.device, channels_last: bool) -> dict[str, float]:
    """Validation MSE, the mean-target baseline's MSE and the mean error in mm (x, y by the crop's
    mm per normalised unit, z by the slice spacing) over present landmarks."""
    model.eval()
    se = base = mm = base_mm = 0.0
    count = 0
    for idx in _batches(len(ds), batch, None):
        pred = model(_to_input(ds, idx, device, channels_last)).float().cpu().numpy()
        t, m = tgt[idx], present[idx]
        se += float(((pred - t) ** 2)[m].sum())
        base += float(((mean[None] - t) ** 2)[m].sum())
        d = (pred - t) * spacing[idx][:, None, :]
        mm += float(np.linalg.norm(d, axis=-1)[m].sum())
        base_mm += float(np.linalg.norm((mean[None] - t) * spacing[idx][:, None, :], axis=-1)[m].sum())
        count += int(m.sum())
    n = max(count, 1)
    return {"val_mse": se / (3 * n), "baseline_mse": base / (3 * n), "val_error_mm": mm / n,
            "baseline_error_mm": base_mm / n, "val_landmarks": count}


def _mm_per_unit(table: SliceTable, meta: pd.DataFrame, cfg: CNNConfig) -> np.ndarray:
    """(n, 3) mm per unit of the normalised target (x, y: crop width/height in mm; z: 600 slices)."""
    m = meta.drop_duplicates(STUDY).set_index(STUDY)
    dz = meta.sort_values([STUDY, "z"]).groupby(STUDY)["z"].agg(
        lambda z: float(np.median(np.diff(z.to_numpy(np.float64)))) if len(z) > 1 else 1.0)
    out = np.zeros((len(table), 3), np.float32)
    for code, study in enumerate(table.studies):
        r = m.loc[study]
        ps_r, ps_c = float(r["pixel_spacing_row"]), float(r["pixel_spacing_col"])
        rows, cols = float(r["rows"]), float(r["columns"])
        size, frame = _crop_frame(table, code, cfg)
        if frame is None:
            w_mm, h_mm = cols * ps_c, rows * ps_r
        else:
            w_mm = (frame[2] - frame[0]) * cols / size * ps_c
            h_mm = (frame[3] - frame[1]) * rows / size * ps_r
        z = float(dz.get(study, 1.0))
        out[table.sample_study == code] = (w_mm, h_mm, (z if np.isfinite(z) else 1.0) * Z_SCALE)
    return out


def _datasets(cfg: CNNConfig, landmarks: str | Path, val_frac: float, stride: int
              ) -> tuple[dict[str, tuple], tuple[list[str], list[str]]]:
    """Per part ("train", "val"): (dataset, targets, presence, mm per unit) of every stride-th slice of
    the cached studies that have landmarks, split by :func:`split_studies`; and the two study lists."""
    cache, meta_path, _ = resolve_paths(cfg)
    meta = pd.read_parquet(meta_path)
    lm = read_landmarks(landmarks)
    points = study_points(lm)
    index = load_index(cache)
    studies = sorted(set(index[STUDY].astype(str)) & set(meta[STUDY].astype(str)) & set(points))
    if len(studies) < 2:
        raise ValueError(f"{landmarks}: landmarks for {len(studies)} cached studies; need at least 2")
    train_ids, val_ids = split_studies(studies, val_frac, cfg.seed)
    boxes = load_boxes(cache) if cfg.crop_lung else None
    tables = {k: build_slice_table(meta, index, boxes, cache, ids, drop_replaced=True)
              for k, ids in (("train", train_ids), ("val", val_ids)) if ids}
    data = {}
    for k, t in tables.items():
        keep = np.flatnonzero(t.sample_slice % stride == 0)
        t = _subset(t, keep)
        tgt, present = sample_targets(t, meta, points, cfg)
        data[k] = (SliceDataset(t, cfg, None, preload=cfg.preload, workers=max(1, cfg.num_workers)), tgt, present,
                   _mm_per_unit(t, meta, cfg))
    return data, (train_ids, val_ids)


def pretrain_landmarks(cfg: CNNConfig, landmarks: str | Path, val_frac: float = 0.2, stride: int = 2,
                       resume: bool = True, device: str | None = None) -> dict[str, Any]:
    """Train ``cfg``'s slice CNN on the landmark task; write the run folder (module docstring) and
    return the summary. ``stride``: every stride-th slice of each study is a sample (neighbouring
    slices give nearly the same targets). ``resume``: continue from ``last.pt`` when present."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    seed_everything(cfg.seed)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data, (train_ids, val_ids) = _datasets(cfg, landmarks, val_frac, stride)
    run = paths.models_dir() / cfg.name
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    ds, tgt, present, _ = data["train"]
    mean, std = target_moments(tgt, present)
    model = LandmarkNet(build_model(cfg), len(LANDMARKS), mean, std).to(dev)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    steps_per_epoch = len(_batches(len(data["train"][0]), cfg.batch_size, None))
    total = steps_per_epoch * cfg.epochs
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    sched = make_scheduler(opt, int(cfg.warmup_epochs * steps_per_epoch), total, cfg.min_lr / cfg.lr)
    log = MetricsLog(run / "metrics.jsonl")
    start = 0
    last = run / "last.pt"
    if resume and last.is_file():
        ck = load_checkpoint(last, ("model", "optimizer", "scheduler", "epoch"), "landmark checkpoint")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start = int(ck["epoch"])
        print(f"resumed {last}: epoch {start}", flush=True)
    log.start(start)
    done = log.read()
    record: dict[str, Any] = done[-1] if done else {}  # a finished run resumed: its last epoch's figures
    for epoch in range(start, cfg.epochs):
        model.train()
        t0, tot, nb = time.time(), 0.0, 0
        rng = np.random.default_rng([cfg.seed, epoch])
        for idx in _batches(len(ds), cfg.batch_size, rng):
            pred = model(_to_input(ds, idx, dev, cfg.channels_last))
            loss = model.standardised_loss(pred.float(), torch.as_tensor(tgt[idx], device=dev),
                                           torch.as_tensor(present[idx], device=dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot, nb = tot + float(loss.detach()), nb + 1
        record = {"epoch": epoch, "train_loss": tot / max(nb, 1), "time": time.time() - t0,
                  "samples_per_s": len(ds) / max(time.time() - t0, 1e-9)}
        if "val" in data:
            vds, vt, vp, vmm = data["val"]
            record.update(_evaluate(model, vds, vt, vp, mean, vmm, cfg.val_batch_size, dev, cfg.channels_last))
        log.append(record)
        print(f"[{cfg.name}] epoch {epoch + 1}/{cfg.epochs} " + " ".join(
            f"{k} {v:.4g}" for k, v in record.items() if k not in ("epoch",)), flush=True)
        save_checkpoint(last, {"model": cpu_state_dict(model), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "epoch": epoch + 1})
    save_checkpoint(run / "backbone.pt", {"model": cpu_state_dict(model.cnn.backbone)})
    summary = {"name": cfg.name, "landmarks": str(landmarks), "train_studies": len(train_ids),
               "val_studies": len(val_ids), "train_samples": len(ds), "stride": stride, **record}
    write_json_atomic(run / "summary.json", summary)
    return summary


def _subset(t: SliceTable, keep: np.ndarray) -> SliceTable:
    """``t`` with only the samples ``keep`` (the studies' files stay: neighbours need them)."""
    from dataclasses import replace

    return replace(t, sample_study=t.sample_study[keep], sample_slice=t.sample_slice[keep],
                   sample_sop=t.sample_sop[keep], label=t.label[keep], exam=t.exam[keep])
