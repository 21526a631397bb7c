#!/usr/bin/env bash
# The whole GPU suite in one device call (issue 16): every `gpu`-marked test plus the torch tests
# that use CUDA when present (transformers, flash-attn's helper modules), as SHARDS pytest
# processes side by side. A GPU test's time is almost all kernel compilation, which is CPU-bound
# and single-threaded, so the host's cores, not the GPU, set the pace: 16 cores on the lent H200.
#
#   bash bench/gpu_suite.sh                        # the whole suite, logs in bench/out
#   SHARDS=8 LIMIT_S=500 bash bench/gpu_suite.sh   # fewer processes, another limit
#   SANITIZE=1 bash bench/gpu_suite.sh             # also compute-sanitizer memcheck over a subset
#   DEMO=1 bash bench/gpu_suite.sh                 # also the main job (python -m pallas_attn.demo)
#   PALLAS_ATTN_MOSAIC_AUTOMATIC=1 bash bench/gpu_suite.sh  # with Mosaic GPU chosen unasked on 9.x
#
# Each process writes $OUT/shard-I.log (pytest -v lines as they run); the summary at the end lists
# every failure and the wall time.
set -u
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false
# XLA's GEMM autotuning of the references' dots compiles many candidate kernels per new shape, and
# 15 processes doing it at once starve the compiles the tests are about: off, 6 dense matrix cells
# took 97 s where the default had finished 3 (H200, side by side). The kernels under test are
# Pallas's, which XLA does not autotune.
export XLA_FLAGS="${XLA_FLAGS:---xla_gpu_autotune_level=0}"
SHARDS=${SHARDS:-14}
LIMIT_S=${LIMIT_S:-520}
PYTEST="python3 -m pytest -p no:cacheprovider -v -rfE --tb=short --durations=10"
# The memcheck subset: each family once, paged and varlen included, at small shapes.
MEMCHECK_K=${MEMCHECK_K:-"bfloat16 and d64 and not mha and not mqa"}
start=$(date +%s)
pids=()
for ((i = 0; i < SHARDS; i++)); do
  timeout "$LIMIT_S" $PYTEST -m gpu --shard "$i/$SHARDS" tests > "$OUT/shard-$i.log" 2>&1 &
  pids+=($!)
done
timeout "$LIMIT_S" $PYTEST tests/test_transformers.py tests/test_torch_flash_compat.py \
  > "$OUT/torch-cuda.log" 2>&1 &
pids+=($!)
if [ "${DEMO:-0}" = 1 ]; then  # the main job beside the tests: every public API, both faces
  timeout "$LIMIT_S" python3 -m pallas_attn.demo > "$OUT/demo.log" 2>&1 &
  pids+=($!)
fi
if [ "${SANITIZE:-0}" = 1 ]; then
  # Pallas kernels compile at first call: memcheck sees every launch, compile included.
  timeout "$LIMIT_S" compute-sanitizer --tool memcheck --print-limit 20 --error-exitcode 3 \
    $PYTEST tests/test_gpu_matrix.py -k "$MEMCHECK_K" > "$OUT/memcheck.log" 2>&1 &
  pids+=($!)
fi
for p in "${pids[@]}"; do wait "$p"; done
echo "suite wall: $(( $(date +%s) - start )) s with $SHARDS shards"
for f in "$OUT"/shard-*.log "$OUT"/torch-cuda.log ${SANITIZE:+"$OUT"/memcheck.log}; do
  [ -f "$f" ] || continue
  last=$(grep -E "^=+ .*(passed|failed|error).* in " "$f" | tail -1)
  echo "$(basename "$f"): ${last:-DID NOT FINISH ($(grep -cE 'PASSED|FAILED' "$f") done)}"
done
grep -hE "^(FAILED|ERROR) " "$OUT"/*.log | sort | uniq | head -60
[ "${SANITIZE:-0}" = 1 ] && grep -E "ERROR SUMMARY|Invalid|out of bounds" "$OUT/memcheck.log" | head -20
[ "${DEMO:-0}" = 1 ] && grep -E "FAIL|raised|entries" "$OUT/demo.log" | head -20
exit 0
