#!/usr/bin/env bash
# Runs every numbered stage in order and prints the wall time of each.
#   src/run_pipeline.sh demo   # the synthetic phantom, reduced folds/epochs (make demo)
# Environment: PY (python to use), PE_DATA_DIR / PE_WORK_DIR / PE_OOF_DIR (see src/pe/paths.py),
# PHANTOM_SEED (the phantom's draw, default 0; `make demo PHANTOM_SEED=2` with its own PE_*_DIR folders
# shows how much the demo's figures depend on the draw: README, demo section).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODE=${1:-demo}

stage() {  # stage NAME CMD...: run a command and print its wall time
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  echo "=== [$name] $*"
  "$@"
  printf '=== [%s] done in %.1f s\n' "$name" "$(echo "$(date +%s.%N) - $t0" | bc)"
}

if [[ $MODE != demo ]]; then echo "unknown mode $MODE" >&2; exit 2; fi
SEED=${PHANTOM_SEED:-0}
[[ $SEED =~ ^[0-9]{1,9}$ ]] || { echo "PHANTOM_SEED must be a non-negative integer, got '$SEED'" >&2; exit 2; }

DATA=${PE_DATA_DIR:-input/phantom}
WORK=${PE_WORK_DIR:-work/demo}
OOF=${PE_OOF_DIR:-oof}
SUBS=${PE_SUBMISSIONS_DIR:-submissions}
export PE_DATA_DIR=$DATA PE_WORK_DIR=$WORK PE_OOF_DIR=$OOF PE_SUBMISSIONS_DIR=$SUBS
CACHE=$WORK/cache/jpeg256
# 2 folds of 72 studies (issue 14: the demo runs in <= 12 min on 2 cores and its CNN still learns;
# 3 folds of the same recipe took 20 min, see the README's demo section).
FOLDS=0,1
T0=$(date +%s)

# the demo phantom: its sizes are pe.synthetic.phantom.PRESETS["demo"]
stage 00_make_phantom $PY src/00_make_phantom.py --out "$DATA" --preset demo --seed "$SEED"
for s in train test; do
  stage 01_parse_metadata:$s $PY src/01_parse_metadata.py --data-dir "$DATA" --split $s --out "$WORK/meta/$s.parquet"
done
for s in train test; do
  stage 02_cache_images:$s $PY src/02_cache_images.py --meta "$WORK/meta/$s.parquet" --out "$CACHE" --size 256
done
stage 03_make_folds $PY src/03_make_folds.py --meta "$WORK/meta/train.parquet" --out "$WORK/folds.csv" --n-folds 2 --seed 42
# every fold in one process (one interpreter and torch start-up instead of three)
stage 04_train_cnn:folds$FOLDS $PY src/04_train_cnn.py --config src/configs/demo.yaml --fold "$FOLDS"
for s in train test train_fit; do
  stage 05_export_embeddings:$s $PY src/05_export_embeddings.py --exp demo --split $s
done
for c in seq_demo_gru seq_demo_lstm; do
  stage 06_train_sequence:$c:folds$FOLDS $PY src/06_train_sequence.py --config src/configs/$c.yaml --fold "$FOLDS"
done
stage 07_ensemble $PY src/07_ensemble.py --members seq_demo_gru seq_demo_lstm --out ens_demo
stage 08_make_submission $PY src/08_make_submission.py --pred "$OOF/ens_demo/test.csv" --test "$DATA/test.csv" \
  --out "$SUBS/demo_submission.csv"
stage 09_score $PY src/09_score.py --submission "$OOF/ens_demo/oof.csv" --truth "$DATA/train.csv" --json "$OOF/ens_demo/score.json"
stage 10_report $PY src/10_report.py --exp ens_demo --max-pointing 64
echo "demo finished in $(( $(date +%s) - T0 )) s"
