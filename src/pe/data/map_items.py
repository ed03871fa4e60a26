"""Inputs of the ConvLSTM stage II: each study's exported reduced feature maps
(``work/embeddings/<cnn_exp>/fold<k>/<split>/maps/``, :mod:`pe.infer.embeddings`) with its slice list,
CNN probabilities and labels as a :class:`MapStudy`, padded batches of them, and the folds' studies
with the same no-leak checks as the BiGRU stage (:func:`pe.data.seq_items.load_fold_data`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pe import paths
from pe.data.seq_items import (
    check_fit_studies,
    check_fold_membership,
    export_folds,
    read_embedding_index,
    uses_fold_model,
)
from pe.models.convlstm import MapReduction, slab_rows
from pe.models.seq_rnn import cnn_logits
from pe.rspect import EXAM_LABELS, IMAGE_LABEL, SOP, STUDY, is_valid_uid


@dataclass
class MapStudy:
    """One study's ConvLSTM inputs (slices in z order) and, for training data, its labels."""

    study: str
    sops: np.ndarray  # (n,) SOPInstanceUID in z order
    maps: np.ndarray  # (m, C, k, k) float16 as stored (m = n unless slabs were subsampled)
    rows: np.ndarray  # (n,) int64: the stored map each slice reads
    probs: np.ndarray  # (n,) float32 CNN slice probabilities
    image_labels: np.ndarray | None = None
    exam_labels: np.ndarray | None = None


def read_reduction(cnn_exp: str, fold: int, split: str) -> MapReduction:
    """The reduction stamped on a fold's map export (``maps/reduction.json``)."""
    f = paths.embeddings_dir(cnn_exp, fold, split) / "maps" / "reduction.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no reduced feature maps exported "
                                f"(run src/05_export_embeddings.py --exp {cnn_exp} --split {split} --maps)")
    return MapReduction(**{k: int(v) for k, v in json.loads(f.read_text()).items()})


def load_map_split(cnn_exp: str, fold: int, split: str, labels: pd.DataFrame | None = None,
                   progress: bool = True) -> tuple[list[MapStudy], MapReduction]:
    """All studies of one fold's export with their maps, aligned with ``labels`` when given."""
    d = paths.embeddings_dir(cnn_exp, fold, split)
    red = read_reduction(cnn_exp, fold, split)
    idx = read_embedding_index(d / "index.parquet")
    if labels is not None:
        idx = idx.merge(labels[[SOP, IMAGE_LABEL, *EXAM_LABELS]], on=SOP, how="left", validate="one_to_one",
                        indicator=True)
        missing = idx.loc[idx["_merge"] != "both", SOP]
        if len(missing):
            raise ValueError(f"{d}/index.parquet: {len(missing)} SOPInstanceUIDs have no labels, e.g. "
                             f"{missing.tolist()[:3]}")
    out = []
    for study, g in tqdm(idx.groupby(STUDY, sort=True), total=idx[STUDY].nunique(),
                         desc=f"load maps {cnn_exp}/fold{fold}/{split}", disable=not progress, leave=False):
        if not is_valid_uid(study):  # the id becomes a file name
            raise ValueError(f"{d}/index.parquet: invalid StudyInstanceUID {str(study)[:80]!r}")
        f = d / "maps" / f"{study}.npy"
        if not f.is_file():
            raise FileNotFoundError(f"{f}: listed in {d}/index.parquet but its maps are missing (rerun the export "
                                    f"with --maps)")
        maps = np.load(f)
        stored, rows = slab_rows(len(g), red.slab_every)
        if maps.shape != (len(stored), red.out_channels, red.k, red.k):
            raise ValueError(f"{f}: shape {maps.shape}, expected {(len(stored), red.out_channels, red.k, red.k)}")
        item = MapStudy(str(study), g[SOP].to_numpy(dtype=object), maps, rows, g["prob"].to_numpy(np.float32))
        if labels is not None:
            item.image_labels = g[IMAGE_LABEL].to_numpy(np.float32)
            item.exam_labels = g.iloc[0][list(EXAM_LABELS)].to_numpy(np.float32)
        out.append(item)
    return out, red


def collate_maps(items: list[MapStudy]) -> dict[str, torch.Tensor]:
    """Pad to the longest study: x (B, M, C, k, k), map_mask (B, M), rows (B, L), mask (B, L),
    cnn_logit (B, L) and, when labelled, image_targets (B, L) and exam_targets (B, 9)."""
    b = len(items)
    mmax, lmax = max(len(it.maps) for it in items), max(len(it.sops) for it in items)
    x = np.zeros((b, mmax, *items[0].maps.shape[1:]), np.float32)
    map_mask = np.zeros((b, mmax), bool)
    rows = np.zeros((b, lmax), np.int64)
    mask = np.zeros((b, lmax), bool)
    logit = np.zeros((b, lmax), np.float32)
    for i, it in enumerate(items):
        m, n = len(it.maps), len(it.sops)
        x[i, :m], map_mask[i, :m] = it.maps, True
        rows[i, :n], mask[i, :n], logit[i, :n] = it.rows, True, cnn_logits(it.probs)
    batch = {"x": torch.from_numpy(x), "map_mask": torch.from_numpy(map_mask), "rows": torch.from_numpy(rows),
             "mask": torch.from_numpy(mask), "cnn_logit": torch.from_numpy(logit)}
    if all(it.image_labels is not None and it.exam_labels is not None for it in items):
        yi = np.zeros((b, lmax), np.float32)
        for i, it in enumerate(items):
            yi[i, : len(it.sops)] = it.image_labels
        batch["image_targets"] = torch.from_numpy(yi)
        batch["exam_targets"] = torch.from_numpy(np.stack([it.exam_labels for it in items]).astype(np.float32))
    return batch


def load_map_fold_data(cfg: Any, fold: int, labels: pd.DataFrame) -> tuple[list[MapStudy], list[MapStudy],
                                                                            MapReduction]:
    """(train studies = every fold != ``fold``, validation studies of ``fold``, the reduction), with the
    leak checks of the BiGRU stage: each study in one fold only, and in the fold the folds file names;
    every fold's maps made with the same reduction. With ``train_embeddings: fold_model`` the training
    studies' maps are fold ``fold``'s own CNN's (``--split train_fit --maps``): the maps of two CNNs, like
    their embeddings, share no feature basis (the benchmark's lesson for the BiGRU stage)."""
    folds = export_folds(cfg, fold, "maps")
    per_fold, reductions = {}, {}
    for j in folds:
        per_fold[j], reductions[j] = load_map_split(cfg.cnn_exp, j, "train", labels, cfg.progress)
    if len({json.dumps(r.to_json(), sort_keys=True) for r in reductions.values()}) != 1:
        raise ValueError(f"the folds' maps of {cfg.cnn_exp} were made with different reductions: "
                         f"{ {j: r.to_json() for j, r in reductions.items()} }")
    check_fold_membership(cfg, per_fold, "maps")
    train = [it for j in folds if j != fold for it in per_fold[j]]
    if uses_fold_model(cfg):
        fit, red = load_map_split(cfg.cnn_exp, fold, "train_fit", labels, cfg.progress)
        if red != reductions[fold]:
            raise ValueError(f"{paths.embeddings_dir(cfg.cnn_exp, fold, 'train_fit')}/maps: made with reduction "
                             f"{red.to_json()}, the validation maps with {reductions[fold].to_json()}")
        train = check_fit_studies(cfg, fold, train, fit)
    return train, per_fold[fold], reductions[fold]
