"""The competition metric: hand-computed values, the fast scorer, the breakdown, the torch loss, the
prior baseline and the 09_score.py script."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pe import rspect
from pe.eval import metric
from pe.eval.baselines import prior_predictions
from pe.eval.submission import to_long
from pe.ids import exam_row_id
from pe.rspect import EXAM_LABELS, IMAGE_LABEL, SOP, STUDY
from pe.synthetic.predictions import synthetic_calibrated

REPO = Path(__file__).resolve().parents[2]


def _truth(exams: dict[str, tuple[list[int], dict[str, int]]]) -> pd.DataFrame:
    """train.csv-shaped truth from {study: (image labels, exam labels that are 1)}."""
    rows = []
    for study, (images, on) in exams.items():
        for i, y in enumerate(images):
            row = {c: 0 for c in rspect.TRAIN_COLUMNS}
            row.update({STUDY: study, "SeriesInstanceUID": study + "s", SOP: f"{study}i{i}", IMAGE_LABEL: y})
            row.update(on)
            rows.append(row)
    return pd.DataFrame(rows)[list(rspect.TRAIN_COLUMNS)]


def _pred(image: dict[str, float], exam: dict[str, dict[str, float]], default: float = 0.5) -> pd.DataFrame:
    ids, labels = list(image), list(image.values())
    for study, values in exam.items():
        for label in EXAM_LABELS:
            ids.append(exam_row_id(study, label))
            labels.append(values.get(label, default))
    return pd.DataFrame({"id": ids, "label": labels})


TWO_EXAMS = _truth({
    "A": ([1, 0], {"central_pe": 1, "rv_lv_ratio_gte_1": 1}),
    "B": ([0], {"negative_exam_for_pe": 1}),
})


def test_two_exam_hand_computed() -> None:
    # Exam A: images (1, 0) -> q = 1/2, each image row weighs 0.07361963 / 2 = 0.036809815.
    #   A i0: truth 1, pred 0.8 -> BCE = -ln 0.8 = 0.22314355131
    #   A i1: truth 0, pred 0.0 -> clipped to 1e-15 -> BCE = -ln(1 - 1e-15) ~ 1.1e-15
    # Exam B: image (0) -> q = 0 -> its image row weighs 0, so even pred 1.0 (BCE 34.54) adds nothing.
    # Exam rows: every prediction 0.5 -> BCE = ln 2 = 0.69314718056; the nine weights sum to
    #   0.99999999992 per exam (as printed in RSPECT.md).
    # numerator   = 0.036809815 * 0.22314355131 + 2 * 0.99999999992 * 0.69314718056 = 1.39450823385
    # denominator = 0.07361963 + 2 * 0.99999999992                                    = 2.07361962984
    # score       = 0.67249953356
    pred = _pred({"Ai0": 0.8, "Ai1": 0.0, "Bi0": 1.0}, {"A": {}, "B": {}})
    assert metric.score(pred, TWO_EXAMS) == pytest.approx(0.67249953356, rel=1e-10)


def test_clipped_prediction_on_weighted_row() -> None:
    # As above, but A's chronic_pe (truth 0) predicted 1.0: clipped to 1 - 1e-15, which float64
    # rounds to 1 - 9.992007221626409e-16, so its BCE is -ln(9.992007221626409e-16) = 34.5395759923
    # instead of ln 2, at weight 0.1042944785:
    # numerator = 1.39450823385 + 0.1042944785 * (34.5395759923 - 0.69314718056) = 4.92450387586
    # score     = 4.92450387586 / 2.07361962984 = 2.37483471173
    pred = _pred({"Ai0": 0.8, "Ai1": 0.0, "Bi0": 1.0}, {"A": {"chronic_pe": 1.0}, "B": {}})
    assert metric.score(pred, TWO_EXAMS) == pytest.approx(2.37483471173, rel=1e-10)


def test_zero_weight_image_rows_and_clip() -> None:
    base = _pred({"Ai0": 0.8, "Ai1": 0.0, "Bi0": 1.0}, {"A": {}, "B": {}})
    other = _pred({"Ai0": 0.8, "Ai1": 1e-30, "Bi0": 0.3}, {"A": {}, "B": {}})
    # B's image row weighs 0 and 0 vs 1e-30 are the same after the clip
    assert metric.score(base, TWO_EXAMS) == metric.score(other, TWO_EXAMS)
    worse = _pred({"Ai0": 0.8, "Ai1": 0.9, "Bi0": 1.0}, {"A": {}, "B": {}})
    assert metric.score(worse, TWO_EXAMS) > metric.score(base, TWO_EXAMS)


def test_only_studies_in_pred_are_scored_and_ids_checked() -> None:
    pred_b = _pred({"Bi0": 0.1}, {"B": {"negative_exam_for_pe": 0.9}}, default=0.1)
    # B alone: image row weight 0; exam: ln(1/0.9) for negative_exam_for_pe, ln(1/0.9) for the rest
    expected = sum(w * -math.log(0.9) for w in rspect.EXAM_WEIGHT_VECTOR) / sum(rspect.EXAM_WEIGHT_VECTOR)
    assert metric.score(pred_b, TWO_EXAMS) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match=r"lacks 1 ids.*Ai1"):
        metric.score(_pred({"Ai0": 0.8}, {"A": {}}), TWO_EXAMS)
    with pytest.raises(ValueError, match="duplicated"):
        metric.score(pd.concat([pred_b, pred_b.iloc[:1]]), TWO_EXAMS)
    with pytest.raises(ValueError, match=r"not in the truth.*zzz"):
        metric.score(pd.concat([pred_b, pd.DataFrame({"id": ["zzz"], "label": [0.5]})]), TWO_EXAMS)
    with pytest.raises(ValueError, match="differs between images"):
        bad = TWO_EXAMS.copy()
        bad.loc[0, "central_pe"] = 0
        metric.score(pred_b, bad)


def test_scorer_fast_path_matches_and_subsets() -> None:
    truth, image_df, exam_df = synthetic_calibrated(30, seed=3, min_images=5, max_images=20)
    pred = to_long(image_df, exam_df)
    scorer = metric.Scorer(truth)
    ip, ep = scorer.align(pred)
    assert scorer.score(ip, ep) == pytest.approx(metric.score(pred, truth), rel=1e-12)
    # a pred restricted to some studies scores as a scorer built for those studies
    keep = scorer.study_ids[:7]
    part = pred[pred["id"].isin(set(truth.loc[truth[STUDY].isin(keep), SOP]))
                | pred["id"].isin({exam_row_id(s, c) for s in keep for c in EXAM_LABELS})]
    assert metric.score(part, truth) == pytest.approx(metric.Scorer(truth, keep).score_long(part), rel=1e-12)
    with pytest.raises(ValueError, match="shape"):
        scorer.score(ip[:-1], ep)


def test_breakdown_consistent_and_perfect_auc() -> None:
    truth, image_df, exam_df = synthetic_calibrated(40, seed=4, min_images=5, max_images=20)
    bd = metric.score_breakdown(to_long(image_df, exam_df), truth)
    assert sum(v["loss"] for v in bd["labels"].values()) == pytest.approx(bd["score"], rel=1e-12)
    assert sum(v["weight"] for v in bd["labels"].values()) == pytest.approx(1.0, rel=1e-12)
    assert list(bd["labels"]) == [IMAGE_LABEL, *EXAM_LABELS]
    json.dumps(bd)  # serialisable
    # predicting the truth itself: AUC 1 wherever defined, and perfect sensitivity/specificity
    first = truth.drop_duplicates(STUDY)
    exact = to_long(truth[[SOP, IMAGE_LABEL]].astype({IMAGE_LABEL: float}), first[[STUDY, *EXAM_LABELS]].astype(
        {c: float for c in EXAM_LABELS}))
    bd = metric.score_breakdown(exact, truth)
    assert bd["image_auc"] == 1.0 and bd["study_pe_auc"] == 1.0
    assert bd["exam_pe_at_0.5"]["sensitivity"] == 1.0 and bd["exam_pe_at_0.5"]["specificity"] == 1.0
    assert bd["score"] < 1e-12
    table = metric.format_breakdown(bd)
    assert table.splitlines()[-1] == f"score: {bd['score']!r}"


def test_binary_stats_hand_counts() -> None:
    # truth 1,1,0,0,0 vs predicted 1,0,1,0,0: tp=1 fn=1 fp=1 tn=2
    s = metric.binary_stats(np.array([1, 1, 0, 0, 0]), np.array([1, 0, 1, 0, 0], dtype=bool))
    assert (s["tp"], s["fn"], s["fp"], s["tn"]) == (1, 1, 1, 2)
    assert s["sensitivity"] == 0.5 and s["specificity"] == pytest.approx(2 / 3)
    assert s["ppv"] == 0.5 and s["npv"] == pytest.approx(2 / 3) and s["f1"] == 0.5


def test_torch_loss_equals_numpy_metric() -> None:
    rng = np.random.default_rng(0)
    B, L = 5, 12
    lengths = np.array([12, 3, 7, 1, 9])
    mask = np.arange(L)[None, :] < lengths[:, None]
    img_t = (rng.random((B, L)) < 0.3) & mask
    img_t[2] = False  # an exam without positive images: its image rows weigh 0
    exam_t = (rng.random((B, 9)) < 0.4).astype(np.float64)
    img_logit = rng.normal(0, 3, (B, L))
    img_logit[~mask] = 1e6  # garbage in the padding must not matter
    exam_logit = rng.normal(0, 3, (B, 9))

    loss = metric.torch_metric_loss(torch.tensor(img_logit, requires_grad=True), torch.tensor(img_t, dtype=torch.float64),
                                    torch.tensor(mask), torch.tensor(exam_logit), torch.tensor(exam_t))
    assert loss.dtype == torch.float64 and loss.ndim == 0

    rows, image_probs = [], {}
    exam_probs = {}
    for b in range(B):
        study = f"s{b}"
        on = {c: int(exam_t[b, j]) for j, c in enumerate(EXAM_LABELS)}
        for i in range(lengths[b]):
            row = {c: 0 for c in rspect.TRAIN_COLUMNS}
            row.update(on)
            row.update({STUDY: study, SOP: f"{study}i{i}", IMAGE_LABEL: int(img_t[b, i])})
            rows.append(row)
            image_probs[f"{study}i{i}"] = 1 / (1 + np.exp(-img_logit[b, i]))
        exam_probs[study] = {c: 1 / (1 + np.exp(-exam_logit[b, j])) for j, c in enumerate(EXAM_LABELS)}
    ref = metric.score(_pred(image_probs, exam_probs), pd.DataFrame(rows))
    assert loss.item() == pytest.approx(ref, abs=1e-6, rel=1e-9)
    loss.backward()  # differentiable


def test_prior_predictions_use_study_means() -> None:
    # study sizes differ, so the mean over images and the mean over studies differ
    truth = _truth({
        "A": ([1, 1, 0, 0], {"central_pe": 1, "rv_lv_ratio_lt_1": 1}),
        "B": ([0], {"negative_exam_for_pe": 1}),
    })
    target = pd.DataFrame({STUDY: ["T", "T", "U"], SOP: ["t0", "t1", "u0"]})
    prior = prior_predictions(truth, target).set_index("id")["label"]
    assert len(prior) == 3 + 2 * 9
    assert prior["t0"] == prior["u0"] == pytest.approx(2 / 5)  # images: 2 positive of 5
    # studies: (1 + 1) / (2 + 2) by the rule of succession (not 4 of 5 image rows)
    assert prior["T_central_pe"] == pytest.approx(0.5)
    assert prior["U_negative_exam_for_pe"] == pytest.approx(0.5)
    assert prior["U_chronic_pe"] == pytest.approx(1 / 4)  # absent label: never exactly 0


def test_calibrated_predictions_beat_prior() -> None:
    truth, image_df, exam_df = synthetic_calibrated(200, seed=5, min_images=10, max_images=40)
    model = metric.score(to_long(image_df, exam_df), truth)
    prior = metric.score(prior_predictions(truth, truth), truth)
    assert model < prior - 0.03


def test_score_script(tmp_path: Path, capsys: pytest.CaptureFixture[str], load_script) -> None:
    truth, image_df, exam_df = synthetic_calibrated(15, seed=6, min_images=5, max_images=15)
    truth.to_csv(tmp_path / "train.csv", index=False)
    pred = to_long(image_df, exam_df)
    pred.assign(fold=1).to_csv(tmp_path / "sub.csv", index=False)  # an OOF file's fold column is ignored
    script = load_script("09_score.py")
    rc = script.main(["--submission", str(tmp_path / "sub.csv"), "--truth", str(tmp_path / "train.csv"),
                      "--json", str(tmp_path / "s.json"), "--baseline-prior"])
    out = capsys.readouterr().out
    assert rc == 0
    last = out.strip().splitlines()[-1]
    assert last.startswith("score: ")
    assert float(last.split()[1]) == pytest.approx(metric.score(pred, truth), rel=1e-12)
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["score"] == pytest.approx(float(last.split()[1]), rel=1e-12)
    assert saved["prior"]["score"] > saved["score"]
    assert "gain over the prior" in out

    # malformed: a study with a missing row, and a file that is not a submission
    pred.iloc[1:].to_csv(tmp_path / "bad.csv", index=False)
    assert script.main(["--submission", str(tmp_path / "bad.csv"), "--truth", str(tmp_path / "train.csv")]) == 2
    err = capsys.readouterr().err
    assert "bad.csv" in err and "lacks 1 ids" in err
    assert script.main(["--submission", str(tmp_path / "train.csv"), "--truth", str(tmp_path / "train.csv")]) == 2
    assert "train.csv" in capsys.readouterr().err
