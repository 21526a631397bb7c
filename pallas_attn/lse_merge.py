"""Combining attention partials computed over disjoint key sets, by their logsumexps.

One helper for every caller: the split-KV decode (kvcache.py merges its splits) and the ring
(ring.py merges one key block per step). A partial whose lse is not finite saw no key: the kernels
write +inf there (the FlashAttention-2 convention for empty rows) and the decode kernel's splits -inf;
either way it gets weight 0. If no partial saw a key, out is 0 and lse +inf.
"""
from __future__ import annotations

import jax.numpy as jnp

_INF = float("inf")


def merge(o_parts, lse_parts, dtype=None):
  """o_parts (n, ..., d) and lse_parts (n, ...) -> (out (..., d) in `dtype` (default fp32), lse fp32).

  out = sum_n exp(lse_n - lse) o_n with lse = log sum_n exp(lse_n), computed in fp32.
  """
  lse_parts = lse_parts.astype(jnp.float32)
  seen = jnp.isfinite(lse_parts)
  m = jnp.max(jnp.where(seen, lse_parts, -_INF), axis=0)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.where(seen, jnp.exp(lse_parts - m_safe), 0.0)
  total = jnp.sum(w, axis=0)
  empty = total == 0.0
  out = jnp.sum(w[..., None] * o_parts.astype(jnp.float32), axis=0)
  out = out / jnp.where(empty, 1.0, total)[..., None]
  lse = jnp.where(empty, _INF, m_safe + jnp.log(jnp.where(empty, 1.0, total)))
  return out.astype(dtype or jnp.float32), lse


def merge_pair(o_a, lse_a, o_b, lse_b, dtype=None):
  """merge() of two partials with the same shapes: o (..., d), lse (...)."""
  return merge(jnp.stack([o_a.astype(jnp.float32), o_b.astype(jnp.float32)]),
               jnp.stack([lse_a, lse_b]), dtype)
