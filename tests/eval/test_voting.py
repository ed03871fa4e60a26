"""Voting study head (pe.eval.voting): the fit recovers a known rule; the metrics are right."""

from __future__ import annotations

import numpy as np
import pytest

from pe.eval import voting
from pe.eval.metric import bce


def _studies(mu: int, delta: float, n: int = 120, seed: int = 0) -> tuple[dict, dict]:
    """Studies whose count of slices above delta is spread around mu (exactly mu - 1 and mu occur);
    uncounted slices sit just below delta, so only the true (mu, delta) separates the classes."""
    rng = np.random.default_rng(seed)
    probs, labels = {}, {}
    for i in range(n):
        count = int(rng.integers(0, 2 * mu + 1)) if i >= 2 else mu - 1 + i
        above = rng.uniform(delta + 0.015, 1.0, count)
        below = rng.uniform(0.0, delta - 0.015, int(rng.integers(20, 60)))
        near = np.full(int(rng.integers(0, mu)), delta - 0.012)  # slices a lower delta would count
        probs[f"s{i}"] = rng.permutation(np.concatenate([above, below, near]))
        labels[f"s{i}"] = int(count >= mu)
    return probs, labels


@pytest.mark.parametrize(("mu", "delta"), [(3, 0.5), (7, 0.3)])
def test_fit_recovers_mu_and_delta(mu: int, delta: float) -> None:
    probs, labels = _studies(mu, delta)
    rule = voting.fit_voting(probs, labels)
    assert rule.mu == mu and abs(rule.delta - delta) <= 0.011 and rule.f1 == pytest.approx(1.0)
    assert rule.predict(probs) == labels


def test_fit_beats_fixed_rule_on_noisy_labels() -> None:
    probs, labels = _studies(4, 0.6, seed=3)
    flip = list(labels)[::10]
    noisy = {s: 1 - v if s in flip else v for s, v in labels.items()}
    rule = voting.fit_voting(probs, noisy)
    naive = voting.study_metrics(voting.VotingRule(1, 0.5, 0.0).predict(probs), noisy)["f1"]
    assert rule.f1 > naive and rule.f1 == pytest.approx(voting.study_metrics(rule.predict(probs), noisy)["f1"])


def test_study_metrics() -> None:
    m = voting.study_metrics({"a": 1, "b": 1, "c": 0, "d": 0, "e": 0}, {"a": 1, "b": 0, "c": 1, "d": 0, "e": 0})
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 1, 2, 1)
    assert m["sensitivity"] == 0.5 and m["specificity"] == pytest.approx(2 / 3)
    assert m["ppv"] == 0.5 and m["npv"] == pytest.approx(2 / 3) and m["f1"] == 0.5


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="no label"):
        voting.fit_voting({"a": np.array([0.9])}, {})
    with pytest.raises(ValueError, match="positive"):
        voting.fit_voting({"a": np.array([0.9])}, {"a": 0})


def test_voting_head_calibrates_its_calls_and_sets_the_exam_pe_row() -> None:
    import pandas as pd

    probs, labels = _studies(3, 0.5, n=60, seed=1)
    noisy = dict(labels)
    flipped = [s for s, v in labels.items() if v][:2]  # 2 called studies that are truly negative
    for s in flipped:
        noisy[s] = 0
    head = voting.fit_voting_head(probs, noisy)
    called = head.rule.predict(probs)
    n_called = sum(called.values())
    pos_called = sum(noisy[s] for s, c in called.items() if c)
    pos_not = sum(noisy[s] for s, c in called.items() if not c)
    assert head.n_studies == 60 and (head.mu, head.delta) == (head.rule.mu, head.rule.delta)
    assert head.p_pe_called == pytest.approx((pos_called + 1) / (n_called + 2))
    assert head.p_pe_not_called == pytest.approx((pos_not + 1) / (60 - n_called + 2))
    assert head.p_pe_called > 0.8 > 0.2 > head.p_pe_not_called
    assert voting.VotingHead.from_json(head.to_json()) == head
    with pytest.raises(ValueError, match="kind"):
        voting.VotingHead.from_json({**head.to_json(), "kind": "max"})
    with pytest.raises(ValueError, match="out of range"):
        voting.VotingHead.from_json({**head.to_json(), "p_pe_called": 1.0})
    with pytest.raises(ValueError, match="malformed"):
        voting.VotingHead.from_json({"kind": "voting", "mu": 2})
    # the submission's negative_exam_for_pe becomes 1 - P(PE | call); every other row is kept
    pred = pd.DataFrame({"id": ["img1", "s0_negative_exam_for_pe", "s0_rightsided_pe", "s1_negative_exam_for_pe"],
                         "label": [0.3, 0.5, 0.4, 0.5]})
    out = voting.apply_exam_pe(pred, head.p_pe({"s0": probs["s0"], "s1": probs["s1"]}))
    want = {s: 1 - (head.p_pe_called if called[s] else head.p_pe_not_called) for s in ("s0", "s1")}
    assert out["label"].tolist() == pytest.approx([0.3, want["s0"], 0.4, want["s1"]])
    with pytest.raises(ValueError, match="no CNN slice probabilities"):
        voting.apply_exam_pe(pred, {"s0": 0.5})
    assert voting.study_pe_labels(pd.DataFrame({"StudyInstanceUID": ["a", "a", "b"],
                                                "pe_present_on_image": [0, 1, 0]})) == {"a": 1, "b": 0}


def _head_log_loss(head: voting.VotingHead, probs: dict, labels: dict) -> float:
    p = head.p_pe(probs)
    return float(bce(np.array([labels[s] for s in sorted(p)]), np.array([p[s] for s in sorted(p)])).mean())


def _weak_cnn_studies(n: int, seed: int) -> tuple[dict, dict]:
    """Half the studies positive; every study has a few middling slices (0.05-0.45, the same for both
    classes) and 40 % of the positive ones one confident slice (0.6-0.95): a weak slice model with a
    high-precision, low-recall signal, whose best F1 is to call (nearly) every study positive."""
    rng = np.random.default_rng(seed)
    probs, labels = {}, {}
    for i in range(n):
        y = int(i % 2 == 0)
        noise = rng.uniform(0.05, 0.45, int(rng.poisson(4)))
        sure = rng.uniform(0.6, 0.95, int(y and rng.random() < 0.4))
        probs[f"s{i}"] = np.concatenate([rng.uniform(0.0, 0.04, 60), noise, sure])
        labels[f"s{i}"] = y
    return probs, labels


def test_log_loss_fit_splits_where_f1_calls_most_studies_positive() -> None:
    probs, labels = _weak_cnn_studies(200, seed=0)
    f1_head = voting.fit_voting_head(probs, labels)
    ll_head = voting.fit_voting_head(probs, labels, criterion="log_loss")
    assert sum(f1_head.rule.predict(probs).values()) >= 140  # F1's near-degenerate answer
    called = ll_head.rule.predict(probs)
    assert ll_head.mu == 1 and 0.45 <= ll_head.delta < 0.6 and 30 <= sum(called.values()) <= 60
    assert ll_head.criterion == "log_loss" and ll_head.p_pe_called > 0.95
    assert ll_head.f1 == pytest.approx(voting.study_metrics(called, labels)["f1"]) and ll_head.f1 < f1_head.f1
    # it is the (mu, delta) of lowest log loss, found by brute force over the grid
    brute = {}
    for d in voting.DEFAULT_DELTAS:
        for mu in range(1, 11):
            c = voting.VotingRule(mu, float(d), 0.0).predict(probs)
            k1, n1 = sum(labels[s] for s in c if c[s]), sum(c.values())
            head = voting.VotingHead(mu, float(d), 0.0, (k1 + 1) / (n1 + 2), (100 - k1 + 1) / (200 - n1 + 2), 200)
            brute[(mu, float(d))] = _head_log_loss(head, probs, labels)
    fitted = _head_log_loss(ll_head, probs, labels)
    assert fitted == pytest.approx(brute[(ll_head.mu, ll_head.delta)]) and fitted <= min(brute.values()) + 1e-12
    assert fitted < _head_log_loss(f1_head, probs, labels) - 0.1
    # and it generalises: lower log loss than the F1 head on fresh studies of the same kind
    test_probs, test_labels = _weak_cnn_studies(400, seed=100)
    assert _head_log_loss(ll_head, test_probs, test_labels) < _head_log_loss(f1_head, test_probs, test_labels) - 0.1
    assert voting.VotingHead.from_json(ll_head.to_json()) == ll_head
    legacy = {k: v for k, v in f1_head.to_json().items() if k != "criterion"}  # written before the option
    assert voting.VotingHead.from_json(legacy).criterion == "f1"
    with pytest.raises(ValueError, match="unknown voting fit criterion 'auc'"):
        voting.VotingHead.from_json({**ll_head.to_json(), "criterion": "auc"})
    with pytest.raises(ValueError, match="criterion"):
        voting.fit_voting(probs, labels, criterion="auc")
