"""Sequence-length buckets, and dense attention run at them through the varlen kernels.

Compiled kernels are keyed by their operands' shapes, so every new sequence length compiles a new
kernel set (1-2 s each on an H200 in bf16). Padded to a bucket length, with the real lengths handed
to the varlen kernels as run-time offsets, lengths 1..L share O(log L) kernel sets.

Buckets: 16 and below -> 16; above, four per octave (n in (2^k, 2^(k+1)] rounds up to a multiple of
2^(k-2)), so padding adds at most a quarter of the length.
"""
from __future__ import annotations

import jax.numpy as jnp


def bucket(n: int) -> int:
  """The bucket length for n: at least n, at most 1.25 n above 16."""
  n = int(n)
  if n <= 16:
    return 16
  step = 1 << max((n - 1).bit_length() - 3, 0)
  return -(-n // step) * step


def dense_as_varlen(q, k, v):
  """A dense batch as varlen operands at bucket sizes: q (b, sq, H, d) flattened to b sequences of
  sq rows and padded with zero rows to bucket(b * sq) (k, v likewise), and the offsets
  cu_seqlens_q = [0, sq, 2 sq, ...], cu_seqlens_k. Rows past the last offset belong to no
  sequence: the kernels never read them, and `dense_from_varlen` drops their outputs."""
  b, sq = q.shape[:2]
  sk = k.shape[1]
  pad = lambda x, n: jnp.pad(x.reshape(n, *x.shape[2:]), ((0, bucket(n) - n), (0, 0), (0, 0)))
  cu_q = jnp.arange(0, b * sq + 1, sq, dtype=jnp.int32)
  cu_k = jnp.arange(0, b * sk + 1, sk, dtype=jnp.int32)
  return pad(q, b * sq), pad(k, b * sk), pad(v, b * sk), cu_q, cu_k


def dense_from_varlen(out, lse, b: int, sq: int):
  """(out (b, sq, H, d), lse (b, H, sq)) from the padded varlen results (total, H, d), (H, total)."""
  h = out.shape[1]
  return (out[:b * sq].reshape(b, sq, h, out.shape[-1]),
          lse[:, :b * sq].reshape(h, b, sq).transpose(1, 0, 2))
