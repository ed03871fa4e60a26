"""Cross-validation folds: one row per study, made once, saved, and checked by every later stage.

Studies (not images) are split, so no study is ever in two folds. Folds are stratified on a
per-study stratum built from the exam labels: ``neg`` (negative_exam_for_pe), ``ind``
(indeterminate) or ``pos`` refined by rv_lv_ratio_gte_1 and central_pe — the two heaviest exam
labels of the metric (RSPECT.md), so every fold sees them in the same proportion. A stratum with
fewer studies than folds is merged into its parent (pos/rv/central → pos → not-negative → all),
because StratifiedKFold cannot spread fewer than K members over K folds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from pe.rspect import STUDY

FOLD = "fold"

# Coarser stratum of each stratum, used when a stratum is too small for n_folds.
_PARENT_ROOT = "all"


def _parent(stratum: str) -> str:
    if stratum.startswith("pos|"):
        return "pos"
    if stratum in ("pos", "ind"):
        return "notneg"
    return _PARENT_ROOT


def study_strata(meta: pd.DataFrame) -> pd.Series:
    """Finest stratum of every study (index: StudyInstanceUID), from its exam labels."""
    needed = [STUDY, "negative_exam_for_pe", "indeterminate", "rv_lv_ratio_gte_1", "central_pe"]
    missing = [c for c in needed if c not in meta.columns]
    if missing:
        raise ValueError(f"metadata has no column(s) {missing}: folds need the train split's exam labels")
    studies = meta.groupby(STUDY, sort=True)[needed[1:]].first()
    if studies.isna().any().any():
        bad = studies.index[studies.isna().any(axis=1)].tolist()[:5]
        raise ValueError(f"missing exam labels for studies {bad}")
    s = studies.astype(int)
    pos = "pos|rv" + s["rv_lv_ratio_gte_1"].astype(str) + "|c" + s["central_pe"].astype(str)
    strata = np.where(s["negative_exam_for_pe"] == 1, "neg", np.where(s["indeterminate"] == 1, "ind", pos))
    return pd.Series(strata, index=studies.index, name="stratum")


def merge_small_strata(strata: pd.Series, min_count: int) -> pd.Series:
    """Move members of strata with fewer than ``min_count`` studies to the parent stratum, repeatedly;
    whatever is still too small at the root joins the largest stratum."""
    strata = strata.copy()
    while True:
        counts = strata.value_counts()
        small = [s for s, n in counts.items() if n < min_count and s != _PARENT_ROOT]
        if not small:
            break
        strata[strata.isin(small)] = strata[strata.isin(small)].map(_parent)
    counts = strata.value_counts()
    if len(counts) > 1 and counts.get(_PARENT_ROOT, min_count) < min_count:
        largest = counts.drop(_PARENT_ROOT).idxmax()
        strata[strata == _PARENT_ROOT] = largest
    return strata


def make_folds(meta: pd.DataFrame, n_folds: int = 5, seed: int = 42) -> pd.DataFrame:
    """``DataFrame(StudyInstanceUID, fold)``, one row per study, sorted by study, stratified as above."""
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    strata = merge_small_strata(study_strata(meta), n_folds)
    if len(strata) < n_folds:
        raise ValueError(f"{len(strata)} studies cannot fill {n_folds} folds")
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.full(len(strata), -1, dtype=int)
    for k, (_, val_idx) in enumerate(skf.split(np.zeros(len(strata)), strata.to_numpy())):
        fold[val_idx] = k
    return pd.DataFrame({STUDY: strata.index.to_numpy(), FOLD: fold})


def validate_folds(folds: pd.DataFrame, source: str = "folds") -> pd.DataFrame:
    """Raise ValueError naming ``source`` unless each study appears once and folds are 0..K-1."""
    missing = [c for c in (STUDY, FOLD) if c not in folds.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}")
    dup = folds[STUDY][folds[STUDY].duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"{source}: {len(dup)} study(ies) in more than one row, e.g. {dup[:3]}")
    try:
        f = folds[FOLD].astype(int)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: fold column is not integer") from e
    if (f != folds[FOLD]).any() or folds[FOLD].isna().any():
        raise ValueError(f"{source}: fold column is not integer")
    present = sorted(set(f.tolist()))
    if present != list(range(len(present))) or len(present) < 2:
        raise ValueError(f"{source}: folds must be 0..K-1 with K >= 2 and none empty, got {present}")
    out = folds[[STUDY, FOLD]].copy()
    out[FOLD] = f
    return out.reset_index(drop=True)


def load_folds(path: str | Path) -> pd.DataFrame:
    """Read and validate a folds CSV (StudyInstanceUID, fold)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: folds file not found (run src/03_make_folds.py)")
    return validate_folds(pd.read_csv(p, dtype={STUDY: str}), str(p))


def check_folds(folds: pd.DataFrame, meta: pd.DataFrame) -> None:
    """Raise ValueError unless every study of ``meta`` is in exactly one fold and no other study is."""
    folds = validate_folds(folds)
    in_meta = set(meta[STUDY].unique())
    in_folds = set(folds[STUDY])
    if in_meta - in_folds:
        raise ValueError(f"{len(in_meta - in_folds)} study(ies) of the metadata have no fold, "
                         f"e.g. {sorted(in_meta - in_folds)[:3]}")
    if in_folds - in_meta:
        raise ValueError(f"{len(in_folds - in_meta)} study(ies) in folds are not in the metadata, "
                         f"e.g. {sorted(in_folds - in_meta)[:3]}")
