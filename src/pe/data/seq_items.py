"""Stage-2 inputs: the exported per-slice embeddings of a study as a :class:`StudySeq`, padded
batches of them, and the folds' studies with their labels (with the no-leak checks)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pe import paths
from pe.config import SeqConfig
from pe.models.seq_rnn import cnn_logits, slice_features
from pe.rspect import EXAM_LABELS, IMAGE_LABEL, SOP, STUDY


@dataclass
class StudySeq:
    """One study's stage-2 inputs (slices in z order) and, for training data, its labels."""

    study: str
    sops: np.ndarray  # (n,) SOPInstanceUID in z order
    emb: np.ndarray  # (n, D) float16 as stored
    probs: np.ndarray  # (n,) float32 CNN slice probabilities
    image_labels: np.ndarray | None = None  # (n,) float32
    exam_labels: np.ndarray | None = None  # (9,) float32 in EXAM_LABELS order


def collate(items: list[StudySeq], cfg: SeqConfig) -> dict[str, torch.Tensor]:
    """Pad a list of studies to the longest: x (B,L,F), mask (B,L), cnn_logit (B,L) and, when labelled,
    image_targets (B,L) and exam_targets (B,9)."""
    feats = [slice_features(it.emb, it.probs, cfg) for it in items]
    lmax = max(f.shape[0] for f in feats)
    b, fdim = len(items), feats[0].shape[1]
    x = np.zeros((b, lmax, fdim), np.float32)
    mask = np.zeros((b, lmax), bool)
    logit = np.zeros((b, lmax), np.float32)
    for i, f in enumerate(feats):
        x[i, : len(f)] = f
        mask[i, : len(f)] = True
        logit[i, : len(f)] = cnn_logits(items[i].probs)
    batch = {"x": torch.from_numpy(x), "mask": torch.from_numpy(mask), "cnn_logit": torch.from_numpy(logit)}
    if all(it.image_labels is not None and it.exam_labels is not None for it in items):
        yi = np.zeros((b, lmax), np.float32)
        for i, it in enumerate(items):
            if len(it.image_labels) != len(feats[i]):  # type: ignore[arg-type]
                raise ValueError(f"study {it.study}: {len(it.image_labels)} image labels for {len(feats[i])} slices")  # type: ignore[arg-type]
            yi[i, : len(feats[i])] = it.image_labels
        batch["image_targets"] = torch.from_numpy(yi)
        batch["exam_targets"] = torch.from_numpy(np.stack([it.exam_labels for it in items]).astype(np.float32))
    return batch


def read_embedding_index(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: embeddings index not found (run src/05_export_embeddings.py)")
    idx = pd.read_parquet(path)
    missing = {STUDY, SOP, "slice_index", "prob"} - set(idx.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    return idx.sort_values([STUDY, "slice_index"], kind="stable")


def load_split_studies(cnn_exp: str, fold: int, split: str, labels: pd.DataFrame | None = None,
                       progress: bool = True) -> list[StudySeq]:
    """All studies of ``work/embeddings/<cnn_exp>/fold<fold>/<split>``, aligned with ``labels``
    (train.csv-like rows keyed by SOPInstanceUID) when given."""
    d = paths.embeddings_dir(cnn_exp, fold, split)
    idx = read_embedding_index(d / "index.parquet")
    if labels is not None:
        # one merge instead of a lookup per study (7,000 studies × 1.8 M label rows on real data)
        cols = [SOP, IMAGE_LABEL, *EXAM_LABELS]
        idx = idx.merge(labels[cols], on=SOP, how="left", validate="one_to_one", indicator=True)
        missing = idx.loc[idx["_merge"] != "both", SOP]
        if len(missing):
            raise ValueError(f"{d}/index.parquet: {len(missing)} SOPInstanceUIDs have no labels, e.g. "
                             f"{missing.tolist()[:3]}")
    out = []
    groups = idx.groupby(STUDY, sort=True)
    for study, g in tqdm(groups, total=idx[STUDY].nunique(), desc=f"load {cnn_exp}/fold{fold}/{split}",
                         disable=not progress, leave=False):
        f = d / f"{study}.npy"
        if not f.is_file():
            raise FileNotFoundError(f"{f}: listed in {d}/index.parquet but missing")
        emb = np.load(f)
        if emb.ndim != 2 or emb.shape[0] != len(g):
            raise ValueError(f"{f}: shape {emb.shape} but the index lists {len(g)} slices")
        item = StudySeq(str(study), g[SOP].to_numpy(dtype=object), emb, g["prob"].to_numpy(np.float32))
        if labels is not None:
            item.image_labels = g[IMAGE_LABEL].to_numpy(np.float32)
            item.exam_labels = g.iloc[0][list(EXAM_LABELS)].to_numpy(np.float32)
        out.append(item)
    return out


def available_folds(cnn_exp: str, split: str = "train") -> list[int]:
    """Folds k >= 0 with an exported ``work/embeddings/<cnn_exp>/fold<k>/<split>/index.parquet``."""
    root = paths.work_dir() / "embeddings" / cnn_exp
    folds = []
    for p in root.glob("fold*"):
        m = re.fullmatch(r"fold(-?\d+)", p.name)
        if m and int(m.group(1)) >= 0 and (p / split / "index.parquet").is_file():
            folds.append(int(m.group(1)))
    return sorted(folds)


def load_fold_data(cfg: SeqConfig, fold: int, labels: pd.DataFrame) -> tuple[list[StudySeq], list[StudySeq]]:
    """(train studies = OOF embeddings of every fold != ``fold``, validation studies of ``fold``).

    Guards against leakage: every study appears once across the folds, and when a folds file exists
    each embeddings folder holds exactly its fold's studies.
    """
    folds = export_folds(cfg, fold, "embeddings")
    per_fold = {j: load_split_studies(cfg.cnn_exp, j, "train", labels, cfg.progress) for j in folds}
    check_fold_membership(cfg, per_fold, "embeddings")
    train = [it for j in folds if j != fold for it in per_fold[j]]
    if cfg.train_probs not in ("embeddings", "oof"):
        raise ValueError(f"train_probs must be 'embeddings' or 'oof', got {cfg.train_probs!r}")
    if uses_fold_model(cfg):
        fit = check_fit_studies(cfg, fold, train, load_split_studies(cfg.cnn_exp, fold, "train_fit", labels,
                                                                     cfg.progress))
        train = with_oof_probs(fit, train, cfg.cnn_exp, fold) if cfg.train_probs == "oof" else fit
    elif cfg.train_probs == "oof":
        raise ValueError(f"{cfg.name}: train_probs=oof replaces fold_model's in-sample probabilities; with "
                         "train_embeddings=oof the training probabilities are out-of-fold already")
    return train, per_fold[fold]


def with_oof_probs(fit: list[StudySeq], oof: list[StudySeq], cnn_exp: str, fold: int) -> list[StudySeq]:
    """Fold ``fold``'s in-sample training studies (``fit``) carrying the out-of-fold CNNs' slice
    probabilities of the same slices instead of their own (``SeqConfig.train_probs = oof``)."""
    by_study = {it.study: it for it in oof}
    out = []
    for it in fit:
        o = by_study[it.study]  # check_fit_studies has matched the study sets
        if len(o.sops) != len(it.sops) or (o.sops != it.sops).any():
            raise ValueError(f"{paths.embeddings_dir(cnn_exp, fold, 'train_fit')}: study {it.study} lists other "
                             "slices (or another order) than its out-of-fold export")
        out.append(StudySeq(it.study, it.sops, it.emb, o.probs, it.image_labels, it.exam_labels))
    return out


def export_folds(cfg: Any, fold: int, what: str) -> list[int]:
    """The folds of ``cfg.cnn_exp``'s training export (``what``: "embeddings" or "maps", for the errors),
    checked: ``cfg.cnn_exp`` set, ``fold`` among them, at least two of them."""
    if not cfg.cnn_exp:
        raise ValueError(f"{cfg.name}: cnn_exp (the stage-1 experiment whose {what} are read) is not set")
    folds = available_folds(cfg.cnn_exp, "train")
    if fold not in folds:
        raise FileNotFoundError(f"{paths.embeddings_dir(cfg.cnn_exp, fold, 'train')}: no exported {what} "
                                f"for fold {fold} (found folds {folds})")
    if len(folds) < 2:
        raise ValueError(f"stage 2 needs OOF {what} of at least two folds of {cfg.cnn_exp}, found {folds}")
    return folds


def check_fold_membership(cfg: Any, per_fold: dict[int, list[Any]], what: str) -> None:
    """No leak between the folds' exports: every study in one fold's export only, and, when a folds file
    exists (``cfg.folds_path`` or the work folder's), in the fold that file gives it."""
    seen: dict[str, int] = {}
    for j, items in per_fold.items():
        for it in items:
            if it.study in seen:
                raise ValueError(f"study {it.study} is in the {what} of folds {seen[it.study]} and {j}")
            seen[it.study] = j
    fpath = Path(cfg.folds_path) if cfg.folds_path else paths.folds_path()
    if not fpath.is_file():
        return
    # read directly (not pe.data.folds.load_folds, whose sklearn import costs seconds per process)
    fdf = pd.read_csv(fpath, dtype={STUDY: str})
    if not {STUDY, "fold"} <= set(fdf.columns):
        raise ValueError(f"{fpath}: expected columns StudyInstanceUID, fold; got {list(fdf.columns)}")
    expected = dict(zip(fdf[STUDY], fdf["fold"].astype(int), strict=True))
    wrong = [s for s, j in seen.items() if expected.get(s) != j]
    if wrong:
        raise ValueError(f"{len(wrong)} studies are exported under a fold other than theirs in {fpath}, "
                         f"e.g. {wrong[:3]}: the {what} would leak")


def uses_fold_model(cfg: Any) -> bool:
    """Whether a stage-2 config trains fold k on fold k's own CNN export of its training studies
    (``train_embeddings: fold_model``; ``oof``: the other folds' out-of-fold exports)."""
    mode = getattr(cfg, "train_embeddings", "oof")
    if mode not in ("oof", "fold_model"):
        raise ValueError(f"train_embeddings must be 'oof' or 'fold_model', got {mode!r}")
    return mode == "fold_model"


def check_fit_studies(cfg: Any, fold: int, oof_train: list[Any], fit: list[Any]) -> list[Any]:
    """``fit`` (fold ``fold``'s train_fit export) after checking it holds exactly the studies of the
    training folds (``oof_train``): no validation study may leak in, none may be missing."""
    want = {it.study for it in oof_train}
    got = {it.study for it in fit}
    if got != want:
        raise ValueError(f"{paths.embeddings_dir(cfg.cnn_exp, fold, 'train_fit')}: holds {len(got)} studies, the "
                         f"training folds of fold {fold} have {len(want)} ({len(got - want)} extra, "
                         f"{len(want - got)} missing); run 05_export_embeddings.py --split train_fit")
    return fit
