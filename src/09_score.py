"""Score a submission-shaped file against train.csv-format labels with the competition metric.

Reads  --submission S.csv (id,label; only the studies it covers are scored, each completely) and
       --truth TRAIN.csv (train.csv format).
Prints the breakdown table (per-label weight, loss contribution, mean BCE, AUC; study-level PE AUC;
       sensitivity / specificity / PPV / NPV / F1 at 0.5) and ends with the line `score: <float>`.
Writes --json OUT: the same breakdown as JSON (atomic).
--baseline-prior also scores the prior baseline (training label means as constant predictions) on
       the same studies and prints the gain. The means come from --prior-from TRAIN.csv when given;
       otherwise from the truth file itself, which makes an optimistic prior (it has seen the
       labels it is scored on). Without --submission the prior alone is scored (on every truth study).
Malformed input: exit status 2 and the reason, naming the file.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from pe.data.tables import read_truth
from pe.eval import metric, submission
from pe.eval.baselines import prior_predictions
from pe.io import write_json_atomic
from pe.rspect import SOP, STUDY


def _clean(obj: Any) -> Any:
    """NaN -> None so the JSON is standard."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--submission", type=Path, help="submission-shaped predictions (id,label)")
    ap.add_argument("--truth", type=Path, required=True, help="train.csv-format labels")
    ap.add_argument("--json", type=Path, help="write the breakdown as JSON here")
    ap.add_argument("--baseline-prior", action="store_true", help="also score the training-mean prior")
    ap.add_argument("--prior-from", type=Path, help="train.csv whose label means make the prior (default: --truth)")
    args = ap.parse_args(argv)
    if args.submission is None and not args.baseline_prior:
        ap.error("give --submission and/or --baseline-prior")

    try:
        truth = read_truth(args.truth)
        prior_src = read_truth(args.prior_from) if args.prior_from else truth
        # extra columns (an OOF file's fold) are ignored; id,label must be there
        pred = submission.read_submission(args.submission, extra_columns=True) if args.submission else None
        if pred is not None:
            try:
                scorer, ip, ep = metric.scorer_for(pred, truth)
            except ValueError as e:
                raise ValueError(f"{args.submission}: {e}") from e
        else:
            scorer = metric.Scorer(truth)
    except ValueError as e:  # SubmissionError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2

    result: dict[str, Any] = {}
    prior_bd = None
    if args.baseline_prior:
        ids = pd.DataFrame({STUDY: scorer.study_ids[scorer.image_study], SOP: scorer.image_ids})
        prior = prior_predictions(prior_src, ids)
        prior_bd = metric.breakdown_arrays(scorer, *scorer.align(prior))
        source = str(args.prior_from) if args.prior_from else f"{args.truth} (optimistic: the scored labels)"
        prior_bd["prior_source"] = source
        result["prior"] = prior_bd
    if pred is not None:
        bd = metric.breakdown_arrays(scorer, ip, ep)
        result.update(bd)
        result["submission"] = str(args.submission)
    else:
        assert prior_bd is not None
        result.update({k: v for k, v in prior_bd.items() if k != "prior_source"})
        result["submission"] = "prior baseline"

    if prior_bd is not None and pred is not None:
        print(f"prior baseline (means from {prior_bd['prior_source']}): {prior_bd['score']:.6f}")
        print(f"gain over the prior: {prior_bd['score'] - result['score']:+.6f}")
        print()
    elif prior_bd is not None:
        print(f"prior baseline only (means from {prior_bd['prior_source']})")
    if args.json:
        write_json_atomic(args.json, _clean(result))
    print(metric.format_breakdown(result))  # its last line is `score: <float>`
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
