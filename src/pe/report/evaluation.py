"""The report's numbers: one prediction set scored against the truth (raw, repaired, prior),
per-study losses, the studies chosen for the slice curves, and the record of an explained slice."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pe import rspect
from pe.eval import metric  # noqa: E402
from pe.eval.baselines import prior_predictions  # noqa: E402
from pe.eval.hierarchy import repair_long
from pe.rspect import EXAM_LABELS, ID_COLUMNS, STUDY  # noqa: E402

_EXAM_W = np.asarray(rspect.EXAM_WEIGHT_VECTOR, dtype=np.float64)
NEG_INDEX = EXAM_LABELS.index("negative_exam_for_pe")


# ------------------------------------------------------------------------------------------------
# Numbers
# ------------------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """Scorer-aligned arrays and breakdowns of one prediction set against the truth."""

    scorer: metric.Scorer
    image_probs: np.ndarray
    exam_probs: np.ndarray
    breakdowns: dict[str, dict[str, Any]] = field(default_factory=dict)
    repair_report: Any = None


def per_study_loss(scorer: metric.Scorer, image_probs: np.ndarray, exam_probs: np.ndarray) -> np.ndarray:
    """Each study's own weighted log loss (the metric restricted to that study's rows)."""
    ib = metric.bce(scorer.image_truth, image_probs) * scorer.image_weight
    num = np.bincount(scorer.image_study, weights=ib, minlength=scorer.n_studies)
    num += metric.bce(scorer.exam_truth, exam_probs) @ _EXAM_W
    den = np.bincount(scorer.image_study, weights=scorer.image_weight, minlength=scorer.n_studies) + _EXAM_W.sum()
    return num / den


def evaluate(pred: pd.DataFrame, truth: pd.DataFrame, prior: bool = True, repair: bool = True) -> Evaluation:
    """Breakdowns of ``pred`` ("oof"), of its hierarchy repair ("repaired") and of the prior baseline
    ("prior", training label means over all of ``truth``) on the studies ``pred`` covers."""
    scorer, ip, ep = metric.scorer_for(pred, truth)
    ev = Evaluation(scorer, ip, ep)
    ev.breakdowns["oof"] = metric.breakdown_arrays(scorer, ip, ep)
    ids = truth.loc[truth[STUDY].isin(pd.Index(scorer.study_ids)), list(ID_COLUMNS)]
    if repair:

        fixed, ev.repair_report = repair_long(pred, ids)
        ev.breakdowns["repaired"] = metric.score_breakdown(fixed, truth)
    if prior:
        ev.breakdowns["prior"] = metric.score_breakdown(prior_predictions(truth, ids), truth)
    return ev


def choose_studies(ev: Evaluation, losses: np.ndarray, n: int) -> list[tuple[int, str]]:
    """Indices (into scorer studies) of the best PE-positive studies and the worst studies by loss,
    ``n`` in all (half each), as (index, "best"|"worst"), without repeats."""
    order = np.argsort(losses, kind="stable")
    pe = ev.scorer.q > 0
    n_best = n // 2 if pe.any() else 0
    best = [int(i) for i in order if pe[i]][:n_best]
    worst = [int(i) for i in order[::-1] if int(i) not in best][: n - len(best)]
    return [(i, "best") for i in best] + [(i, "worst") for i in worst]


@dataclass
class ExplainedSlice:
    """One explained slice: the PE-window channel the model saw, its maps and the true boxes, all in
    the model input frame."""

    sop: str
    study: str
    fold: int
    prob: float
    image: np.ndarray  # (H, W) PE-window (G) channel of the centre slice, as fed to the model
    cam: np.ndarray  # (H, W) Grad-CAM in [0, 1]
    ig: np.ndarray | None = None  # (H, W) integrated gradients in [0, 1]
    boxes: np.ndarray | None = None  # (m, 4) x0, y0, x1, y1 in input pixels; None when unknown
    logit_drop: float | None = None  # PE logit minus the logit with the emboli filled in (fill_boxes)
