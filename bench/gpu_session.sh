#!/usr/bin/env bash
# Everything one H100 session checks, in one call, most important first; each phase has its own time
# limit so a slow one cannot starve the rest. Logs and bench outputs go to $OUT (or bench/out).
# GPU tests run in parallel workers: their time goes to compiling (CPU-bound), not to the GPU.
set -u
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false
TESTS_S=${TESTS_S:-420}
phase() { local limit=$1; shift; echo "=== $* (limit ${limit}s)"; local t0=$SECONDS
  timeout "$limit" "$@"; echo "=== rc=$? in $((SECONDS - t0))s"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# -v names every test as it finishes, so a run cut off by its time limit still says what passed.
phase "$TESTS_S" python3 -m pytest -v -m gpu -n 8 -p no:cacheprovider -rfEx --durations=15 tests \
  > "$OUT/gpu_tests.log" 2>&1
grep -E "FAILED|ERROR|XPASS|passed|failed" "$OUT/gpu_tests.log" | grep -v "^W0000\|^I0000" | tail -45
if [ "${BENCH:-1}" = 1 ]; then
  phase 150 python3 -m bench.run --set headline --out "$OUT" --time-limit 130 \
    --exclude tokamax-triton tokamax-mosaic xla-reference 2>&1 | tail -14
  phase 45 python3 -m bench.options 2>&1 | tail -6
fi
phase 50 python3 -m bench.sparse 2>&1 | tail -8
phase 60 python3 -m bench.landmark 2>&1 | tail -10
phase 90 python3 -m bench.dma 2>&1 | tail -14
phase 45 python3 bench/bridge_overhead.py 2>&1 | tail -14
