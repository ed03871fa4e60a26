"""Blend sequence-model experiments on their out-of-fold predictions and print the demo's stage table.

    python src/07_ensemble.py --members seq_demo_gru seq_demo_lstm --out ens_demo [--truth TRAIN.csv]
                              [--cnn-exp demo] [--exam-pe-head sequence|voting|voting_log_loss]

Reads   oof/<exp>/fold<k>.csv (OOF id,label; every id once per member, same ids for all members),
        oof/<exp>/test_fold<k>.csv (test id,label; averaged over folds per member),
        the truth (default <PE_DATA_DIR>/train.csv) and, for the CNN baseline row,
        oof/<cnn_exp>/cnn_fold<k>.parquet (cnn_exp from the members' run config unless given).
Writes  oof/<out>/oof.csv (cross-fitted OOF blend), oof/<out>/test.csv (test blend, not repaired),
        oof/<out>/weights.json (members, mode, per-group weights, scores: used by the Kaggle kernel),
        oof/<out>/stages.json (the stage table as JSON).
Method: pe/eval/ensemble.py (group-wise simplex weights minimising the metric, cross-fitted over folds).
--exam-pe-head voting: negative_exam_for_pe from the voting study head of papers/condrea2023 (>= mu
slices above delta, fitted for F1 on the CNN's OOF slice probabilities, then calibrated), cross-fitted
on the OOF rows; test rows from the fold-averaged test probabilities; weights.json carries the head
for the kernel. An option: on the quality benchmark the sequence stage's calls had the higher F1.
--exam-pe-head voting_log_loss: the same head with (mu, delta) chosen for its log loss instead of F1
(our option beyond the paper; README, methods table).
"""

from __future__ import annotations

import argparse

from pe import paths
from pe.eval.ensemble import EnsembleError, run_ensemble
from pe.eval.voting import EXAM_PE_HEADS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", nargs="+", required=True, help="experiment names under oof/")
    ap.add_argument("--out", required=True, help="name of the ensemble (oof/<out>/)")
    ap.add_argument("--truth", default=None, help="train.csv-format truth (default: <PE_DATA_DIR>/train.csv)")
    ap.add_argument("--cnn-exp", default=None, help="stage-1 experiment for the max-aggregation baseline row")
    ap.add_argument("--exam-pe-head", choices=list(EXAM_PE_HEADS), default="sequence",
                    help="which model gives negative_exam_for_pe (default: the blended sequence members)")
    args = ap.parse_args(argv)
    truth = args.truth or paths.data_dir() / "train.csv"
    try:
        stages = run_ensemble(args.members, args.out, truth, cnn_exp=args.cnn_exp, exam_pe_head=args.exam_pe_head)
    except (EnsembleError, ValueError) as e:
        print(f"error: {e}")
        return 1
    print(f"blend: {stages['mode']} averaging of {', '.join(stages['members'])} on {stages['n_studies']} studies")
    print(stages["table"])
    print(f"wrote {paths.exp_oof_dir(args.out)}/{{oof.csv,test.csv,weights.json,stages.json}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
