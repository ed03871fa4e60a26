"""Cluster filtering and cluster-level localisation scores (condrea2024 Sec. III-B and IV).

Filtering (paper: drop clusters < 100 voxels and clusters > 160 px from the study centre at 512 px,
Euclidean 2D distance): small clusters are sporadic attributions, far ones lie outside the lungs.

Matching (Pu et al. 2023, adopted by condrea2024): a predicted cluster and a true embolus *match*
when they share at least one voxel (3D intersection). The rule implemented here:
- TP = number of true emboli intersected by at least one predicted cluster;
- FN = number of true emboli intersected by none;
- FP = number of predicted clusters intersecting no true embolus.
So one prediction touching two emboli makes both emboli TPs (and is not an FP); two predictions
touching one embolus give one TP and no FP. Sensitivity = TP / (TP + FN), PPV = TP / (TP + FP),
F1 = 2 TP / (2 TP + FP + FN). Note the consequence: one huge prediction covering every embolus
scores perfectly, so PPV must be read together with the predicted cluster sizes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage

from pe.eval.bootstrap import BootstrapCI, bootstrap_ci

CONNECTIVITY_26 = np.ones((3, 3, 3), bool)


@dataclass(frozen=True)
class ClusterFilter:
    """Size/location filter. ``max_dist_px`` is in pixels of a ``ref_size``-wide image and is scaled
    linearly to the actual width; ``min_voxels`` is absolute (scale it yourself when the in-plane
    resolution differs from the one it was chosen at). ``None`` disables a criterion."""

    min_voxels: int | None = 100
    max_dist_px: float | None = 160.0
    ref_size: int = 512

    def max_dist_for(self, width: int) -> float | None:
        return None if self.max_dist_px is None else self.max_dist_px * width / self.ref_size


def label_clusters(mask: np.ndarray) -> np.ndarray:
    """int32 3D connected components (26-connectivity) of a binary (z, y, x) mask."""
    m = np.asarray(mask)
    if m.ndim != 3:
        raise ValueError(f"mask must be (z, y, x), got shape {m.shape}")
    labels, _ = ndimage.label(m > 0, structure=CONNECTIVITY_26)
    return labels.astype(np.int32)


def relabel(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..n in order of first appearance of their value (0 stays background)."""
    values = np.unique(labels[labels > 0])
    lut = np.zeros(int(labels.max(initial=0)) + 1, np.int32)
    lut[values] = np.arange(1, len(values) + 1, dtype=np.int32)
    return lut[labels]


def filter_clusters(labels: np.ndarray, flt: ClusterFilter,
                    centre_yx: tuple[float, float] | None = None) -> np.ndarray:
    """``labels`` (z, y, x) without the clusters failing ``flt``, renumbered 1..n.

    The distance is the in-plane (2D) Euclidean distance from a cluster's centroid to ``centre_yx``
    (default: the image centre, i.e. the study centre of a centred axial series)."""
    if labels.ndim != 3:
        raise ValueError(f"labels must be (z, y, x), got shape {labels.shape}")
    ids = np.unique(labels[labels > 0])
    if len(ids) == 0:
        return np.zeros_like(labels, dtype=np.int32)
    keep = np.ones(len(ids), bool)
    if flt.min_voxels is not None:
        sizes = ndimage.sum_labels(np.ones_like(labels), labels, ids)
        keep &= sizes >= flt.min_voxels
    max_dist = flt.max_dist_for(labels.shape[2])
    if max_dist is not None:
        cy, cx = centre_yx if centre_yx is not None else ((labels.shape[1] - 1) / 2, (labels.shape[2] - 1) / 2)
        cents = np.asarray(ndimage.center_of_mass(np.ones_like(labels), labels, ids)).reshape(-1, 3)
        keep &= np.hypot(cents[:, 1] - cy, cents[:, 2] - cx) <= max_dist
    kept = np.where(np.isin(labels, ids[keep]), labels, 0)
    return relabel(kept)


@dataclass(frozen=True)
class MatchCounts:
    tp: int
    fp: int
    fn: int
    n_pred: int
    n_true: int


def match_clusters(pred: np.ndarray, true: np.ndarray) -> MatchCounts:
    """Pu et al. matching of predicted cluster labels against true embolus labels (same shape,
    int labels, 0 = background); see the module docstring for the rule."""
    if pred.shape != true.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {true.shape}")
    pred_ids = np.unique(pred[pred > 0])
    true_ids = np.unique(true[true > 0])
    both = (pred > 0) & (true > 0)
    pairs = np.unique(np.stack([pred[both], true[both]], axis=1), axis=0) if both.any() else np.zeros((0, 2), int)
    tp = len(np.unique(pairs[:, 1]))
    fp = len(pred_ids) - len(np.unique(pairs[:, 0]))
    return MatchCounts(tp=tp, fp=fp, fn=len(true_ids) - tp, n_pred=len(pred_ids), n_true=len(true_ids))


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def scores_from_counts(tp: float, fp: float, fn: float) -> dict[str, float]:
    """Sensitivity, PPV and F1 from counts (NaN where undefined, e.g. PPV without predictions)."""
    return {"sensitivity": _ratio(tp, tp + fn), "ppv": _ratio(tp, tp + fp), "f1": _ratio(2 * tp, 2 * tp + fp + fn)}


def per_study_table(counts: dict[str, MatchCounts] | Iterable[tuple[str, MatchCounts]]) -> pd.DataFrame:
    """One row per study: StudyInstanceUID, tp, fp, fn, n_pred, n_true, sensitivity, ppv, f1."""
    items = counts.items() if isinstance(counts, dict) else counts
    rows = [{"StudyInstanceUID": uid, **vars(c), **scores_from_counts(c.tp, c.fp, c.fn)} for uid, c in items]
    cols = ["StudyInstanceUID", "tp", "fp", "fn", "n_pred", "n_true", "sensitivity", "ppv", "f1"]
    return pd.DataFrame(rows, columns=cols)


def _pooled(stat: str):
    def fn(rows: np.ndarray) -> float:
        tp, fp, fn_ = rows.sum(axis=0)
        return scores_from_counts(tp, fp, fn_)[stat]
    return fn


def _nanmean(v: np.ndarray) -> float:
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def pooled_scores(table: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
                  alpha: float = 0.05) -> dict[str, BootstrapCI]:
    """Pooled sensitivity / PPV / F1 (from TP, FP, FN summed over studies) with percentile bootstrap
    intervals over studies, plus the mean of the per-study F1 (studies with undefined F1 skipped)."""
    if table.empty:
        raise ValueError("no studies to score")
    counts = table[["tp", "fp", "fn"]].to_numpy(float)
    out = {s: bootstrap_ci(counts, _pooled(s), n_boot=n_boot, seed=seed, alpha=alpha)
           for s in ("sensitivity", "ppv", "f1")}
    out["mean_study_f1"] = bootstrap_ci(table["f1"].to_numpy(float), _nanmean,
                                        n_boot=n_boot, seed=seed, alpha=alpha)
    return out


def paired_difference(table_a: pd.DataFrame | Sequence[pd.DataFrame], table_b: pd.DataFrame | Sequence[pd.DataFrame],
                      n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict[str, BootstrapCI]:
    """Pooled sensitivity / PPV / F1 of ``table_b`` minus ``table_a`` (per-study tables of
    :func:`per_study_table`) over the studies both scored, with a *paired* percentile bootstrap: each
    resample draws studies once and scores both methods on them, so the interval is that of the
    difference, narrower than two independent intervals suggest when the methods err on the same studies.
    Either side may be a list of tables (e.g. one recipe trained at several seeds): its statistic is then
    the mean over its tables of each one's pooled value (the expected score of one run), over the studies
    every table scored."""
    side_a = [table_a] if isinstance(table_a, pd.DataFrame) else list(table_a)
    side_b = [table_b] if isinstance(table_b, pd.DataFrame) else list(table_b)
    if not side_a or not side_b:
        raise ValueError("each side needs at least one per-study table")
    tables = [t.set_index("StudyInstanceUID")[["tp", "fp", "fn"]] for t in side_a + side_b]
    common = tables[0].index
    for t in tables[1:]:
        common = common.intersection(t.index)
    if common.empty:
        raise ValueError("the tables share no study")
    counts = np.hstack([t.loc[common].to_numpy(float) for t in tables])
    n_a = len(side_a)

    def diff(stat: str):
        pooled = _pooled(stat)

        def fn(rows: np.ndarray) -> float:
            values = [pooled(rows[:, 3 * i:3 * i + 3]) for i in range(len(tables))]
            return float(np.mean(values[n_a:]) - np.mean(values[:n_a]))
        return fn

    return {s: bootstrap_ci(counts, diff(s), n_boot=n_boot, seed=seed, alpha=alpha)
            for s in ("sensitivity", "ppv", "f1")}


def boxes_to_labels(shape: Sequence[int], boxes: Iterable[Sequence[float]]) -> np.ndarray:
    """True emboli as 3D labels from per-slice boxes (slice_index, x0, y0, x1, y1) in voxel units,
    x1/y1 exclusive: boxes are painted per slice and 26-connected boxes on neighbouring slices form
    one embolus (the RSPECT-augmented truth is per-slice boxes; Pu et al. count 3D emboli)."""
    mask = np.zeros(tuple(int(s) for s in shape), bool)
    for z, x0, y0, x1, y1 in boxes:
        z = int(z)
        if not 0 <= z < mask.shape[0]:
            raise ValueError(f"box slice index {z} outside a volume of {mask.shape[0]} slices")
        mask[z, max(int(np.floor(y0)), 0):int(np.ceil(y1)), max(int(np.floor(x0)), 0):int(np.ceil(x1))] = True
    return label_clusters(mask)


def cluster_table(labels: np.ndarray, score: np.ndarray | None = None) -> pd.DataFrame:
    """One row per cluster: id, voxels, 3D box (z0, y0, x0, z1, y1, x1; ends exclusive) and, given
    a probability/heat volume ``score``, its maximum and mean inside the cluster — the localisation
    output (teacher or student) as a table."""
    cols = ["cluster", "voxels", "z0", "y0", "x0", "z1", "y1", "x1", "score_max", "score_mean"]
    ids = np.unique(labels[labels > 0])
    if len(ids) == 0:
        return pd.DataFrame(columns=cols)
    if score is not None and score.shape != labels.shape:
        raise ValueError(f"score shape {score.shape} differs from labels shape {labels.shape}")
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, ids)
    slices = ndimage.find_objects(labels)
    s = np.zeros(labels.shape, np.float32) if score is None else score
    smax = ndimage.maximum(s, labels, ids)
    smean = ndimage.mean(s, labels, ids)
    rows = []
    for k, i in enumerate(ids):
        sl = slices[int(i) - 1]
        box = [sl[0].start, sl[1].start, sl[2].start, sl[0].stop, sl[1].stop, sl[2].stop]
        rows.append([int(i), int(sizes[k]), *box,
                     float("nan") if score is None else float(smax[k]),
                     float("nan") if score is None else float(smean[k])])
    return pd.DataFrame(rows, columns=cols)
