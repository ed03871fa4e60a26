"""The paper's localisation metrics on data with box truth (condrea2024 Sec. IV, Tables II-V).

Every study the stage wrote is scored against its true emboli (boxes → 3D emboli in the cache frame,
:func:`pe.localize.frames.truth_labels`) with the Pu et al. cluster matching of
:func:`pe.localize.clusters.match_clusters`; pooled sensitivity / PPV / F1 come with percentile
bootstrap intervals over studies (:func:`pe.localize.clusters.pooled_scores`). Studies without an
embolus count too: each cluster predicted there is a false positive.

Rows of :func:`localization_table`: the teacher after refinement round k (filtered; Table II), the
teacher's final masks without and with the filter (Table III), and the student (Tables IV-V), each
with its mean seconds per study.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from pe import paths
from pe.localize.clusters import (
    filter_clusters,
    label_clusters,
    match_clusters,
    per_study_table,
    pooled_scores,
)
from pe.localize.frames import read_truth_boxes, truth_labels
from pe.localize.pseudo_io import PseudoMaskStore
from pe.localize.teacher_stage import TeacherStageConfig
from pe.rspect import SOP, STUDY

TABLE_COLUMNS = ["method", "studies", "emboli", "clusters", "sensitivity", "ppv", "f1", "seconds_per_study"]


class Truth:
    """Box truth of one split, rasterised per study on demand (and kept)."""

    def __init__(self, boxes_csv: str | Path, meta: pd.DataFrame) -> None:
        self.boxes = read_truth_boxes(boxes_csv)
        self.meta = meta
        self._cache: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}

    @classmethod
    def for_split(cls, split: str, boxes_csv: str | Path) -> Truth:
        cols = [STUDY, SOP, "slice_index", "rows", "columns"]
        return cls(boxes_csv, pd.read_parquet(paths.meta_path(split), columns=cols))

    def labels(self, study: str, shape: tuple[int, ...]) -> np.ndarray:
        key = (study, tuple(shape))
        if key not in self._cache:
            if shape[1] != shape[2]:
                raise ValueError(f"study {study}: cache-frame volumes are square, got {shape}")
            self._cache[key] = truth_labels(self.boxes, self.meta, study, shape[0], shape[1])
        return self._cache[key]


def score_volumes(studies: list[str], predict: Callable[[str], np.ndarray], truth: Truth) -> pd.DataFrame:
    """Per-study TP/FP/FN table of the label volumes ``predict(study)``."""
    counts = []
    for s in studies:
        pred = predict(s)
        counts.append((s, match_clusters(pred, truth.labels(s, pred.shape))))
    return per_study_table(counts)


def _row(method: str, table: pd.DataFrame, seconds: float, n_boot: int, seed: int) -> dict:
    ci = pooled_scores(table, n_boot=n_boot, seed=seed)
    return {"method": method, "studies": len(table), "emboli": int(table["n_true"].sum()),
            "clusters": int(table["n_pred"].sum()), "sensitivity": ci["sensitivity"], "ppv": ci["ppv"],
            "f1": ci["f1"], "seconds_per_study": seconds}


def _seconds(root: Path) -> float:
    t = root / "timings.csv"
    return float(pd.read_csv(t)["seconds"].mean()) if t.is_file() else float("nan")


def teacher_rows(root: Path, truth: Truth, flt_cfg: TeacherStageConfig, n_boot: int = 1000,
                 seed: int = 0) -> list[dict]:
    """Table II (filtered masks after each refinement round) and III (final, unfiltered / filtered)."""
    iters = PseudoMaskStore(root / "iters")
    studies = sorted(iters.done() & PseudoMaskStore(root / "masks").done())
    if not studies:
        return []
    maps = {s: iters.read(s)[0] for s in studies}
    rounds = max(int(m.max(initial=0)) for m in maps.values())
    secs = _seconds(root)

    def at(k: int, filtered: bool) -> Callable[[str], np.ndarray]:
        def f(s: str) -> np.ndarray:
            m = maps[s]
            lab = label_clusters((m > 0) & (m <= k))
            return filter_clusters(lab, flt_cfg.cluster_filter(m.shape[2])) if filtered else lab
        return f

    rows = [_row(f"teacher, round <= {k}, filtered", score_volumes(studies, at(k, True), truth), secs, n_boot, seed)
            for k in range(1, rounds + 1)]
    final = max(rounds, 1)
    rows.append(_row("teacher, final, unfiltered", score_volumes(studies, at(final, False), truth), secs, n_boot, seed))
    rows.append(_row("teacher, final, filtered", score_volumes(studies, at(final, True), truth), secs, n_boot, seed))
    return rows


def store_rows(method: str, root: Path, truth: Truth, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """One row for a folder with ``masks/`` (the student's, or any stage's final clusters)."""
    store = PseudoMaskStore(root / "masks")
    studies = sorted(store.done())
    if not studies:
        return []
    table = score_volumes(studies, lambda s: store.read(s)[0], truth)
    return [_row(method, table, _seconds(root), n_boot, seed)]


def format_table(rows: list[dict]) -> str:
    """The rows as a fixed-width text table (estimates with 95 % bootstrap intervals)."""
    head = f"{'method':<34} {'studies':>7} {'emboli':>6} {'clusters':>8}  {'sensitivity':<21} {'PPV':<21} {'F1':<21} {'s/study':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<34} {r['studies']:>7} {r['emboli']:>6} {r['clusters']:>8}  {str(r['sensitivity']):<21} "
                     f"{str(r['ppv']):<21} {str(r['f1']):<21} {r['seconds_per_study']:>7.2f}")
    return "\n".join(lines)


def localization_table(exp: str, split: str, boxes_csv: str | Path, flt_cfg: TeacherStageConfig | None = None,
                       n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Teacher rows (Tables II-III) and the student row (IV-V) of ``exp`` on ``split``."""
    from pe.localize.student_stage import student_dir
    from pe.localize.teacher_stage import teacher_dir

    truth = Truth.for_split(split, boxes_csv)
    rows = teacher_rows(teacher_dir(exp, split), truth, flt_cfg or TeacherStageConfig(), n_boot, seed)
    rows += store_rows("student", student_dir(exp) / split, truth, n_boot, seed)
    if not rows:
        raise FileNotFoundError(f"no teacher or student output of {exp} on {split} (run src/11_pseudo_masks.py)")
    return rows


def rows_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows with the intervals split into estimate / low / high columns (for CSV/JSON)."""
    out = []
    for r in rows:
        d = {k: r[k] for k in ("method", "studies", "emboli", "clusters", "seconds_per_study")}
        for m in ("sensitivity", "ppv", "f1"):
            d[m], d[f"{m}_low"], d[f"{m}_high"] = r[m].estimate, r[m].low, r[m].high
        out.append(d)
    return pd.DataFrame(out)

