#!/usr/bin/env bash
# condrea2024's localisation tables on the benchmark phantom, with a quality-benchmark CNN: stage 11 teacher on
# both splits, stage 12 student(s), bench/bench_localize.py (the table and its paired differences).
#   bash bench/localize_run.sh RUN_FOLDER [TEST_STUDIES|all] [TRAIN_STUDIES|all]
#   ITERS="300 1200" ORACLE_ITERS="300 1200" bash bench/localize_run.sh RUN_FOLDER all all
#   SEEDS="0 1" GATED_ITERS=1200 FINETUNE_STUDIES=45 bash bench/localize_run.sh RUN_FOLDER all all   # session 24
# RUN_FOLDER: a finished benchmark run with a stage-04 experiment "cnn",
#   reports/bench-quality/<out>/runs/cnn-<key>-s<seed> (the phantom is input/bench-phantom; PE_DATA_DIR overrides).
# TEST_STUDIES / TRAIN_STUDIES: the first N studies of each split (default 10 / 24, the 2026-11-28 subset), or "all".
# SEEDS: student seeds (default 0); seed k > 0 adds "_seed<k>" to the folder names below.
# ITERS: one student per value (default 1200, stage 12's; ITERS= none), trained on the teacher's pseudo-masks: student_it<N>.
# ORACLE_ITERS: oracle students trained on the train split's box truth: student_oracle_it<N>.
# GATED_ITERS: students on the label-gated teacher's pseudo-masks (stage 11 --gate-labels, teacher_gated/):
#   student_gated_it<N>.
# FINETUNE_STUDIES=N: condrea2024 Table VI, on the box truth of the first N training studies, 1,200 iterations:
#   student_scratch<N>_seed<k> from scratch and student_ft<N>_seed<k> fine-tuned from student_it1200 (seed 0).
# ENSEMBLE=1 (with several SEEDS): per ITERS / GATED_ITERS value, the seed ensemble of those students (stage 12
#   --average): student_it<N>_ens<K> / student_gated_it<N>_ens<K>, and a table with the ensemble against each seed
#   (localization_ensemble_it<N>.csv / localization_ensemble_gated_it<N>.csv).   # session 25:
#   SEEDS="0 1 2 3" ITERS= GATED_ITERS=1200 ENSEMBLE=1 bash bench/localize_run.sh RUN_FOLDER all all
# STUDENT_ARGS: extra stage-12 arguments of the ITERS / GATED_ITERS / ORACLE_ITERS students, TAG a name part for them
#   (student_gated<TAG>_it<N>...).   # session 26:
# COMPARE=1 (with TAG): per ITERS / GATED_ITERS value, the TAG students against those of BASE_TAG (default: the
#   untagged ones) at the same SEEDS (bench_localize.py --group: seed by seed and by the mean over seeds):
#   localization_compare<TAG>[_gated]_it<N>.csv. Session 26 compared with students trained before --prior 0.01 became
#   the default; on a fresh run folder train that baseline first:
#   SEEDS="0 1 2 3" ITERS= GATED_ITERS=1200 TAG=_none STUDENT_ARGS="--prior none" bash bench/localize_run.sh RUN all all
#   SEEDS="0 1 2 3" ITERS= GATED_ITERS=1200 TAG=_prior01 STUDENT_ARGS="--prior 0.01" BASE_TAG=_none COMPARE=1 \
#       bash bench/localize_run.sh RUN all all
# One table per seed (its first student is the reference of the "later - first" differences), and one for the
# fine-tuning arms. Outputs go under RUN_FOLDER/work/localize/cnn/; finished studies and trained students are
# reused (stage 12 retrains only a missing model.pt). Time on 2 CPU cores (2026-12-07, centre-slice CNN): the
# teacher ~5 s per study (IG 8 steps, 3 rounds; all 240 studies in 14 min; gated on the train split ~1.5 min), a
# student ~5.5 min for 1,200 iterations plus ~5 s per predicted study.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?give a finished quality-benchmark run folder (reports/bench-quality/<out>/runs/cnn-<key>-s<seed>)}
NTEST=${2:-10}
NTRAIN=${3:-24}
SEEDS=${SEEDS:-0}
ITERS=${ITERS-1200}
ORACLE_ITERS=${ORACLE_ITERS:-}
GATED_ITERS=${GATED_ITERS:-}
FINETUNE_STUDIES=${FINETUNE_STUDIES:-}
ENSEMBLE=${ENSEMBLE:-}
TAG=${TAG:-}
COMPARE=${COMPARE:-}
BASE_TAG=${BASE_TAG:-}
read -r -a XARGS <<< "${STUDENT_ARGS:-}"
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
LOC=$PE_WORK_DIR/localize/cnn
TRUTH=$PE_DATA_DIR/train_boxes.csv
$PY src/11_pseudo_masks.py --exp cnn --split test $(cap "$NTEST") $TEACHER
$PY src/11_pseudo_masks.py --exp cnn --split train $(cap "$NTRAIN") $TEACHER
if [ -n "$GATED_ITERS" ]; then
    $PY src/11_pseudo_masks.py --exp cnn --split train $(cap "$NTRAIN") $TEACHER --gate-labels \
        --out "$LOC/teacher_gated/train"
fi
STUDENTS=()
student() {  # folder name, iterations, seed [extra stage-12 arguments]
    local name=$1 it=$2 seed=$3
    shift 3
    $PY src/12_train_student.py --exp cnn --splits test $(cap "$NTEST") --iterations "$it" --seed "$seed" \
        --out "$LOC/$name" "$@"
    STUDENTS+=(--student "$name=$LOC/$name")
}
table() {  # csv stem; scores "${STUDENTS[@]}"
    $PY bench/bench_localize.py --exp cnn --split test --boxes "$PE_DATA_DIR/phantom_test_boxes.csv" \
        "${STUDENTS[@]}" --csv "$LOC/$1.csv"
}
for seed in $SEEDS; do
    sfx=$([ "$seed" = 0 ] && echo "" || echo "_seed$seed")
    STUDENTS=()
    for it in $ITERS; do student "student${TAG}_it$it$sfx" "$it" "$seed" "${XARGS[@]}"; done
    for it in $GATED_ITERS; do
        student "student_gated${TAG}_it$it$sfx" "$it" "$seed" --teacher-out "$LOC/teacher_gated/train" "${XARGS[@]}"
    done
    for it in $ORACLE_ITERS; do
        student "student_oracle${TAG}_it$it$sfx" "$it" "$seed" --train-boxes "$TRUTH" "${XARGS[@]}"
    done
    table "localization_test$TAG$sfx"
done
ensemble() {  # student folder stem (e.g. student_gated_it1200), csv stem
    local stem=$1 members=() rows=() k=0
    for seed in $SEEDS; do
        sfx=$([ "$seed" = 0 ] && echo "" || echo "_seed$seed")
        members+=("$LOC/$stem$sfx")
        rows+=(--student "seed$seed=$LOC/$stem$sfx")
        k=$((k + 1))
    done
    $PY src/12_train_student.py --exp cnn --splits test $(cap "$NTEST") --out "$LOC/${stem}_ens$k" \
        --average "${members[@]}"
    $PY bench/bench_localize.py --exp cnn --split test --boxes "$PE_DATA_DIR/phantom_test_boxes.csv" \
        --student "ens$k=$LOC/${stem}_ens$k" "${rows[@]}" --focus "ens$k" --csv "$LOC/$2.csv"
}
if [ -n "$ENSEMBLE" ]; then
    for it in $ITERS; do ensemble "student${TAG}_it$it" "localization_ensemble${TAG}_it$it"; done
    for it in $GATED_ITERS; do ensemble "student_gated${TAG}_it$it" "localization_ensemble_gated${TAG}_it$it"; done
fi
compare() {  # base folder stem (e.g. student_gated_it1200), tagged stem, csv stem
    local rows=() base=() tagged=()
    for seed in $SEEDS; do
        sfx=$([ "$seed" = 0 ] && echo "" || echo "_seed$seed")
        rows+=(--student "base$seed=$LOC/$1$sfx" --student "tag$seed=$LOC/$2$sfx")
        base+=("base$seed")
        tagged+=("tag$seed")
    done
    $PY bench/bench_localize.py --exp cnn --split test --boxes "$PE_DATA_DIR/phantom_test_boxes.csv" "${rows[@]}" \
        --group "base$BASE_TAG=$(IFS=,; echo "${base[*]}")" --group "tag$TAG=$(IFS=,; echo "${tagged[*]}")" --csv "$LOC/$3.csv"
}
if [ -n "$COMPARE" ]; then
    [ -n "$TAG" ] || { echo "COMPARE=1 needs a TAG (the students to compare with the untagged ones)" >&2; exit 2; }
    for it in $ITERS; do compare "student${BASE_TAG}_it$it" "student${TAG}_it$it" "localization_compare${TAG}_it$it"; done
    for it in $GATED_ITERS; do
        compare "student_gated${BASE_TAG}_it$it" "student_gated${TAG}_it$it" "localization_compare${TAG}_gated_it$it"
    done
fi
if [ -n "$FINETUNE_STUDIES" ]; then
    N=$FINETUNE_STUDIES
    [ -f "$LOC/student_it1200/model.pt" ] || student student_it1200 1200 0
    for seed in $SEEDS; do
        STUDENTS=()
        student "student_scratch${N}_seed$seed" 1200 "$seed" --train-boxes "$TRUTH" --train-studies "$N"
        student "student_ft${N}_seed$seed" 1200 "$seed" --train-boxes "$TRUTH" --train-studies "$N" \
            --init "$LOC/student_it1200/model.pt"
        table "localization_finetune${N}_seed$seed"
    done
fi
