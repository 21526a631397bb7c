"""Plain jnp statement of flash_attn_with_kvcache (SPEC section 1, KV cache): the tests' oracle.

Written for reading, not speed: rotary by an explicit rotation of feature pairs, the append as a
scatter, and attention over each row's keys gathered into a dense (b, capacity, Hk, d) view of its
cache. `upcast=True` does the math in float32 at HIGHEST precision; `upcast=False` keeps the input
dtype through the matmuls (the tests' yardstick for rounding error).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def rotary_reference(x, cos, sin, positions, interleaved: bool):
  """x (b, s, h, d) rotated at positions (b, s): pair (a, c) -> (a cos - c sin, a sin + c cos).

  Pairs are (2r, 2r + 1) when interleaved (GPT-J), (r, r + rotary_dim / 2) otherwise (GPT-NeoX),
  for r < rotary_dim / 2 = cos.shape[1]; features past rotary_dim pass through. fp32 math, rounded
  to x.dtype.
  """
  half = cos.shape[1]
  r = np.arange(half)
  first, second = (2 * r, 2 * r + 1) if interleaved else (r, r + half)
  xf = x.astype(jnp.float32)
  c = jnp.asarray(cos, jnp.float32)[positions][:, :, None, :]  # (b, s, 1, half)
  s = jnp.asarray(sin, jnp.float32)[positions][:, :, None, :]
  a, b = xf[..., first], xf[..., second]
  out = xf.at[..., first].set(a * c - b * s).at[..., second].set(a * s + b * c)
  return out.astype(x.dtype)


def cache_positions(cache_seqlens, s_new: int):
  """(b, s_new) absolute positions the new keys are written at."""
  return cache_seqlens[:, None] + jnp.arange(s_new, dtype=jnp.int32)[None, :]


def cache_slots(positions, cache_batch_idx, block_table, page_size: int):
  """(cache row, row within it) of each absolute position (b, n) of each batch row."""
  b = positions.shape[0]
  if block_table is None:
    rows = jnp.arange(b, dtype=jnp.int32) if cache_batch_idx is None else cache_batch_idx
    return jnp.broadcast_to(rows[:, None], positions.shape), positions
  pages = jnp.take_along_axis(block_table, positions // page_size, axis=1)
  return pages, positions % page_size


def kvcache_reference(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                      cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                      softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                      rotary_interleaved=True, alibi_slopes=None, upcast=True):
  """((out, lse), k_cache, v_cache): out (b, sq, H, d), lse (b, H, sq) fp32, caches updated.

  cache_seqlens is a (b,) int32 array here (or None: the whole capacity).
  """
  b, sq, h, d = q.shape
  hk = k_cache.shape[2]
  paged = block_table is not None
  page = k_cache.shape[1]
  capacity = block_table.shape[1] * page if paged else k_cache.shape[1]
  s_new = 0 if k is None else k.shape[1]
  if cache_seqlens is None:
    cache_seqlens = jnp.full((b,), capacity, jnp.int32)
  leftpad = jnp.zeros((b,), jnp.int32) if cache_leftpad is None else cache_leftpad

  if rotary_cos is not None:
    pos_k = cache_positions(cache_seqlens, s_new)
    k = rotary_reference(k, rotary_cos, rotary_sin, pos_k, rotary_interleaved)
    pos_q = cache_positions(cache_seqlens, sq)
    if not causal and tuple(window_size) == (-1, -1):
      pos_q = jnp.broadcast_to(cache_seqlens[:, None], (b, sq))
    q = rotary_reference(q, rotary_cos, rotary_sin, pos_q, rotary_interleaved)

  if k is not None:
    rows, slots = cache_slots(cache_positions(cache_seqlens, s_new), cache_batch_idx, block_table, page)
    k_cache = k_cache.at[rows, slots].set(k)
    v_cache = v_cache.at[rows, slots].set(v)

  # Dense view: position p of batch row b, for every p < capacity.
  every = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32)[None, :], (b, capacity))
  rows, slots = cache_slots(every, cache_batch_idx, block_table, page)
  keys, values = k_cache[rows, slots], v_cache[rows, slots]  # (b, capacity, Hk, d)

  sk = cache_seqlens - leftpad + s_new  # (b,) keys seen by each row
  off = (sk - sq)[:, None, None]
  i = jnp.arange(sq)[None, :, None]
  j = every[:, None, :] - leftpad[:, None, None]  # logical key index of position p
  left, right = window_size
  if causal:
    right = 0
  visible = (j >= 0) & (j < sk[:, None, None])
  if right >= 0:
    visible &= j <= i + off + right
  if left >= 0:
    visible &= j >= i + off - left

  dtype = q.dtype
  if upcast:
    q, keys, values = (x.astype(jnp.float32) for x in (q, keys, values))
  keys = jnp.repeat(keys, h // hk, axis=2)
  values = jnp.repeat(values, h // hk, axis=2)
  scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
  raw = jnp.einsum("bqhd,bkhd->bhqk", q, keys, precision=_HIGHEST).astype(jnp.float32)
  t = scale * raw if softcap <= 0 else softcap * jnp.tanh(scale * raw / softcap)
  if alibi_slopes is not None:
    slopes = jnp.broadcast_to(jnp.asarray(alibi_slopes, jnp.float32), (b, h))
    t = t - slopes[:, :, None, None] * jnp.abs(i + off - j).astype(jnp.float32)[:, None]
  t = jnp.where(visible[:, None], t, -jnp.inf)
  lse = jax.nn.logsumexp(t, axis=-1)
  empty = jnp.isneginf(lse)
  p = jnp.where(empty[..., None], 0.0, jnp.exp(t - jnp.where(empty, 0.0, lse)[..., None]))
  out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(values.dtype), values, precision=_HIGHEST)
  return (out.astype(dtype), jnp.where(empty, jnp.inf, lse)), k_cache, v_cache
