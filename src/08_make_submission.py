"""Make the final submission: repair the label hierarchy at the lowest expected metric, validate
against test.csv and write atomically.

Reads  --pred PRED.csv (id,label, submission-shaped, possibly inconsistent) and --test TEST.csv
       (StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID).
Writes --out SUB.csv (id,label: the images in test.csv order, then 9 rows per study). Prints how many exams broke each rule
(each of them was changed), the flips between positive and negative, and the expected-loss cost
of the repair (pe.eval.hierarchy.repair). Exit status 2 with the reason on malformed input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from pe import paths
from pe.eval import hierarchy, submission
from pe.rspect import SOP, STUDY


def read_test(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise submission.SubmissionError(f"{path}: no such file")
    df = pd.read_csv(path, dtype=str)
    missing = [c for c in (STUDY, SOP) if c not in df.columns]
    if missing:
        raise submission.SubmissionError(f"{path}: lacks columns {missing}")
    return df


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pred", type=Path, required=True, help="submission-shaped predictions (id,label)")
    ap.add_argument("--test", type=Path, required=True, help="test.csv of the competition")
    ap.add_argument("--out", type=Path, default=paths.submissions_dir() / "submission.csv",
                    help="submission CSV to write (default: $PE_SUBMISSIONS_DIR or submissions/, submission.csv)")
    args = ap.parse_args(argv)

    try:
        test = read_test(args.test)
        pred = submission.read_submission(args.pred)
        try:
            image_df, exam_df = submission.from_long(pred, test)
        except submission.SubmissionError as e:
            raise submission.SubmissionError(f"{args.pred}: {e}") from e
    except submission.SubmissionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    image_df, exam_df, report = hierarchy.repair(image_df, exam_df)
    print(hierarchy.format_repair_summary(hierarchy.summarize_repair(report)))
    broken = hierarchy.check(image_df, exam_df).drop(columns=[STUDY]).to_numpy()
    assert not broken.any(), "repair left a broken rule"  # guaranteed by construction and tested
    fixed = submission.to_long(image_df, exam_df)
    submission.write_submission(fixed, args.out, test)  # validates against test.csv first
    print(f"wrote {args.out}: {len(fixed)} rows ({len(test)} images, {test[STUDY].nunique()} studies)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
