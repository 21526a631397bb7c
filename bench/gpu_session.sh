#!/usr/bin/env bash
# What an H100 session checks, most important first; each phase has its own time limit so a slow one
# cannot starve the rest. Logs and bench outputs go to $OUT (or bench/out).
#
# One device call runs at most 10 minutes, so a full check takes two calls:
#   PHASES=tests TESTS_S=540 bash bench/gpu_session.sh
#   PHASES="bench options sparse landmark dma decode overhead" bash bench/gpu_session.sh
# GPU tests run in parallel workers: their time goes to compiling (CPU-bound), not to the GPU.
set -u
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false
TESTS_S=${TESTS_S:-420}
PHASES=${PHASES:-tests bench options sparse landmark dma decode overhead}
phase() { local limit=$1; shift; echo "=== $* (limit ${limit}s)"; local t0=$SECONDS
  timeout "$limit" "$@"; echo "=== rc=$? in $((SECONDS - t0))s"; }
wanted() { [[ " $PHASES " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if wanted tests; then
  # -v names every test as it finishes, so a run cut off by its time limit still says what passed.
  phase "$TESTS_S" python3 -m pytest -v -m gpu -n 8 -p no:cacheprovider -rfEx --durations=15 tests \
    > "$OUT/gpu_tests.log" 2>&1
  grep -E "FAILED|ERROR|XPASS|passed|failed" "$OUT/gpu_tests.log" | grep -v "^W0000\|^I0000" | tail -45
fi
if wanted bench; then
  phase 150 python3 -m bench.run --set headline --out "$OUT" --time-limit 130 \
    --exclude tokamax-triton tokamax-mosaic xla-reference 2>&1 | tail -14
fi
if wanted options; then phase 45 python3 -m bench.options 2>&1 | tail -6; fi
if wanted sparse; then phase 50 python3 -m bench.sparse 2>&1 | tail -8; fi
if wanted landmark; then phase 60 python3 -m bench.landmark 2>&1 | tail -10; fi
if wanted dma; then phase 90 python3 -m bench.dma 2>&1 | tail -14; fi
if wanted decode; then phase 60 python3 -m bench.decode 2>&1 | tail -16; fi
if wanted overhead; then phase 45 python3 bench/bridge_overhead.py 2>&1 | tail -14; fi
