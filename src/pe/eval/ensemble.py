"""Out-of-fold ensembling of submission-shaped predictions (``id,label``), used by
``src/07_ensemble.py`` (fitting) and by the Kaggle kernel (applying ``weights.json``).

Blending weights are non-negative and sum to 1 (SLSQP on the simplex), fitted by minimising the
competition metric on the members' out-of-fold predictions, separately per *label group*:

| group      | rows                                           | why together                               |
|------------|------------------------------------------------|--------------------------------------------|
| image      | ``pe_present_on_image`` (one row per slice)    | the only per-slice output                  |
| negative   | ``negative_exam_for_pe``, ``indeterminate``    | the two labels of a predicted-negative exam |
| chronicity | ``chronic_pe``, ``acute_and_chronic_pe``       | mutually exclusive pair (rule 1c)          |
| location   | ``central_pe``, ``leftsided_pe``, ``rightsided_pe`` | one anatomical sub-task (rule 1b)     |
| rv_lv      | ``rv_lv_ratio_gte_1``, ``rv_lv_ratio_lt_1``    | complementary pair (rule 1a)               |

The metric is a weighted sum of per-row losses divided by a total weight that depends on the truth
only, so it decomposes exactly over the groups: minimising each group's contribution minimises the
whole. Members are averaged either as probabilities or as logits (one mode for all groups, chosen by
the cross-fitted OOF metric). Overfitting the weights is guarded against by *cross-fitting*: for
each fold, weights are fitted on the other folds and applied to it, giving an honest OOF estimate;
a group keeps its fitted weights only when their cross-fitted loss beats equal weights, otherwise it
falls back to equal weights. The written OOF predictions are the cross-fitted ones (so whatever
scores ``oof.csv`` later sees an honest number); test predictions use weights fitted on all folds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from pe import paths, rspect
from pe.data.tables import read_truth
from pe.eval import voting
from pe.eval.baselines import oof_baselines
from pe.eval.hierarchy import RULE_IDS, check_long, repair_long, summarize_repair
from pe.eval.metric import Scorer, bce, score
from pe.eval.pred_files import (
    PredictionFileError,
    cnn_exp_of,
    member_fold_files,
    read_cnn_oof,
    read_long,
    read_member_oof,
)
from pe.eval.voting import VotingHead, apply_exam_pe, fit_voting_head, probs_by_study, study_pe_labels
from pe.ids import label_of_ids, match_ids, studies_of_ids
from pe.io import write_csv_atomic, write_json_atomic

GROUPS: dict[str, tuple[str, ...]] = {
    "image": (rspect.IMAGE_LABEL,),
    "negative": ("negative_exam_for_pe", "indeterminate"),
    "chronicity": rspect.CHRONICITY_LABELS,
    "location": rspect.LOCATION_LABELS,
    "rv_lv": rspect.RV_LV_LABELS,
}
MODES: tuple[str, ...] = ("prob", "logit")
# Clipping inside the blend: the metric clips at 1e-15, but logits of 1e-15 (±34.5) would let one
# over-confident member dominate a logit average; 1e-6 keeps a member's vote bounded (±13.8).
_BLEND_EPS = 1e-6


class EnsembleError(PredictionFileError):
    """Member predictions that cannot be blended (missing, duplicated or mismatched ids)."""


def labels_in_order(frame: pd.DataFrame, order: np.ndarray, what: str) -> np.ndarray:
    """``frame``'s labels in the order of the ids ``order``; EnsembleError naming ``what`` unless
    the id sets are equal. (pyarrow hashing via :func:`pe.ids.match_ids`: pandas' ``isin`` on
    arrow strings is a Python loop, minutes at RSPECT scale.)"""
    try:
        pos = match_ids(frame["id"], order)
    except ValueError as e:
        raise EnsembleError(f"{what}: {e}") from e
    found = pos >= 0
    if not found.all() or found.sum() != len(frame):
        missing = np.asarray(order, dtype=object)[~found]
        extra = len(frame) - int(found.sum())
        raise EnsembleError(f"{what}: id set differs ({len(missing)} missing e.g. {missing[:3].tolist()}, "
                            f"{extra} extra)")
    return frame["label"].to_numpy(dtype=float)[pos]


def to_space(p: np.ndarray, mode: str) -> np.ndarray:
    """Probabilities → the averaging space of ``mode`` (identity or logit of clipped p)."""
    if mode == "prob":
        return np.asarray(p, dtype=np.float64)
    if mode == "logit":
        q = np.clip(np.asarray(p, dtype=np.float64), _BLEND_EPS, 1 - _BLEND_EPS)
        return np.log(q) - np.log1p(-q)
    raise ValueError(f"unknown blend mode {mode!r}; expected one of {MODES}")


def from_space(x: np.ndarray, mode: str) -> np.ndarray:
    """Inverse of :func:`to_space`."""
    if mode == "prob":
        return x
    if mode == "logit":
        return 1.0 / (1.0 + np.exp(-x))
    raise ValueError(f"unknown blend mode {mode!r}; expected one of {MODES}")


def average_long(frames: Sequence[pd.DataFrame], mode: str = "prob", weights: Sequence[float] | None = None,
                 what: str = "predictions") -> pd.DataFrame:
    """Weighted average of ``id,label`` frames with identical id sets, in probability or logit space."""
    if not frames:
        raise EnsembleError(f"{what}: nothing to average")
    ids = frames[0]["id"].to_numpy(dtype=object)
    w = np.full(len(frames), 1 / len(frames)) if weights is None else np.asarray(weights, dtype=float)
    acc = np.zeros(len(ids))
    for i, f in enumerate(frames):
        lab = labels_in_order(f, ids, f"{what}: frame {i}")
        acc += w[i] * to_space(lab, mode)
    return pd.DataFrame({"id": ids, "label": np.clip(from_space(acc, mode), 0.0, 1.0)})


def read_member_test(exp_dir: str | Path, mode: str = "prob") -> pd.DataFrame:
    """A member's test predictions averaged over its ``test_fold<k>.csv`` files (in ``mode`` space)."""
    exp_dir = Path(exp_dir)
    files = member_fold_files(exp_dir, test=True)
    if not files:
        raise EnsembleError(f"{exp_dir}: no test predictions test_fold<k>.csv found")
    return average_long([read_long(p) for p in files.values()], mode, what=f"{exp_dir} test folds")


# --- rows, groups and metric weights ---------------------------------------------------------------
def group_of_labels(labels: np.ndarray) -> np.ndarray:
    """Blend group (a key of :data:`GROUPS`) of every label name."""
    lut = {lab: g for g, labs in GROUPS.items() for lab in labs}
    codes, uniques = pd.factorize(np.asarray(labels, dtype=object))
    return np.array([lut[u] for u in uniques] + [None], dtype=object)[codes]


def weighted_loss(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> float:
    """Σ w·BCE(y, p) (not normalised), with the metric's own clipped BCE."""
    return float(np.asarray(w, dtype=np.float64) @ bce(y, p))


# --- fitting -----------------------------------------------------------------------------------
def blend(X: np.ndarray, w: np.ndarray, mode: str) -> np.ndarray:
    """Blend member columns ``X`` (already in ``mode`` space) with weights ``w`` → probabilities."""
    return np.clip(from_space(X @ w, mode), 0.0, 1.0)


def fit_weights(X: np.ndarray, y: np.ndarray, rw: np.ndarray, mode: str) -> np.ndarray:
    """Simplex weights (≥ 0, Σ = 1) minimising Σ rw·BCE(y, blend(X, w)); SLSQP from equal weights.

    ``X`` (n, M) holds the members in ``mode`` space. With no weighted rows (e.g. the image group
    of a fold without positive exams) the data say nothing and equal weights are returned.
    """
    m = X.shape[1]
    w0 = np.full(m, 1.0 / m)
    keep = rw > 0
    if m == 1 or not keep.any():
        return w0
    X, y, rw = X[keep], y[keep], rw[keep] / rw[keep].sum()  # normalised: well-scaled objective

    def loss_and_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = X @ w
        if mode == "prob":
            p = np.clip(z, rspect.CLIP_EPS, 1 - rspect.CLIP_EPS)
            dldz = (p - y) / (p * (1 - p))
        else:
            p = np.clip(1 / (1 + np.exp(-z)), rspect.CLIP_EPS, 1 - rspect.CLIP_EPS)
            dldz = p - y
        loss = -(rw * (y * np.log(p) + (1 - y) * np.log1p(-p))).sum()
        return float(loss), X.T @ (rw * dldz)

    res = minimize(loss_and_grad, w0, jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * m,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}],
                   options={"maxiter": 200, "ftol": 1e-10})
    w = np.clip(res.x, 0.0, None)
    w = w / w.sum() if w.sum() > 0 else w0
    # SLSQP may stop early on flat objectives; never return something worse than the start.
    return w if loss_and_grad(w)[0] <= loss_and_grad(w0)[0] else w0


@dataclasses.dataclass
class BlendData:
    """Members aligned on one id order, with truth, metric row weights, groups and folds."""

    ids: np.ndarray
    members: list[str]
    P: np.ndarray  # (n, M) probabilities
    folds: np.ndarray
    y: np.ndarray
    rw: np.ndarray
    groups: np.ndarray
    study: np.ndarray

    @property
    def total_weight(self) -> float:
        return float(self.rw.sum())


def align_members(oofs: Mapping[str, pd.DataFrame], truth: pd.DataFrame) -> BlendData:
    """Align member OOF frames (``id, label, fold``) on the metric's row order for their studies.

    Every member must predict exactly the same id set, and that set must be all ids of the studies it
    covers (``truth`` is train.csv-shaped); folds are taken from the first member. Truth labels and
    row weights come from :class:`pe.eval.metric.Scorer`, so the blend objective is the metric itself.
    """
    names = list(oofs)
    if not names:
        raise EnsembleError("no ensemble members given")
    first = oofs[names[0]]
    studies = studies_of_ids(first["id"].to_numpy())
    try:
        scorer = Scorer(truth, studies)
    except ValueError as e:
        raise EnsembleError(f"member {names[0]}: {e}") from e
    ids = scorer.all_ids
    cols = [labels_in_order(oofs[name], ids, f"member {name} (vs the ids of member {names[0]}'s studies)")
            for name in names]
    n_img, n_st = scorer.n_images, scorer.n_studies
    exam_w = np.asarray(rspect.EXAM_WEIGHT_VECTOR, dtype=np.float64)
    row_group = np.concatenate([np.full(n_img, "image", dtype=object),
                                np.tile(group_of_labels(np.array(rspect.EXAM_LABELS, dtype=object)), n_st)])
    return BlendData(
        ids=ids, members=names, P=np.column_stack(cols),
        folds=first["fold"].to_numpy()[match_ids(first["id"], ids)],
        y=np.concatenate([scorer.image_truth, scorer.exam_truth.ravel()]),
        rw=np.concatenate([scorer.image_weight, np.tile(exam_w, n_st)]),
        groups=row_group,
        study=np.concatenate([scorer.study_ids[scorer.image_study], np.repeat(scorer.study_ids, len(exam_w))]))


@dataclasses.dataclass
class EnsembleFit:
    """Everything :func:`fit_ensemble` decided and measured (scores are the competition metric)."""

    mode: str
    weights: dict[str, dict[str, float]]  # group -> member -> weight (fitted on all folds, after fallback)
    source: dict[str, str]  # group -> "fitted" | "equal"
    oof_pred: np.ndarray  # cross-fitted OOF blend after the per-group fallback
    scores: dict[str, float]  # named metric values (see fit_ensemble)
    group_losses: dict[str, dict[str, dict[str, float]]]  # mode -> kind -> group -> contribution
    fold_weights: dict[str, dict[int, dict[str, list[float]]]]  # mode -> fold -> group -> weights

    def to_json(self, members: Sequence[str]) -> dict[str, Any]:
        return {
            "members": list(members),
            "mode": self.mode,
            "groups": {g: {"labels": list(GROUPS[g]), "weights": self.weights[g], "source": self.source[g]}
                       for g in GROUPS},
            "scores": self.scores,
            "group_losses": self.group_losses,
            "fold_weights": {m: {str(k): v for k, v in fw.items()} for m, fw in self.fold_weights.items()},
        }


def fit_ensemble(data: BlendData) -> EnsembleFit:
    """Fit group-wise simplex weights in both modes, cross-fitted over folds; pick mode and fallback.

    ``scores`` holds, per mode, ``<mode>_equal`` (equal weights), ``<mode>_in_sample`` (weights fitted
    on all folds, scored on the same rows: optimistic), ``<mode>_cross_fitted`` (each fold scored with
    weights fitted on the others) and ``<mode>_final`` (cross-fitted after the per-group fallback to
    equal weights); ``final`` is the chosen mode's ``_final`` and ``members/<name>`` each member alone.
    """
    W = data.total_weight
    if W <= 0:
        raise EnsembleError("the truth gives every row zero weight: nothing to fit")
    fold_values = np.unique(data.folds)
    m = len(data.members)
    equal = np.full(m, 1.0 / m)
    scores: dict[str, float] = {}
    for j, name in enumerate(data.members):
        scores[f"members/{name}"] = weighted_loss(data.y, data.P[:, j], data.rw) / W
    per_mode: dict[str, Any] = {}
    group_losses: dict[str, dict[str, dict[str, float]]] = {}
    fold_weights: dict[str, dict[int, dict[str, list[float]]]] = {}
    for mode in MODES:
        X = to_space(data.P, mode)
        full_w: dict[str, np.ndarray] = {}
        cf_pred = np.empty(len(data.ids))
        eq_pred = blend(X, equal, mode)
        ins_pred = np.empty(len(data.ids))
        fold_weights[mode] = {int(k): {} for k in fold_values}
        for g in GROUPS:
            gm = data.groups == g
            if not gm.any():
                full_w[g] = equal
                continue
            full_w[g] = fit_weights(X[gm], data.y[gm], data.rw[gm], mode)
            ins_pred[gm] = blend(X[gm], full_w[g], mode)
            for k in fold_values:
                train = gm & (data.folds != k)
                test = gm & (data.folds == k)
                # A single fold has no held-out partner: its "cross-fitted" weights are equal weights.
                wk = fit_weights(X[train], data.y[train], data.rw[train], mode) if train.any() else equal
                fold_weights[mode][int(k)][g] = [float(v) for v in wk]
                cf_pred[test] = blend(X[test], wk, mode)
        losses: dict[str, dict[str, float]] = {"equal": {}, "in_sample": {}, "cross_fitted": {}}
        for g in GROUPS:
            gm = data.groups == g
            for kind, pred in (("equal", eq_pred), ("in_sample", ins_pred), ("cross_fitted", cf_pred)):
                losses[kind][g] = weighted_loss(data.y[gm], pred[gm], data.rw[gm]) / W if gm.any() else 0.0
        # Per group: keep fitted weights only when their cross-fitted loss beats equal weights.
        source = {g: "fitted" if losses["cross_fitted"][g] < losses["equal"][g] else "equal" for g in GROUPS}
        final_pred = cf_pred.copy()
        for g in GROUPS:
            if source[g] == "equal":
                gm = data.groups == g
                final_pred[gm] = eq_pred[gm]
        for kind in ("equal", "in_sample", "cross_fitted"):
            scores[f"{mode}_{kind}"] = sum(losses[kind].values())
        scores[f"{mode}_final"] = weighted_loss(data.y, final_pred, data.rw) / W
        group_losses[mode] = losses
        per_mode[mode] = (full_w, source, final_pred)
    mode = min(MODES, key=lambda md: scores[f"{md}_final"])
    full_w, source, final_pred = per_mode[mode]
    weights = {g: {name: float(equal[j] if source[g] == "equal" else full_w[g][j])
                   for j, name in enumerate(data.members)} for g in GROUPS}
    scores["final"] = scores[f"{mode}_final"]
    return EnsembleFit(mode=mode, weights=weights, source=source, oof_pred=final_pred, scores=scores,
                       group_losses=group_losses, fold_weights=fold_weights)


# --- applying weights (07 on test predictions, and the Kaggle kernel) -------------------------------
def blend_long(members: Mapping[str, pd.DataFrame], spec: Mapping[str, Any]) -> pd.DataFrame:
    """Blend members' ``id,label`` frames with a ``weights.json`` spec (see :meth:`EnsembleFit.to_json`).

    Members missing from ``members`` are an error; their weights are not renormalised silently.
    """
    names = list(spec["members"])
    absent = [n for n in names if n not in members]
    if absent:
        raise EnsembleError(f"blend needs member(s) {absent}; have {sorted(members)}")
    mode = spec["mode"]
    if set(spec["groups"]) != set(GROUPS):
        raise EnsembleError(f"blend spec has groups {sorted(spec['groups'])}, expected {sorted(GROUPS)}")
    order = members[names[0]]["id"].to_numpy(dtype=object)
    cols = [labels_in_order(members[n], order, f"member {n} (vs member {names[0]})") for n in names]
    X = to_space(np.column_stack(cols), mode)
    groups = group_of_labels(label_of_ids(order))
    out = np.empty(len(order))
    for g, gs in spec["groups"].items():
        gm = groups == g
        if gm.any():
            out[gm] = blend(X[gm], np.array([gs["weights"][n] for n in names], dtype=float), mode)
    return pd.DataFrame({"id": order, "label": out})


def equal_spec(members: Sequence[str], mode: str = "prob") -> dict[str, Any]:
    """A ``weights.json``-shaped spec with equal weights (the kernel's default without a fitted blend)."""
    w = {n: 1.0 / len(members) for n in members}
    return {"members": list(members), "mode": mode,
            "groups": {g: {"labels": list(GROUPS[g]), "weights": dict(w), "source": "equal"} for g in GROUPS}}


# --- the stage table ---------------------------------------------------------------------------
def format_stage_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Fixed-width table of ``{"stage", "oof_metric", "note"}`` rows (metric printed to 4 decimals)."""
    w_stage = max([len("stage"), *(len(str(r["stage"])) for r in rows)])
    lines = [f"{'stage':<{w_stage}}  {'OOF metric':>10}  note", f"{'-' * w_stage}  {'-' * 10}  {'-' * 4}"]
    for r in rows:
        v = r.get("oof_metric")
        val = f"{v:10.4f}" if isinstance(v, (int, float)) and np.isfinite(v) else f"{'n/a':>10}"
        lines.append(f"{r['stage']:<{w_stage}}  {val}  {r.get('note', '')}".rstrip())
    return "\n".join(lines)


# --- the whole stage (src/07_ensemble.py) -------------------------------------------------------
def stage_rows(fit: EnsembleFit, data: BlendData, truth: pd.DataFrame, oof_pred: pd.DataFrame,
               cnn_oof: pd.DataFrame | None, cnn_exp: str | None,
               voted: tuple[pd.DataFrame, str] | None = None) -> list[dict[str, Any]]:
    """The demo's table: OOF metric per stage on the ensemble's studies (all from pe.eval.metric.score).
    ``voted``: the blend with the voting exam PE head and its note (the written oof.csv then)."""
    studies = pd.Index(pd.unique(data.study))
    ids_df = truth.loc[truth[rspect.STUDY].isin(studies), list(rspect.ID_COLUMNS)].reset_index(drop=True)
    rows: list[dict[str, Any]] = []
    n_st = len(studies)
    # Baselines are out-of-fold like the members: for each fold, fitted on the other folds' truth.
    fold_of = pd.Series(data.folds, index=data.study).groupby(level=0).first()
    prior, maxagg = oof_baselines(truth, fold_of, cnn_oof)
    rows.append({"stage": "prior baseline", "oof_metric": score(prior, truth),
                 "note": f"training-fold label means, {n_st} studies"})
    cnn_score, note = float("nan"), "no CNN OOF found"
    if cnn_oof is not None:
        covered = cnn_oof.loc[cnn_oof[rspect.STUDY].isin(studies), rspect.STUDY].nunique()
        if maxagg is not None:
            cnn_score = score(maxagg, truth)
            note = f"{cnn_exp}: exam PE = max slice prob, sub-labels from training folds"
        else:
            note = f"{cnn_exp}: CNN OOF covers {covered}/{n_st} studies"
    rows.append({"stage": "CNN max-aggregation", "oof_metric": cnn_score, "note": note})
    for name in data.members:
        rows.append({"stage": f"member {name}", "oof_metric": fit.scores[f"members/{name}"], "note": "sequence model"})
    rows.append({"stage": "ensemble equal weights", "oof_metric": fit.scores[f"{fit.mode}_equal"],
                 "note": f"{fit.mode} averaging"})
    rows.append({"stage": "ensemble fitted in-sample", "oof_metric": fit.scores[f"{fit.mode}_in_sample"],
                 "note": "optimistic: weights fitted on the scored rows"})
    fitted = [g for g, s in fit.source.items() if s == "fitted"]
    rows.append({"stage": "ensemble cross-fitted", "oof_metric": fit.scores["final"],
                 "note": f"{'' if voted else 'written oof.csv; '}fitted groups: {','.join(fitted) or 'none'}"})
    if voted is not None:
        oof_pred = voted[0]
        rows.append({"stage": "ensemble + voting exam PE", "oof_metric": score(oof_pred, truth),
                     "note": f"written oof.csv; {voted[1]}"})
    repaired, report = repair_long(oof_pred, ids_df)
    n_broken = int(check_long(repaired, ids_df)[list(RULE_IDS)].to_numpy().sum())
    changed = summarize_repair(report)["exams_changed"]
    rows.append({"stage": "ensemble + repair", "oof_metric": score(repaired, truth),
                 "note": f"hierarchy repair changed {changed}/{n_st} exams; rules broken after: {n_broken}"})
    return rows


def voting_exam_pe(oof_pred: pd.DataFrame, data: BlendData, truth: pd.DataFrame, cnn_oof: pd.DataFrame | None,
                   cnn_exp: str, criterion: str = "f1") -> tuple[pd.DataFrame, VotingHead, str]:
    """The voting study head (papers/condrea2023 eqs. 1-2, :class:`pe.eval.voting.VotingHead`) as the
    exam PE head of the blend: cross-fitted on the OOF rows (fold k's studies by a rule fitted on the
    other folds' CNN OOF slice probabilities), and fitted on every OOF study for the test rows and the
    kernel; (mu, delta) chosen by ``criterion`` (pe.eval.voting.FIT_CRITERIA). Returns (OOF predictions
    with it, the full head, a note for the stage table)."""
    if cnn_oof is None:
        raise EnsembleError(f"the voting exam PE head needs the CNN's OOF slice probabilities "
                            f"(oof/{cnn_exp}/cnn_fold<k>.parquet of 04_train_cnn.py)")
    labels = study_pe_labels(truth)
    probs = probs_by_study(cnn_oof)
    fold_of = pd.Series(data.folds, index=data.study).groupby(level=0).first()
    lacking = sorted(set(fold_of.index) - set(probs))
    if lacking:
        raise EnsembleError(f"oof/{cnn_exp}/cnn_fold<k>.parquet lacks {len(lacking)} of the ensemble's studies, "
                            f"e.g. {lacking[:3]}")
    p_pe: dict[str, float] = {}
    for k in sorted(pd.unique(fold_of)):
        inside = fold_of.index[fold_of == k]
        others = set(fold_of.index) - set(inside)
        head_k = fit_voting_head({s: p for s, p in probs.items() if s in others}, labels, criterion=criterion)
        p_pe.update(head_k.p_pe({s: probs[s] for s in inside}))
    voted = apply_exam_pe(oof_pred, p_pe)
    head = fit_voting_head({s: p for s, p in probs.items() if s in set(fold_of.index)}, labels,
                           criterion=criterion)
    note = (f"{cnn_exp}: >= {head.mu} slices above {head.delta:.2f} -> P(PE) {head.p_pe_called:.2f}, "
            f"else {head.p_pe_not_called:.2f} (fitted for {criterion}, cross-fitted)")
    return voted, head, note


def fold_averaged_test_probs(cnn_exp: str) -> dict[str, np.ndarray]:
    """Study -> the CNN's test slice probabilities averaged over its fold models (stage 05's
    ``embeddings/<cnn_exp>/fold<k>/test/index.parquet``), as the kernel averages them."""
    from pe.data.seq_items import available_folds, read_embedding_index

    folds = available_folds(cnn_exp, "test")
    if not folds:
        raise EnsembleError(f"work/embeddings/{cnn_exp}/fold<k>/test/index.parquet: none found (the voting "
                            f"head's test predictions read the CNN's test probabilities; run 05 --split test)")
    idx = pd.concat([read_embedding_index(paths.embeddings_dir(cnn_exp, k, "test") / "index.parquet")
                     for k in folds], ignore_index=True)
    mean = idx.groupby([rspect.STUDY, rspect.SOP], sort=False, as_index=False)["prob"].mean()
    return probs_by_study(mean)


def run_ensemble(members: Sequence[str], out: str, truth_path: str | Path, cnn_exp: str | None = None,
                 exam_pe_head: str = "sequence") -> dict[str, Any]:
    """Read members from ``oof/<exp>/``, fit, and write ``oof/<out>/{oof,test}.csv``, ``weights.json``
    and ``stages.json``. Returns the stages dict (rows + scores). ``exam_pe_head="voting"`` (or
    ``"voting_log_loss"``, fitted for log loss) replaces the blend's ``negative_exam_for_pe`` by the voting
    head (:func:`voting_exam_pe`), stored in ``weights.json`` for the kernel."""
    if exam_pe_head not in voting.EXAM_PE_HEADS:
        raise EnsembleError(f"exam PE head must be one of {list(voting.EXAM_PE_HEADS)}, got {exam_pe_head!r}")
    if len(set(members)) != len(members):
        raise EnsembleError(f"members named twice: {list(members)}")
    try:
        truth = read_truth(truth_path)
    except (FileNotFoundError, ValueError) as err:
        raise EnsembleError(str(err)) from err
    oofs = {m: read_member_oof(paths.exp_oof_dir(m)) for m in members}
    data = align_members(oofs, truth)
    fit = fit_ensemble(data)
    out_dir = paths.exp_oof_dir(out)
    oof_pred = pd.DataFrame({"id": data.ids, "label": fit.oof_pred})
    spec = fit.to_json(data.members)
    test_members = {m: read_member_test(paths.exp_oof_dir(m), fit.mode) for m in members}
    test_pred = blend_long(test_members, spec)
    cnn_exp = cnn_exp or cnn_exp_of(members[0])
    cnn_oof = read_cnn_oof(cnn_exp) if cnn_exp else None
    voted = None
    criterion = voting.EXAM_PE_HEADS[exam_pe_head]
    if criterion is not None:
        if not cnn_exp:
            raise EnsembleError("the voting exam PE head needs the CNN experiment: pass --cnn-exp")
        voted_oof, head, note = voting_exam_pe(oof_pred, data, truth, cnn_oof, cnn_exp, criterion)
        voted = (voted_oof, note)
        spec["exam_pe_head"] = {**head.to_json(), "cnn_exp": cnn_exp}
        test_pred = apply_exam_pe(test_pred, head.p_pe(fold_averaged_test_probs(cnn_exp)))
    rows = stage_rows(fit, data, truth, oof_pred, cnn_oof, cnn_exp, voted)
    if voted is not None:
        oof_pred = voted[0]
    stages = {"rows": rows, "scores": fit.scores, "mode": fit.mode, "members": list(members),
              "n_studies": int(len(pd.unique(data.study))), "table": format_stage_table(rows)}
    write_csv_atomic(oof_pred, out_dir / "oof.csv")
    write_csv_atomic(test_pred, out_dir / "test.csv")
    write_json_atomic(out_dir / "weights.json", spec)
    write_json_atomic(out_dir / "stages.json", stages)
    return stages
