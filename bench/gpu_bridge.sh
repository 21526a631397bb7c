#!/usr/bin/env bash
# One device call for the torch bridge's host cost and length buckets (issue 15): the probe of each
# step, the overhead table with a profile, and the gpu-marked bridge and bucket tests.
set -u
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false
filter() { grep -v "^W0000\|^I0000\|^WARNING: All log"; }
timeout 150 python3 -m bench.bridge_probe ${PROBE_FLAGS:-} --out "$OUT/probe.json" 2>&1 | filter
timeout 200 python3 bench/bridge_overhead.py --out "$OUT/bo.json" --profile "$OUT/prof.txt" 2>&1 | filter | tail -40
timeout ${TESTS_S:-200} python3 -m pytest -q -m gpu -p no:cacheprovider -x ${TESTS:-tests/test_buckets.py tests/test_torch_bridge.py} 2>&1 | filter | tail -15
