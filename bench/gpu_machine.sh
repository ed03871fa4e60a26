#!/usr/bin/env bash
# make bench-gpu on a lent GPU machine (the device tool, ../shared/gpu/README.md), as ONE call:
#   bash ../shared/gpu/prepare-wheels.sh          # here, once: .whl/ (pydicom, GDCM, pylibjpeg, albumentations, timm)
#   run(command="bash bench/gpu_machine.sh", carry=[".whl"], timeout_s=560)
# Each part runs under its own timeout and logs into $OUT, so a part that overruns loses only its tail.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  > "$OUT/pip.log" 2>&1 || echo "pip install failed (see pip.log)"
export PYTHONPATH=/tmp/site:src NO_ALBUMENTATIONS_UPDATE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
# A: both real CNN configs, fp16 / bf16, the config's batch and twice it, no compile, kernel path, projections
timeout "${PART_A_S:-270}" python3 bench/bench_gpu.py --dtypes fp16 bf16 --compile off --batch-mult 1 2 \
  --steps 30 --warmup 5 --kernel-studies 3 > "$OUT/a_dtypes_batches.log" 2>&1
echo "part A rc $?" >> "$OUT/rc.txt"
# B: torch.compile on for the default CNN (compilation happens in the warm-up steps)
timeout "${PART_B_S:-200}" python3 bench/bench_gpu.py --configs src/configs/cnn_effv2s_512.yaml --dtypes fp16 \
  --compile on --steps 30 --warmup 8 --kernel-studies 1 > "$OUT/b_compile.log" 2>&1
echo "part B rc $?" >> "$OUT/rc.txt"
grep -hE "^(device|data|train|kernel|projected)|Error|error" "$OUT"/a_*.log "$OUT"/b_*.log | cut -c1-400
