"""FlashAttention-2's dense API on the JAX face: same names, arguments and returns as flash-attn 2.8.

JAX idiom where JAX forces it: dropout takes the keyword-only PRNG key `dropout_key`.
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax

from pallas_attn import buckets, checks, dropout
from pallas_attn.flash import attention
from pallas_attn.reference import attention_logits
from pallas_attn.spec import AttentionSpec, band_from_window


def _alibi_rows(alibi_slopes, batch: int, nheads: int):
  if alibi_slopes is None:
    return None
  slopes = jnp.broadcast_to(jnp.asarray(alibi_slopes, jnp.float32), (batch, nheads))
  return slopes[:, :, None]


def prepare(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
            softcap=0.0, alibi_slopes=None):
  """Validates flash_attn_func's arguments; returns the kernel spec and the ALiBi rows (b, H, 1)."""
  checks.check_qkv(q, k, v)
  b, sq, h, d = q.shape
  checks.check_options(dropout_p=dropout_p, softmax_scale=softmax_scale, window_size=window_size,
                       softcap=softcap, alibi_slopes=alibi_slopes, batch=b, nheads=h)
  spec = AttentionSpec(
      mask=band_from_window(sq, k.shape[1], causal, tuple(window_size)),
      scale=float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d),
      softcap=float(softcap),
      alibi=alibi_slopes is not None,
      dropout_p=float(dropout_p),
  )
  return spec, _alibi_rows(alibi_slopes, b, h)


def dropout_seed(dropout_p, dropout_key, p_name: str = "dropout_p"):
  """The kernels' int32 (1,) seed from the JAX face's PRNG key (None without dropout)."""
  if dropout_p == 0:
    return None
  if dropout_key is None:
    raise ValueError(f"dropout_key: {p_name} > 0 needs a PRNG key (keyword dropout_key=...)")
  return dropout.seed_from_key(dropout_key)


def signed_probs(t, lse, seed, dropout_p: float):
  """P = exp(t - lse) for logits t (b, H, sq, sk), negated where the kernels' keep mask drops.

  Coordinates are (batch index, head, row, column) of t, the ones the kernels hash, so a varlen
  caller passes per-sequence padded logits. A dropped zero (masked or empty row) comes out as -0.0.
  """
  p = jnp.exp(t - lse[..., None])
  keep = dropout.dense_keep(seed, *t.shape, dropout_p)
  return jnp.where(keep, p, -p)


def s_dmask(q, k, lse, spec: AttentionSpec, alibi, seed):
  """(b, H, sq, sk) debugging output: P (from the kernel's lse) with dropped entries negated."""
  t = attention_logits(q, k, softmax_scale=spec.scale, causal=False,
                       window_size=_window_of(spec.mask), softcap=spec.softcap,
                       alibi_slopes=None if alibi is None else alibi[:, :, 0])
  return lax.stop_gradient(signed_probs(t, lse, seed, spec.dropout_p)).astype(q.dtype)


def _window_of(mask):
  return (-1 if mask.left is None else mask.left, -1 if mask.right is None else mask.right)


def _flash(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
           return_attn_probs, dropout_key, tiles=None, bucket_lengths=False, backend=None):
  spec, alibi = prepare(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes)
  spec = dataclasses.replace(spec, backend=backend)
  seed = dropout_seed(dropout_p, dropout_key)
  if bucket_lengths and seed is None and 0 not in (q.shape[1], k.shape[1]):
    out, lse = _bucketed(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes, tiles,
                         backend)
    return (out, lse, jnp.zeros((0,), q.dtype)) if return_attn_probs else out
  out, lse = attention(q, k, v, alibi, spec, tiles, None, None, seed)
  if return_attn_probs:
    if seed is None:
      return out, lse, jnp.zeros((0,), q.dtype)
    return out, lse, s_dmask(q, k, lse, spec, alibi, seed)
  return out


def _bucketed(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes, tiles, backend):
  """(out, lse) computed at bucket lengths through the varlen kernels (pallas_attn/buckets.py)."""
  from pallas_attn.flash_attn_varlen import prepare_varlen  # pylint: disable=g-import-not-at-top
  b, sq = q.shape[:2]
  qp, kp, vp, cu_q, cu_k = buckets.dense_as_varlen(q, k, v)
  spec, alibi, seqlens = prepare_varlen(qp, kp, vp, cu_q, cu_k, sq, k.shape[1], 0.0, softmax_scale,
                                        causal, window_size, softcap, alibi_slopes)
  spec = dataclasses.replace(spec, backend=backend)
  out, lse = attention(qp, kp, vp, alibi, spec, tiles, None, seqlens, None)
  return buckets.dense_from_varlen(out, lse, b, sq)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                    dropout_key=None, tiles=None, bucket_lengths=False, backend=None):
  """Scaled dot-product attention softmax(q k^T * scale) v without materializing the scores.

  Arguments:
    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim), nheads a
      multiple of nheads_k (query head h reads kv head h // (nheads / nheads_k)).
    causal: bottom-right aligned. With seqlen_q=2, seqlen_k=5 the mask is 1 1 1 1 0 / 1 1 1 1 1;
      with seqlen_q=5, seqlen_k=2 it is 0 0 / 0 0 / 0 0 / 1 0 / 1 1 (empty rows give out 0).
    window_size: (left, right); query i sees keys in [i + sk - sq - left, i + sk - sq + right],
      -1 meaning unbounded on that side.
    softcap: > 0 applies softcap * tanh(score / softcap) before ALiBi and masking.
    alibi_slopes: (nheads,) or (batch, nheads) fp32; adds -slope * |i + sk - sq - j|.
    deterministic: accepted for compatibility; the backward is always deterministic.
    dropout_p: probability of dropping each attention probability (kept ones are scaled by
      1 / (1 - dropout_p)); needs dropout_key. The keep mask is a pure function of
      (seed, batch, head, i, j), so the backward replays it.
    return_attn_probs: also return lse (batch, nheads, seqlen_q) fp32 and S_dmask: empty without
      dropout, else (batch, nheads, seqlen_q, seqlen_k) P with dropped entries negated.
    dropout_key: PRNG key for dropout (keyword-only, JAX face only).
    tiles: KernelConfigs overriding the tuned tile table (keyword-only, for experiments).
    bucket_lengths: (keyword-only, JAX face only) compute at bucket lengths (pallas_attn/buckets.py:
      padded operands, real lengths read at run time by the varlen kernels), so calls at many
      sequence lengths share O(log) compiled kernels; same results. Ignored with dropout.
    backend: (keyword-only, JAX face only) the kernel backend by name ("triton", or "mosaic" where
      registered; pallas_attn/backends/registry.py), overriding PALLAS_ATTN_BACKEND; None lets
      the dispatcher choose per call. A backend that does not cover the call raises ValueError.
  Returns:
    out (batch, seqlen_q, nheads, headdim), or (out, softmax_lse, S_dmask).
  """
  del deterministic
  return _flash(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                return_attn_probs, dropout_key, tiles, bucket_lengths, backend)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False, *, dropout_key=None,
                              tiles=None, backend=None):
  """flash_attn_func with qkv (batch, seqlen, 3, nheads, headdim) stacked."""
  del deterministic
  checks.require_array("qkv", qkv, 5, "(batch, seqlen, 3, nheads, headdim)")
  if qkv.shape[2] != 3:
    raise ValueError(f"qkv: expected shape (batch, seqlen, 3, nheads, headdim), got {tuple(qkv.shape)}")
  return _flash(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal,
                window_size, softcap, alibi_slopes, return_attn_probs, dropout_key, tiles,
                backend=backend)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False, *, dropout_key=None,
                             tiles=None, backend=None):
  """flash_attn_func with kv (batch, seqlen_k, 2, nheads_k, headdim) stacked."""
  del deterministic
  checks.require_array("kv", kv, 5, "(batch, seqlen_k, 2, nheads_k, headdim)")
  if kv.shape[2] != 2:
    raise ValueError(f"kv: expected shape (batch, seqlen_k, 2, nheads_k, headdim), got {tuple(kv.shape)}")
  return _flash(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                alibi_slopes, return_attn_probs, dropout_key, tiles, backend=backend)
