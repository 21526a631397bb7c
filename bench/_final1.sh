export PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
P="python3 -m pytest -p no:cacheprovider -v -rfE --tb=short --durations=8"
L=300
timeout $L $P tests/test_dot_product_attention.py tests/test_kernel_cache.py tests/test_flash_tiles.py -k "not test_bad" > $OUT/dpa.log 2>&1 &
timeout $L $P tests/test_gpu_matrix.py -k "float32 and not mha and not mqa" --shard 0/2 > $OUT/m0.log 2>&1 &
timeout $L $P tests/test_gpu_matrix.py -k "float32 and not mha and not mqa" --shard 1/2 > $OUT/m1.log 2>&1 &
(for d in 64 128 256; do timeout 60 python3 -m bench.compile_reuse --dtype float32 --d $d; done) > $OUT/compile.log 2>&1 &
timeout $L compute-sanitizer --tool memcheck --print-limit 20 python3 -m pallas_attn.demo --problem small > $OUT/memcheck.log 2>&1 &
wait
grep -v "^W0000\|^I0000\|Warn" $OUT/compile.log
for f in dpa m0 m1; do echo "== $f: $(grep -E '^=+ .* in ' $OUT/$f.log | tail -1) $(grep -cE 'PASSED|FAILED' $OUT/$f.log) done"; grep -E "^(FAILED|ERROR)" $OUT/$f.log | head; done
grep -E "ERROR SUMMARY|entries|FAIL|rror" $OUT/memcheck.log | head -20; tail -3 $OUT/memcheck.log
