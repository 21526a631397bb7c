"""Cost of options the main suite's peers do not have: sinks and dropout, against the same call
without them, at (4, 16, 4096, 128) bf16 causal. Forward and forward+backward, median ms.

  python -m bench.options [--smoke]
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from bench.timing import jax_median_ms

import pallas_attn as pa


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--smoke", action="store_true")
  args = ap.parse_args()
  b, h, s, d = (4, 16, 4096, 128) if not args.smoke else (1, 2, 128, 64)
  dtype = jnp.bfloat16 if not args.smoke else jnp.float32
  ks = jax.random.split(jax.random.PRNGKey(0), 6)
  q, k, v, do = (jax.random.normal(kk, (b, s, h, d), dtype) for kk in ks[:4])
  sink = jax.random.normal(ks[4], (2, h), jnp.float32)
  key = ks[5]
  cases = {
      "plain causal": lambda q, k, v: pa.flash_attn_func(q, k, v, causal=True),
      "2 sinks (sh)": lambda q, k, v: pa.fa2_func_with_sink(q, k, v, sink, causal=True),
      "dropout 0.1": lambda q, k, v: pa.flash_attn_func(q, k, v, dropout_p=0.1, causal=True,
                                                        dropout_key=key),
  }
  rows = []
  for name, f in cases.items():
    def fb(q, k, v, f=f):
      _, vjp = jax.vjp(f, q, k, v)
      return vjp(do)
    rows.append((name, jax_median_ms(jax.jit(f), q, k, v), jax_median_ms(jax.jit(fb), q, k, v)))
    print("OPTIONS", rows[-1], flush=True)
  base = rows[0]
  print(f"\n(b, H, s, d) = {(b, h, s, d)} {jnp.dtype(dtype).name} causal")
  print("%-16s %9s %11s %9s %9s" % ("case", "fwd ms", "f+b ms", "fwd x", "f+b x"))
  for name, f, fb in rows:
    print("%-16s %9.3f %11.3f %9.3f %9.3f" % (name, f, fb, f / base[1], fb / base[2]))


if __name__ == "__main__":
  main()
