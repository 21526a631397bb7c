#!/usr/bin/env bash
# Everything one H100 session checks, in one call, most important first; each phase has its own time
# limit so a slow one cannot starve the rest. Logs and bench outputs go to $OUT (or bench/out).
set -u
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false
phase() { local limit=$1; shift; echo "=== $* (limit ${limit}s)"; local t0=$SECONDS
  timeout "$limit" "$@"; echo "=== rc=$? in $((SECONDS - t0))s: $*"; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import jax, torch, triton; print('jax', jax.__version__, 'torch', torch.__version__, 'triton', triton.__version__)"
phase 270 python3 -m pytest -q -m gpu -p no:cacheprovider -rfEsx tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -45
phase 150 python3 -m bench.run --set headline --out "$OUT" --time-limit 130 \
  --exclude tokamax-triton tokamax-mosaic xla-reference 2>&1 | tail -40
phase 45 python3 -m bench.options 2>&1 | tail -6
phase 50 python3 -m bench.sparse 2>&1 | tail -8
phase 50 python3 -m bench.landmark 2>&1 | tail -10
phase 45 python3 bench/bridge_overhead.py 2>&1 | tail -14
