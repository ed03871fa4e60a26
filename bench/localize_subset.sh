#!/usr/bin/env bash
# condrea2024's localisation tables on a subset of the benchmark phantom, with the quality benchmark's
# baseline CNN (stage 11 teacher on both splits, stage 12 student, bench/bench_localize.py).
#   bash bench/localize_subset.sh [RUN_FOLDER] [TEST_STUDIES] [TRAIN_STUDIES]
# RUN_FOLDER: a finished benchmark run (default the baseline of reports/bench-quality/hard-1-conv, seed 0).
# Outputs go under RUN_FOLDER/work/localize/cnn/; the table is printed. The teacher costs ~20 s per study
# on 2 CPU cores (IG 8 steps, 3 rounds); the student ~4 min of training plus ~12 s per predicted study.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-reports/bench-quality/hard-1-conv/runs/cnn-4bb705b016-s0}
NTEST=${2:-10}
NTRAIN=${3:-24}
if [ ! -d "$RUN/work/models/cnn" ]; then
    echo "$RUN: no stage-04 experiment 'cnn' there; give a finished quality-benchmark run folder" \
         "(reports/bench-quality/<out>/runs/cnn-<key>-s<seed>)" >&2
    exit 2
fi
export PE_WORK_DIR=$PWD/$RUN/work PE_OOF_DIR=$PWD/$RUN/oof PE_DATA_DIR=$PWD/input/bench-phantom
PY=${PY:-.venv/bin/python}
TEACHER="--ig-steps 8 --max-iter 3 --clf-sensitivity 0.95"
$PY src/11_pseudo_masks.py --exp cnn --split test --max-studies "$NTEST" $TEACHER
$PY src/11_pseudo_masks.py --exp cnn --split train --max-studies "$NTRAIN" $TEACHER
$PY src/12_train_student.py --exp cnn --splits test --max-studies "$NTEST" --retrain
$PY bench/bench_localize.py --exp cnn --split test --boxes "$PE_DATA_DIR/phantom_test_boxes.csv"
