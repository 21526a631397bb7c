"""One flash forward and one backward at (4, 16, 4096, 128) bf16, for Nsight Compute:

  ncu --kernel-name regex:pallas_attn --section SpeedOfLight ... python3 -m bench.ncu_flash [--causal]
      [--backend mosaic]

Compiles and runs each once before the profiled calls, so the profile holds steady-state launches
(the first of each kernel is skipped with --launch-skip if needed).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from bench.options import VARLEN_LENGTHS, mixed_varlen
from pallas_attn import flash_attn_func, flash_attn_varlen_func


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--causal", action="store_true")
  ap.add_argument("--shape", default="4,4096,16,128", help="b,s,H,d")
  ap.add_argument("--varlen", action="store_true",
                  help="flash_attn_varlen_func over bench.options' mixed lengths (16384 tokens)")
  ap.add_argument("--even", action="store_true",
                  help="flash_attn_varlen_func over --shape's b sequences of s, packed (compare with "
                       "the same --shape dense)")
  ap.add_argument("--backend", default=None, help="flash_attn_func's backend= (e.g. mosaic)")
  args = ap.parse_args()
  b, s, h, d = (int(x) for x in args.shape.split(","))
  if args.even:
    cu = jnp.arange(b + 1, dtype=jnp.int32) * s
    even = lambda q, k, v, s=s: flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, s, s,
                                                       causal=args.causal)[None]
    b, s = 1, b * s
  if args.varlen:
    b, s = 1, sum(VARLEN_LENGTHS)
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v, do = (jax.random.normal(kk, (b, s, h, d), jnp.bfloat16) for kk in ks)
  attend = (mixed_varlen(args.causal) if args.varlen else even if args.even else
            lambda q, k, v: flash_attn_func(q, k, v, causal=args.causal, backend=args.backend))

  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(do)

  step = jax.jit(fwd_bwd)
  for _ in range(2):
    jax.block_until_ready(step(q, k, v, do))


if __name__ == "__main__":
  main()
