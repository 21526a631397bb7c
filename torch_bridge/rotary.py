"""flash_attn.layers.rotary on the torch face: flash-attn 2.8's rotary helpers and RotaryEmbedding.

The rotation is the KV-cache path's own (`pallas_attn.kvcache.rotate` through torch_bridge.kvcache's
`kvcache_rotary` op: fp32 math, rounded to the input dtype), so both faces rotate identically. That
op puts row i of batch b at position offsets[b] + i; varlen inputs become one row whose cos/sin
tables are gathered per token first. Gradients: a rotation's transpose is the rotation by the
negated angle, so the backward is the same op with -sin (flash-attn's `conjugate=True`).
"""
from __future__ import annotations

import torch

from torch_bridge import compat
from torch_bridge.kvcache import _rotary_op


def _check(x, cos, sin, layout):
  if not isinstance(x, torch.Tensor) or x.dim() != layout.count(",") + 1:
    raise ValueError(f"x: expected a tensor of shape {layout}, got "
                     f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
  for name, t in (("cos", cos), ("sin", sin)):
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
      raise ValueError(f"{name}: expected a tensor of shape (seqlen_rotary, rotary_dim / 2), got "
                       f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
  if tuple(sin.shape) != tuple(cos.shape):
    raise ValueError(f"sin: expected cos' shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
  if not 0 < 2 * cos.shape[1] <= x.shape[-1]:
    raise ValueError(f"cos: rotary_dim = 2 * cos.shape[1] must be in [2, headdim={x.shape[-1]}], "
                     f"got {2 * cos.shape[1]}")


def _offsets(seqlen_offsets, batch, device):
  if isinstance(seqlen_offsets, torch.Tensor):
    if seqlen_offsets.shape != (batch,):
      raise ValueError(f"seqlen_offsets: expected an int or a tensor of shape ({batch},), got shape "
                       f"{tuple(seqlen_offsets.shape)}")
    return seqlen_offsets.to(device=device, dtype=torch.int32)
  return torch.full((batch,), int(seqlen_offsets), dtype=torch.int32, device=device)


def _rotate(x, cos, sin, interleaved, seqlen_offsets, cu_seqlens, conjugate):
  """x rotated (a new tensor): x (batch, seqlen, nheads, headdim), or (total, nheads, headdim) with
  cu_seqlens."""
  if conjugate:
    sin = -sin
  if cu_seqlens is not None:
    seq = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(x.shape[0], device=x.device), right=True)
    offsets = _offsets(seqlen_offsets, cu_seqlens.shape[0] - 1, x.device)
    pos = (offsets[seq] + torch.arange(x.shape[0], device=x.device) - cu_seqlens[seq]).long()
    pos = pos.clamp(0, cos.shape[0] - 1)
    cos, sin = cos[pos], sin[pos]
    x4, seqlens = x.unsqueeze(0), torch.zeros(1, dtype=torch.int32, device=x.device)
  else:
    x4, seqlens = x, _offsets(seqlen_offsets, x.shape[0], x.device)
  # The op rotates a query and a key tensor together; the key here is a one-token stand-in.
  out, _ = _rotary_op(x4.contiguous(), x4[:, :1, :1].contiguous(), cos.contiguous(),
                      sin.contiguous(), seqlens, bool(interleaved), True)
  return out.view_as(x)


class _ApplyRotary(torch.autograd.Function):

  @staticmethod
  def forward(ctx, x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens):
    out = _rotate(x, cos, sin, interleaved, seqlen_offsets, cu_seqlens, conjugate=False)
    ctx.save_for_backward(cos, sin)
    ctx.args = (interleaved, seqlen_offsets, cu_seqlens)
    if inplace:
      x.copy_(out)
      ctx.mark_dirty(x)
      return x
    return out

  @staticmethod
  def backward(ctx, dout):
    cos, sin = ctx.saved_tensors
    interleaved, seqlen_offsets, cu_seqlens = ctx.args
    dx = _rotate(dout, cos, sin, interleaved, seqlen_offsets, cu_seqlens, conjugate=True)
    return dx, None, None, None, None, None, None


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
                     max_seqlen=None):
  """Rotary embedding on the first rotary_dim = 2 * cos.shape[1] features of x.

  Arguments:
    x: (batch, seqlen, nheads, headdim), or (total_seqlen, nheads, headdim) with cu_seqlens.
    cos, sin: (seqlen_rotary, rotary_dim / 2).
    interleaved: True rotates pairs (2r, 2r + 1) (GPT-J), False pairs (r, r + rotary_dim / 2)
      (GPT-NeoX).
    inplace: write the result into x (and return x).
    seqlen_offsets: int or (batch,): token i of sequence b sits at position seqlen_offsets[b] + i.
    cu_seqlens: (batch + 1,) int32 offsets of packed sequences; max_seqlen: accepted (unused).
  Returns:
    out, shaped like x. Differentiable with respect to x.
  """
  del max_seqlen
  _check(x, cos, sin, "(total_seqlen, nheads, headdim)" if cu_seqlens is not None
         else "(batch, seqlen, nheads, headdim)")
  return _ApplyRotary.apply(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens)


apply_rotary_emb_func = apply_rotary_emb  # flash-attn's backward-compatible alias


def _split_qkv(qkv, num_heads_q):
  if qkv.dim() == 5:
    if qkv.shape[2] != 3:
      raise ValueError(f"qkv: expected shape (batch, seqlen, 3, nheads, headdim), got {tuple(qkv.shape)}")
    return qkv[:, :, 0], qkv[:, :, 1]
  if qkv.dim() != 4 or num_heads_q is None:
    raise ValueError(f"qkv: expected (batch, seqlen, 3, nheads, headdim), or (batch, seqlen, "
                     f"num_heads_q + 2 * num_heads_k, headdim) with num_heads_q; got shape "
                     f"{tuple(qkv.shape)} and num_heads_q={num_heads_q!r}")
  num_heads_k = (qkv.shape[2] - num_heads_q) // 2
  if qkv.shape[2] != num_heads_q + 2 * num_heads_k:
    raise ValueError(f"num_heads_q: qkv's {qkv.shape[2]} heads are not num_heads_q={num_heads_q} plus "
                     "twice num_heads_k")
  return qkv[:, :, :num_heads_q], qkv[:, :, num_heads_q:num_heads_q + num_heads_k]


def apply_rotary_emb_qkv_(qkv, cos, sin, cos_k=None, sin_k=None, interleaved=False, seqlen_offsets=0,
                          num_heads_q=None):
  """In place: rotary on the q and k parts of qkv (batch, seqlen, 3, nheads, headdim), or of
  (batch, seqlen, num_heads_q + 2 * num_heads_k, headdim) with num_heads_q; k uses cos_k/sin_k
  when given. Returns qkv."""
  q, k = _split_qkv(qkv, num_heads_q)
  apply_rotary_emb(q, cos, sin, interleaved, True, seqlen_offsets)
  apply_rotary_emb(k, cos if cos_k is None else cos_k, sin if sin_k is None else sin_k, interleaved,
                   True, seqlen_offsets)
  return qkv


def apply_rotary_emb_kv_(kv, cos, sin, interleaved=False, seqlen_offsets=0):
  """In place: rotary on the k part of kv (batch, seqlen, 2, nheads, headdim). Returns kv."""
  if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[2] != 2:
    raise ValueError(f"kv: expected shape (batch, seqlen, 2, nheads, headdim), got "
                     f"{tuple(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__}")
  apply_rotary_emb(kv[:, :, 0], cos, sin, interleaved, True, seqlen_offsets)
  return kv


class RotaryEmbedding(torch.nn.Module):
  """flash-attn's RotaryEmbedding: cos/sin tables of inv_freq = base^(-2r/dim) (fp32, cached per
  length, device and dtype) applied to qkv (or q and kv) by apply_rotary_emb_qkv_ / _kv_."""

  def __init__(self, dim: int, base=10000.0, interleaved=False, scale_base=None, device=None):
    super().__init__()
    if scale_base is not None:
      raise NotImplementedError("scale_base: XPos scaling is not implemented; expected None, got "
                                f"{scale_base!r}")
    self.dim, self.base, self.interleaved, self.scale_base = dim, float(base), interleaved, None
    self.register_buffer("inv_freq", self._compute_inv_freq(device), persistent=False)
    self.register_buffer("scale", None, persistent=False)
    self._seq_len_cached, self._cos_cached, self._sin_cached = 0, None, None
    self._cos_k_cached = self._sin_k_cached = None

  def _compute_inv_freq(self, device=None):
    return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim))

  def _update_cos_sin_cache(self, seqlen, device=None, dtype=None):
    if (seqlen > self._seq_len_cached or self._cos_cached is None or self._cos_cached.device != device
        or self._cos_cached.dtype != dtype or (self.training and self._cos_cached.is_inference())):
      self._seq_len_cached = seqlen
      # The buffer stays where the module was built; the cache follows the inputs' device.
      inv_freq = (self.inv_freq.to(device) if self.inv_freq.dtype == torch.float32
                  else self._compute_inv_freq(device))
      freqs = torch.outer(torch.arange(seqlen, device=device, dtype=torch.float32), inv_freq)
      self._cos_cached, self._sin_cached = torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)

  def forward(self, qkv, kv=None, seqlen_offset=0, max_seqlen=None, num_heads_q=None):
    """qkv (batch, seqlen, 3, nheads, headdim) (or with num_heads_q, heads stacked), or q
    (batch, seqlen, nheads, headdim) with kv (batch, seqlen, 2, nheads, headdim); seqlen_offset int
    or (batch,). Rotates in place and returns qkv, or (q, kv)."""
    seqlen = qkv.shape[1]
    if max_seqlen is not None:
      self._update_cos_sin_cache(max_seqlen, device=qkv.device, dtype=qkv.dtype)
    elif isinstance(seqlen_offset, int):
      self._update_cos_sin_cache(seqlen + seqlen_offset, device=qkv.device, dtype=qkv.dtype)
    if kv is None:
      return apply_rotary_emb_qkv_(qkv, self._cos_cached, self._sin_cached, interleaved=self.interleaved,
                                   seqlen_offsets=seqlen_offset, num_heads_q=num_heads_q)
    q = apply_rotary_emb(qkv, self._cos_cached, self._sin_cached, interleaved=self.interleaved,
                         inplace=True, seqlen_offsets=seqlen_offset)
    kv = apply_rotary_emb_kv_(kv, self._cos_cached, self._sin_cached, interleaved=self.interleaved,
                              seqlen_offsets=seqlen_offset)
    return q, kv


_PUBLIC = dict(apply_rotary_emb=apply_rotary_emb, apply_rotary_emb_func=apply_rotary_emb_func,
               apply_rotary_emb_qkv_=apply_rotary_emb_qkv_, apply_rotary_emb_kv_=apply_rotary_emb_kv_,
               RotaryEmbedding=RotaryEmbedding)
compat.register("flash_attn.layers")
compat.register("flash_attn.layers.rotary", **_PUBLIC)
