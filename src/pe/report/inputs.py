"""What the report reads besides the predictions: slice order, CNN folds, embolus boxes and the
original image sizes they are drawn in."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd  # noqa: E402

from pe import paths
from pe.data.folds import load_folds
from pe.rspect import SOP, STUDY  # noqa: E402


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
def load_slice_order(truth: pd.DataFrame) -> pd.Series:
    """Slice position (0..n-1 in z order) per SOPInstanceUID: from the metadata table
    (``work/meta/train.parquet``) when present, else train.csv's row order within each study."""
    meta = paths.meta_path("train")
    if meta.is_file():
        m = pd.read_parquet(meta, columns=[SOP, "slice_index"])
        return m.set_index(SOP)["slice_index"]
    log.warning("%s not found: slice order taken from train.csv row order", meta)
    return pd.Series(truth.groupby(STUDY).cumcount().to_numpy(), index=truth[SOP].to_numpy())

log = logging.getLogger(__name__)


def load_embolus_boxes(data_dir: Path | None = None) -> pd.DataFrame | None:
    """``<data_dir>/train_boxes.csv`` (SOPInstanceUID, x, y, width, height in original pixels), or None
    when the data has no box annotations (the real RSPECT training set ships none)."""
    p = (data_dir or paths.data_dir()) / "train_boxes.csv"
    if not p.is_file():
        return None
    df = pd.read_csv(p, dtype={SOP: str})
    missing = [c for c in (SOP, "x", "y", "width", "height") if c not in df.columns]
    if missing:
        raise ValueError(f"{p}: missing columns {missing}")
    return df


def original_shapes() -> pd.DataFrame | None:
    """(rows, columns) of the original DICOM per SOPInstanceUID from the train metadata table."""
    meta = paths.meta_path("train")
    if not meta.is_file():
        return None
    return pd.read_parquet(meta, columns=[SOP, "rows", "columns"]).set_index(SOP)


def cnn_oof_folds(cnn_exp: str) -> pd.Series | None:
    """Validation fold per study as the CNN's own OOF files record it: a study in
    ``oof/<cnn_exp>/cnn_fold<k>.parquet`` was predicted by fold k's model, which did not train on it."""
    parts = []
    for f in sorted(paths.exp_oof_dir(cnn_exp).glob("cnn_fold[0-9]*.parquet")):
        m = re.fullmatch(r"cnn_fold(\d+)\.parquet", f.name)
        if m:
            studies = pd.read_parquet(f, columns=[STUDY])[STUDY].astype(str).unique()
            parts.append(pd.Series(int(m.group(1)), index=studies))
    if not parts:
        return None
    out = pd.concat(parts)
    dup = out.index[out.index.duplicated()]
    if len(dup):
        raise ValueError(f"{paths.exp_oof_dir(cnn_exp)}: study {dup[0]} is in the OOF files of two folds")
    return out


def study_folds() -> pd.Series | None:
    """Validation fold per study (``work/folds.csv``)."""
    p = paths.folds_path()
    if not p.is_file():
        return None

    f = load_folds(p)
    return f.set_index(STUDY)["fold"].astype(int)
