"""The competition metric (weighted log loss), its breakdown, a torch loss with the same definition,
and the prior baseline. Weights, label names and the clip come from :mod:`pe.rspect` only.

Definition (shared/RSPECT.md): every image row weighs ``IMAGE_WEIGHT * q_i`` where ``q_i`` is the
share of positive images in its exam *in the truth*; every exam row weighs its label's entry of
``EXAM_WEIGHT_VECTOR``; score = sum(weight * BCE) / sum(weight) over all rows of all scored exams,
with predictions clipped to [CLIP_EPS, 1 - CLIP_EPS]. An exam without positive images contributes
nothing through its image rows.

Note on the clip: 1 - 1e-15 is not a float64; it rounds to 1 - 9.992e-16, so a confident wrong 1.0
costs -ln(9.992e-16) = 34.5396 rather than -ln(1e-15) = 34.5388, exactly as numpy's clip + log do.

API: :func:`score` / :func:`score_breakdown` / :func:`format_breakdown` on long ``id,label`` frames
against train.csv-shaped truth (only the studies present in the prediction are scored);
:class:`Scorer` for repeated scoring (ids resolved once; ``Scorer.score(image_probs, exam_probs)``
then costs two vectorised logs and two dot products, for the ensemble optimiser);
:func:`torch_metric_loss` for training; :func:`prior_predictions` for the prior baseline;
:func:`synthetic_calibrated` for tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pe import rspect
from pe.ids import exam_ids, first_ids, match_ids, to_arrow_strings
from pe.rspect import CLIP_EPS, EXAM_LABELS, IMAGE_LABEL, IMAGE_WEIGHT, SOP, STUDY, THRESHOLD

_EXAM_W = np.asarray(rspect.EXAM_WEIGHT_VECTOR, dtype=np.float64)


def bce(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Element-wise binary cross-entropy with the competition's clip (y may be soft)."""
    p = np.clip(np.asarray(p, dtype=np.float64), CLIP_EPS, 1.0 - CLIP_EPS)
    y = np.asarray(y, dtype=np.float64)
    return -(y * np.log(p) + (1.0 - y) * np.log1p(-p))


# ------------------------------------------------------------------------------------------------
# Scorer: truth resolved once
# ------------------------------------------------------------------------------------------------
class Scorer:
    """The metric against fixed truth, with ids resolved once.

    ``truth`` is train.csv-shaped (one row per image, exam labels repeated on every row of a study).
    ``study_ids`` restricts scoring to these studies (default: all studies of ``truth``).

    Attributes aligned to the scorer's own order: ``image_ids`` (SOPInstanceUID per image row),
    ``image_study`` (index into ``study_ids`` per image), ``study_ids``; ``exam_ids`` is the
    (n_studies, 9) array of submission ids ``<study>_<label>`` in ``EXAM_LABELS`` order.
    ``score(image_probs, exam_probs)`` takes arrays in exactly that order.
    """

    def __init__(self, truth: pd.DataFrame, study_ids: Sequence[str] | np.ndarray | None = None) -> None:
        need = [STUDY, SOP, IMAGE_LABEL, *EXAM_LABELS]
        missing = [c for c in need if c not in truth.columns]
        if missing:
            raise ValueError(f"truth frame lacks columns: {missing}")
        if study_ids is not None:
            keep = truth[STUDY].isin(pd.Index(study_ids))
            unknown = pd.Index(study_ids).difference(pd.Index(truth.loc[keep, STUDY].unique()))
            if len(unknown):
                raise ValueError(f"{len(unknown)} studies not in truth, e.g. {first_ids(unknown)}")
            truth = truth.loc[keep]
        codes, uniques = pd.factorize(truth[STUDY], sort=False)
        self._init_arrays(
            image_ids=to_arrow_strings(truth[SOP]),
            image_study=codes.astype(np.int64),
            study_ids=np.asarray(uniques, dtype=object),
            image_truth=truth[IMAGE_LABEL].to_numpy(dtype=np.float64),
            exam_rows=truth[list(EXAM_LABELS)].to_numpy(dtype=np.float64),
        )

    def _init_arrays(self, image_ids: pa.Array, image_study: np.ndarray, study_ids: np.ndarray,
                     image_truth: np.ndarray, exam_rows: np.ndarray | None = None,
                     exam_truth: np.ndarray | None = None) -> None:
        n = len(study_ids)
        # ids stay an Arrow array (cheap to build, hash and filter); numpy copies are made on demand
        self._image_ids_pa = image_ids
        self._image_ids_np: np.ndarray | None = None
        self.image_study = image_study
        self.study_ids = study_ids
        self.image_truth = image_truth
        if pd.isna(image_truth).any():
            raise ValueError("truth has missing pe_present_on_image values")
        counts = np.bincount(image_study, minlength=n).astype(np.float64)
        if exam_truth is None:
            assert exam_rows is not None
            if np.isnan(exam_rows).any():
                raise ValueError("truth has missing exam label values")
            # exam labels are repeated on every image row: one row gives the exam's value, and the
            # per-study sums must equal value * count or the truth file is inconsistent.
            first = np.zeros((n, len(EXAM_LABELS)))
            first_idx = np.zeros(n, dtype=np.int64)
            rows = np.arange(len(image_study))
            # any one row per study (which one a repeated-index write keeps does not matter: the
            # sum check below rejects a study whose rows disagree)
            first_idx[image_study] = rows
            first[:] = exam_rows[first_idx]
            for j in range(len(EXAM_LABELS)):
                sums = np.bincount(image_study, weights=exam_rows[:, j], minlength=n)
                bad = ~np.isclose(sums, first[:, j] * counts)
                if bad.any():
                    raise ValueError(f"truth: {EXAM_LABELS[j]} differs between images of {bad.sum()} "
                                     f"studies, e.g. {first_ids(study_ids[bad])}")
            exam_truth = first
        self.exam_truth = exam_truth
        self.n_images_per_study = counts
        pos = np.bincount(image_study, weights=image_truth, minlength=n)
        self.q = np.divide(pos, counts, out=np.zeros(n), where=counts > 0)
        self.image_weight = IMAGE_WEIGHT * self.q[image_study]
        self.total_weight = float(self.image_weight.sum() + n * _EXAM_W.sum())
        self.exam_ids = exam_ids(study_ids)

    # -- sizes and ids ---------------------------------------------------------------------------
    @property
    def n_studies(self) -> int:
        return len(self.study_ids)

    @property
    def n_images(self) -> int:
        return len(self._image_ids_pa)

    @property
    def image_ids(self) -> np.ndarray:
        """SOPInstanceUID of every image row (object array, scorer order)."""
        if self._image_ids_np is None:
            self._image_ids_np = self._image_ids_pa.to_numpy(zero_copy_only=False).astype(object)
        return self._image_ids_np

    @property
    def all_ids(self) -> np.ndarray:
        """Submission ids in scorer order: every image row, then the exam rows study by study."""
        return np.concatenate([self.image_ids, self.exam_ids.ravel()])

    def _all_ids_arrow(self) -> pa.Array:
        return pa.concat_arrays([self._image_ids_pa, to_arrow_strings(self.exam_ids.ravel())])

    def subset(self, study_mask: np.ndarray) -> Scorer:
        """A scorer over the studies where ``study_mask`` (aligned to ``study_ids``) is True."""
        study_mask = np.asarray(study_mask, dtype=bool)
        new_code = np.cumsum(study_mask) - 1
        keep = study_mask[self.image_study]
        out = object.__new__(Scorer)
        out._init_arrays(
            image_ids=self._image_ids_pa.filter(pa.array(keep)), image_study=new_code[self.image_study[keep]],
            study_ids=self.study_ids[study_mask], image_truth=self.image_truth[keep],
            exam_truth=self.exam_truth[study_mask])
        return out

    # -- aligning a long prediction frame --------------------------------------------------------
    def align(self, pred: pd.DataFrame, *, allow_extra: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(image_probs, exam_probs (n_studies, 9)) from a long ``id,label`` frame in scorer order.

        Raises ValueError when an id of a scored study is missing, an id is duplicated, or (unless
        ``allow_extra``) the frame holds ids this scorer does not know.
        """
        _check_pred_columns(pred)
        found = match_ids(pred["id"], self._all_ids_arrow())
        if (found < 0).any():
            miss = self.all_ids[found < 0]
            raise ValueError(f"prediction lacks {len(miss)} ids of the scored studies, e.g. {first_ids(miss)}")
        if not allow_extra and len(pred) > len(found):
            _raise_extra(pred, found)
        labels = _pred_labels(pred)[found]
        return labels[: self.n_images], labels[self.n_images:].reshape(self.n_studies, len(EXAM_LABELS))

    # -- the metric ------------------------------------------------------------------------------
    def _check_shapes(self, image_probs: np.ndarray, exam_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ip = np.asarray(image_probs, dtype=np.float64)
        ep = np.asarray(exam_probs, dtype=np.float64)
        if ip.shape != (self.n_images,):
            raise ValueError(f"image_probs has shape {ip.shape}, expected ({self.n_images},)")
        if ep.shape != (self.n_studies, len(EXAM_LABELS)):
            raise ValueError(f"exam_probs has shape {ep.shape}, expected ({self.n_studies}, {len(EXAM_LABELS)})")
        return ip, ep

    def score(self, image_probs: np.ndarray, exam_probs: np.ndarray) -> float:
        """Weighted log loss of the aligned predictions (lower is better)."""
        ip, ep = self._check_shapes(image_probs, exam_probs)
        num = float(self.image_weight @ bce(self.image_truth, ip)) + float((bce(self.exam_truth, ep) @ _EXAM_W).sum())
        return num / self.total_weight

    def label_losses(self, image_probs: np.ndarray, exam_probs: np.ndarray) -> dict[str, dict[str, float]]:
        """Per label: ``loss`` (its contribution to the score; they sum to the score), ``weight``
        (its share of the total weight; they sum to 1) and ``mean_bce`` (unweighted)."""
        ip, ep = self._check_shapes(image_probs, exam_probs)
        out: dict[str, dict[str, float]] = {}
        bi = bce(self.image_truth, ip)
        out[IMAGE_LABEL] = dict(loss=float(self.image_weight @ bi) / self.total_weight,
                                weight=float(self.image_weight.sum()) / self.total_weight,
                                mean_bce=float(bi.mean()) if len(bi) else float("nan"))
        be = bce(self.exam_truth, ep)
        for j, label in enumerate(EXAM_LABELS):
            out[label] = dict(loss=float(_EXAM_W[j] * be[:, j].sum()) / self.total_weight,
                              weight=float(_EXAM_W[j] * self.n_studies) / self.total_weight,
                              mean_bce=float(be[:, j].mean()) if self.n_studies else float("nan"))
        return out

    def score_long(self, pred: pd.DataFrame) -> float:
        return self.score(*self.align(pred))


def _check_pred_columns(pred: pd.DataFrame) -> None:
    if not {"id", "label"} <= set(pred.columns):
        raise ValueError(f"prediction must have columns id,label; got {list(pred.columns)}")


def _raise_extra(pred: pd.DataFrame, found: np.ndarray) -> None:
    extra = np.ones(len(pred), dtype=bool)
    extra[found[found >= 0]] = False
    ids = pred["id"].to_numpy()[extra]
    raise ValueError(f"prediction has {extra.sum()} ids not in the truth, e.g. {first_ids(ids)}")


def _pred_labels(pred: pd.DataFrame) -> np.ndarray:
    labels = pd.to_numeric(pred["label"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(labels)
    if bad.any():
        ids = pred["id"].to_numpy()[bad]
        raise ValueError(f"prediction has {bad.sum()} non-numeric or non-finite labels, e.g. ids {first_ids(ids)}")
    return labels


def scorer_for(pred: pd.DataFrame, truth: pd.DataFrame) -> tuple[Scorer, np.ndarray, np.ndarray]:
    """The scorer over the studies present in ``pred`` (by any image or exam id) and the aligned
    prediction arrays. Raises ValueError naming ids for missing, duplicated or unknown ids."""
    _check_pred_columns(pred)
    full = Scorer(truth)
    labels_all = _pred_labels(pred)
    found = match_ids(pred["id"], full._all_ids_arrow())
    hit = found >= 0
    # every truth row belongs to a study: images by image_study, exam rows by their row number
    row_study = np.concatenate([full.image_study, np.repeat(np.arange(full.n_studies), len(EXAM_LABELS))])
    present = np.bincount(row_study, weights=hit, minlength=full.n_studies) > 0
    if not present.any():
        raise ValueError("prediction shares no id with the truth")
    miss = present[row_study] & ~hit
    if miss.any():
        raise ValueError(f"prediction lacks {miss.sum()} ids of the studies it covers, "
                         f"e.g. {first_ids(full.all_ids[miss])}")
    if hit.sum() < len(pred):
        _raise_extra(pred, found)
    sub = full.subset(present)
    keep = present[row_study]
    labels = labels_all[found[keep]]
    return sub, labels[: sub.n_images], labels[sub.n_images:].reshape(sub.n_studies, len(EXAM_LABELS))


def score(pred: pd.DataFrame, truth: pd.DataFrame) -> float:
    """Competition score of a submission-shaped ``pred`` (id,label) against train.csv-shaped ``truth``.

    Only studies present in ``pred`` are scored; each of them must have all its ids (ValueError
    names the missing ones otherwise).
    """
    scorer, ip, ep = scorer_for(pred, truth)
    return scorer.score(ip, ep)


# ------------------------------------------------------------------------------------------------
# Breakdown
# ------------------------------------------------------------------------------------------------
def auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC of scores ``s`` for labels ``y`` (> 0.5 = positive); NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score  # sklearn's import costs ~1 s; scoring alone never needs it

    y = np.asarray(y) > 0.5
    if y.all() or not y.any():
        return float("nan")  # AUC is undefined with one class
    return float(roc_auc_score(y, s))


def binary_stats(y: np.ndarray, pred_pos: np.ndarray) -> dict[str, float]:
    """Sensitivity, specificity, PPV, NPV, F1 and the confusion counts (NaN when undefined)."""
    y = np.asarray(y) > 0.5
    p = np.asarray(pred_pos, dtype=bool)
    tp, fp = int((y & p).sum()), int((~y & p).sum())
    fn, tn = int((y & ~p).sum()), int((~y & ~p).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    return dict(sensitivity=ratio(tp, tp + fn), specificity=ratio(tn, tn + fp), ppv=ratio(tp, tp + fp),
                npv=ratio(tn, tn + fn), f1=ratio(2 * tp, 2 * tp + fp + fn), tp=tp, fp=fp, tn=tn, fn=fn)


def breakdown_arrays(scorer: Scorer, image_probs: np.ndarray, exam_probs: np.ndarray) -> dict[str, Any]:
    """:func:`score_breakdown` for arrays aligned to ``scorer``."""
    ip, ep = scorer._check_shapes(image_probs, exam_probs)
    labels = scorer.label_losses(ip, ep)
    labels[IMAGE_LABEL]["auc"] = auc(scorer.image_truth, ip)
    labels[IMAGE_LABEL]["positives"] = int((scorer.image_truth > 0.5).sum())
    for j, label in enumerate(EXAM_LABELS):
        labels[label]["auc"] = auc(scorer.exam_truth[:, j], ep[:, j])
        labels[label]["positives"] = int((scorer.exam_truth[:, j] > 0.5).sum())
    # Study-level PE: truth "the exam has a positive image" against the score 1 - P(negative_exam_for_pe);
    # indeterminate exams (neither PE nor negative) are left out, as in papers/condrea2023 (sec. 4).
    study_pe = scorer.q > 0
    determinate = scorer.exam_truth[:, EXAM_LABELS.index("indeterminate")] < 0.5
    pe_score = 1.0 - ep[:, EXAM_LABELS.index("negative_exam_for_pe")]
    return {
        "score": float(sum(v["loss"] for v in labels.values())),
        "n_studies": scorer.n_studies,
        "n_images": scorer.n_images,
        "n_pe_studies": int(study_pe.sum()),
        "n_indeterminate_studies": int((~determinate).sum()),
        "total_weight": scorer.total_weight,
        "labels": labels,
        "study_pe_auc": auc(study_pe[determinate], pe_score[determinate]),
        "image_auc": labels[IMAGE_LABEL]["auc"],
        "exam_pe_at_0.5": binary_stats(study_pe[determinate], pe_score[determinate] > THRESHOLD),
        "image_at_0.5": binary_stats(scorer.image_truth, ip > THRESHOLD),
    }


def score_breakdown(pred: pd.DataFrame, truth: pd.DataFrame) -> dict[str, Any]:
    """Everything the reports show about a submission-shaped ``pred`` scored against ``truth``.

    Keys: ``score``; ``n_studies``, ``n_images``, ``n_pe_studies``, ``total_weight``; ``labels``:
    per label (image label first, then ``EXAM_LABELS``) ``loss`` (contribution, sums to the score),
    ``weight`` (share of total weight), ``mean_bce``, ``auc``, ``positives``; ``study_pe_auc``
    (1 - P(negative_exam_for_pe) against "the exam has a positive image", indeterminate exams left
    out, their count in ``n_indeterminate_studies``); ``image_auc``;
    ``exam_pe_at_0.5`` and ``image_at_0.5``: sensitivity, specificity, ppv, npv, f1 and counts at
    the strict 0.5 threshold. JSON-serialisable (NaN where undefined).
    """
    scorer, ip, ep = scorer_for(pred, truth)
    return breakdown_arrays(scorer, ip, ep)


def format_breakdown(bd: dict[str, Any]) -> str:
    """A fixed-width text table of :func:`score_breakdown` (the last line is ``score: <float>``)."""
    lines = [f"studies: {bd['n_studies']}  (PE positive: {bd['n_pe_studies']}, indeterminate: "
             f"{bd['n_indeterminate_studies']})   images: {bd['n_images']}",
             "",
             f"{'label':<24}{'weight':>8}{'loss':>9}{'mean BCE':>10}{'AUC':>8}{'pos':>9}",
             "-" * 68]
    for label, v in bd["labels"].items():
        lines.append(f"{label:<24}{v['weight']:>8.4f}{v['loss']:>9.4f}{v['mean_bce']:>10.4f}"
                     f"{v['auc']:>8.4f}{v['positives']:>9d}")
    lines += ["-" * 68, f"{'total':<24}{1.0:>8.4f}{bd['score']:>9.4f}", "",
              f"study-level PE AUC (1 - P(negative), indeterminate left out): {bd['study_pe_auc']:.4f}   image AUC: {bd['image_auc']:.4f}",
              "",
              f"{'at 0.5':<10}{'sens':>8}{'spec':>8}{'PPV':>8}{'NPV':>8}{'F1':>8}   tp/fp/tn/fn"]
    for name, key in (("exam PE", "exam_pe_at_0.5"), ("images", "image_at_0.5")):
        s = bd[key]
        lines.append(f"{name:<10}{s['sensitivity']:>8.4f}{s['specificity']:>8.4f}{s['ppv']:>8.4f}"
                     f"{s['npv']:>8.4f}{s['f1']:>8.4f}   {s['tp']}/{s['fp']}/{s['tn']}/{s['fn']}")
    lines += ["", f"score: {bd['score']!r}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Torch loss (training of the sequence stage)
# ------------------------------------------------------------------------------------------------
def torch_metric_loss(image_logits: Any, image_targets: Any, image_mask: Any, exam_logits: Any,
                      exam_targets: Any) -> Any:
    """The competition metric over a batch of padded exams, from logits (BCE with logits, stable).

    Shapes: image_* (B, L) with ``image_mask`` True on real slices; exam_* (B, 9) in ``EXAM_LABELS``
    order. Image rows weigh IMAGE_WEIGHT * q_i, q_i = mean of the true image labels over the valid
    slices of exam i; exam rows weigh ``EXAM_WEIGHT_VECTOR``; weighted BCE summed over the batch and
    divided by the batch's sum of weights. Returns a scalar tensor. (No 1e-15 clip: with logits the
    loss is finite anyway, and equals the clipped metric for probabilities inside the clip.)
    """
    import torch
    import torch.nn.functional as F

    valid = image_mask.bool()
    mask = valid.to(image_logits.dtype)
    targets = image_targets.to(image_logits.dtype)
    n_valid = mask.sum(dim=1).clamp_min(1.0)
    q = ((targets * mask).sum(dim=1) / n_valid).detach()  # weights come from the truth: no gradient
    img_w = IMAGE_WEIGHT * q[:, None] * mask
    img_bce = F.binary_cross_entropy_with_logits(image_logits, targets, reduction="none")
    # padded slices may hold garbage logits: zero them by weight *and* by where() so NaN cannot leak
    img_term = torch.where(valid, img_w * img_bce, torch.zeros_like(img_bce)).sum()
    ew = torch.as_tensor(_EXAM_W, dtype=exam_logits.dtype, device=exam_logits.device)
    exam_bce = F.binary_cross_entropy_with_logits(exam_logits, exam_targets.to(exam_logits.dtype), reduction="none")
    exam_term = (exam_bce * ew).sum()
    total_w = img_w.sum() + ew.sum() * exam_logits.shape[0]
    return (img_term + exam_term) / total_w


