"""Label-consistency rules (rule ids of ``pe.rspect.RULES``): checking a prediction set and repairing
it at the lowest expected metric.

Wide inputs: ``image_df`` (StudyInstanceUID, pe_present_on_image[, SOPInstanceUID]) and ``exam_df``
(StudyInstanceUID + the nine ``EXAM_LABELS``, one row per study). An exam is predicted positive when
any of its images is > 0.5 (strict); a study of ``exam_df`` without image rows is negative.

Repair (:func:`repair`). The inputs are taken as calibrated beliefs p. Submitting q for a row with
weight w costs, in expectation, w * (H(p) + KL(p || q)); H(p) does not depend on q, so the price of
moving a value from p to q is w * KL(p || q) = w * (CE(p, q) - CE(p, p)) (computed with the
metric's clip). For each exam the cheapest consistent-positive and the cheapest consistent-negative
variant are priced and the cheaper is kept. Values move only as far as the boundary they must
cross: down to exactly 0.5 (0.5 is not positive) or up to ``UP = np.nextafter(0.5, 1)``; every
other value is left as it is, so a consistent input comes back bit-identical.

- negative variant: every image > 0.5 goes down to 0.5; exactly one of indeterminate /
  negative_exam_for_pe above 0.5 (the cheaper of the two single-on patterns); the seven
  positive-only labels go down to 0.5;
- positive variant: when no image is above 0.5, the cheapest image (the most probable one) goes up;
  exactly one of the rv_lv pair (cheaper single-on pattern); when no location is above 0.5 the
  cheapest one goes up; when both chronic labels are above 0.5 the cheaper one goes down;
  indeterminate and negative_exam_for_pe go down.
Ties go to the pattern with fewer changes, then to the exam's current state.

Image-row weight: the true weight IMAGE_WEIGHT * q_i needs the unknown share q_i of positive images;
it is estimated by its expectation under the beliefs, the mean of the exam's own image
probabilities, so each image row of exam i weighs IMAGE_WEIGHT * mean(p_image). The metric's
normaliser (the sum of all weights) is global and does not depend on the submitted values, so
comparing per-exam costs in absolute expected loss is exactly what minimises the expected score.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from pe import rspect
from pe.eval.submission import from_long, to_long
from pe.ids import match_ids, to_arrow_strings
from pe.rspect import CLIP_EPS, EXAM_LABELS, IMAGE_LABEL, IMAGE_WEIGHT, RULES, STUDY, THRESHOLD

UP: float = float(np.nextafter(THRESHOLD, 1.0))  # the smallest float that counts as positive
DOWN: float = THRESHOLD  # exactly 0.5 counts as not positive
RULE_IDS: tuple[str, ...] = tuple(RULES)
_W = np.asarray(rspect.EXAM_WEIGHT_VECTOR, dtype=np.float64)
_J = {label: j for j, label in enumerate(EXAM_LABELS)}
_GTE, _LT = (_J[x] for x in rspect.RV_LV_LABELS)
_LOC = [_J[x] for x in rspect.LOCATION_LABELS]
_CHR, _ACH = (_J[x] for x in rspect.CHRONICITY_LABELS)
_IND, _NEG = (_J[x] for x in rspect.NEGATIVE_LABELS)
_POS_ONLY = [_J[x] for x in rspect.POSITIVE_ONLY_LABELS]

# move cost: f(p, q_new) -> cost per unit weight of moving a value from p to q_new
MoveCost = Callable[[np.ndarray, float], np.ndarray]


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
def _arrays(image_df: pd.DataFrame, exam_df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image probs, image -> exam row index, exam probs (n, 9)) with validation."""
    for name, df, cols in (("image_df", image_df, [STUDY, IMAGE_LABEL]), ("exam_df", exam_df, [STUDY, *EXAM_LABELS])):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise ValueError(f"{name} lacks columns {missing}")
    studies = pd.Index(exam_df[STUDY].astype(str).to_numpy(dtype=object))
    if not studies.is_unique:
        raise ValueError(f"exam_df has duplicated studies, e.g. {list(studies[studies.duplicated()][:5])}")
    # encode the 1.8 M image study ids once (Arrow hashing), then map the few distinct ones
    enc = pc.dictionary_encode(to_arrow_strings(image_df[STUDY]))
    distinct = enc.dictionary.to_numpy(zero_copy_only=False)
    dict_code = studies.get_indexer(distinct) if len(distinct) else np.zeros(0, dtype=np.int64)
    if (dict_code < 0).any():
        unknown = distinct[dict_code < 0]
        raise ValueError(f"image_df has {len(unknown)} studies missing from exam_df, e.g. {list(unknown[:5])}")
    code = dict_code[enc.indices.to_numpy(zero_copy_only=False)]
    ip = image_df[IMAGE_LABEL].to_numpy(dtype=np.float64)
    ep = exam_df[list(EXAM_LABELS)].to_numpy(dtype=np.float64)
    for name, a in (("image", ip), ("exam", ep)):
        if not np.isfinite(a).all() or (a < 0).any() or (a > 1).any():
            raise ValueError(f"{name} predictions must be finite and in [0, 1]")
    return ip, code.astype(np.int64), ep


def _exam_positive(ip: np.ndarray, code: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(code, weights=ip > THRESHOLD, minlength=n) > 0


# ------------------------------------------------------------------------------------------------
# check
# ------------------------------------------------------------------------------------------------
def check_arrays(ip: np.ndarray, code: np.ndarray, ep: np.ndarray) -> np.ndarray:
    """(n_exams, 6) bool: rule broken, columns in ``RULE_IDS`` order."""
    n = len(ep)
    pos = _exam_positive(ip, code, n)
    on = ep > THRESHOLD
    broken = np.zeros((n, len(RULE_IDS)), dtype=bool)
    broken[:, 0] = pos & (on[:, _GTE].astype(int) + on[:, _LT] != 1)
    broken[:, 1] = pos & ~on[:, _LOC].any(axis=1)
    broken[:, 2] = pos & on[:, _CHR] & on[:, _ACH]
    broken[:, 3] = pos & (on[:, _IND] | on[:, _NEG])
    broken[:, 4] = ~pos & (on[:, _IND].astype(int) + on[:, _NEG] != 1)
    broken[:, 5] = ~pos & on[:, _POS_ONLY].any(axis=1)
    return broken


def check(image_df: pd.DataFrame, exam_df: pd.DataFrame) -> pd.DataFrame:
    """Per exam (``exam_df`` order): StudyInstanceUID and one bool column per rule id of
    ``rspect.RULES`` (True = the prediction set breaks that rule)."""
    ip, code, ep = _arrays(image_df, exam_df)
    out = pd.DataFrame(check_arrays(ip, code, ep), columns=list(RULE_IDS))
    out.insert(0, STUDY, exam_df[STUDY].to_numpy())
    return out


# ------------------------------------------------------------------------------------------------
# costs
# ------------------------------------------------------------------------------------------------
def _ce(p: np.ndarray, q: np.ndarray | float) -> np.ndarray:
    """Expected log loss of submitting q when the belief is p (q clipped as the metric does)."""
    q = np.clip(q, CLIP_EPS, 1.0 - CLIP_EPS)
    return -(p * np.log(q) + (1.0 - p) * np.log1p(-q))


def kl_move_cost(p: np.ndarray, q_new: float) -> np.ndarray:
    """KL(p || q_new) per unit weight: the expected-loss increase of submitting q_new instead of p.
    Clamped at 0 so float rounding can never make a move look profitable."""
    return np.maximum(_ce(p, q_new) - _ce(p, p), 0.0)


def swapped_bce_move_cost(p: np.ndarray, q_new: float) -> np.ndarray:
    """Raw BCE with target and prediction swapped, -(q_new log p + (1 - q_new) log(1 - p)): the cost
    the 1st-place post-processing ranked repairs by (see :func:`repair_bce_heuristic`)."""
    pc = np.clip(p, CLIP_EPS, 1.0 - CLIP_EPS)
    return -(q_new * np.log(pc) + (1.0 - q_new) * np.log1p(-pc))


def expected_image_row_weight(ip: np.ndarray, code: np.ndarray, n: int) -> np.ndarray:
    """Per exam, IMAGE_WEIGHT * mean image probability: the expected weight of each image row."""
    counts = np.bincount(code, minlength=n)
    sums = np.bincount(code, weights=ip, minlength=n)
    return IMAGE_WEIGHT * np.divide(sums, counts, out=np.zeros(n), where=counts > 0)


def expected_cost(image_p: np.ndarray, code: np.ndarray, exam_p: np.ndarray, image_q: np.ndarray,
                  exam_q: np.ndarray) -> np.ndarray:
    """Per exam, the expected-loss increase (absolute weighted units, before the global
    normaliser) of submitting (image_q, exam_q) when the beliefs are (image_p, exam_p); image rows
    weigh IMAGE_WEIGHT * mean(image_p) of their exam."""
    n = len(exam_p)
    wi = expected_image_row_weight(image_p, code, n)
    moved = np.flatnonzero(image_q != image_p)  # unchanged rows cost nothing: skip their logs
    p, q = image_p[moved], image_q[moved]
    img = np.bincount(code[moved], weights=np.maximum(_ce(p, q) - _ce(p, p), 0.0), minlength=n)
    exam = (np.where(exam_q != exam_p, np.maximum(_ce(exam_p, exam_q) - _ce(exam_p, exam_p), 0.0), 0.0)
            * _W).sum(axis=1)
    return wi * img + exam


# ------------------------------------------------------------------------------------------------
# repair core
# ------------------------------------------------------------------------------------------------
def _pick(cost_a: np.ndarray, changes_a: np.ndarray, cost_b: np.ndarray, changes_b: np.ndarray) -> np.ndarray:
    """True where option A wins: lower cost, then fewer changes (so a satisfied rule stays as is)."""
    return (cost_a < cost_b) | ((cost_a == cost_b) & (changes_a <= changes_b))


def _negative_variant(ip: np.ndarray, code: np.ndarray, on: np.ndarray, img_on: np.ndarray, up: np.ndarray,
                      down: np.ndarray, image_row_weight: np.ndarray,
                      move_cost: MoveCost) -> tuple[np.ndarray, np.ndarray]:
    """Cost of making every exam consistently negative, and whether indeterminate (rather than
    negative_exam_for_pe) is the label left on."""
    n = len(on)
    on_idx = np.flatnonzero(img_on)  # only images above 0.5 have a price here (few of 1.8 M)
    neg_img = image_row_weight * np.bincount(code[on_idx], weights=move_cost(ip[on_idx], DOWN), minlength=n)
    a_cost = up[:, _IND] + down[:, _NEG]  # indeterminate alone on
    b_cost = down[:, _IND] + up[:, _NEG]  # negative_exam_for_pe alone on
    a_chg = (~on[:, _IND]).astype(int) + on[:, _NEG]
    b_chg = on[:, _IND].astype(int) + ~on[:, _NEG]
    neg_ind_alone = _pick(a_cost, a_chg, b_cost, b_chg)
    neg_2a = np.where(neg_ind_alone, a_cost, b_cost)
    neg_2b = down[:, _POS_ONLY].sum(axis=1)
    neg_cost = neg_img + neg_2a + neg_2b

    return neg_cost, neg_ind_alone


def _move_exam_values(eq: np.ndarray, on: np.ndarray, P: np.ndarray, N: np.ndarray, neg_ind_alone: np.ndarray,
                      pos_gte_alone: np.ndarray, loc_any: np.ndarray, loc_best: np.ndarray, both_chr: np.ndarray,
                      chr_down_first: np.ndarray) -> None:
    """Move (in place) the exam values that must cross 0.5 for the chosen variant of every exam."""
    def set_on(rows: np.ndarray, j: int) -> None:
        m = rows & ~on[:, j]
        eq[m, j] = UP

    def set_off(rows: np.ndarray, j: int) -> None:
        m = rows & on[:, j]
        eq[m, j] = DOWN

    # negative exams
    set_on(N & neg_ind_alone, _IND)
    set_off(N & neg_ind_alone, _NEG)
    set_on(N & ~neg_ind_alone, _NEG)
    set_off(N & ~neg_ind_alone, _IND)
    for j in _POS_ONLY:
        set_off(N, j)
    # positive exams
    set_on(P & pos_gte_alone, _GTE)
    set_off(P & pos_gte_alone, _LT)
    set_on(P & ~pos_gte_alone, _LT)
    set_off(P & ~pos_gte_alone, _GTE)
    for k, j in enumerate(_LOC):
        set_on(P & ~loc_any & (loc_best == k), j)
    set_off(P & both_chr & chr_down_first, _CHR)
    set_off(P & both_chr & ~chr_down_first, _ACH)
    set_off(P, _IND)
    set_off(P, _NEG)


def _repair_arrays(ip: np.ndarray, code: np.ndarray, ep: np.ndarray, move_cost: MoveCost,
                   image_row_weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cheapest-variant repair. Returns (image_q, exam_q, now_positive, variant_cost)."""
    n = len(ep)
    on = ep > THRESHOLD
    img_on = ip > THRESHOLD
    pos_now = _exam_positive(ip, code, n)
    # per-value prices of the two possible moves (0 when the value is already on that side)
    up = np.where(on, 0.0, move_cost(ep, UP) * _W)
    down = np.where(on, move_cost(ep, DOWN) * _W, 0.0)

    neg_cost, neg_ind_alone = _negative_variant(ip, code, on, img_on, up, down, image_row_weight, move_cost)

    # ---- positive variant --------------------------------------------------------------------
    mx = np.full(n, -np.inf)
    np.maximum.at(mx, code, ip)
    has_img = np.isfinite(mx)
    raise_cost = np.full(n, np.inf)  # an exam without images cannot be made positive
    raise_cost[has_img] = image_row_weight[has_img] * move_cost(mx[has_img], UP)
    pos_img = np.where(pos_now, 0.0, raise_cost)
    a_cost = up[:, _GTE] + down[:, _LT]  # rv_lv_ratio_gte_1 alone on
    b_cost = down[:, _GTE] + up[:, _LT]
    a_chg = (~on[:, _GTE]).astype(int) + on[:, _LT]
    b_chg = on[:, _GTE].astype(int) + ~on[:, _LT]
    pos_gte_alone = _pick(a_cost, a_chg, b_cost, b_chg)
    pos_1a = np.where(pos_gte_alone, a_cost, b_cost)
    loc_any = on[:, _LOC].any(axis=1)
    loc_up = up[:, _LOC]
    loc_best = np.argmin(loc_up, axis=1)
    pos_1b = np.where(loc_any, 0.0, loc_up[np.arange(n), loc_best])
    both_chr = on[:, _CHR] & on[:, _ACH]
    chr_down_first = down[:, _CHR] <= down[:, _ACH]
    pos_1c = np.where(both_chr, np.minimum(down[:, _CHR], down[:, _ACH]), 0.0)
    pos_1d = down[:, _IND] + down[:, _NEG]
    pos_cost = pos_img + pos_1a + pos_1b + pos_1c + pos_1d

    make_pos = (pos_cost < neg_cost) | ((pos_cost == neg_cost) & pos_now)

    # ---- apply -------------------------------------------------------------------------------
    iq = ip.copy()
    eq = ep.copy()
    P, N = make_pos, ~make_pos
    # images
    iq[N[code] & img_on] = DOWN
    need_raise = np.flatnonzero(P & ~pos_now)
    if len(need_raise):
        cand = np.flatnonzero(np.isin(code, need_raise) & (ip == mx[code]))
        _, first = np.unique(code[cand], return_index=True)  # one image per exam: the first maximum
        iq[cand[first]] = UP

    _move_exam_values(eq, on, P, N, neg_ind_alone, pos_gte_alone, loc_any, loc_best, both_chr, chr_down_first)
    return iq, eq, make_pos, np.where(make_pos, pos_cost, neg_cost)


def _report(exam_df: pd.DataFrame, ip: np.ndarray, code: np.ndarray, ep: np.ndarray, iq: np.ndarray,
            eq: np.ndarray, now_pos: np.ndarray) -> pd.DataFrame:
    n = len(ep)
    broken = check_arrays(ip, code, ep)
    rep = pd.DataFrame(broken, columns=list(RULE_IDS))
    rep.insert(0, STUDY, exam_df[STUDY].to_numpy())
    rep["was_positive"] = _exam_positive(ip, code, n)
    rep["now_positive"] = now_pos
    n_img_changed = np.bincount(code, weights=iq != ip, minlength=n).astype(int)
    rep["n_changed"] = n_img_changed + (eq != ep).sum(axis=1)
    rep["changed"] = rep["n_changed"] > 0
    rep["cost"] = expected_cost(ip, code, ep, iq, eq)
    counts = np.bincount(code, minlength=n)
    # expected total weight of the exam's rows: the normaliser's share, to express cost as score
    rep["expected_weight"] = _W.sum() + expected_image_row_weight(ip, code, n) * counts
    return rep


def repair(image_df: pd.DataFrame, exam_df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The consistent prediction set of lowest expected metric (see the module docstring).

    Returns copies (image_df, exam_df) with repaired values and a per-exam report: StudyInstanceUID,
    one bool column per rule id (broken *before* repair), was_positive, now_positive, n_changed
    (values moved), changed, cost (expected-loss increase of the repair, absolute weighted units)
    and expected_weight (the exam's expected share of the normaliser; sum(cost) / sum(expected_weight)
    is the expected change of the score). :func:`summarize_repair` condenses it.
    """
    ip, code, ep = _arrays(image_df, exam_df)
    iq, eq, now_pos, _ = _repair_arrays(ip, code, ep, kl_move_cost, expected_image_row_weight(ip, code, len(ep)))
    return _wrap(image_df, exam_df, ip, code, ep, iq, eq, now_pos)


def repair_bce_heuristic(image_df: pd.DataFrame, exam_df: pd.DataFrame, image_weight: float = 1e-4
                         ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The "1st-place" style repair, kept as a comparison baseline: the same variants and boundary
    moves, but each move is priced by raw BCE with target and prediction swapped
    (:func:`swapped_bce_move_cost`: the new value as the target, the old value as the prediction)
    and every image row has a fixed tiny weight ``image_weight`` instead of its expected weight."""
    ip, code, ep = _arrays(image_df, exam_df)
    w = np.full(len(ep), float(image_weight))
    iq, eq, now_pos, _ = _repair_arrays(ip, code, ep, swapped_bce_move_cost, w)
    return _wrap(image_df, exam_df, ip, code, ep, iq, eq, now_pos)


def _wrap(image_df: pd.DataFrame, exam_df: pd.DataFrame, ip: np.ndarray, code: np.ndarray, ep: np.ndarray,
          iq: np.ndarray, eq: np.ndarray, now_pos: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    img_out = image_df.copy()
    img_out[IMAGE_LABEL] = iq
    exam_out = exam_df.copy()
    exam_out[list(EXAM_LABELS)] = eq
    return img_out, exam_out, _report(exam_df, ip, code, ep, iq, eq, now_pos)


def summarize_repair(report: pd.DataFrame) -> dict[str, Any]:
    """Counts and cost of a repair report: exams breaking each rule (each of them was changed),
    exams changed, flips between positive and negative, values moved, and the expected cost both in
    absolute weighted loss and as expected change of the score."""
    return {
        "n_exams": len(report),
        "rule_broken": {r: int(report[r].sum()) for r in RULE_IDS},
        "exams_changed": int(report["changed"].sum()),
        "flipped_to_positive": int((~report["was_positive"] & report["now_positive"]).sum()),
        "flipped_to_negative": int((report["was_positive"] & ~report["now_positive"]).sum()),
        "values_changed": int(report["n_changed"].sum()),
        "expected_cost": float(report["cost"].sum()),
        "expected_score_change": float(report["cost"].sum() / report["expected_weight"].sum()) if len(report) else 0.0,
    }


def format_repair_summary(summary: dict[str, Any]) -> str:
    lines = [f"{'rule':<6}{'exams':>8}  description"]
    for r in RULE_IDS:
        lines.append(f"{r:<6}{summary['rule_broken'][r]:>8}  {RULES[r]}")
    lines += [f"exams changed: {summary['exams_changed']} of {summary['n_exams']} "
              f"(to positive: {summary['flipped_to_positive']}, to negative: {summary['flipped_to_negative']}); "
              f"values moved: {summary['values_changed']}",
              f"expected cost of repair: {summary['expected_cost']:.6g} weighted loss "
              f"= {summary['expected_score_change']:+.6f} on the score"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# long-format conveniences
# ------------------------------------------------------------------------------------------------
def check_long(sub: pd.DataFrame, ids_df: pd.DataFrame) -> pd.DataFrame:
    """:func:`check` on a long ``id,label`` frame; ``ids_df`` maps SOPInstanceUID to StudyInstanceUID."""

    return check(*from_long(sub, ids_df))


def repair_long(sub: pd.DataFrame, ids_df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`repair` on a long ``id,label`` frame; returns (repaired frame in the row order of
    ``sub``, report)."""

    image_df, exam_df, report = repair(*from_long(sub, ids_df))
    new = to_long(image_df, exam_df)
    pos = match_ids(new["id"], sub["id"].astype(str).to_numpy(dtype=object))
    out = pd.DataFrame({"id": new["id"].to_numpy()[pos], "label": new["label"].to_numpy()[pos]})
    return out, report
