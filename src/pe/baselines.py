"""Simple baselines that a sequence model has to beat on the same studies.

``max_aggregation_predictions``: the exam is as positive as its most suspicious slice. With
p = max_k P(PE on slice k) from the CNN:
- image rows: the CNN slice probabilities themselves;
- positive-only labels (rv/lv, location, chronicity): p · P(label | positive exam);
- negative_exam_for_pe and indeterminate: (1 - p) · P(label | negative exam);
where the conditional frequencies are counted over the training exams.
(The prior baseline, training label means, is :func:`pe.metric.prior_predictions`.)
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pe.metric import succession_rate
from pe.rspect import EXAM_LABELS, NEGATIVE_LABELS, POSITIVE_ONLY_LABELS, SOP, STUDY, exam_row_id


def exam_table(truth: pd.DataFrame) -> pd.DataFrame:
    """One row per study with the nine exam labels (train.csv repeats them on every image row)."""
    missing = {STUDY, *EXAM_LABELS} - set(truth.columns)
    if missing:
        raise ValueError(f"truth table lacks columns {sorted(missing)}")
    return truth.drop_duplicates(STUDY)[[STUDY, *EXAM_LABELS]].reset_index(drop=True)


def conditional_frequencies(train_truth: pd.DataFrame) -> dict[str, float]:
    """P(label | positive exam) for positive-only labels, P(label | negative exam) for the two
    negative labels, over the training exams. An exam is positive when negative_exam_for_pe and
    indeterminate are both 0 (the hierarchy of RSPECT.md). Frequencies by
    :func:`pe.metric.succession_rate` (an empty group gives 0.5)."""
    exams = exam_table(train_truth)
    neg = (exams[list(NEGATIVE_LABELS)].sum(axis=1) > 0).to_numpy()
    out: dict[str, float] = {}
    for label in POSITIVE_ONLY_LABELS:
        out[label] = float(succession_rate(exams.loc[~neg, label].sum(), int((~neg).sum())))
    for label in NEGATIVE_LABELS:
        out[label] = float(succession_rate(exams.loc[neg, label].sum(), int(neg.sum())))
    return out


def max_aggregation_predictions(index_df: pd.DataFrame, train_truth: pd.DataFrame) -> pd.DataFrame:
    """Submission-shaped ``id,label`` for the studies of ``index_df`` (StudyInstanceUID,
    SOPInstanceUID, prob: the CNN slice probabilities), exam rows from the maximum slice probability
    and the training frequencies of ``train_truth`` (train.csv-like per-image rows)."""
    missing = {STUDY, SOP, "prob"} - set(index_df.columns)
    if missing:
        raise ValueError(f"index table lacks columns {sorted(missing)}")
    if index_df[SOP].duplicated().any():
        raise ValueError("index table lists a SOPInstanceUID twice")
    freq = conditional_frequencies(train_truth)
    p = index_df.groupby(STUDY, sort=True)["prob"].max().clip(0.0, 1.0)
    image = pd.DataFrame({"id": index_df[SOP].to_numpy(), "label": index_df["prob"].clip(0.0, 1.0).to_numpy()})
    rows_id, rows_label = [], []
    for label in EXAM_LABELS:
        scale = p if label in POSITIVE_ONLY_LABELS else 1.0 - p
        rows_id.append([exam_row_id(s, label) for s in p.index])
        rows_label.append((scale * freq[label]).to_numpy())
    exam = pd.DataFrame({"id": np.concatenate(rows_id), "label": np.concatenate(rows_label)})
    return pd.concat([image, exam], ignore_index=True)

