"""pe.eval.draws and bench/demo_draws.py: a demo trial's pooled slice AUC and box-size AUCs from its
out-of-fold files and kept truth, and two recipes compared paired over phantom draws."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from pe.data.tables import LABEL_COLUMNS
from pe.eval import draws
from pe.rspect import IMAGE_LABEL, SOP, STUDY

REPO = Path(__file__).resolve().parents[2]


def _truth(n: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    label = (np.arange(n) % 3 == 0).astype(int)
    area = np.where(label == 1, rng.choice([40.0, 120.0, 400.0], n), np.nan)
    return pd.DataFrame({SOP: [f"1.2.{i}" for i in range(n)], IMAGE_LABEL: label, "box_area": area})


def _trial(root: Path, name: str, truth: pd.DataFrame, skill: float, seed: int) -> Path:
    """A trial folder as demo_cnn_trial.sh leaves it: two out-of-fold files and truth.csv."""
    t = root / name
    (t / "oof" / "demo").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    prob = 1 / (1 + np.exp(-(skill * (truth[IMAGE_LABEL].to_numpy() - 0.5) + rng.normal(size=len(truth)))))
    frame = pd.DataFrame({SOP: truth[SOP], "StudyInstanceUID": "1.9", "prob": prob})
    half = len(frame) // 2
    frame.iloc[:half].to_parquet(t / "oof" / "demo" / "cnn_fold0.parquet")
    frame.iloc[half:].to_parquet(t / "oof" / "demo" / "cnn_fold1.parquet")
    truth.to_csv(t / "truth.csv", index=False)
    return t


def test_paired_over_draws_is_the_t_interval_and_sign_test_of_the_differences():
    a = [0.80, 0.82, 0.79, 0.90, 0.75]
    d = np.array([0.01, 0.03, -0.01, 0.02, 0.04])
    res = draws.paired_over_draws(a, np.add(a, d))
    half = stats.t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5)
    assert res["mean"] == pytest.approx(d.mean()) and res["ci"] == pytest.approx((d.mean() - half, d.mean() + half))
    assert (res["wins"], res["losses"]) == (4, 1)
    assert res["sign_p"] == pytest.approx(0.375)  # two-sided binomial, 4 of 5
    with pytest.raises(ValueError, match="same number"):
        draws.paired_over_draws([0.8, 0.9], [0.8])


def test_trial_figures_pool_the_folds_and_split_positives_by_box_size(tmp_path):
    truth = _truth()
    t = _trial(tmp_path, "t", truth, skill=2.0, seed=1)
    m = draws.trial_oof(t)
    fig = draws.trial_figures(m)
    assert fig["pooled_auc"] == pytest.approx(roc_auc_score(m[IMAGE_LABEL], m["prob"]))
    assert (fig["slices"], fig["positives"]) == (40, int(truth[IMAGE_LABEL].sum()))
    small = m[(m[IMAGE_LABEL] == 1) & (m.box_area < 80)]
    neg = m[m[IMAGE_LABEL] == 0]
    want = roc_auc_score([1] * len(small) + [0] * len(neg), pd.concat([small.prob, neg.prob]))
    assert fig["by_box"]["0-80"] == pytest.approx((want, len(small)))
    assert sum(n for _, n in fig["by_box"].values()) == fig["positives"]


def test_a_trial_of_another_draw_or_without_truth_is_refused_with_its_folder(tmp_path):
    t = _trial(tmp_path, "t", _truth(), skill=2.0, seed=1)
    other = _truth().assign(**{SOP: lambda d: "9." + d[SOP]})
    with pytest.raises(ValueError, match=f"{t}: 40 of 40 out-of-fold slices are not in its truth"):
        draws.trial_oof(t, other)
    (t / "truth.csv").unlink()
    with pytest.raises(FileNotFoundError, match="demo_draws.py truth --seed N"):
        draws.trial_oof(t)


def _data_dir(d: Path) -> Path:
    """An RSPECT-layout train.csv of three slices (two positive) and their boxes."""
    d.mkdir(parents=True, exist_ok=True)
    rows = pd.DataFrame({STUDY: "1.9", SOP: ["1.2.0", "1.2.1", "1.2.2"], "SeriesInstanceUID": "1.8"})
    for c in LABEL_COLUMNS:
        rows[c] = 0
    rows[IMAGE_LABEL] = [1, 1, 0]
    rows.to_csv(d / "train.csv", index=False)
    pd.DataFrame({SOP: ["1.2.0", "1.2.0", "1.2.1"], "x": 1, "y": 1, "width": [4, 10, 3], "height": [5, 10, 3]}) \
        .to_csv(d / "train_boxes.csv", index=False)
    return d


def test_slice_truth_keeps_each_slices_largest_box(tmp_path):
    got = draws.slice_truth(_data_dir(tmp_path)).set_index(SOP)
    assert got.loc["1.2.0", "box_area"] == 100 and got.loc["1.2.1", "box_area"] == 9
    assert math.isnan(got.loc["1.2.2", "box_area"]) and got[IMAGE_LABEL].tolist() == [1, 1, 0]


def test_compare_pairs_the_trials_draw_by_draw(tmp_path):
    for i in range(3):
        truth = _truth(seed=i)
        _trial(tmp_path, f"a{i}", truth, skill=1.0, seed=10 + i)
        _trial(tmp_path, f"b{i}", truth, skill=4.0, seed=20 + i)
    cmd = [sys.executable, str(REPO / "bench" / "demo_draws.py"), "compare", "--trials-dir", str(tmp_path),
           "--a", "a0", "a1", "a2", "--b", "b0", "b1", "b2"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    want = [draws.trial_figures(draws.trial_oof(tmp_path / f"{s}{i}"))["pooled_auc"] for s in "ab" for i in range(3)]
    res = draws.paired_over_draws(want[:3], want[3:])
    assert f"B - A: {res['mean']:+.4f}" in out and f"B higher on {res['wins']} of 3 draws" in out
    assert "A: mean" in out and "reach 0.90" in out
    bad = subprocess.run(cmd[:-1], capture_output=True, text=True)  # two B trials for three A trials
    assert bad.returncode != 0 and "pair them draw by draw" in bad.stderr


def test_record_keeps_the_truth_and_prints_the_box_sizes(tmp_path):
    trial = tmp_path / "t1"
    (trial / "oof" / "demo").mkdir(parents=True)
    pd.DataFrame({SOP: ["1.2.0", "1.2.1", "1.2.2"], "prob": [0.9, 0.2, 0.4]}) \
        .to_parquet(trial / "oof" / "demo" / "cnn_fold0.parquet")
    cmd = [sys.executable, str(REPO / "bench" / "demo_draws.py"), "record", str(trial),
           "--data", str(_data_dir(trial / "data")), "--seconds", "1", "2", "3"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "t1: 3 out-of-fold slices (2 positive); phantom 1 s, stages 01-03 2 s, CNN 3 s" in out
    assert "0-80 px2: 0.000 (n=1)" in out and "80-160 px2: 1.000 (n=1)" in out  # 9 px2 below, 100 px2 above the negative
    assert draws.read_trial_truth(trial)[IMAGE_LABEL].tolist() == [1, 1, 0]
