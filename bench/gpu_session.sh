#!/usr/bin/env bash
# What an H100 session checks, most important first; each phase has its own time limit so a slow one
# cannot starve the rest. Every phase's full output goes to $OUT/phases.log (the device tool returns
# at most 8 files); the terminal gets each phase's tail.
#
# One device call runs at most 10 minutes, so a full check takes two or three calls. The whole -m gpu
# suite no longer fits in one (560 s left 4 of 62 tests unfinished on 2026-11-27): split it, e.g.
#   PHASES=tests TESTS_S=540 TESTS="tests/test_flash_attn.py tests/test_landmark.py tests/test_kvcache.py
#     tests/test_sparse.py tests/test_sink.py tests/test_flash_dma.py" bash bench/gpu_session.sh
#   PHASES=tests TESTS_S=540 TESTS="tests/test_dropout.py tests/test_varlen.py tests/test_varlen_paged.py
#     tests/test_torch_*.py" bash bench/gpu_session.sh
#   PHASES="bench options sparse landmark dma decode overhead" bash bench/gpu_session.sh
#   PHASES="landmark_sweep ncu" bash bench/gpu_session.sh
# GPU tests run in parallel workers: their time goes to compiling (CPU-bound), not to the GPU.
# TESTS selects test files (default: all of tests/).
set -u
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false
TESTS_S=${TESTS_S:-420}
TESTS=${TESTS:-tests}
PHASES=${PHASES:-tests bench options sparse landmark dma decode overhead}
LOG="$OUT/phases.log"
# phase LIMIT TAIL CMD...: runs CMD under a time limit, logs all of it, shows its last TAIL lines.
phase() { local limit=$1 tail=$2; shift 2; echo "=== $* (limit ${limit}s)" | tee -a "$LOG"; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/.phase" 2>&1; local rc=$?
  cat "$OUT/.phase" >> "$LOG"; tail -n "$tail" "$OUT/.phase"; rm -f "$OUT/.phase"
  echo "=== rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"; }
wanted() { [[ " $PHASES " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if wanted tests; then
  # -v names every test as it finishes, so a run cut off by its time limit still says what passed.
  # shellcheck disable=SC2086
  phase "$TESTS_S" 0 python3 -m pytest -v -m gpu -n 8 -p no:cacheprovider -rfEx --durations=15 $TESTS
  grep -E "FAILED|ERROR|XPASS|passed|failed" "$LOG" | grep -v "^W0000\|^I0000" | tail -45
fi
if wanted bench; then
  # shellcheck disable=SC2086
  phase "${BENCH_S:-170}" 40 python3 -m bench.run --set ${BENCH_SETS:-headline} --out "$OUT" \
    --time-limit "$(( ${BENCH_S:-170} - 20 ))" \
    --exclude tokamax-triton tokamax-mosaic xla-reference
fi
if wanted options; then phase 90 16 python3 -m bench.options; fi
if wanted sparse; then phase 120 10 python3 -m bench.sparse; fi
if wanted landmark; then phase 150 10 python3 -m bench.landmark; fi
if wanted landmark_sweep; then phase 240 40 python3 -m bench.landmark --sweep; fi
if wanted dma; then phase 90 14 python3 -m bench.dma; fi
if wanted decode; then phase 60 30 python3 -m bench.decode; fi
if wanted overhead; then
  phase 90 24 python3 bench/bridge_overhead.py --out "$OUT/bridge_overhead.json" --profile "$OUT/bridge_profile.txt"
fi
if wanted ncu; then
  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  # NCU_RUNS: which of plain, causal, varlen (bench.ncu_flash's flags) to profile.
  for run in ${NCU_RUNS:-plain causal}; do
    flags=""; [[ $run == plain ]] || flags="--$run"
    phase 150 30 "$NCU" --kernel-name regex:pallas_attn --launch-skip 3 --launch-count 3 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section SchedulerStats \
      python3 -m bench.ncu_flash $flags
  done
fi
