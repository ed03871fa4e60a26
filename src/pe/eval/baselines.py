"""Simple baselines that a sequence model has to beat on the same studies.

``max_aggregation_predictions``: the exam is as positive as its most suspicious slice. With
p = max_k P(PE on slice k) from the CNN:
- image rows: the CNN slice probabilities themselves;
- positive-only labels (rv/lv, location, chronicity): p · P(label | positive exam);
- negative_exam_for_pe and indeterminate: (1 - p) · P(label | negative exam);
where the conditional frequencies are counted over the training exams.
``prior_predictions``: every image gets the training images' mean label, every exam row its label's
training frequency.

``oof_baselines``: both of them out-of-fold (each fold predicted from the other folds' truth), the
rows that the ensemble's stage table and the sequence stage's summary print next to their models.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pe.eval.submission import to_long
from pe.ids import exam_row_id
from pe.rspect import EXAM_LABELS, ID_COLUMNS, IMAGE_LABEL, NEGATIVE_LABELS, POSITIVE_ONLY_LABELS, SOP, STUDY


def succession_rate(positives: Any, n: int) -> Any:
    """Laplace's rule of succession, (positives + 1) / (n + 2): a label frequency that is never
    exactly 0 or 1, so a label absent from a small training set does not cost 34.5 (the clipped
    log loss) per held-out positive. On RSPECT's 7,279 studies it moves a frequency by < 3e-4."""
    return (np.asarray(positives, dtype=np.float64) + 1.0) / (n + 2.0)


def prior_means(train_truth: pd.DataFrame) -> tuple[float, np.ndarray]:
    """(mean image label over all training images, exam label frequencies over training studies by
    :func:`succession_rate`)."""
    first = train_truth.drop_duplicates(STUDY)
    counts = first[list(EXAM_LABELS)].to_numpy(np.float64)
    return float(train_truth[IMAGE_LABEL].mean()), succession_rate(counts.sum(axis=0), len(counts))


def prior_predictions(train_truth: pd.DataFrame, target_ids: pd.DataFrame) -> pd.DataFrame:
    """The prior baseline as a long ``id,label`` frame for the images and studies of ``target_ids``
    (columns StudyInstanceUID, SOPInstanceUID): every image gets the mean image label of the training
    images, every exam row the mean of its label over the training studies."""
    img_mean, exam_means = prior_means(train_truth)
    image_df = pd.DataFrame({SOP: target_ids[SOP].to_numpy(), IMAGE_LABEL: img_mean})
    studies = pd.unique(target_ids[STUDY])
    exam_df = pd.DataFrame(np.tile(exam_means, (len(studies), 1)), columns=list(EXAM_LABELS))
    exam_df.insert(0, STUDY, studies)
    return to_long(image_df, exam_df)


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
    :func:`succession_rate` (an empty group gives 0.5)."""
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


def oof_baselines(truth: pd.DataFrame, fold_of: pd.Series, cnn_probs: pd.DataFrame | None = None,
                  folds: list[int] | None = None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Out-of-fold prior and CNN max-aggregation predictions for the studies of ``fold_of``
    (StudyInstanceUID -> fold): each fold's studies are predicted from the truth of the others.
    ``folds`` limits the predicted folds (default all); the training truth is always every other fold.

    ``cnn_probs`` (StudyInstanceUID, SOPInstanceUID, prob) gives the max-aggregation baseline; it is
    None when ``cnn_probs`` is None or does not cover every study.
    """
    studies = set(fold_of.index)
    predict = sorted(pd.unique(fold_of)) if folds is None else sorted(folds)
    targets = set(fold_of.index[fold_of.isin(predict)])
    ids_df = truth.loc[truth[STUDY].isin(targets), list(ID_COLUMNS)]
    covered = cnn_probs is not None and targets <= set(cnn_probs[STUDY])
    priors, maxaggs = [], []
    for k in predict:
        val = set(fold_of.index[fold_of == k])
        train_truth = truth[truth[STUDY].isin(studies - val)]
        priors.append(prior_predictions(train_truth, ids_df[ids_df[STUDY].isin(val)]))
        if covered:
            maxaggs.append(max_aggregation_predictions(cnn_probs[cnn_probs[STUDY].isin(val)], train_truth))
    prior = pd.concat(priors, ignore_index=True)
    return prior, pd.concat(maxaggs, ignore_index=True) if covered else None
