#!/usr/bin/env bash
# One trial of the demo's CNN recipe: stages 00-04 of `make demo` (2 folds, or FOLDS) into work/demo-trials/NAME,
# with phantom sizes from the environment and demo.yaml overrides as arguments; prints the pooled
# out-of-fold slice AUC (the number issue 14 asks to be >= 0.90), the wall time of each part, and
# the AUC of the positive slices grouped by their largest embolus box (which emboli it misses).
# The README's demo section lists the trials it ran with this script.
#   bash bench/demo_cnn_trial.sh shipped                          # the demo as shipped
#   bash bench/demo_cnn_trial.sh e20 epochs=20 val_every=10       # a config override
#   TRAIN=120 MINS=20 MAXS=30 bash bench/demo_cnn_trial.sh short  # another phantom
#   FOLDS=3 bash bench/demo_cnn_trial.sh n3                       # 3 folds instead of the demo's 2
#   CACHE=512 bash bench/demo_cnn_trial.sh c512                   # another JPEG cache size (sets cache_size too)
#   SCALE=1.25 bash bench/demo_cnn_trial.sh s125                  # phantom --embolus-scale (emboli x1.25)
#   SEED=1 bash bench/demo_cnn_trial.sh seed1                     # another phantom draw (the demo's is seed 0)
# The trial's phantom and JPEG cache (~1.5 GB) are removed at the end; KEEP=1 keeps them (OOF files, the
# slice truth, models and metadata always stay under work/demo-trials/NAME; TRIALS_DIR=DIR puts the trial in
# DIR/NAME). Two recipes over several draws (SEED=0..N for each), paired: bench/demo_draws.py compare.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${1:?usage: demo_cnn_trial.sh NAME [key=value ...]}; shift
[[ $NAME =~ ^[A-Za-z0-9_.-]+$ ]] || { echo "bad trial name: $NAME" >&2; exit 2; }
PY=${PY:-.venv/bin/python}
FOLDS=${FOLDS:-2}
[[ $FOLDS =~ ^[2-9]$ ]] || { echo "FOLDS must be 2-9, got $FOLDS" >&2; exit 2; }
CACHE=${CACHE:-256}
[[ $CACHE =~ ^[1-9][0-9]*$ ]] || { echo "CACHE must be a size in pixels, got $CACHE" >&2; exit 2; }
SEED=${SEED:-0}
[[ $SEED =~ ^[0-9]{1,9}$ ]] || { echo "SEED must be a non-negative integer (a phantom seed), got '$SEED'" >&2; exit 2; }
KEEP=${KEEP:-0}
[[ $KEEP =~ ^[01]$ ]] || { echo "KEEP must be 0 or 1, got $KEEP" >&2; exit 2; }
FOLD_LIST=$(seq -s, 0 $((FOLDS - 1)))
R=${TRIALS_DIR:-work/demo-trials}/$NAME
rm -rf "$R"; mkdir -p "$R"
export PE_DATA_DIR=$R/data PE_WORK_DIR=$R/work PE_OOF_DIR=$R/oof PE_REPORTS_DIR=$R/reports
T0=$(date +%s)
# the demo's phantom (00_make_phantom.py --preset demo, as make demo), with the sizes TRAIN / MINS / MAXS / POS
# override when set
SIZES=(--preset demo --embolus-scale "${SCALE:-1}")
[[ -n ${TRAIN:-} ]] && SIZES+=(--train-studies "$TRAIN")
[[ -n ${MINS:-} ]] && SIZES+=(--min-slices "$MINS")
[[ -n ${MAXS:-} ]] && SIZES+=(--max-slices "$MAXS")
[[ -n ${POS:-} ]] && SIZES+=(--positive-rate "$POS")
$PY src/00_make_phantom.py --out "$R/data" --seed "$SEED" "${SIZES[@]}" >/dev/null 2>&1
T1=$(date +%s)
$PY src/01_parse_metadata.py --data-dir "$R/data" --split train --out "$R/work/meta/train.parquet" >/dev/null 2>&1
$PY src/02_cache_images.py --meta "$R/work/meta/train.parquet" --out "$R/work/cache/jpeg$CACHE" --size "$CACHE" >/dev/null 2>&1
$PY src/03_make_folds.py --meta "$R/work/meta/train.parquet" --out "$R/work/folds.csv" --n-folds "$FOLDS" --seed 42 >/dev/null
T2=$(date +%s)
$PY src/04_train_cnn.py --config src/configs/demo.yaml --fold "$FOLD_LIST" progress=false cache_size="$CACHE" "$@" 2>&1 | grep "val_auc\|preloaded\|pooled"
T3=$(date +%s)
# keeps the phantom's slice truth as $R/truth.csv (for bench/demo_draws.py compare) and prints the slice
# counts, the wall times and the AUC of the positives by largest embolus box (which emboli it misses)
$PY bench/demo_draws.py record "$R" --data "$R/data" --seconds $((T1 - T0)) $((T2 - T1)) $((T3 - T2))
[[ $KEEP == 1 ]] || rm -rf "$R/data" "$R/work/cache"
