"""OpenAI sparse-transformer attention on the torch face: zeta's `SparseAttention` module and a
functional `sparse_attention`, with pallas_attn/sparse.py's math and errors.

Every mode is a reshape around the dense flash op (`pallas_attn::flash_attn_fwd` / `_bwd`), so no op
of its own: 'all' is causal attention and 'local' its band of width L, on the heads split out of
n_embd; 'strided' regroups positions so each residue class mod L is contiguous, which makes it
causal attention over n / L rows with L * heads heads (see pallas_attn/sparse.py).
"""
from __future__ import annotations

import jax
import torch
import torch.nn.functional as F

from pallas_attn import sparse as jax_sparse
from torch_bridge import _dlpack, _ops, compat
from torch_bridge.flash_attn import flash_attn_func

MODES = jax_sparse.MODES


def _check(q, k, v, heads, attn_mode, local_attn_ctx, blocksize):
  """pallas_attn's checks (the JAX face's messages) on the tensors' shapes and dtypes."""
  metas = []
  for name, x in (("q", q), ("k", k), ("v", v)):
    _ops.require_tensor(name, x, "(n_batch, n_ctx, n_embd)")
    metas.append(jax.ShapeDtypeStruct(tuple(x.shape), _dlpack.jax_dtype(name, x.dtype)))
  jax_sparse._check(*metas, heads, attn_mode, local_attn_ctx, blocksize)  # pylint: disable=protected-access


def sparse_attention(q, k, v, heads, attn_mode, local_attn_ctx=None, blocksize=32):
  """q, k, v (n_batch, n_ctx, n_embd) -> (n_batch, n_ctx, n_embd), differentiable in q, k and v.

  Arguments:
    heads: head h owns features [h * d, (h + 1) * d) with d = n_embd / heads; scale d ** -0.5; the
      heads are merged back in order.
    attn_mode: 'all' (j <= i), 'local' (i - L < j <= i) or 'strided' (j <= i and (i - j) % L == 0),
      with L = local_attn_ctx (required for local and strided; the stride is L, not blocksize).
    blocksize: a power of two >= 16. A tile-size hint in the original; validated, and the result
      does not depend on it (the torch face uses the tuned tiles).
  float16, bfloat16 or float32, all on one device (CUDA: the current device; CPU tensors run the
  kernels in Pallas interpret mode). Any n_ctx.
  """
  _check(q, k, v, heads, attn_mode, local_attn_ctx, blocksize)
  b, n, e = q.shape
  d = e // heads
  scale = d ** -0.5
  split = lambda x: x.reshape(b, n, heads, d)

  if attn_mode == "strided":
    stride = local_attn_ctx
    rows = -(-n // stride)
    pad = rows * stride - n

    def regroup(x):
      # (b, rows * L, H, d) viewed as (b, rows, L * H, d): class r of head h becomes head r * H + h.
      # Padding sits after every real position of its class, so causality hides it.
      return F.pad(split(x), (0, 0, 0, 0, 0, pad)).reshape(b, rows, stride * heads, d)

    out = flash_attn_func(regroup(q), regroup(k), regroup(v), softmax_scale=scale, causal=True)
    return out.reshape(b, rows * stride, e)[:, :n]

  window = (-1, 0) if attn_mode == "all" else (local_attn_ctx - 1, 0)
  out = flash_attn_func(split(q), split(k), split(v), softmax_scale=scale, window_size=window)
  return out.reshape(b, n, e)


class SparseAttention(torch.nn.Module):
  """zeta's SparseAttention with the OpenAI sparse transformer's math (SPEC section 4).

  SparseAttention(heads, attn_mode, local_attn_ctx=None, blocksize=32); forward(q, k, v) on
  (n_batch, n_ctx, n_embd) tensors returns (n_batch, n_ctx, n_embd). See `sparse_attention` for the
  modes; arguments are checked when forward runs, with the JAX face's errors.
  """

  def __init__(self, heads, attn_mode, local_attn_ctx=None, blocksize=32):
    super().__init__()
    self.heads = heads
    self.attn_mode = attn_mode
    self.local_attn_ctx = local_attn_ctx
    self.blocksize = blocksize

  def forward(self, q, k, v):
    return sparse_attention(q, k, v, self.heads, self.attn_mode, self.local_attn_ctx, self.blocksize)

  def extra_repr(self) -> str:
    return (f"heads={self.heads}, attn_mode={self.attn_mode!r}, local_attn_ctx={self.local_attn_ctx}, "
            f"blocksize={self.blocksize}")


# zeta's import paths: the class lives in zeta/nn/attention/sparse_attention.py and zeta.nn.attention
# re-exports it (`from zeta.nn.attention import SparseAttention`, the seed's import).
compat.register("zeta")
compat.register("zeta.nn")
for _module in ("zeta.nn.attention", "zeta.nn.attention.sparse_attention"):
  compat.register(_module, SparseAttention=SparseAttention)
