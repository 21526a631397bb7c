"""FlashAttention-2's varlen API on the JAX face: sequences packed along the token axis.

Sequence s owns rows [cu_seqlens[s], cu_seqlens[s + 1]) and gets its own bottom-right causal
alignment and window. The kernels read the offsets themselves (no padding, no Python loop), and
max_seqlen is rounded up to a power of two before it reaches the compiled kernel, so a new value
recompiles only when it crosses a power of two.
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from pallas_attn import _compat, checks
from pallas_attn.flash import attention
from pallas_attn.flash_attn import _alibi_rows
from pallas_attn.spec import AttentionSpec, band_from_window


def bucket(max_seqlen: int) -> int:
  return max(16, _compat.next_power_of_2(int(max_seqlen)))


def prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                   softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                   alibi_slopes=None, block_table=None):
  """Validates flash_attn_varlen_func's arguments; returns (spec, alibi rows, seqlens)."""
  checks.check_qkv_varlen(q, k, v)
  batch = checks.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0])
  checks.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], batch)
  max_q = checks.check_max_seqlen("max_seqlen_q", max_seqlen_q, cu_seqlens_q)
  max_k = checks.check_max_seqlen("max_seqlen_k", max_seqlen_k, cu_seqlens_k)
  h, d = q.shape[1], q.shape[2]
  checks.check_options(dropout_p=dropout_p, softmax_scale=softmax_scale, window_size=window_size,
                       softcap=softcap, alibi_slopes=alibi_slopes, batch=batch, nheads=h)
  if block_table is not None:
    raise NotImplementedError("block_table (paged keys/values) in varlen is not supported yet")
  if dropout_p > 0:
    raise NotImplementedError("dropout_p > 0 is not supported yet")
  spec = AttentionSpec(
      mask=band_from_window(bucket(max_q), bucket(max_k), causal, tuple(window_size)),
      scale=float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d),
      softcap=float(softcap),
      alibi=alibi_slopes is not None,
      varlen=True,
  )
  return spec, _alibi_rows(alibi_slopes, batch, h), (cu_seqlens_q, cu_seqlens_k)


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
            softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs,
            block_table, tiles):
  spec, alibi, seqlens = prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                                        softcap, alibi_slopes, block_table)
  out, lse = attention(q, k, v, alibi, spec, tiles, None, seqlens)
  if return_attn_probs:
    return out, lse, jnp.zeros((0,), q.dtype)
  return out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None, *, dropout_key=None,
                           tiles=None):
  """flash_attn_func over packed sequences.

  Arguments:
    q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim).
    cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) row offsets of each sequence.
    max_seqlen_q, max_seqlen_k: Python ints, upper bounds of the sequence lengths.
    Other arguments as flash_attn_func; alibi_slopes (nheads,) or (batch, nheads).
  Returns:
    out (total_q, nheads, headdim), or (out, softmax_lse (nheads, total_q) fp32, S_dmask).
  """
  del deterministic, dropout_key
  return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                 softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs,
                 block_table, tiles)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                     causal=False, window_size=(-1, -1), softcap=0.0,
                                     alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, dropout_key=None, tiles=None):
  """flash_attn_varlen_func with qkv (total, 3, nheads, headdim) and one set of offsets."""
  del deterministic, dropout_key
  checks.require_array("qkv", qkv, 4, "(total, 3, nheads, headdim)")
  if qkv.shape[1] != 3:
    raise ValueError(f"qkv: expected shape (total, 3, nheads, headdim), got {tuple(qkv.shape)}")
  return _varlen(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                 dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                 return_attn_probs, None, tiles)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None, causal=False,
                                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                    deterministic=False, return_attn_probs=False, *,
                                    dropout_key=None, tiles=None):
  """flash_attn_varlen_func with kv (total_k, 2, nheads_k, headdim)."""
  del deterministic, dropout_key
  checks.require_array("kv", kv, 4, "(total_k, 2, nheads_k, headdim)")
  if kv.shape[1] != 2:
    raise ValueError(f"kv: expected shape (total_k, 2, nheads_k, headdim), got {tuple(kv.shape)}")
  return _varlen(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                 return_attn_probs, None, tiles)
