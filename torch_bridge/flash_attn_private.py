"""flash-attn 2.8's private entry points (`flash_attn.flash_attn_interface._flash_attn_forward` and
friends), which libraries built on flash-attn (ring attention, for one) call inside their own
autograd Functions. Same signatures and returns, over the public functions' custom ops:

- `_flash_attn_forward(...)` / `_flash_attn_varlen_forward(...)` -> (out, softmax_lse, S_dmask,
  rng_state), not differentiable. rng_state is int64 (2,) holding (our dropout seed, 0), the shape
  of flash-attn's (seed, offset) pair; pass it back to the backward to replay the dropout mask.
- `_flash_attn_backward(...)` / `_flash_attn_varlen_backward(...)` write dq, dk, dv into the given
  tensors and return softmax_d = rowsum(dout * out) in fp32, (batch, nheads, seqlen_q) (varlen:
  (nheads, total_q)); flash-attn rounds seqlen_q up to a multiple of 128 there, we do not.
"""
from __future__ import annotations

import torch

from torch_bridge import compat
from torch_bridge import flash_attn as dense
from torch_bridge import flash_attn_varlen as varlen


def _rng_state(seed, device):
  state = torch.zeros(2, dtype=torch.int64, device=device)
  if seed is not None:
    state[0] = seed.to(torch.int64)[0]
  return state


def _seed(dropout_p, rng_state):
  if not dropout_p > 0:
    return None
  if rng_state is None:
    raise ValueError("rng_state: dropout_p > 0 needs the rng_state returned by the forward, got None")
  return rng_state[:1].to(torch.int32)


def _write(dst, src, name):
  if dst is None:
    return src
  if tuple(dst.shape) != tuple(src.shape):
    raise ValueError(f"{name}: expected shape {tuple(src.shape)}, got {tuple(dst.shape)}")
  return dst.copy_(src)


@torch.no_grad()
def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right,
                        softcap, alibi_slopes, return_softmax):
  args = dense.op_args(q, k, v, dropout_p, softmax_scale, causal, (window_size_left, window_size_right),
                       softcap, alibi_slopes)
  out, lse = dense._FLASH.fwd(*args)  # pylint: disable=protected-access
  s_dmask = (dense.attn_probs(dense._s_dmask_op, lse, args) if return_softmax  # pylint: disable=protected-access
             else torch.empty(0, dtype=q.dtype, device=q.device))
  return out, lse, s_dmask, _rng_state(args[-1], q.device)


@torch.no_grad()
def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                         window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
                         rng_state=None):
  del deterministic  # always deterministic
  args = list(dense.op_args(q, k, v, 0.0, softmax_scale, causal, (window_size_left, window_size_right),
                            softcap, alibi_slopes))
  args[4], args[-1] = float(dropout_p), _seed(float(dropout_p), rng_state)
  grads = dense._FLASH.bwd(dout, None, *args, out, softmax_lse)  # pylint: disable=protected-access
  for name, dst, src in zip(("dq", "dk", "dv"), (dq, dk, dv), grads):
    _write(dst, src, name)
  return (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()


def _no_paged(block_table, leftpad_k, seqused_k):
  for name, value in (("block_table", block_table), ("leftpad_k", leftpad_k), ("seqused_k", seqused_k)):
    if value is not None:
      raise NotImplementedError(f"{name}: not supported by _flash_attn_varlen_forward here; expected "
                                "None (use flash_attn_varlen_func for paged keys)")


@torch.no_grad()
def _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p, softmax_scale, causal, window_size_left=-1,
                               window_size_right=-1, softcap=0.0, alibi_slopes=None,
                               return_softmax=False, block_table=None, leftpad_k=None, seqused_k=None,
                               zero_tensors=False):
  del zero_tensors
  _no_paged(block_table, leftpad_k, seqused_k)
  args = varlen.op_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                        softmax_scale, causal, (window_size_left, window_size_right), softcap,
                        alibi_slopes, None)
  out, lse = varlen._VARLEN.fwd(*args)  # pylint: disable=protected-access
  s_dmask = (dense.attn_probs(varlen._s_dmask_op, lse, args) if return_softmax  # pylint: disable=protected-access
             else torch.empty(0, dtype=q.dtype, device=q.device))
  return out, lse, s_dmask, _rng_state(args[-1], q.device)


@torch.no_grad()
def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                                max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                                window_size_left, window_size_right, softcap, alibi_slopes,
                                deterministic, rng_state=None, zero_tensors=False):
  del deterministic, zero_tensors
  args = list(varlen.op_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0,
                             softmax_scale, causal, (window_size_left, window_size_right), softcap,
                             alibi_slopes, None))
  args[8], args[-1] = float(dropout_p), _seed(float(dropout_p), rng_state)
  grads = varlen._VARLEN.bwd(dout, None, *args, out, softmax_lse)  # pylint: disable=protected-access
  for name, dst, src in zip(("dq", "dk", "dv"), (dq, dk, dv), grads):
    _write(dst, src, name)
  return (dout.float() * out.float()).sum(-1).transpose(0, 1).contiguous()


_PRIVATE = dict(_flash_attn_forward=_flash_attn_forward, _flash_attn_backward=_flash_attn_backward,
                _flash_attn_varlen_forward=_flash_attn_varlen_forward,
                _flash_attn_varlen_backward=_flash_attn_varlen_backward)
compat.register("flash_attn.flash_attn_interface", **_PRIVATE)
