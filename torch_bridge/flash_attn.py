"""FlashAttention-2's dense API on the torch face: flash-attn 2.8's names, arguments and returns.

Two custom ops carry the work (`pallas_attn::flash_attn_fwd` / `flash_attn_bwd`, backed by
pallas_attn.flash's jitted forward and backward); the public functions only unpack packed layouts
and shape the return value, so torch.compile sees a single opaque node per call.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import torch

from pallas_attn import flash, flash_attn as jax_flash_attn
from torch_bridge import _dlpack, _ops, compat

_FWD_ARGS = ("Tensor q, Tensor k, Tensor v, Tensor? alibi_slopes, float dropout_p, float? softmax_scale, "
             "bool causal, int window_left, int window_right, float softcap")


@functools.lru_cache(maxsize=1024)
def _spec(shapes, dtypes, dropout_p, softmax_scale, causal, window_left, window_right, softcap):
  """The kernel spec of one static configuration, validated by pallas_attn's own checks.

  Keyed by torch shapes and dtypes, so a call that hits the cache costs one dict lookup.
  """
  names = ("q", "k", "v", "alibi_slopes")
  metas = [None if s is None else (tuple(s), _dlpack.jax_dtype(n, d))
           for n, s, d in zip(names, shapes, dtypes)]
  q, k, v = (jax.ShapeDtypeStruct(*m) for m in metas[:3])
  alibi_slopes = None if metas[3] is None else np.zeros(*metas[3])
  spec, _ = jax_flash_attn.prepare(q, k, v, dropout_p, softmax_scale, causal,
                                   (window_left, window_right), softcap, alibi_slopes)
  if dropout_p > 0:
    # The JAX face has dropout; seeding it from torch's generator is still to be wired here.
    raise NotImplementedError("dropout_p > 0 is not supported on the torch face yet")
  return spec, None  # (spec, tile configs: None = the tuned table)


def _static(q, k, v, alibi_slopes, dropout_p, softmax_scale, causal, window_left, window_right,
            softcap, *_):
  tensors = (q, k, v, alibi_slopes)
  return _spec(tuple(None if t is None else t.shape for t in tensors),
               tuple(None if t is None else t.dtype for t in tensors),
               dropout_p, softmax_scale, causal, window_left, window_right, softcap)


def _alibi_rows(alibi_slopes, q):
  """(nheads,) or (batch, nheads) slopes as the kernels' (batch, nheads, 1) rows."""
  if alibi_slopes is None:
    return None
  b, _, h, _ = q.shape
  return alibi_slopes.expand(b, h).unsqueeze(-1)


def _fwd_outputs(q, *_):
  b, sq, h, _ = q.shape
  return [(q.shape, q.dtype), ((b, h, sq), torch.float32)]


def _fwd_operands(q, k, v, alibi_slopes, *_):
  return q, k, v, _alibi_rows(alibi_slopes, q)


_fwd = _ops.kernel_op(
    "flash_attn_fwd", f"({_FWD_ARGS}) -> (Tensor, Tensor)",
    kernel=_dlpack.Kernel(into=flash.forward_into, plain=flash.forward),
    outputs=_fwd_outputs, static=_static, operands=_fwd_operands)


def _bwd_outputs(dout, dlse, q, k, v, *_):
  return [(q.shape, q.dtype), (k.shape, k.dtype), (v.shape, v.dtype)]


def _bwd_static(dout, dlse, *args):
  return _static(*args)


def _bwd_operands(dout, dlse, q, k, v, alibi_slopes, *rest):
  out, lse = rest[-2:]
  if dout is None:  # only lse was used downstream
    dout = torch.zeros_like(out)
  return q, k, v, _alibi_rows(alibi_slopes, q), out, lse, dout, dlse


_bwd = _ops.kernel_op(
    "flash_attn_bwd",
    f"(Tensor? dout, Tensor? dsoftmax_lse, {_FWD_ARGS}, Tensor out, Tensor softmax_lse) "
    "-> (Tensor, Tensor, Tensor)",
    kernel=_dlpack.Kernel(into=flash.backward_into, plain=flash.backward),
    outputs=_bwd_outputs, static=_bwd_static, operands=_bwd_operands)

_attention_op = _ops.differentiable(_fwd, _bwd, wrt=("q", "k", "v"))


def _require_tensor(name, x, layout):
  if not isinstance(x, torch.Tensor):
    raise TypeError(f"{name}: expected a torch.Tensor of shape {layout}, got {type(x).__name__}")


def _window(window_size):
  if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
    raise ValueError(f"window_size: expected a pair (left, right), got {window_size!r}")
  return int(window_size[0]), int(window_size[1])


def _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
               return_attn_probs):
  _require_tensor("q", q, "(batch, seqlen_q, nheads, headdim)")
  _require_tensor("k", k, "(batch, seqlen_k, nheads_k, headdim)")
  _require_tensor("v", v, "(batch, seqlen_k, nheads_k, headdim)")
  if alibi_slopes is not None:
    _require_tensor("alibi_slopes", alibi_slopes, "(nheads,) or (batch, nheads)")
  left, right = _window(window_size)
  out, lse = _attention_op(q, k, v, alibi_slopes, float(dropout_p),
                  None if softmax_scale is None else float(softmax_scale), bool(causal), left, right,
                  float(softcap))
  if return_attn_probs:
    # S_dmask only carries information with dropout, which is not supported yet.
    return out, lse, torch.empty(0, dtype=q.dtype, device=q.device)
  return out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
  """softmax(q k^T * softmax_scale) v, computed blockwise without materializing the scores.

  MQA/GQA: k and v may have fewer heads than q (nheads a multiple of nheads_k); query head h reads
  kv head h // (nheads // nheads_k). With 6 query heads and 2 kv heads, heads 0-2 read kv head 0.

  causal is aligned to the bottom-right corner of the score matrix. seqlen_q=2, seqlen_k=5:
      1 1 1 1 0
      1 1 1 1 1
  seqlen_q=5, seqlen_k=2:
      0 0
      0 0
      0 0
      1 0
      1 1
  A row with no visible key gives out 0 (and softmax_lse +inf).

  window_size=(left, right) != (-1, -1): query i sees keys in
  [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]; -1 is unbounded on that side.

  Arguments:
    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim). float16,
      bfloat16 or float32, all on one device (CUDA: the current device; CPU tensors run the
      kernels in Pallas interpret mode). headdim <= 256.
    dropout_p: must be 0.0 for now (dropout raises NotImplementedError).
    softmax_scale: default 1 / sqrt(headdim).
    causal: bottom-right aligned causal mask (see above).
    window_size: (left, right) sliding window.
    softcap: > 0 applies softcap * tanh(scores / softcap) before ALiBi and masking.
    alibi_slopes: (nheads,) or (batch, nheads) float32; adds -slope * |i + seqlen_k - seqlen_q - j|.
    deterministic: accepted; the backward is always deterministic.
    return_attn_probs: also return softmax_lse and S_dmask.
  Returns:
    out (batch, seqlen_q, nheads, headdim), or with return_attn_probs (out, softmax_lse, S_dmask):
    softmax_lse (batch, nheads, seqlen_q) float32, the natural-log logsumexp of each row's scores
    (differentiable), and S_dmask an empty tensor (it only exists with dropout).
  """
  del deterministic
  return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                    return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):
  """flash_attn_func with qkv (batch, seqlen, 3, nheads, headdim) stacked; same arguments and returns.

  The gradient of qkv comes back as one (batch, seqlen, 3, nheads, headdim) tensor.
  """
  del deterministic
  _require_tensor("qkv", qkv, "(batch, seqlen, 3, nheads, headdim)")
  if qkv.dim() != 5 or qkv.shape[2] != 3:
    raise ValueError(f"qkv: expected shape (batch, seqlen, 3, nheads, headdim), got {tuple(qkv.shape)}")
  q, k, v = qkv.unbind(2)
  return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                    return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False):
  """flash_attn_func with kv (batch, seqlen_k, 2, nheads_k, headdim) stacked; same arguments and returns."""
  del deterministic
  _require_tensor("kv", kv, "(batch, seqlen_k, 2, nheads_k, headdim)")
  if kv.dim() != 5 or kv.shape[2] != 2:
    raise ValueError(f"kv: expected shape (batch, seqlen_k, 2, nheads_k, headdim), got {tuple(kv.shape)}")
  k, v = kv.unbind(2)
  return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                    return_attn_probs)


_PUBLIC = dict(flash_attn_func=flash_attn_func, flash_attn_qkvpacked_func=flash_attn_qkvpacked_func,
               flash_attn_kvpacked_func=flash_attn_kvpacked_func)
# __version__: the flash-attn API level mirrored here, for callers that gate features on it.
compat.register("flash_attn", __version__="2.8.0", **_PUBLIC)
compat.register("flash_attn.flash_attn_interface", **_PUBLIC)
