"""Voting study head of papers/condrea2023_anatomically_aware_dual_hop.txt (eqs. 1-2).

A study is PE-positive when at least ``mu`` of its slices have a probability above ``delta``
(eq. 1: ``Count(p > delta) >= mu``; "more than mu - 1"). ``mu`` and ``delta`` maximise the F1 of the
study label on validation studies (eq. 2). The paper found it as good as a sequence model on
~6,000 training studies and preferred it for being transparent; it is reported here beside the
sequence stage with the paper's table columns (sensitivity, specificity, PPV, NPV, F1).

Our option beyond the paper: ``criterion="log_loss"`` picks (mu, delta) for the log loss of the head's
two calibrated probabilities instead (the loss the competition scores ``negative_exam_for_pe`` by). With
half the exams positive and a weak slice model, F1 is maximised by calling every study positive, a
split that carries no information; the log loss of a split is lowest where it separates the classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pe.eval.metric import binary_stats

NEG_LABEL = "negative_exam_for_pe"  # the exam row (pe.rspect.EXAM_LABELS) the voting head sets
DEFAULT_DELTAS = np.round(np.linspace(0.01, 0.99, 99), 2)
FIT_CRITERIA = ("f1", "log_loss")  # what (mu, delta) are chosen for: eq. 2's F1, or the head's log loss
# Stage 07's --exam-pe-head choices: the sequence members', or the voting head fitted by a criterion.
EXAM_PE_HEADS = {"sequence": None, "voting": "f1", "voting_log_loss": "log_loss"}


@dataclass(frozen=True)
class VotingRule:
    mu: int  # minimum number of slices above delta
    delta: float  # slice probability threshold (strict)
    f1: float  # F1 on the studies it was fitted on (whatever the criterion it was chosen by)
    criterion: str = "f1"  # FIT_CRITERIA: what (mu, delta) were chosen for

    def predict(self, probs: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Study -> 0/1 by eq. 1."""
        return {s: int(np.count_nonzero(np.asarray(p) > self.delta) >= self.mu) for s, p in probs.items()}


def _aligned(probs: Mapping[str, np.ndarray], labels: Mapping[str, int]) -> tuple[list[np.ndarray], np.ndarray]:
    missing = [s for s in probs if s not in labels]
    if missing:
        raise ValueError(f"{len(missing)} studies have slice probabilities but no label, e.g. {missing[:3]}")
    studies = sorted(probs)
    y = np.array([int(labels[s]) for s in studies])
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError("study labels must be 0 or 1")
    return [np.sort(np.asarray(probs[s], dtype=np.float64)) for s in studies], y


def _counts_above(sorted_probs: list[np.ndarray], deltas: np.ndarray) -> np.ndarray:
    """(n_studies, n_deltas) int: slices with probability strictly above each delta."""
    return np.stack([len(p) - np.searchsorted(p, deltas, side="right") for p in sorted_probs])


def _smoothed_rate(k: np.ndarray | int, n: np.ndarray | int) -> np.ndarray | float:
    """P(PE) of a group of ``n`` studies with ``k`` positive: Laplace-smoothed (k + 1) / (n + 2), never 0 or 1.
    The head's two probabilities and the log-loss fit of (mu, delta) both use it."""
    return (k + 1) / (n + 2)


def _mu_scores(counts: np.ndarray, y: np.ndarray, criterion: str) -> tuple[np.ndarray, np.ndarray]:
    """(score, F1) of ``counts >= mu`` for mu = 1 .. max(counts) (at least mu = 1); score is higher-better:
    the F1, or minus the mean log loss of the smoothed rates (:func:`_smoothed_rate`) of the called and
    not-called studies (:class:`VotingHead`'s probabilities)."""
    top = max(int(counts.max()) if len(counts) else 0, 1)
    # tp(mu) / predicted(mu) = studies (positive / any) with count >= mu: reverse cumulative histograms.
    tp = np.cumsum(np.bincount(counts[y == 1], minlength=top + 1)[::-1])[::-1][1:].astype(np.float64)
    pred = np.cumsum(np.bincount(counts, minlength=top + 1)[::-1])[::-1][1:].astype(np.float64)
    f1 = 2 * tp / (pred + y.sum())
    if criterion == "f1":
        return f1, f1
    n, pos = float(len(y)), float(y.sum())
    ll = np.zeros_like(tp)
    for k, m in ((tp, pred), (pos - tp, n - pred)):  # called, not called
        r = _smoothed_rate(k, m)
        ll += k * np.log(r) + (m - k) * np.log1p(-r)
    return ll / n, f1


def fit_voting(probs: Mapping[str, np.ndarray], labels: Mapping[str, int],
               deltas: Sequence[float] | np.ndarray = DEFAULT_DELTAS, criterion: str = "f1") -> VotingRule:
    """Eq. 2: the (mu, delta) of highest F1 on these studies (``probs``: study -> slice probabilities,
    ``labels``: study -> negative_exam_for_pe == 0), or of lowest head log loss with
    ``criterion="log_loss"``. Ties go to the smallest delta, then mu."""
    if criterion not in FIT_CRITERIA:
        raise ValueError(f"voting fit criterion must be one of {FIT_CRITERIA}, got {criterion!r}")
    if not probs:
        raise ValueError("fit_voting needs at least one study")
    sorted_probs, y = _aligned(probs, labels)
    if y.sum() == 0:
        raise ValueError("fit_voting needs at least one positive study (F1 is undefined otherwise)")
    d = np.asarray(deltas, dtype=np.float64)
    counts = _counts_above(sorted_probs, d)
    best, best_score = VotingRule(1, float(d[0]), -1.0, criterion), -np.inf
    for i, delta in enumerate(d):
        score, f1 = _mu_scores(counts[:, i], y, criterion)
        j = int(np.argmax(score))
        if score[j] > best_score + 1e-12:
            best, best_score = VotingRule(j + 1, float(delta), float(f1[j]), criterion), float(score[j])
    return best


def study_metrics(pred: Mapping[str, int], labels: Mapping[str, int]) -> dict[str, float]:
    """Sensitivity, specificity, PPV, NPV, F1 and accuracy of study predictions (NaN when undefined)."""
    studies = sorted(pred)
    p = np.array([int(pred[s]) for s in studies])
    y = np.array([int(labels[s]) for s in studies])
    stats = binary_stats(y, p == 1)
    stats["accuracy"] = float((p == y).mean()) if len(p) else float("nan")
    return stats


def probs_by_study(frame: pd.DataFrame, study_col: str = "StudyInstanceUID", prob_col: str = "prob",
                   ) -> dict[str, np.ndarray]:
    """study -> slice probabilities from a long per-image table (e.g. the CNN's out-of-fold file)."""
    for c in (study_col, prob_col):
        if c not in frame.columns:
            raise ValueError(f"per-slice table lacks column {c!r} (has {list(frame.columns)})")
    return {str(s): g[prob_col].to_numpy(np.float64) for s, g in frame.groupby(study_col, sort=True)}


# --------------------------------------------------------------------------------------------
# the voting rule as the exam PE head of a submission (issue 16, item 4)


@dataclass(frozen=True)
class VotingHead:
    """The voting rule turned into a probability for the competition's log loss: a study called
    positive gets P(PE exam | called) and one not called P(PE exam | not called), both Laplace-smoothed
    frequencies (k + 1) / (n + 2) on the studies the rule was fitted on. The submission's
    ``negative_exam_for_pe`` becomes 1 - that; the other exam labels stay the sequence stage's, and the
    hierarchy repair (stage 08 / the kernel) makes them consistent with it."""

    mu: int
    delta: float
    f1: float  # of the rule on the fitting studies
    p_pe_called: float
    p_pe_not_called: float
    n_studies: int
    criterion: str = "f1"  # FIT_CRITERIA; heads written before it existed were fitted for F1

    @property
    def rule(self) -> VotingRule:
        return VotingRule(self.mu, self.delta, self.f1, self.criterion)

    def p_pe(self, probs: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Study -> P(PE exam) from its slice probabilities."""
        return {s: self.p_pe_called if c else self.p_pe_not_called for s, c in self.rule.predict(probs).items()}

    def to_json(self) -> dict[str, float | int | str]:
        return {"kind": "voting", **{f: getattr(self, f) for f in self.__dataclass_fields__}}

    @classmethod
    def from_json(cls, d: Mapping[str, object], where: str = "exam_pe_head") -> VotingHead:
        if d.get("kind") != "voting":
            raise ValueError(f"{where}: unknown exam PE head kind {d.get('kind')!r} (known: 'voting')")
        try:
            head = cls(int(d["mu"]), float(d["delta"]), float(d["f1"]), float(d["p_pe_called"]),  # type: ignore[arg-type]
                       float(d["p_pe_not_called"]), int(d["n_studies"]),  # type: ignore[arg-type]
                       str(d.get("criterion", "f1")))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: malformed voting head {dict(d)}: {e}") from e
        if head.criterion not in FIT_CRITERIA:
            raise ValueError(f"{where}: unknown voting fit criterion {head.criterion!r} (known: {FIT_CRITERIA})")
        if head.mu < 1 or not 0 <= head.delta < 1 or not all(0 < p < 1 for p in (head.p_pe_called,
                                                                                  head.p_pe_not_called)):
            raise ValueError(f"{where}: voting head out of range: {dict(d)}")
        return head


def study_pe_labels(truth: pd.DataFrame) -> dict[str, int]:
    """Study -> 1 when any of its images shows PE (``pe_present_on_image``), the label the rule is
    fitted for (papers/condrea2023: a study is positive when it has a positive slice)."""
    from pe.rspect import IMAGE_LABEL, STUDY

    return {str(s): int(v > 0.5) for s, v in truth.groupby(STUDY)[IMAGE_LABEL].max().items()}


def fit_voting_head(probs: Mapping[str, np.ndarray], labels: Mapping[str, int],
                    deltas: Sequence[float] | np.ndarray = DEFAULT_DELTAS, criterion: str = "f1") -> VotingHead:
    """Eq. 2's rule (chosen by ``criterion``) on ``probs`` / ``labels`` plus its two calibrated
    probabilities."""
    probs = {s: p for s, p in probs.items() if s in labels}
    rule = fit_voting(probs, labels, deltas, criterion)
    called = rule.predict(probs)
    c = np.array([called[s] for s in sorted(called)], dtype=bool)
    y = np.array([int(labels[s]) for s in sorted(called)])
    rate = [float(_smoothed_rate(int(y[m].sum()), int(m.sum()))) for m in (c, ~c)]
    return VotingHead(rule.mu, rule.delta, rule.f1, rate[0], rate[1], len(y), criterion)


def apply_exam_pe(pred: pd.DataFrame, p_pe: Mapping[str, float]) -> pd.DataFrame:
    """``pred`` (submission-shaped id,label) with ``<study>_negative_exam_for_pe`` = 1 - ``p_pe[study]``
    (e.g. :meth:`VotingHead.p_pe`); a study of ``pred`` missing from ``p_pe`` is an error."""
    from pe.ids import exam_row_id, label_of_ids

    neg_ids = {exam_row_id(s, NEG_LABEL): 1.0 - float(p) for s, p in p_pe.items()}
    ids = pred["id"].astype(str)
    is_neg = pd.Series(label_of_ids(ids.to_numpy(dtype=object)) == NEG_LABEL, index=ids.index)
    missing = sorted(set(ids[is_neg]) - set(neg_ids))
    if missing:
        raise ValueError(f"{len(missing)} studies have no CNN slice probabilities for the voting head, e.g. "
                         f"{missing[:3]}")
    out = pred.copy()
    out.loc[is_neg, "label"] = ids[is_neg].map(neg_ids).to_numpy()
    return out
