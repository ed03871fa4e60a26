"""Folds: every study in exactly one fold, stratified on the exam labels, validated when loaded."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pe.data.folds import check_folds, load_folds, make_folds, merge_small_strata, study_strata
from pe.rspect import EXAM_LABELS

REPO = Path(__file__).resolve().parents[2]


def fake_meta(n_neg: int = 40, n_ind: int = 3, n_pos: int = 30, seed: int = 0, rows_per_study: int = 3) -> pd.DataFrame:
    """Per-image metadata with exam labels repeated on every row of a study."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_neg + n_ind + n_pos):
        lab = dict.fromkeys(EXAM_LABELS, 0)
        if i < n_neg:
            lab["negative_exam_for_pe"] = 1
        elif i < n_neg + n_ind:
            lab["indeterminate"] = 1
        else:
            rv = int(rng.random() < 0.4)
            lab.update(rv_lv_ratio_gte_1=rv, rv_lv_ratio_lt_1=1 - rv, central_pe=int(rng.random() < 0.3),
                       rightsided_pe=1)
        study = f"{i:012x}"
        for k in range(rows_per_study):
            rows.append({"StudyInstanceUID": study, "SOPInstanceUID": f"{i:06x}{k:06x}", **lab})
    return pd.DataFrame(rows).sample(frac=1, random_state=seed).reset_index(drop=True)


def test_every_study_in_exactly_one_fold_and_stratified() -> None:
    meta = fake_meta()
    folds = make_folds(meta, n_folds=5, seed=42)
    assert sorted(folds["StudyInstanceUID"]) == sorted(meta["StudyInstanceUID"].unique())
    assert not folds["StudyInstanceUID"].duplicated().any()
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3, 4]
    check_folds(folds, meta)
    # Stratification: positives and negatives spread evenly (StratifiedKFold: counts differ by <= 1
    # per stratum, so at most by the number of positive sub-strata for "positive").
    study_lab = meta.groupby("StudyInstanceUID")[["negative_exam_for_pe"]].first()
    per_fold = folds.join(study_lab, on="StudyInstanceUID").groupby("fold")["negative_exam_for_pe"].sum()
    assert per_fold.max() - per_fold.min() <= 1
    # Same seed → same folds; another seed → different folds.
    assert make_folds(meta, 5, 42).equals(folds)
    assert not make_folds(meta, 5, 7)["fold"].equals(folds["fold"])


def test_small_strata_are_merged_upwards() -> None:
    meta = fake_meta(n_neg=20, n_ind=2, n_pos=12)
    strata = study_strata(meta)
    assert (strata == "ind").sum() == 2
    merged = merge_small_strata(strata, 5)
    assert merged.value_counts().min() >= 5
    assert "ind" not in set(merged)  # 2 indeterminate studies cannot fill 5 folds
    assert (merged[strata == "neg"] == "neg").all()  # large strata untouched


def test_too_few_studies_and_unlabelled_meta_fail_clearly() -> None:
    with pytest.raises(ValueError, match="cannot fill"):
        make_folds(fake_meta(n_neg=2, n_ind=0, n_pos=1), n_folds=5)
    with pytest.raises(ValueError, match="exam labels"):
        make_folds(pd.DataFrame({"StudyInstanceUID": ["a"], "SOPInstanceUID": ["b"]}))


def test_load_folds_validates(tmp_path: Path) -> None:
    good = pd.DataFrame({"StudyInstanceUID": ["a", "b", "c", "d"], "fold": [0, 1, 0, 1]})
    good.to_csv(tmp_path / "good.csv", index=False)
    assert load_folds(tmp_path / "good.csv").equals(good)
    bad_cases = {
        "dup.csv": (pd.DataFrame({"StudyInstanceUID": ["a", "a", "b"], "fold": [0, 1, 1]}), "more than one"),
        "gap.csv": (pd.DataFrame({"StudyInstanceUID": ["a", "b", "c"], "fold": [0, 2, 2]}), "0..K-1"),
        "col.csv": (pd.DataFrame({"StudyInstanceUID": ["a", "b"]}), "missing column"),
    }
    for name, (df, msg) in bad_cases.items():
        df.to_csv(tmp_path / name, index=False)
        with pytest.raises(ValueError, match=msg) as e:
            load_folds(tmp_path / name)
        assert name in str(e.value)
    meta = pd.DataFrame({"StudyInstanceUID": ["a", "b", "c", "d", "e"]})
    with pytest.raises(ValueError, match="have no fold"):
        check_folds(good, meta)
    with pytest.raises(ValueError, match="not in the metadata"):
        check_folds(good, meta[~meta["StudyInstanceUID"].isin(["d", "e"])])


def test_make_folds_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    meta = fake_meta()
    meta.to_parquet(tmp_path / "meta.parquet", index=False)
    spec = importlib.util.spec_from_file_location("make_folds", REPO / "src" / "03_make_folds.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    out = tmp_path / "folds.csv"
    assert mod.main(["--meta", str(tmp_path / "meta.parquet"), "--out", str(out), "--n-folds", "4", "--seed", "1"]) == 0
    folds = load_folds(out)
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3]
    check_folds(folds, meta)
    assert "73 studies in 4 folds" in capsys.readouterr().out
