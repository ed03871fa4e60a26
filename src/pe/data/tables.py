"""The one reader of RSPECT's label tables (train.csv, test.csv and the truth files scored against)
and of the training labels carried by the train metadata.

Dtype policy, everywhere: the three id columns are Python ``str`` objects (``object`` dtype), not
pandas' Arrow strings, because ``isin`` / ``merge`` on Arrow strings fall back to Python loops and
the ids are matched against other tables many times; labels are numbers.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pe import paths
from pe.ids import first_ids
from pe.rspect import EXAM_LABELS, ID_COLUMNS, IMAGE_LABEL, SOP, STUDY

LABEL_COLUMNS: tuple[str, ...] = (IMAGE_LABEL, *EXAM_LABELS)


def read_table(path: str | Path, required: tuple[str, ...] = ID_COLUMNS) -> pd.DataFrame:
    """A CSV of RSPECT rows with the id dtype policy above; ValueError naming the file when it is
    missing, unreadable or lacks a ``required`` column."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    try:
        df = pd.read_csv(p, dtype={c: object for c in ID_COLUMNS})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not a readable CSV ({e})") from e
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{p}: missing column(s) {missing}")
    return df


def read_truth(path: str | Path | None = None) -> pd.DataFrame:
    """A train.csv-format label file (default ``<data_dir>/train.csv``), checked: every label column
    numeric without gaps, no SOPInstanceUID twice. Errors name the file."""
    p = Path(path) if path is not None else paths.data_dir() / "train.csv"
    df = read_table(p, (STUDY, SOP, *LABEL_COLUMNS))
    for c in LABEL_COLUMNS:
        if not pd.api.types.is_numeric_dtype(df[c]) or df[c].isna().any():
            raise ValueError(f"{p}: column {c} must be numeric without missing values")
    dup = df[SOP].duplicated()
    if dup.any():
        raise ValueError(f"{p}: {int(dup.sum())} duplicated SOPInstanceUIDs, e.g. {first_ids(df.loc[dup, SOP].to_numpy())}")
    return df


def load_train_labels() -> pd.DataFrame:
    """Per-image train labels from the train metadata (it carries every train.csv column)."""
    meta_path = paths.meta_path("train")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: train metadata not found (run src/01_parse_metadata.py)")
    cols = [STUDY, "SeriesInstanceUID", SOP, *LABEL_COLUMNS]
    meta = pd.read_parquet(meta_path)
    missing = set(cols) - set(meta.columns)
    if missing:
        raise ValueError(f"{meta_path}: missing label columns {sorted(missing)}")
    return meta[cols]
