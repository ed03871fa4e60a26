"""Synthetic calibrated predictions and their truth, for tests and benchmarks of the metric, the
hierarchy repair and the ensemble (no images involved)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pe import rspect
from pe.rspect import EXAM_LABELS, IMAGE_LABEL, SOP, STUDY


# ------------------------------------------------------------------------------------------------
# Synthetic calibrated predictions (tests and benchmarks)
# ------------------------------------------------------------------------------------------------
def synthetic_calibrated(n_exams: int, seed: int = 0, *, min_images: int = 60, max_images: int = 430,
                         noise: float = 0.0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """A train.csv-shaped truth obeying the label hierarchy and predictions calibrated to it.

    Per exam latent probabilities are drawn first; the truth is drawn from them in hierarchy order
    (PE positivity; then negative/indeterminate or rv_lv, locations, chronicity and a band of
    positive images), and the predictions are the exact marginal probabilities of each label under
    that generator (``noise`` > 0 adds Gaussian noise of that scale in logit space, making them only
    noisily calibrated). Returns (truth, image_pred_df, exam_pred_df) with the wide columns of
    :mod:`pe.eval.submission`. Fully vectorised: 7,279 exams x 245 images take about a second.
    """
    rng = np.random.default_rng(seed)
    n = n_exams
    n_img = rng.integers(min_images, max_images + 1, size=n)
    study = np.array([f"{i:012x}" for i in range(n)], dtype=object)
    code = np.repeat(np.arange(n), n_img)
    start = np.concatenate([[0], np.cumsum(n_img)[:-1]])
    pos_in = (np.arange(code.size) - start[code]) / n_img[code]  # relative slice position in [0, 1)

    # latent probabilities: about a third of exams carry PE, most predictions are confident
    pi_pe = rng.beta(0.6, 1.2, size=n)
    pi_ind = rng.beta(0.5, 12.0, size=n)
    pi_rv = rng.beta(1.0, 1.5, size=n)
    pi_c, pi_r, pi_l = rng.beta(1.0, 2.0, size=n), rng.beta(2.0, 1.0, size=n), rng.beta(2.0, 1.0, size=n)
    pi_ch, pi_ac = rng.beta(0.5, 6.0, size=n) / 2, rng.beta(0.5, 6.0, size=n) / 2
    centre, width, peak = rng.uniform(0.2, 0.8, n), rng.uniform(0.05, 0.3, n), rng.beta(6.0, 2.0, n)
    r_img = peak[code] * np.exp(-(((pos_in - centre[code]) / width[code]) ** 2))  # P(image | PE exam)

    pe = rng.random(n) < pi_pe
    ind = ~pe & (rng.random(n) < pi_ind)
    gte = pe & (rng.random(n) < pi_rv)
    right = pe & (rng.random(n) < pi_r)
    left = pe & (rng.random(n) < pi_l)
    central = pe & ((rng.random(n) < pi_c) | (~right & ~left))  # a PE exam has at least one location
    u = rng.random(n)
    chronic = pe & (u < pi_ch)
    a_and_c = pe & (u >= pi_ch) & (u < pi_ch + pi_ac)
    img = pe[code] & (rng.random(code.size) < r_img)
    # a PE exam has at least one positive image: force its most likely slice when none was drawn
    n_pos = np.bincount(code, weights=img, minlength=n)
    mx = np.full(n, -np.inf)
    np.maximum.at(mx, code, r_img)
    need = pe & (n_pos == 0)
    cand = np.flatnonzero(need[code] & (r_img == mx[code]))
    _, first = np.unique(code[cand], return_index=True)
    img[cand[first]] = True

    exam_truth = {
        "negative_exam_for_pe": ~pe & ~ind, "indeterminate": ind, "chronic_pe": chronic,
        "acute_and_chronic_pe": a_and_c, "central_pe": central, "leftsided_pe": left, "rightsided_pe": right,
        "rv_lv_ratio_gte_1": gte, "rv_lv_ratio_lt_1": pe & ~gte,
    }
    exam_pred = {
        "negative_exam_for_pe": (1 - pi_pe) * (1 - pi_ind), "indeterminate": (1 - pi_pe) * pi_ind,
        "chronic_pe": pi_pe * pi_ch, "acute_and_chronic_pe": pi_pe * pi_ac,
        "central_pe": pi_pe * (pi_c + (1 - pi_c) * (1 - pi_r) * (1 - pi_l)),
        "leftsided_pe": pi_pe * pi_l, "rightsided_pe": pi_pe * pi_r,
        "rv_lv_ratio_gte_1": pi_pe * pi_rv, "rv_lv_ratio_lt_1": pi_pe * (1 - pi_rv),
    }
    img_pred = pi_pe[code] * r_img
    if noise > 0:
        def jitter(p: np.ndarray) -> np.ndarray:
            p = np.clip(p, 1e-6, 1 - 1e-6)
            z = np.log(p / (1 - p)) + rng.normal(0.0, noise, size=p.shape)
            return 1.0 / (1.0 + np.exp(-z))
        img_pred = jitter(img_pred)
        exam_pred = {k: jitter(v) for k, v in exam_pred.items()}

    sop = np.array([f"{i + (1 << 44):012x}" for i in range(code.size)], dtype=object)
    truth = pd.DataFrame({STUDY: study[code], "SeriesInstanceUID": study[code], SOP: sop,
                          IMAGE_LABEL: img.astype(np.int64)})
    for label in rspect.TRAIN_COLUMNS[4:]:
        values = exam_truth.get(label, np.zeros(n, dtype=bool))
        truth[label] = values.astype(np.int64)[code]
    truth = truth[list(rspect.TRAIN_COLUMNS)]
    image_df = pd.DataFrame({STUDY: study[code], SOP: sop, IMAGE_LABEL: img_pred})
    exam_df = pd.DataFrame({STUDY: study, **{k: exam_pred[k] for k in EXAM_LABELS}})
    return truth, image_df, exam_df
