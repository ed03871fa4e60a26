"""Prediction files on disk, and the one reader of each, shared by the ensemble, the report, the
benchmark and the kernel.

- ``oof/<exp>/fold<k>.csv`` / ``test_fold<k>.csv``: a sequence member's OOF / test predictions
  (``id,label``, submission-shaped); ``oof/<exp>/oof.csv``: an ensemble's OOF predictions.
- ``oof/<cnn_exp>/cnn_fold<k>.parquet``: the CNN's OOF slice probabilities.
- ``work/models/<exp>/fold<k>/config.yaml``: which CNN experiment a sequence model was trained on.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pe import paths, rspect

_FOLD_FILE = re.compile(r"fold(\d+)\.csv")
_TEST_FOLD_FILE = re.compile(r"test_fold(\d+)\.csv")


class PredictionFileError(ValueError):
    """A prediction file that is missing or malformed (columns, duplicated ids, labels outside [0, 1])."""


def read_long(path: str | Path) -> pd.DataFrame:
    """Read one ``id,label`` CSV, checking columns, duplicates and label range; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise PredictionFileError(f"{p}: file not found")
    df = pd.read_csv(p, dtype={"id": str})
    if list(df.columns) != list(rspect.SUBMISSION_COLUMNS):
        raise PredictionFileError(f"{p}: expected columns {list(rspect.SUBMISSION_COLUMNS)}, got {list(df.columns)}")
    dup = df["id"][df["id"].duplicated()]
    if len(dup):
        raise PredictionFileError(f"{p}: {len(dup)} duplicated id(s), first {list(dup.iloc[:3])}")
    lab = df["label"].to_numpy(dtype=float)
    bad = ~np.isfinite(lab) | (lab < 0) | (lab > 1)
    if bad.any():
        raise PredictionFileError(f"{p}: {int(bad.sum())} label(s) not finite in [0, 1], first id {df['id'][bad].iloc[0]}")
    return df


def member_fold_files(exp_dir: Path, test: bool = False) -> dict[int, Path]:
    """``{fold: path}`` of ``fold<k>.csv`` (OOF) or ``test_fold<k>.csv`` (test) in ``exp_dir``."""
    pattern = _TEST_FOLD_FILE if test else _FOLD_FILE
    files = {}
    for p in sorted(Path(exp_dir).glob("*.csv")):
        m = pattern.fullmatch(p.name)
        if m:
            files[int(m.group(1))] = p
    return files


def read_member_oof(exp_dir: str | Path) -> pd.DataFrame:
    """All OOF fold files of one member: columns ``id, label, fold``; every id exactly once."""
    exp_dir = Path(exp_dir)
    files = member_fold_files(exp_dir)
    if not files:
        raise PredictionFileError(f"{exp_dir}: no OOF files fold<k>.csv found")
    parts = []
    for fold, p in files.items():
        df = read_long(p)
        df["fold"] = fold
        parts.append(df)
    out = pd.concat(parts, ignore_index=True)
    dup = out["id"][out["id"].duplicated()]
    if len(dup):
        raise PredictionFileError(f"{exp_dir}: {len(dup)} id(s) predicted in more than one fold file, first {list(dup.iloc[:3])}")
    return out


def cnn_exp_of(exp: str) -> str | None:
    """The stage-1 CNN experiment behind ``exp``: ``cnn_exp`` in the run config of ``exp`` (a sequence
    experiment) or, for an ensemble, of the members listed in its ``weights.json``; None when nothing says."""
    candidates = [exp]
    wfile = paths.exp_oof_dir(exp) / "weights.json"
    if wfile.is_file():
        try:
            candidates = list(json.loads(wfile.read_text()).get("members", [])) + candidates
        except (ValueError, AttributeError):
            pass
    for name in candidates:
        for cfg_file in sorted((paths.models_dir() / name).glob("fold*/config.yaml")):
            try:
                value = (yaml.safe_load(cfg_file.read_text()) or {}).get("cnn_exp")
            except yaml.YAMLError:
                value = None
            if value:
                return str(value)
    return None


def read_cnn_oof(cnn_exp: str, oof_root: Path | None = None) -> pd.DataFrame | None:
    """Stage-1 slice probabilities of all folds (``<oof_root>/<cnn_exp>/cnn_fold<k>.parquet``, the root
    ``paths.oof_dir()`` by default; another run's, e.g. a demo trial's, when given), or None."""
    files = sorted(((oof_root or paths.oof_dir()) / cnn_exp).glob("cnn_fold[0-9]*.parquet"))
    if not files:
        return None
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def read_predictions(exp: str) -> pd.DataFrame:
    """OOF predictions of an experiment: ``oof/<exp>/oof.csv`` (an ensemble) or the union of its
    ``fold<k>.csv`` files (a sequence model); each id once."""
    d = paths.exp_oof_dir(exp)
    if (d / "oof.csv").is_file():
        return read_long(d / "oof.csv")
    if not member_fold_files(d):
        raise FileNotFoundError(f"{d}: no oof.csv and no fold<k>.csv OOF prediction files")
    return read_member_oof(d).drop(columns="fold")
