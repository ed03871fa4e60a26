"""Submission conversion, validation, atomic I/O, and the 08_make_submission.py script."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pe.eval import hierarchy, metric, submission
from pe.eval.submission import SubmissionError
from pe.rspect import EXAM_LABELS, IMAGE_LABEL, SOP, STUDY
from pe.synthetic.predictions import synthetic_calibrated

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def small() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    truth, image_df, exam_df = synthetic_calibrated(6, seed=1, min_images=3, max_images=6)
    return truth[[STUDY, "SeriesInstanceUID", SOP]], image_df, exam_df


def test_to_long_from_long_round_trip(small: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]) -> None:
    test, image_df, exam_df = small
    sub = submission.to_long(image_df, exam_df)
    assert list(sub.columns) == ["id", "label"]
    assert len(sub) == len(test) + 9 * test[STUDY].nunique()
    assert f"{exam_df[STUDY][0]}_acute_and_chronic_pe" in set(sub["id"])
    shuffled = sub.sample(frac=1.0, random_state=1)
    img2, exam2 = submission.from_long(shuffled, test)
    assert img2[SOP].tolist() == image_df[SOP].tolist()
    assert np.array_equal(img2[IMAGE_LABEL].to_numpy(), image_df[IMAGE_LABEL].to_numpy())
    assert np.array_equal(exam2[list(EXAM_LABELS)].to_numpy(), exam_df[list(EXAM_LABELS)].to_numpy())
    with pytest.raises(SubmissionError, match="lacks 1 ids"):
        submission.from_long(sub.iloc[1:], test)
    # an OOF frame with a fold column converts too (the extra column is ignored)
    img3, _ = submission.from_long(sub.assign(fold=0), test)
    assert np.array_equal(img3[IMAGE_LABEL].to_numpy(), image_df[IMAGE_LABEL].to_numpy())


def test_validate_reasons(small: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]) -> None:
    test, image_df, exam_df = small
    sub = submission.to_long(image_df, exam_df)
    submission.validate(sub, test)
    first_id = sub["id"][0]
    bad_cases = {
        "missing": (sub.iloc[1:], rf"lacks 1 ids, e.g. {first_id}"),
        "extra": (pd.concat([sub, pd.DataFrame({"id": ["zz1", "zz2"], "label": [0.1, 0.2]})]),
                  r"2 ids not in the test set, e.g. zz1, zz2"),
        "duplicate": (pd.concat([sub, sub.iloc[:1]]), rf"1 duplicated ids, e.g. {first_id}"),
        "nan": (sub.assign(label=np.where(sub.index == 3, np.nan, sub["label"])), r"1 non-numeric"),
        "range": (sub.assign(label=np.where(sub.index < 2, 1.5, sub["label"])), r"2 labels outside \[0, 1\]"),
        "columns": (sub.rename(columns={"label": "prob"}), r"exactly the columns id,label"),
    }
    for name, (bad, pattern) in bad_cases.items():
        with pytest.raises(SubmissionError, match=pattern):
            submission.validate(bad, test)
        assert name


def test_write_read_atomic_and_exact(tmp_path: Path, small: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]) -> None:
    test, image_df, exam_df = small
    sub = submission.to_long(image_df, exam_df)
    sub.loc[0, "label"] = hierarchy.UP  # the smallest float above 0.5 must survive the CSV round trip
    out = tmp_path / "sub" / "s.csv"
    submission.write_submission(sub, out, test)
    back = submission.read_submission(out)
    assert back["label"][0] > 0.5
    assert np.array_equal(back["label"].to_numpy(), sub["label"].to_numpy())
    assert [p.name for p in out.parent.iterdir()] == ["s.csv"]  # no temporary left behind
    with pytest.raises(SubmissionError):
        submission.write_submission(sub.iloc[1:], tmp_path / "bad.csv", test)
    assert not (tmp_path / "bad.csv").exists()
    (tmp_path / "junk.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SubmissionError, match="junk.csv"):
        submission.read_submission(tmp_path / "junk.csv")


def test_make_submission_script(tmp_path: Path, capsys: pytest.CaptureFixture[str], load_script) -> None:
    truth, image_df, exam_df = synthetic_calibrated(30, seed=7, min_images=5, max_images=15)
    test = truth[[STUDY, "SeriesInstanceUID", SOP]]
    test.to_csv(tmp_path / "test.csv", index=False)
    pred = submission.to_long(image_df, exam_df)
    pred.to_csv(tmp_path / "pred.csv", index=False)
    assert hierarchy.check_long(pred, test).drop(columns=[STUDY]).to_numpy().any()  # needs repair

    script = load_script("08_make_submission.py")
    rc = script.main(["--pred", str(tmp_path / "pred.csv"), "--test", str(tmp_path / "test.csv"),
                      "--out", str(tmp_path / "out" / "sub.csv")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "expected cost of repair" in out and "1a" in out
    sub = submission.read_submission(tmp_path / "out" / "sub.csv")
    submission.validate(sub, test)
    assert not hierarchy.check_long(sub, test).drop(columns=[STUDY]).to_numpy().any()
    # the repair's expected cost is small; on these calibrated predictions the score barely moves
    assert metric.score(sub, truth) - metric.score(pred, truth) < 0.02

    pred.iloc[:-1].to_csv(tmp_path / "short.csv", index=False)
    rc = script.main(["--pred", str(tmp_path / "short.csv"), "--test", str(tmp_path / "test.csv"),
                      "--out", str(tmp_path / "never.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and "short.csv" in err and "lacks 1 ids" in err
    assert not (tmp_path / "never.csv").exists()
