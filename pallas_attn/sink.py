"""Attention sinks (MagiAttention's extension) on the JAX face: fa2_*_with_sink and fa3_*_with_sink.

A sink is an extra key per query head with a learnable raw logit and a zero value: it enters the
softmax denominator (and lse) but not the output. The logits seed the kernel's online softmax, so
sinks cost one small load per query tile, and the dQ pass returns their gradient.

Layouts: "sh" sink (s_sink, H) shared by every row; "ssh" one set per query token, (b, sq, s_sink, H)
or varlen (total_q, s_sink, H). Sinks are fp32 and so is their gradient.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from pallas_attn import checks
from pallas_attn.flash import attention
from pallas_attn.flash_attn import dropout_seed, prepare, s_dmask
from pallas_attn.flash_attn_varlen import prepare_varlen, s_dmask_varlen

LAYOUTS = ("sh", "ssh")


def _kernel_sink(sink, sink_layout, q, varlen: bool):
  """Validates the public sink and returns it in the kernels' layout (or None)."""
  if sink is None:
    return None
  if sink_layout not in LAYOUTS:
    raise ValueError(f"sink_layout: expected one of {LAYOUTS}, got {sink_layout!r}")
  if not hasattr(sink, "shape") or jnp.dtype(sink.dtype) != jnp.float32:
    raise TypeError(f"sink: expected a float32 array, got "
                    f"{getattr(sink, 'dtype', type(sink).__name__)}")
  h = q.shape[-2]
  rows = q.shape[:-2]  # (b, sq) or (total_q,)
  if sink_layout == "sh":
    if sink.ndim != 2 or sink.shape[1] != h or sink.shape[0] < 1:
      raise ValueError(f"sink: expected shape (s_sink, {h}) for sink_layout='sh', got {tuple(sink.shape)}")
    return sink.T  # (H, s_sink)
  if sink.ndim != len(rows) + 2 or tuple(sink.shape[:len(rows)]) != tuple(rows) or sink.shape[-1] != h:
    want = ", ".join(str(r) for r in rows)
    raise ValueError(f"sink: expected shape ({want}, s_sink, {h}) for sink_layout='ssh', "
                     f"got {tuple(sink.shape)}")
  # (total_q, s, H) -> (H, total_q, s); (b, sq, s, H) -> (b, H, sq, s)
  return jnp.transpose(sink, (2, 0, 1) if varlen else (0, 3, 1, 2))


def _with_sink(spec, sink, sink_layout):
  return spec if sink is None else dataclasses.replace(spec, sink=sink_layout)


def _dense(q, k, v, sink, sink_layout, dropout_p, softmax_scale, causal, window_size, softcap,
           alibi_slopes, dropout_key=None):
  spec, alibi = prepare(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes)
  ksink = _kernel_sink(sink, sink_layout, q, varlen=False)
  seed = dropout_seed(dropout_p, dropout_key)
  out, lse = attention(q, k, v, alibi, _with_sink(spec, ksink, sink_layout), None, ksink, None, seed)
  s_mask = None if seed is None else s_dmask(q, k, lse, spec, alibi, seed)
  return out, lse, s_mask


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sink, sink_layout,
            dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, block_table=None,
            dropout_key=None):
  spec, alibi, seqlens = prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                                        softcap, alibi_slopes, block_table)
  ksink = _kernel_sink(sink, sink_layout, q, varlen=True)
  seed = dropout_seed(dropout_p, dropout_key)
  out, lse = attention(q, k, v, alibi, _with_sink(spec, ksink, sink_layout), None, ksink, seqlens,
                       seed)
  s_mask = None if seed is None else s_dmask_varlen(q, k, lse, *seqlens, int(max_seqlen_q),
                                                    int(max_seqlen_k), spec, alibi, seed)
  return out, lse, s_mask


def _fa2_return(out, lse, q, return_attn_probs, s_mask=None):
  if not return_attn_probs:
    return out
  return out, lse, jnp.zeros((0,), q.dtype) if s_mask is None else s_mask


def _fa3_return(out, lse, return_attn_probs):
  return (out, lse) if return_attn_probs else out


def _unpack(name, packed, n, axis, layout):
  checks.require_array(name, packed, axis + 3, layout)
  if packed.shape[axis] != n:
    raise ValueError(f"{name}: expected shape {layout}, got {tuple(packed.shape)}")
  return tuple(jnp.take(packed, i, axis=axis) for i in range(n))


# ------------------------------------------------------------------------------------------------
# FlashAttention-2 family: every flash-attn argument, with sink and sink_layout after the tensors.


def fa2_func_with_sink(q, k, v, sink=None, sink_layout="sh", dropout_p=0.0, softmax_scale=None,
                       causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                       deterministic=False, return_attn_probs=False, *, dropout_key=None):
  """flash_attn_func plus sinks. Returns out, or (out, lse including the sinks, S_dmask)."""
  del deterministic
  out, lse, s_mask = _dense(q, k, v, sink, sink_layout, dropout_p, softmax_scale, causal,
                            window_size, softcap, alibi_slopes, dropout_key)
  return _fa2_return(out, lse, q, return_attn_probs, s_mask)


def fa2_kvpacked_func_with_sink(q, kv, sink=None, sink_layout="sh", dropout_p=0.0, softmax_scale=None,
                                causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                deterministic=False, return_attn_probs=False, *, dropout_key=None):
  """fa2_func_with_sink with kv (batch, seqlen_k, 2, nheads_k, headdim)."""
  k, v = _unpack("kv", kv, 2, 2, "(batch, seqlen_k, 2, nheads_k, headdim)")
  return fa2_func_with_sink(q, k, v, sink, sink_layout, dropout_p, softmax_scale, causal, window_size,
                            softcap, alibi_slopes, deterministic, return_attn_probs,
                            dropout_key=dropout_key)


def fa2_qkvpacked_func_with_sink(qkv, sink=None, sink_layout="sh", dropout_p=0.0, softmax_scale=None,
                                 causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                 deterministic=False, return_attn_probs=False, *, dropout_key=None):
  """fa2_func_with_sink with qkv (batch, seqlen, 3, nheads, headdim)."""
  q, k, v = _unpack("qkv", qkv, 3, 2, "(batch, seqlen, 3, nheads, headdim)")
  return fa2_func_with_sink(q, k, v, sink, sink_layout, dropout_p, softmax_scale, causal, window_size,
                            softcap, alibi_slopes, deterministic, return_attn_probs,
                            dropout_key=dropout_key)


def fa2_varlen_func_with_sink(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              sink=None, sink_layout="sh", dropout_p=0.0, softmax_scale=None,
                              causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False, block_table=None, *,
                              dropout_key=None):
  """flash_attn_varlen_func plus sinks; lse is (nheads, total_q)."""
  del deterministic
  out, lse, s_mask = _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sink,
                             sink_layout, dropout_p, softmax_scale, causal, window_size, softcap,
                             alibi_slopes, block_table, dropout_key)
  return _fa2_return(out, lse, q, return_attn_probs, s_mask)


def fa2_varlen_kvpacked_func_with_sink(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                       sink=None, sink_layout="sh", dropout_p=0.0, softmax_scale=None,
                                       causal=False, window_size=(-1, -1), softcap=0.0,
                                       alibi_slopes=None, deterministic=False,
                                       return_attn_probs=False, *, dropout_key=None):
  """fa2_varlen_func_with_sink with kv (total_k, 2, nheads_k, headdim)."""
  k, v = _unpack("kv", kv, 2, 1, "(total_k, 2, nheads_k, headdim)")
  return fa2_varlen_func_with_sink(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                   sink, sink_layout, dropout_p, softmax_scale, causal, window_size,
                                   softcap, alibi_slopes, deterministic, return_attn_probs,
                                   dropout_key=dropout_key)


def fa2_varlen_qkvpacked_func_with_sink(qkv, cu_seqlens, max_seqlen, sink=None, sink_layout="sh",
                                        dropout_p=0.0, softmax_scale=None, causal=False,
                                        window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                        deterministic=False, return_attn_probs=False, *,
                                        dropout_key=None):
  """fa2_varlen_func_with_sink with qkv (total, 3, nheads, headdim) and one set of offsets."""
  q, k, v = _unpack("qkv", qkv, 3, 1, "(total, 3, nheads, headdim)")
  return fa2_varlen_func_with_sink(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, sink,
                                   sink_layout, dropout_p, softmax_scale, causal, window_size,
                                   softcap, alibi_slopes, deterministic, return_attn_probs,
                                   dropout_key=dropout_key)


# ------------------------------------------------------------------------------------------------
# FlashAttention-3 family: FA3's arguments; those without a meaning here are refused by name.


def _fa3_unsupported(qv=None, q_descale=None, k_descale=None, v_descale=None, attention_chunk=0,
                     seqused_q=None, seqused_k=None):
  for name, value in (("qv", qv), ("q_descale", q_descale), ("k_descale", k_descale),
                      ("v_descale", v_descale), ("seqused_q", seqused_q), ("seqused_k", seqused_k)):
    if value is not None:
      raise NotImplementedError(f"{name}: not supported by pallas-attn (pass None)")
  if attention_chunk:
    raise NotImplementedError(f"attention_chunk: only 0 is supported, got {attention_chunk!r}")


def fa3_func_with_sink(q, k, v, sink=None, sink_layout="sh", softmax_scale=None, causal=False,
                       qv=None, q_descale=None, k_descale=None, v_descale=None,
                       window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                       pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False):
  """FA3's flash_attn_func plus sinks. Returns out, or (out, lse). num_splits, pack_gqa and
  sm_margin are scheduling hints without effect here."""
  del num_splits, pack_gqa, deterministic, sm_margin
  _fa3_unsupported(qv, q_descale, k_descale, v_descale, attention_chunk)
  out, lse, _ = _dense(q, k, v, sink, sink_layout, 0.0, softmax_scale, causal, window_size, softcap,
                       None)
  return _fa3_return(out, lse, return_attn_probs)


def fa3_varlen_func_with_sink(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              sink=None, sink_layout="sh", seqused_q=None, seqused_k=None,
                              softmax_scale=None, causal=False, qv=None, q_descale=None,
                              k_descale=None, v_descale=None, window_size=(-1, -1),
                              attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None,
                              deterministic=False, sm_margin=0, return_attn_probs=False):
  """FA3's flash_attn_varlen_func plus sinks. Returns out, or (out, lse (nheads, total_q))."""
  del num_splits, pack_gqa, deterministic, sm_margin
  _fa3_unsupported(qv, q_descale, k_descale, v_descale, attention_chunk, seqused_q, seqused_k)
  out, lse, _ = _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sink,
                        sink_layout, 0.0, softmax_scale, causal, window_size, softcap, None)
  return _fa3_return(out, lse, return_attn_probs)


def split_fa3_qkv(qkv, num_heads_q=None):
  """FA3's packed qkv: (b, s, 3, H, d), or (b, s, H + 2 * Hk, d) split [H | Hk | Hk] by num_heads_q."""
  if getattr(qkv, "ndim", None) == 5:
    return _unpack("qkv", qkv, 3, 2, "(batch, seqlen, 3, nheads, headdim)")
  checks.require_array("qkv", qkv, 4, "(batch, seqlen, nheads + 2 * nheads_k, headdim)")
  if not isinstance(num_heads_q, (int, np.integer)) or num_heads_q <= 0:
    raise ValueError(f"num_heads_q: a 4-D qkv needs the number of query heads, got {num_heads_q!r}")
  rest = qkv.shape[2] - num_heads_q
  if rest <= 0 or rest % 2:
    raise ValueError(f"qkv: expected nheads + 2 * nheads_k heads with nheads={num_heads_q}, "
                     f"got {qkv.shape[2]} heads")
  hk = rest // 2
  return qkv[:, :, :num_heads_q], qkv[:, :, num_heads_q:num_heads_q + hk], qkv[:, :, num_heads_q + hk:]


def fa3_qkvpacked_func_with_sink(qkv, sink=None, sink_layout="sh", softmax_scale=None, causal=False,
                                 q_descale=None, k_descale=None, v_descale=None,
                                 window_size=(-1, -1), attention_chunk=0, softcap=0.0,
                                 deterministic=False, num_heads_q=None, sm_margin=0,
                                 return_attn_probs=False):
  """fa3_func_with_sink with packed qkv (see split_fa3_qkv)."""
  q, k, v = split_fa3_qkv(qkv, num_heads_q)
  return fa3_func_with_sink(q, k, v, sink, sink_layout, softmax_scale, causal, None, q_descale,
                            k_descale, v_descale, window_size, attention_chunk, softcap,
                            deterministic=deterministic, sm_margin=sm_margin,
                            return_attn_probs=return_attn_probs)
