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


def attention_logits(q, k, *, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                     alibi_slopes=None, upcast=True, bias=None, keep=None):
  """(b, H, sq, sk) fp32 final logits t of SPEC section 0, -inf where masked.

  bias: additive (b, H, sq, sk) term (after softcap, like ALiBi); keep: (b, H, sq, sk) bool, False
  masks (both per query head; the dynamic-mask reference repeats its per-kv-head arrays).
  """
  b, sq, h, d = q.shape
  sk, hk = k.shape[1], k.shape[2]
  scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
  if upcast:
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  k = jnp.repeat(k, h // hk, axis=2)
  raw = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=jax.lax.Precision.HIGHEST).astype(jnp.float32)
  t = scale * raw if softcap <= 0 else softcap * jnp.tanh(scale * raw / softcap)
  if alibi_slopes is not None:
    slopes = jnp.broadcast_to(jnp.asarray(alibi_slopes, jnp.float32), (b, h))
    dist = jnp.abs(jnp.arange(sq)[:, None] + (sk - sq) - jnp.arange(sk)[None, :])
    t = t - slopes[:, :, None, None] * dist
  if bias is not None:
    t = t + bias.astype(jnp.float32)
  visible = band_mask(band_from_window(sq, sk, causal, tuple(window_size)))
  if keep is not None:
    visible = visible & keep
  return jnp.where(visible, t, -jnp.inf)


def attention_reference(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, upcast=True, sink=None, sink_layout="sh",
                        dropout_p=0.0, dropout_keep=None, bias=None, keep=None):
  """q (b, sq, H, d), k/v (b, sk, Hk, d) -> out (b, sq, H, d), lse (b, H, sq) fp32.

  sink: fp32 logits (s_sink, H) ("sh") or (b, sq, s_sink, H) ("ssh"); each is an extra key with a raw
  logit (unscaled, uncapped, never masked) and a zero value: it enters lse but not the output.
  dropout_keep: (b, H, sq, sk) bool; kept probabilities are scaled by 1 / (1 - dropout_p) after
  normalization (lse is taken before dropout).
  """
  b, sq, h, d = q.shape
  hk = k.shape[2]
  dtype = q.dtype
  if upcast:
    v = v.astype(jnp.float32)
  v = jnp.repeat(v, h // hk, axis=2)
  precision = jax.lax.Precision.HIGHEST
  t = attention_logits(q, k, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                       softcap=softcap, alibi_slopes=alibi_slopes, upcast=upcast, bias=bias,
                       keep=keep)
  lse = jax.nn.logsumexp(t, axis=-1)
  if sink is not None:
    z = jnp.asarray(sink, jnp.float32)
    z = (jnp.broadcast_to(z.T[None, :, None, :], (b, h, sq, z.shape[0])) if sink_layout == "sh"
         else jnp.transpose(z, (0, 3, 1, 2)))  # [b, H, sq, s_sink]
    lse = jnp.logaddexp(lse, jax.nn.logsumexp(z, axis=-1))
  empty = jnp.isneginf(lse)
  p = jnp.where(empty[..., None], 0.0, jnp.exp(t - jnp.where(empty, 0.0, lse)[..., None]))
  if dropout_keep is not None:
    p = jnp.where(dropout_keep, p / (1.0 - dropout_p), 0.0)
  out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, precision=precision)
  return out.astype(dtype), jnp.where(empty, jnp.inf, lse)


def landmark_attention_reference(q, k, v, is_mem, sm_scale, block_size, upcast=True):
  """Landmark attention (SPEC section 3): q (B, H, Lq, d), k/v (B, H, Lk, d) -> out like q.

  Builds the (Lq, Lk) matrix of effective weights: an earlier block's ordinary key j gets
  A[landmark of its block] * (softmax of the block's ordinary logits)[j], an own-block key j <= p' gets
  A[j], landmarks get 0; A is the outer softmax over {earlier landmarks} + {own keys j <= p'}.
  is_mem is accepted for signature parity only: the landmarks sit where SPEC section 3 puts them
  (the public function rejects any other is_mem).
  """
  del is_mem
  dtype = q.dtype
  lq, lk = q.shape[2], k.shape[2]
  bs = block_size
  if upcast:
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  precision = jax.lax.Precision.HIGHEST
  s = sm_scale * jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=precision).astype(jnp.float32)

  p = jnp.arange(lq)[:, None] + (lk - lq)  # absolute query positions
  j = jnp.arange(lk)[None, :]
  landmark = j % bs == bs - 1
  earlier = j // bs < p // bs
  own = (j // bs == p // bs) & (j <= p) & ~landmark  # j <= p' for every ordinary j

  # Outer softmax over earlier landmarks and own-block keys.
  outer = jnp.where((landmark & earlier) | own, s, -jnp.inf)
  a = jnp.exp(outer - jax.nn.logsumexp(outer, axis=-1, keepdims=True))

  # Within-block softmax over each block's ordinary keys, blocks laid out as (n_blocks, bs).
  n_blocks = -(-lk // bs)
  pad = [(0, 0)] * 3 + [(0, n_blocks * bs - lk)]
  blocked = lambda x, fill: jnp.pad(x, pad, constant_values=fill).reshape(*x.shape[:3], n_blocks, bs)
  w = jax.nn.softmax(blocked(jnp.where(landmark, -jnp.inf, s), -jnp.inf), axis=-1)
  a_block = blocked(a, 0.0)[..., bs - 1:]  # the outer weight of each block's landmark
  via_landmark = (a_block * w).reshape(*s.shape[:3], n_blocks * bs)[..., :lk]

  weights = jnp.where(earlier & ~landmark, via_landmark, jnp.where(own, a, 0.0))
  out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v, precision=precision)
  return out.astype(dtype)


def sparse_attention_mask(n_ctx: int, attn_mode: str, local_attn_ctx=None):
  """(n_ctx, n_ctx) bool of OpenAI's sparse transformer patterns; every mode is causal."""
  i = jnp.arange(n_ctx)[:, None]
  j = jnp.arange(n_ctx)[None, :]
  causal = j <= i
  if attn_mode == "all":
    return causal
  if attn_mode == "local":
    return causal & (i - j < local_attn_ctx)
  if attn_mode == "strided":
    return causal & ((i - j) % local_attn_ctx == 0)
  raise ValueError(f"attn_mode: expected 'all', 'local' or 'strided', got {attn_mode!r}")


def sparse_attention_reference(q, k, v, heads: int, attn_mode: str, local_attn_ctx=None,
                               upcast=True):
  """q, k, v (n_batch, n_ctx, n_embd); head h owns features [h*d, (h+1)*d); scale d^-0.5."""
  b, n, e = q.shape
  d = e // heads
  dtype = q.dtype
  split = lambda x: x.reshape(b, n, heads, d).astype(jnp.float32 if upcast else dtype)
  qh, kh, vh = split(q), split(k), split(v)
  t = jnp.einsum("bqhd,bkhd->bhqk", qh, kh, precision=jax.lax.Precision.HIGHEST)
  t = t.astype(jnp.float32) * d ** -0.5
  t = jnp.where(sparse_attention_mask(n, attn_mode, local_attn_ctx), t, -jnp.inf)
  p = jax.nn.softmax(t, axis=-1)  # every row sees at least itself
  out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(vh.dtype), vh, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(b, n, e).astype(dtype)


def dynamic_mask_reference(q, k, v, zoh, active_mask, *, softmax_scale=None, is_causal=False,
                           softcap=0.0, upcast=True, dropout_p=0.0, dropout_keep=None):
  """Flash dynamic mask attention (SPEC section 5): out (b, sq, H, d), lse (b, H, sq).

  zoh and active_mask are (b, Hk, sq, sk), shared by the H / Hk query heads of each kv head: zoh is
  added to the scaled (or softcapped) scores, and keys where active_mask <= 0 (or past the causal
  diagonal) are masked.
  """
  group = q.shape[2] // k.shape[2]
  bias = jnp.repeat(zoh.astype(jnp.float32) if upcast else zoh, group, axis=1)
  keep = jnp.repeat(active_mask > 0, group, axis=1)
  return attention_reference(q, k, v, softmax_scale=softmax_scale, causal=is_causal, softcap=softcap,
                             upcast=upcast, dropout_p=dropout_p, dropout_keep=dropout_keep,
                             bias=bias, keep=keep)


def topk_mask_reference(zoh, keep_window_size, is_causal=False):
  """The mask `active_mask=None` stands for: per row, the keep_window_size largest zoh entries among
  the keys the causal rule allows (all ones when sk <= keep_window_size)."""
  sq, sk = zoh.shape[-2:]
  allowed = band_mask(band_from_window(sq, sk, is_causal, (-1, -1)))
  if sk <= keep_window_size:
    return jnp.broadcast_to(allowed, zoh.shape).astype(zoh.dtype)
  scores = jnp.where(allowed, zoh.astype(jnp.float32), -jnp.inf)
  order = jnp.argsort(-scores, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1, stable=True)
  return ((rank < keep_window_size) & allowed).astype(zoh.dtype)
