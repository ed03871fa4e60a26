"""Cluster filtering, Pu et al. matching and bootstrap intervals on hand-made cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pe.eval.bootstrap import bootstrap_ci
from pe.localize.clusters import (
    ClusterFilter,
    MatchCounts,
    boxes_to_labels,
    cluster_table,
    filter_clusters,
    match_clusters,
    paired_difference,
    per_study_table,
    pooled_scores,
    scores_from_counts,
)


def _vol(shape=(6, 64, 64)):
    return np.zeros(shape, np.int32)


def test_one_prediction_touching_two_emboli_counts_both():
    true, pred = _vol(), _vol()
    true[2, 10:14, 10:14] = 1
    true[2, 10:14, 20:24] = 2
    true[4, 40:44, 40:44] = 3  # missed
    pred[2, 12, 12:22] = 1  # a bar through emboli 1 and 2
    pred[0, 50:52, 5:7] = 2  # touches nothing
    c = match_clusters(pred, true)
    assert (c.tp, c.fp, c.fn, c.n_pred, c.n_true) == (2, 1, 1, 2, 3)
    s = scores_from_counts(c.tp, c.fp, c.fn)
    assert s["sensitivity"] == pytest.approx(2 / 3) and s["ppv"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(4 / 6)


def test_two_predictions_on_one_embolus_and_3d_intersection():
    true, pred = _vol(), _vol()
    true[1:4, 10:20, 10:20] = 1
    pred[1, 12:14, 12:14] = 1
    pred[3, 15:17, 15:17] = 2
    pred[4, 12:14, 12:14] = 3  # same (y, x) as the embolus but the next slice: no 3D intersection
    c = match_clusters(pred, true)
    assert (c.tp, c.fp, c.fn) == (1, 1, 0)
    with pytest.raises(ValueError, match="shape"):
        match_clusters(pred[:-1], true)


def test_empty_cases_give_nan_where_undefined():
    c = match_clusters(_vol(), _vol())
    assert (c.tp, c.fp, c.fn) == (0, 0, 0)
    assert np.isnan(scores_from_counts(0, 0, 0)["f1"])
    assert scores_from_counts(0, 3, 0)["ppv"] == 0.0


def test_filter_drops_small_and_far_clusters_with_scaled_distance():
    labels = _vol((4, 128, 128))
    labels[1:3, 60:70, 60:70] = 1  # big, central: kept
    labels[1, 62:64, 40:42] = 2  # 4 voxels: too small
    labels[1:3, 2:12, 2:12] = 3  # big, in the corner: 81 px from the centre at 128 px
    flt = ClusterFilter(min_voxels=20, max_dist_px=160.0, ref_size=512)  # 160 px at 512 → 40 px at 128
    out = filter_clusters(labels, flt)
    assert out.max() == 1 and (out[labels == 1] == 1).all() and (out[labels != 1] == 0).all()
    keep_far = filter_clusters(labels, ClusterFilter(min_voxels=20, max_dist_px=None))
    assert keep_far.max() == 2  # renumbered 1..n
    keep_all = filter_clusters(labels, ClusterFilter(min_voxels=None, max_dist_px=None))
    assert keep_all.max() == 3
    # A custom centre moves the distance criterion.
    near_corner = filter_clusters(labels, ClusterFilter(min_voxels=20), centre_yx=(8.0, 8.0))
    assert near_corner.max() == 1 and (near_corner[labels == 3] == 1).all()


def test_boxes_to_labels_joins_boxes_on_neighbouring_slices():
    boxes = [(1, 10, 10, 14, 14), (2, 12, 12, 16, 16), (5, 40, 40, 44, 44)]
    labels = boxes_to_labels((8, 64, 64), boxes)
    assert labels.max() == 2 and labels[1, 10, 10] == labels[2, 15, 15] != labels[5, 40, 40]
    with pytest.raises(ValueError, match="slice index"):
        boxes_to_labels((4, 8, 8), [(9, 0, 0, 1, 1)])


def _f1_pooled(rows: np.ndarray) -> float:
    tp, fp, fn = rows.sum(axis=0)
    return 2 * tp / (2 * tp + fp + fn)


def test_bootstrap_pooled_ratio_and_interval_behaviour():
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 6, size=(60, 3)).astype(float)
    ci = bootstrap_ci(rows, _f1_pooled, n_boot=400, seed=1)
    assert ci.estimate == pytest.approx(_f1_pooled(rows))
    assert ci.low < ci.estimate < ci.high and ci.n_valid == 400
    assert bootstrap_ci(rows, _f1_pooled, n_boot=400, seed=1) == ci  # seeded
    # More studies → narrower interval (same per-study distribution).
    wide = bootstrap_ci(rows[:15], _f1_pooled, n_boot=400, seed=1)
    assert (wide.high - wide.low) > (ci.high - ci.low)
    # Constant data → degenerate interval; NaN resamples are left out.
    const = bootstrap_ci(np.ones(10), np.mean, n_boot=50)
    assert const.low == const.high == 1.0
    half_nan = bootstrap_ci(np.array([0.0, 1.0]), lambda v: np.nan if v.sum() == 0 else v.mean(), n_boot=200)
    assert 0 < half_nan.n_valid < 200
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci(np.zeros((0, 3)), _f1_pooled)


def test_per_study_table_and_pooled_scores():
    true, pred = _vol(), _vol()
    true[2, 10:14, 10:14] = 1
    pred[2, 11, 11] = 1
    counts = {"s1": match_clusters(pred, true), "s2": match_clusters(_vol(), true), "s3": match_clusters(pred, _vol())}
    table = per_study_table(counts)
    assert table[["tp", "fp", "fn"]].to_numpy().tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0]]
    pooled = pooled_scores(table, n_boot=200)
    assert pooled["f1"].estimate == pytest.approx(2 / 4)
    assert pooled["sensitivity"].estimate == pytest.approx(0.5) and pooled["ppv"].estimate == pytest.approx(0.5)
    assert pooled["f1"].low <= 0.5 <= pooled["f1"].high
    assert pooled["mean_study_f1"].estimate == pytest.approx(1 / 3)


def _table(rows):
    """Per-study table from (study, tp, fp, fn) tuples."""
    return per_study_table([(s, MatchCounts(tp=tp, fp=fp, fn=fn, n_pred=tp + fp, n_true=tp + fn))
                            for s, tp, fp, fn in rows])


def test_paired_difference_is_the_difference_of_pooled_scores_over_common_studies():
    rng = np.random.default_rng(0)
    studies = [f"s{i}" for i in range(40)]
    n_true = rng.integers(0, 4, 40)
    a = _table([(s, int(t // 2), int(rng.integers(0, 4)), int(t - t // 2)) for s, t in zip(studies, n_true, strict=True)])
    b = _table([(s, int(t), int(rng.integers(0, 2)), 0) for s, t in zip(studies, n_true, strict=True)])  # finds every embolus
    extra = _table([("only_in_b", 5, 0, 0)])  # a study one method did not score is left out
    diff = paired_difference(a, pd.concat([b, extra], ignore_index=True), n_boot=300)
    pa, pb = pooled_scores(a, n_boot=10), pooled_scores(b, n_boot=10)
    for stat in ("sensitivity", "ppv", "f1"):
        assert diff[stat].estimate == pytest.approx(pb[stat].estimate - pa[stat].estimate)
        assert diff[stat].low <= diff[stat].estimate <= diff[stat].high
    assert diff["sensitivity"].low > 0 and diff["f1"].low > 0  # b is clearly better on these studies
    # the paired interval of a difference with itself is a point at 0; swapped order flips the sign
    same = paired_difference(a, a, n_boot=100)["f1"]
    assert same.estimate == same.low == same.high == 0.0
    flipped = paired_difference(b, a, n_boot=300)["f1"]
    assert flipped.estimate == pytest.approx(-diff["f1"].estimate) and flipped.high < 0
    with pytest.raises(ValueError, match="share no study"):
        paired_difference(a, extra)


def test_paired_difference_of_groups_is_the_difference_of_mean_pooled_scores():
    rng = np.random.default_rng(1)
    studies = [f"s{i}" for i in range(30)]
    n_true = rng.integers(0, 4, 30)

    def run(fp_hi: int) -> pd.DataFrame:  # a run of a recipe: misses half the emboli, some false positives
        return _table([(s, int(t // 2), int(rng.integers(0, fp_hi)), int(t - t // 2))
                       for s, t in zip(studies, n_true, strict=True)])

    weak, strong = [run(6), run(6), run(6)], [run(2), run(2), run(2)]
    extra = _table([("only_here", 3, 0, 0)])
    diff = paired_difference(weak, [strong[0], pd.concat([strong[1], extra], ignore_index=True), strong[2]],
                             n_boot=300)
    for stat in ("sensitivity", "ppv", "f1"):
        mean = np.mean([pooled_scores(t, n_boot=10)[stat].estimate for t in strong]) - np.mean(
            [pooled_scores(t, n_boot=10)[stat].estimate for t in weak])
        assert diff[stat].estimate == pytest.approx(mean)  # the study only one run scored is left out
    assert diff["sensitivity"].estimate == pytest.approx(0.0) and diff["ppv"].low > 0
    # a group of one is the plain paired difference, interval included
    one = paired_difference([weak[0]], [strong[0]], n_boot=200)["f1"]
    plain = paired_difference(weak[0], strong[0], n_boot=200)["f1"]
    assert (one.estimate, one.low, one.high) == (plain.estimate, plain.low, plain.high)
    with pytest.raises(ValueError, match="at least one"):
        paired_difference([], strong)


def test_cluster_table_boxes_and_scores():
    labels = _vol()
    labels[1:3, 10:14, 20:25] = 1
    labels[5, 0, 0] = 3
    score = np.zeros(labels.shape, np.float32)
    score[2, 11, 21] = 0.9
    t = cluster_table(labels, score)
    assert t["cluster"].tolist() == [1, 3] and t["voxels"].tolist() == [40, 1]
    assert t.loc[0, ["z0", "y0", "x0", "z1", "y1", "x1"]].tolist() == [1, 10, 20, 3, 14, 25]
    assert t.loc[0, "score_max"] == pytest.approx(0.9) and t.loc[0, "score_mean"] == pytest.approx(0.9 / 40)
    assert cluster_table(_vol()).empty and np.isnan(cluster_table(labels)["score_max"]).all()
