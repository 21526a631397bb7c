"""Does a compiled Pallas kernel get reused by another jitted program? Times the first call of two
different programs that contain the same flash kernels (and their backward), in this process; run
it twice with XLA_FLAGS=--xla_gpu_kernel_cache_file=... to see XLA's kernel cache across programs
and processes.

Measured on the H200 (jax 0.11.2, bf16 d=128 causal): without the cache each program compiles its
own copy (1.40 / 1.48 s for two forward programs); with it the second takes 0.09 s and a second
process 0.18 s. But do not turn it on: with the cache enabled for the GPU tests, programs that
reused a cached Pallas kernel computed wrong results (fp32 varlen and KV-cache outputs off by
more than the outputs' size) and then failed with CUDA_ERROR_ILLEGAL_INSTRUCTION. This script
times compiles only; it does not check results.

    python -m bench.compile_reuse [--dtype bfloat16] [--d 128]
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp

import pallas_attn


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--d", type=int, default=128)
  args = ap.parse_args()
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  dt = jnp.dtype(args.dtype)
  q = jax.random.normal(ks[0], (2, 384, 8, args.d), dt)
  k = jax.random.normal(ks[1], (2, 384, 2, args.d), dt)
  v = jax.random.normal(ks[2], (2, 384, 2, args.d), dt)
  attn = lambda q, k, v: pallas_attn.flash_attn_func(q, k, v, causal=True)
  programs = {
      "fwd A": jax.jit(attn),
      "fwd B (same kernel, other program)": jax.jit(lambda q, k, v: attn(q, k, v) * 2),
      "fwd+bwd A": jax.jit(jax.grad(lambda q, k, v: attn(q, k, v).astype(jnp.float32).sum(), (0, 1, 2))),
      "fwd+bwd B": jax.jit(jax.grad(lambda q, k, v: (attn(q, k, v).astype(jnp.float32) ** 2).sum(),
                                    (0, 1, 2))),
  }
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} dtype={args.dtype} d={args.d}")
  for name, fn in programs.items():
    t0 = time.perf_counter()
    jax.block_until_ready(fn(q, k, v))
    print(f"  first call {name:36s} {time.perf_counter() - t0:6.2f} s", flush=True)


if __name__ == "__main__":
  main()
