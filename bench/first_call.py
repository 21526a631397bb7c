"""Where a new shape's first call spends its time: trace + lower, XLA compile, and the first run,
for the forward and for forward+backward (jax.grad), per dtype (issue 16: fp32 first calls took
4.95 s forward / 6.16 s backward on the H200 against 1.0-1.7 s for bf16).

    python -m bench.first_call [--dtypes bfloat16,float32] [--d 64] [--lengths 200,333]
    PALLAS_ATTN_BACKEND=mosaic python -m bench.first_call --dtypes bfloat16   # Mosaic's compiles

Each (dtype, length) is a shape this process has not compiled. The first row also pays one-time
imports and backend start-up, so list a cheap dtype first. XLA_FLAGS=--xla_gpu_autotune_level=0
shows how much of a compile is XLA's autotuning.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from pallas_attn import flash_attn_func


def first_call(dtype, s: int, d: int, h: int = 4, causal: bool = True) -> dict:
  ks = jax.random.split(jax.random.PRNGKey(s), 3)
  q, k, v = (jax.random.normal(key, (1, s, h, d), dtype) for key in ks)
  fwd = lambda q, k, v: flash_attn_func(q, k, v, causal=causal)  # noqa: E731
  fwd_bwd = jax.grad(lambda q, k, v: fwd(q, k, v).astype(jnp.float32).sum(), (0, 1, 2))
  row = {}
  for name, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
    t0 = time.perf_counter()
    lowered = jax.jit(fn).trace(q, k, v).lower()
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v))
    t3 = time.perf_counter()
    row[name] = dict(lower_s=t1 - t0, compile_s=t2 - t1, run_s=t3 - t2)
  return row


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--dtypes", default="bfloat16,float32")
  ap.add_argument("--d", type=int, default=64)
  ap.add_argument("--lengths", default="200,333")
  args = ap.parse_args(argv)
  for dt in args.dtypes.split(","):
    for s in (int(x) for x in args.lengths.split(",")):
      row = first_call(jnp.dtype(dt), s, args.d)
      parts = [f"{name}: lower {r['lower_s']:.2f} s, compile {r['compile_s']:.2f} s, "
               f"run {r['run_s']:.2f} s" for name, r in row.items()]
      print(f"{dt} s={s} d={args.d}: " + " | ".join(parts), flush=True)


if __name__ == "__main__":
  main()
