"""Plain jnp attention: the readable statement of the math (SPEC sections 0-1) and the tests' oracle.

`upcast=True` computes in float32 at HIGHEST matmul precision (the accurate answer); `upcast=False`
keeps the input dtype through the matmuls the way a naive implementation would, which gives the tests
their yardstick for acceptable rounding error.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_attn.masking import BandMask
from pallas_attn.spec import band_from_window


def band_mask(mask: BandMask):
  """(sq, sk) bool: key j visible to query i."""
  return mask.visible(jnp.arange(mask.sq), jnp.arange(mask.sk))


def attention_reference(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, upcast=True):
  """q (b, sq, H, d), k/v (b, sk, Hk, d) -> out (b, sq, H, d), lse (b, H, sq) fp32."""
  b, sq, h, d = q.shape
  sk, hk = k.shape[1], k.shape[2]
  dtype = q.dtype
  scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
  if upcast:
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  k = jnp.repeat(k, h // hk, axis=2)
  v = jnp.repeat(v, h // hk, axis=2)
  precision = jax.lax.Precision.HIGHEST
  raw = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision).astype(jnp.float32)
  t = scale * raw if softcap <= 0 else softcap * jnp.tanh(scale * raw / softcap)
  mask = band_from_window(sq, sk, causal, tuple(window_size))
  if alibi_slopes is not None:
    slopes = jnp.broadcast_to(jnp.asarray(alibi_slopes, jnp.float32), (b, h))
    dist = jnp.abs(jnp.arange(sq)[:, None] + (sk - sq) - jnp.arange(sk)[None, :])
    t = t - slopes[:, :, None, None] * dist
  visible = band_mask(mask)
  t = jnp.where(visible, t, -jnp.inf)
  lse = jax.nn.logsumexp(t, axis=-1)
  empty = jnp.isneginf(lse)
  p = jnp.where(empty[..., None], 0.0, jnp.exp(t - jnp.where(empty, 0.0, lse)[..., None]))
  out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, precision=precision)
  return out.astype(dtype), jnp.where(empty, jnp.inf, lse)
