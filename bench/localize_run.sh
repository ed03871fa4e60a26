#!/usr/bin/env bash
# condrea2024's localisation tables on the benchmark phantom, with a quality-benchmark CNN: stage 11 teacher on
# both splits, stage 12 student(s), bench/bench_localize.py (the table and its paired differences).
#   bash bench/localize_run.sh RUN_FOLDER [TEST_STUDIES|all] [TRAIN_STUDIES|all]
#   ITERS="300 1200" ORACLE_ITERS="300 1200" bash bench/localize_run.sh RUN_FOLDER all all
# RUN_FOLDER: a finished benchmark run with a stage-04 experiment "cnn",
#   reports/bench-quality/<out>/runs/cnn-<key>-s<seed> (the phantom is input/bench-phantom; PE_DATA_DIR overrides).
# TEST_STUDIES / TRAIN_STUDIES: the first N studies of each split (default 10 / 24, the 2026-11-28 subset), or "all".
# ITERS: one student per value (default 1200, stage 12's), trained on the teacher's pseudo-masks: student_it<N>.
# ORACLE_ITERS: oracle students trained on the train split's box truth: student_oracle_it<N>.
# Outputs go under RUN_FOLDER/work/localize/cnn/; finished studies and trained students are reused (stage 12
# retrains only a missing model.pt). Time on 2 CPU cores (2026-12-07, centre-slice CNN): the teacher ~5 s per
# study (IG 8 steps, 3 rounds; all 240 studies in 14 min), a student ~5.5 min for 1,200 iterations plus ~5 s
# per predicted study.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?give a finished quality-benchmark run folder (reports/bench-quality/<out>/runs/cnn-<key>-s<seed>)}
NTEST=${2:-10}
NTRAIN=${3:-24}
ITERS=${ITERS:-1200}
ORACLE_ITERS=${ORACLE_ITERS:-}
if [ ! -d "$RUN/work/models/cnn" ]; then
    echo "$RUN: no stage-04 experiment 'cnn' there; give a finished quality-benchmark run folder" \
         "(reports/bench-quality/<out>/runs/cnn-<key>-s<seed>)" >&2
    exit 2
fi
RUN=$(cd "$RUN" && pwd)
export PE_WORK_DIR=$RUN/work PE_OOF_DIR=$RUN/oof PE_DATA_DIR=${PE_DATA_DIR:-$PWD/input/bench-phantom}
PY=${PY:-.venv/bin/python}
cap() { if [ "$1" = all ]; then echo ""; else echo "--max-studies $1"; fi; }
TEACHER="--ig-steps 8 --max-iter 3 --clf-sensitivity 0.95"
$PY src/11_pseudo_masks.py --exp cnn --split test $(cap "$NTEST") $TEACHER
$PY src/11_pseudo_masks.py --exp cnn --split train $(cap "$NTRAIN") $TEACHER
LOC=$PE_WORK_DIR/localize/cnn
STUDENTS=()
student() {  # name iterations [extra stage-12 arguments]
    local name=$1 it=$2
    shift 2
    $PY src/12_train_student.py --exp cnn --splits test $(cap "$NTEST") --iterations "$it" --out "$LOC/$name" "$@"
    STUDENTS+=(--student "$name=$LOC/$name")
}
for it in $ITERS; do
    student "student_it$it" "$it"
done
for it in $ORACLE_ITERS; do
    student "student_oracle_it$it" "$it" \
        --train-boxes "$PE_DATA_DIR/train_boxes.csv"
done
$PY bench/bench_localize.py --exp cnn --split test --boxes "$PE_DATA_DIR/phantom_test_boxes.csv" "${STUDENTS[@]}" \
    --csv "$LOC/localization_test.csv"
