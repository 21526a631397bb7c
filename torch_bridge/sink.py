"""Attention sinks (MagiAttention's extension) on the torch face: the fa2_* and fa3_*_with_sink functions.

Signatures and returns are pallas_attn/sink.py's, less the JAX-only `dropout_key`. With a sink, two
pairs of custom ops carry the work (`pallas_attn::flash_attn_sink_fwd` / `_bwd` and
`flash_attn_varlen_sink_fwd` / `_bwd`): the dense and varlen flash ops' arguments followed by the
sink in its public layout and the layout's name. Their jitted JAX forms convert the sink to the
kernels' layout and dsink back inside the one call, so torch sees public layouts only. Without a sink
the functions call the plain flash and varlen ops.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import torch

from pallas_attn import flash, sink as jax_sink
from torch_bridge import _dlpack, _ops, compat
from torch_bridge import flash_attn as bridge_fa
from torch_bridge import flash_attn_varlen as bridge_varlen


# The sink ops extend the dense and varlen ops, so they reuse those modules' private pieces.
# pylint: disable=protected-access

_SINK_ARGS = "Tensor sink, str sink_layout"


# ------------------------------------------------------------------------------------------------
# Kernels: operands (q, k, v, alibi, cu_seqlens_q, cu_seqlens_k, sink, seed), cu_seqlens None when
# dense, seed None without dropout.


def _seqlens(cu_q, cu_k):
  return None if cu_q is None else (cu_q, cu_k)


def _to_kernel_layout(sink, q, kernel_spec):
  return jax_sink._kernel_sink(sink, kernel_spec.sink, q, kernel_spec.varlen)


@functools.partial(jax.jit, static_argnums=(10, 11), donate_argnums=(8, 9))
def _forward_into(q, k, v, alibi, cu_q, cu_k, sink, seed, out, lse, kernel_spec, cfgs):
  return flash.forward_into(q, k, v, alibi, out, lse, kernel_spec, cfgs,
                            _to_kernel_layout(sink, q, kernel_spec), _seqlens(cu_q, cu_k), seed)


@functools.partial(jax.jit, static_argnums=(8, 9))
def _forward(q, k, v, alibi, cu_q, cu_k, sink, seed, kernel_spec, cfgs):
  return flash.forward(q, k, v, alibi, kernel_spec, cfgs, _to_kernel_layout(sink, q, kernel_spec),
                       _seqlens(cu_q, cu_k), seed)


def _backward_impl(q, k, v, alibi, cu_q, cu_k, sink, seed, out, lse, dout, dlse, kernel_spec, cfgs,
                   into=None):
  # The kernel layout is a transposition of the public one; its VJP maps dsink back.
  ksink, to_public = jax.vjp(lambda s: _to_kernel_layout(s, q, kernel_spec), sink)
  args = (q, k, v, alibi, out, lse, dout, dlse)
  if into is None:
    dq, dk, dv, dksink = flash.backward(*args, kernel_spec, cfgs, ksink, _seqlens(cu_q, cu_k), seed)
  else:
    dq, dk, dv, dksink = flash.backward_into(*args, *into, kernel_spec, cfgs, ksink,
                                             _seqlens(cu_q, cu_k), seed)
  return dq, dk, dv, to_public(dksink)[0]


# dsink's buffer is never read, so jit would drop it (and its donation) without keep_unused; kept,
# XLA writes the gradient straight into it and every output stays aliased.
@functools.partial(jax.jit, static_argnums=(16, 17), donate_argnums=(12, 13, 14, 15),
                   keep_unused=True)
def _backward_into(q, k, v, alibi, cu_q, cu_k, sink, seed, out, lse, dout, dlse, dq, dk, dv, dsink,
                   kernel_spec, cfgs):
  del dsink
  return _backward_impl(q, k, v, alibi, cu_q, cu_k, sink, seed, out, lse, dout, dlse, kernel_spec,
                        cfgs, into=(dq, dk, dv))


@functools.partial(jax.jit, static_argnums=(12, 13))
def _backward(q, k, v, alibi, cu_q, cu_k, sink, seed, out, lse, dout, dlse, kernel_spec, cfgs):
  return _backward_impl(q, k, v, alibi, cu_q, cu_k, sink, seed, out, lse, dout, dlse, kernel_spec,
                        cfgs)


_FORWARD = _dlpack.Kernel(into=_forward_into, plain=_forward)
_BACKWARD = _dlpack.Kernel(into=_backward_into, plain=_backward)


# ------------------------------------------------------------------------------------------------
# Ops: the dense and varlen flash ops' arguments, then `sink, sink_layout`.


def _check_sink_dtype(sink):
  if sink.dtype != torch.float32:
    raise TypeError(f"sink: expected a float32 tensor, got {sink.dtype}")


def _sink_desc(name, base, operands, varlen):
  """The op `name` (forward and backward): the flash op `base`'s arguments, then the sink."""

  def with_sink(static, q, sink, sink_layout):
    # eval_shape runs the JAX face's own layout checks without computing anything.
    jax.eval_shape(lambda s: jax_sink._kernel_sink(s, sink_layout, q, varlen), sink)
    kernel_spec, cfgs = static
    return dataclasses.replace(kernel_spec, sink=sink_layout), cfgs

  return dataclasses.replace(
      base, name=name, args=f"{base.args}, {_SINK_ARGS}",
      static=base.static.extend(with_sink, check=_check_sink_dtype), operands=operands,
      forward=_FORWARD, backward=_BACKWARD, wrt=("q", "k", "v", "sink"))


DENSE = _sink_desc(
    "flash_attn_sink_fwd", bridge_fa.FLASH,
    ("q", "k", "v", (bridge_fa._alibi_rows, "alibi_slopes", "q"), None, None, "sink", "seed"),
    varlen=False)
VARLEN = _sink_desc(
    "flash_attn_varlen_sink_fwd", bridge_varlen.VARLEN,
    ("q", "k", "v", bridge_varlen._ALIBI, "cu_seqlens_q", "cu_seqlens_k", "sink", "seed"),
    varlen=True)
_DENSE, _VARLEN = _ops.build(DENSE), _ops.build(VARLEN)
_dense_sink_op, _varlen_sink_op = _DENSE.call, _VARLEN.call


# ------------------------------------------------------------------------------------------------
# Shared by the public functions


def _check_sink(sink, sink_layout):
  _ops.require_tensor("sink", sink, "(s_sink, nheads) ('sh') or (..., s_sink, nheads) ('ssh')")
  if sink_layout not in jax_sink.LAYOUTS:
    raise ValueError(f"sink_layout: expected one of {jax_sink.LAYOUTS}, got {sink_layout!r}")


def _dense(q, k, v, sink, sink_layout, dropout_p, softmax_scale, causal, window_size, softcap,
           alibi_slopes):
  """(out, lse, S_dmask thunk) of dense attention with sinks; plain attention when sink is None."""
  args = bridge_fa.op_args(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes)
  if sink is not None:
    _check_sink(sink, sink_layout)
  if (sink is None or sink_layout == "sh") and bridge_fa._pads(args, (sink is None, sink_layout)):  # pylint: disable=protected-access
    # Padded to bucket lengths through the varlen kernels (torch_bridge/_buckets.py); "ssh" sinks
    # are per query row, so they keep exact shapes.
    op = (bridge_varlen._varlen_op if sink is None  # pylint: disable=protected-access
          else lambda *a: _varlen_sink_op(*a, sink, sink_layout))
    out, lse = bridge_fa.bucketed(*args[:4], *args[5:10], varlen_op=op)
    return out, lse.contiguous(), lambda: torch.empty(0, dtype=q.dtype, device=q.device)
  if sink is None:
    out, lse = bridge_fa._attention_op(*args)
  else:
    out, lse = _dense_sink_op(*args, sink, sink_layout)
  # S_dmask needs only the kernels' lse, which already counts the sinks.
  return out, lse, lambda: bridge_fa.attn_probs(bridge_fa._s_dmask_op, lse, args)


_VARLEN_NAMES = bridge_varlen._NAMES


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sink, sink_layout,
            dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, block_table=None,
            names=_VARLEN_NAMES):
  """(out, lse, S_dmask thunk) of varlen attention with sinks; plain varlen attention when sink is
  None."""
  args = bridge_varlen.op_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                               block_table, names)
  if sink is not None:
    _check_sink(sink, sink_layout)
  padded = (bridge_varlen.padded_args(args, (sink is None, sink_layout))
            if sink is None or sink_layout == "sh" else None)  # "ssh" sinks have a row per token
  if padded is not None:
    out, lse = (bridge_varlen._varlen_op(*padded) if sink is None
                else _varlen_sink_op(*padded, sink, sink_layout))
    total = args[0].shape[0]
    return (out[:total], lse[:, :total].contiguous(),
            lambda: bridge_fa.attn_probs(bridge_varlen._s_dmask_op, lse, padded))
  if sink is None:
    out, lse = bridge_varlen._varlen_op(*args)
  else:
    out, lse = _varlen_sink_op(*args, sink, sink_layout)
  return out, lse, lambda: bridge_fa.attn_probs(bridge_varlen._s_dmask_op, lse, args)


def _fa2_return(out, lse, s_dmask, return_attn_probs):
  return (out, lse, s_dmask()) if return_attn_probs else out


def _fa3_return(out, lse, return_attn_probs):
  return (out, lse) if return_attn_probs else out


def _unpack(name, packed, n, axis, layout):
  _ops.require_tensor(name, packed, layout)
  if packed.dim() != axis + 3 or packed.shape[axis] != n:
    raise ValueError(f"{name}: expected shape {layout}, got {tuple(packed.shape)}")
  return packed.unbind(axis)


# ------------------------------------------------------------------------------------------------
# FlashAttention-2 family: every flash-attn argument, with sink and sink_layout after the tensors.


def fa2_func_with_sink(q, k, v, sink=None, sink_layout="sh", dropout_p=0.0, softmax_scale=None,
                       causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                       deterministic=False, return_attn_probs=False):
  """flash_attn_func plus attention sinks.

  Each sink is an extra key per query head with a learnable raw logit (not scaled, capped, masked or
  biased) and a zero value: it enters the softmax denominator and lse but not the output. A query row
  that sees no key gives out 0 and lse = logsumexp of its sink logits.

  Arguments:
    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim), as in
      flash_attn_func.
    sink: float32 logits, (s_sink, nheads) for sink_layout="sh" (shared by every row), or
      (batch, seqlen_q, s_sink, nheads) for "ssh" (one set per query token); None = no sinks.
      Differentiable; its gradient is float32.
    dropout_p: as flash_attn_func (seeded from torch's default generator); sinks are never dropped.
    Other arguments as flash_attn_func.
  Returns:
    out (batch, seqlen_q, nheads, headdim), or with return_attn_probs (out, lse, S_dmask): lse
    (batch, nheads, seqlen_q) float32 including the sinks, S_dmask as flash_attn_func's (its P
    normalized by that lse, so a row's entries sum to less than 1 by the sinks' share).
  """
  del deterministic
  out, lse, s_dmask = _dense(q, k, v, sink, sink_layout, dropout_p, softmax_scale, causal,
                             window_size, softcap, alibi_slopes)
  return _fa2_return(out, lse, s_dmask, return_attn_probs)


def fa2_kvpacked_func_with_sink(q, kv, sink=None, sink_layout="sh", dropout_p=0.0, softmax_scale=None,
                                causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                deterministic=False, return_attn_probs=False):
  """fa2_func_with_sink with kv (batch, seqlen_k, 2, nheads_k, headdim)."""
  k, v = _unpack("kv", kv, 2, 2, "(batch, seqlen_k, 2, nheads_k, headdim)")
  return fa2_func_with_sink(q, k, v, sink, sink_layout, dropout_p, softmax_scale, causal, window_size,
                            softcap, alibi_slopes, deterministic, return_attn_probs)


def fa2_qkvpacked_func_with_sink(qkv, sink=None, sink_layout="sh", dropout_p=0.0, softmax_scale=None,
                                 causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                 deterministic=False, return_attn_probs=False):
  """fa2_func_with_sink with qkv (batch, seqlen, 3, nheads, headdim)."""
  q, k, v = _unpack("qkv", qkv, 3, 2, "(batch, seqlen, 3, nheads, headdim)")
  return fa2_func_with_sink(q, k, v, sink, sink_layout, dropout_p, softmax_scale, causal, window_size,
                            softcap, alibi_slopes, deterministic, return_attn_probs)


def fa2_varlen_func_with_sink(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              sink=None, sink_layout="sh", dropout_p=0.0, softmax_scale=None,
                              causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False, block_table=None):
  """flash_attn_varlen_func plus sinks: sink (s_sink, nheads) ("sh") or (total_q, s_sink, nheads)
  ("ssh"). Returns out, or (out, lse (nheads, total_q) including the sinks, S_dmask)."""
  del deterministic
  out, lse, s_dmask = _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              sink, sink_layout, dropout_p, softmax_scale, causal, window_size,
                              softcap, alibi_slopes, block_table)
  return _fa2_return(out, lse, s_dmask, return_attn_probs)


def fa2_varlen_kvpacked_func_with_sink(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                       sink=None, sink_layout="sh", dropout_p=0.0, softmax_scale=None,
                                       causal=False, window_size=(-1, -1), softcap=0.0,
                                       alibi_slopes=None, deterministic=False,
                                       return_attn_probs=False):
  """fa2_varlen_func_with_sink with kv (total_k, 2, nheads_k, headdim)."""
  k, v = _unpack("kv", kv, 2, 1, "(total_k, 2, nheads_k, headdim)")
  return fa2_varlen_func_with_sink(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                   sink, sink_layout, dropout_p, softmax_scale, causal, window_size,
                                   softcap, alibi_slopes, deterministic, return_attn_probs)


def fa2_varlen_qkvpacked_func_with_sink(qkv, cu_seqlens, max_seqlen, sink=None, sink_layout="sh",
                                        dropout_p=0.0, softmax_scale=None, causal=False,
                                        window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                        deterministic=False, return_attn_probs=False):
  """fa2_varlen_func_with_sink with qkv (total, 3, nheads, headdim) and one set of offsets."""
  del deterministic
  q, k, v = _unpack("qkv", qkv, 3, 1, "(total, 3, nheads, headdim)")
  out, lse, s_dmask = _varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, sink,
                              sink_layout, dropout_p, softmax_scale, causal, window_size, softcap,
                              alibi_slopes, names=(("cu_seqlens", "max_seqlen"),) * 2)
  return _fa2_return(out, lse, s_dmask, return_attn_probs)


# ------------------------------------------------------------------------------------------------
# FlashAttention-3 family: FA3's arguments; those without a meaning here are refused by name.


def fa3_func_with_sink(q, k, v, sink=None, sink_layout="sh", softmax_scale=None, causal=False,
                       qv=None, q_descale=None, k_descale=None, v_descale=None,
                       window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                       pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False):
  """FA3's flash_attn_func plus sinks (see fa2_func_with_sink). Returns out, or (out, lse).

  qv, the fp8 descales and attention_chunk != 0 raise NotImplementedError; num_splits, pack_gqa and
  sm_margin are scheduling hints without effect here.
  """
  del num_splits, pack_gqa, deterministic, sm_margin
  jax_sink._fa3_unsupported(qv, q_descale, k_descale, v_descale, attention_chunk)
  out, lse, _ = _dense(q, k, v, sink, sink_layout, 0.0, softmax_scale, causal, window_size, softcap,
                       None)
  return _fa3_return(out, lse, return_attn_probs)


def fa3_varlen_func_with_sink(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              sink=None, sink_layout="sh", seqused_q=None, seqused_k=None,
                              softmax_scale=None, causal=False, qv=None, q_descale=None,
                              k_descale=None, v_descale=None, window_size=(-1, -1),
                              attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None,
                              deterministic=False, sm_margin=0, return_attn_probs=False):
  """FA3's flash_attn_varlen_func plus sinks. Returns out, or (out, lse (nheads, total_q)).

  seqused_q/seqused_k raise NotImplementedError, as the FA3-only inputs of fa3_func_with_sink.
  """
  del num_splits, pack_gqa, deterministic, sm_margin
  jax_sink._fa3_unsupported(qv, q_descale, k_descale, v_descale, attention_chunk, seqused_q,
                            seqused_k)
  out, lse, _ = _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sink,
                        sink_layout, 0.0, softmax_scale, causal, window_size, softcap, None)
  return _fa3_return(out, lse, return_attn_probs)


def _split_fa3_qkv(qkv, num_heads_q):
  """FA3's packed qkv: (b, s, 3, H, d), or (b, s, H + 2 * Hk, d) split [H | Hk | Hk] by num_heads_q."""
  _ops.require_tensor("qkv", qkv, "(batch, seqlen, 3, nheads, headdim) or "
                  "(batch, seqlen, nheads + 2 * nheads_k, headdim)")
  if qkv.dim() == 5:
    return _unpack("qkv", qkv, 3, 2, "(batch, seqlen, 3, nheads, headdim)")
  if qkv.dim() != 4:
    raise ValueError(f"qkv: expected a 4-D tensor (batch, seqlen, nheads + 2 * nheads_k, headdim) or "
                     f"a 5-D one (batch, seqlen, 3, nheads, headdim), got shape {tuple(qkv.shape)}")
  if isinstance(num_heads_q, bool) or not isinstance(num_heads_q, int) or num_heads_q <= 0:
    raise ValueError(f"num_heads_q: a 4-D qkv needs the number of query heads, got {num_heads_q!r}")
  rest = qkv.shape[2] - num_heads_q
  if rest <= 0 or rest % 2:
    raise ValueError(f"qkv: expected nheads + 2 * nheads_k heads with nheads={num_heads_q}, "
                     f"got {qkv.shape[2]} heads")
  return qkv.split((num_heads_q, rest // 2, rest // 2), dim=2)


def fa3_qkvpacked_func_with_sink(qkv, sink=None, sink_layout="sh", softmax_scale=None, causal=False,
                                 q_descale=None, k_descale=None, v_descale=None,
                                 window_size=(-1, -1), attention_chunk=0, softcap=0.0,
                                 deterministic=False, num_heads_q=None, sm_margin=0,
                                 return_attn_probs=False):
  """fa3_func_with_sink with packed qkv: (batch, seqlen, 3, nheads, headdim), or
  (batch, seqlen, nheads + 2 * nheads_k, headdim) split [nheads | nheads_k | nheads_k] by
  num_heads_q. The gradient of qkv comes back as one tensor of qkv's shape."""
  q, k, v = _split_fa3_qkv(qkv, num_heads_q)
  return fa3_func_with_sink(q, k, v, sink, sink_layout, softmax_scale, causal, None, q_descale,
                            k_descale, v_descale, window_size, attention_chunk, softcap,
                            deterministic=deterministic, sm_margin=sm_margin,
                            return_attn_probs=return_attn_probs)


_FA2 = dict(fa2_func_with_sink=fa2_func_with_sink,
            fa2_kvpacked_func_with_sink=fa2_kvpacked_func_with_sink,
            fa2_qkvpacked_func_with_sink=fa2_qkvpacked_func_with_sink,
            fa2_varlen_func_with_sink=fa2_varlen_func_with_sink,
            fa2_varlen_kvpacked_func_with_sink=fa2_varlen_kvpacked_func_with_sink,
            fa2_varlen_qkvpacked_func_with_sink=fa2_varlen_qkvpacked_func_with_sink)
_FA3 = dict(fa3_func_with_sink=fa3_func_with_sink,
            fa3_varlen_func_with_sink=fa3_varlen_func_with_sink,
            fa3_qkvpacked_func_with_sink=fa3_qkvpacked_func_with_sink)
# MagiAttention's import paths: `from extensions.fa3_interface_with_sink import fa3_func_with_sink`.
compat.register("extensions")
compat.register("extensions.fa2_interface_with_sink", **_FA2)
compat.register("extensions.fa3_interface_with_sink", **_FA3)
