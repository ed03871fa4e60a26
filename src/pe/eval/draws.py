"""The demo CNN judged over several phantom draws (issue 14; ``bench/demo_draws.py``).

One draw of the demo phantom moves the pooled out-of-fold slice AUC of the demo CNN by more than any
recipe change measured on it (0.736-0.910 over eight draws, the recipe unchanged), so a recipe is
compared with another over several draws, paired: the same phantom seed for both, the difference
per draw, its mean with a t-interval over draws and a two-sided sign test.

A trial folder is what ``bench/demo_cnn_trial.sh`` leaves: ``oof/demo/cnn_fold<k>.parquet`` (stage 04's
out-of-fold slice probabilities) and ``truth.csv`` (:data:`TRUTH_COLUMNS`, written from the trial's
phantom before the phantom is deleted).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from pe.data.annotations import read_boxes
from pe.data.tables import read_table, read_truth
from pe.eval.metric import auc
from pe.eval.pred_files import read_cnn_oof
from pe.rspect import IMAGE_LABEL, SOP

TRUTH_COLUMNS = (SOP, IMAGE_LABEL, "box_area")
# positives grouped by their largest embolus box, in pixels of the 512 px slice (the README's bins)
BOX_BINS = ((0, 80), (80, 160), (160, None))


def slice_truth(data_dir: str | Path) -> pd.DataFrame:
    """Per training slice of an RSPECT-layout folder with boxes: SOPInstanceUID, the image label and
    the area of its largest embolus box (NaN without a box)."""
    d = Path(data_dir)
    labels = read_truth(d / "train.csv")[[SOP, IMAGE_LABEL]]  # checked: numeric labels, no SOP twice
    boxes = read_boxes(d / "train_boxes.csv")
    area = (boxes.width * boxes.height).groupby(boxes[SOP]).max().rename("box_area")
    out = labels.merge(area, left_on=SOP, right_index=True, how="left", validate="one_to_one")
    return out[list(TRUTH_COLUMNS)]


def read_trial_truth(trial: str | Path) -> pd.DataFrame:
    """A trial's ``truth.csv``, checked: numeric labels, no SOPInstanceUID twice."""
    path = Path(trial) / "truth.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no truth file (for a trial made before the trial script kept it: "
                                f"bench/demo_draws.py truth --seed N {Path(trial)})")
    df = read_table(path, TRUTH_COLUMNS)
    if not pd.api.types.is_numeric_dtype(df[IMAGE_LABEL]) or df[IMAGE_LABEL].isna().any() \
            or df[SOP].duplicated().any():
        raise ValueError(f"{path}: {IMAGE_LABEL} must be numeric without gaps and each {SOP} listed once")
    return df


def trial_oof(trial: str | Path, truth: pd.DataFrame | None = None) -> pd.DataFrame:
    """The trial's out-of-fold slices with their truth: SOPInstanceUID, prob, label, box_area."""
    t = Path(trial)
    oof = read_cnn_oof("demo", t / "oof")  # the trial's PE_OOF_DIR; demo.yaml's experiment name
    if oof is None:
        raise FileNotFoundError(f"{t / 'oof' / 'demo'}: no cnn_fold<k>.parquet (stage 04 did not finish?)")
    oof = oof[[SOP, "prob"]]
    truth = read_trial_truth(t) if truth is None else truth
    m = oof.merge(truth, on=SOP, how="left", validate="one_to_one")
    if m[IMAGE_LABEL].isna().any():
        raise ValueError(f"{t}: {int(m[IMAGE_LABEL].isna().sum())} of {len(m)} out-of-fold slices are not in "
                         "its truth (the truth of another phantom draw?)")
    return m


def trial_figures(m: pd.DataFrame) -> dict:
    """Pooled slice AUC, slice counts and the AUC of each box-size bin's positives against every negative."""
    y = m[IMAGE_LABEL].to_numpy(dtype=float)
    out = {"pooled_auc": auc(y, m["prob"].to_numpy()), "slices": len(m), "positives": int(y.sum()), "by_box": {}}
    neg, pos = m[y == 0], m[y == 1]
    for lo, hi in BOX_BINS:
        p = pos[(pos.box_area >= lo) & ((pos.box_area < hi) if hi else True)]
        if len(p) and len(neg):
            s = np.concatenate([p["prob"].to_numpy(), neg["prob"].to_numpy()])
            out["by_box"][f"{lo}-{hi or ''}"] = (auc(np.r_[np.ones(len(p)), np.zeros(len(neg))], s), len(p))
    out["positives_without_box"] = int(pos.box_area.isna().sum())
    return out


def paired_over_draws(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict:
    """b − a per draw: mean, t-interval over draws (n − 1 degrees of freedom), wins of b, and the
    two-sided sign test over the draws that differ."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"need the same number (>= 2) of draws on both sides, got {len(a)} and {len(b)}")
    d = b - a
    n, mean, sd = len(d), float(d.mean()), float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n) if sd > 0 else 0.0
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    p_sign = float(stats.binomtest(wins, wins + losses).pvalue) if wins + losses else 1.0
    return {"n": n, "mean": mean, "sd": sd, "ci": (mean - half, mean + half), "wins": wins, "losses": losses,
            "sign_p": p_sign}
