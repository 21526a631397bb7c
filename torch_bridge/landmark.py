"""Landmark attention on the torch face: epfml landmark-attention's `fused_landmark_attention` and
`FusedLandmarkAttention` (ltriton/flash_landmark_attention.py), computed by pallas_attn's kernels.

Two custom ops carry the work (`pallas_attn::landmark_fwd` / `landmark_bwd`, backed by
pallas_attn.landmark's jitted forward and backward). `fused_landmark_attention` calls the forward op,
whose registered autograd runs the backward op, so torch.compile sees one opaque node;
`FusedLandmarkAttention` is the original's autograd class over the same two ops.
"""
from __future__ import annotations

import torch

from pallas_attn import landmark as jax_landmark
from torch_bridge import _dlpack, _ops, compat

def _prepare(q, k, v, n_prefix_q, sm_scale, block_size):
  """The kernel spec of one static configuration, validated by pallas_attn's own checks."""
  # is_mem is the public function's business (it checks the caller's); the ops take the pattern.
  is_mem = None
  if len(k.shape) == 4 and block_size in jax_landmark.BLOCK_SIZES:
    is_mem = jax_landmark.required_is_mem(k.shape[2], block_size)
  spec = jax_landmark.prepare(q, k, v, is_mem, sm_scale, block_size)
  if isinstance(n_prefix_q, bool) or spec.n_hist != n_prefix_q * spec.block_size:
    raise ValueError(f"n_prefix_q: expected (seqlen_k - seqlen_q) / block_size = {spec.n_hist} / "
                     f"{spec.block_size} = {spec.n_hist // spec.block_size}, got {n_prefix_q!r}")
  return spec, None  # (spec, tile configs: None = the defaults)


_LANDMARK = _ops.build(_ops.OpDesc(
    "landmark_fwd", "Tensor q, Tensor k, Tensor v, int n_prefix_q, float? sm_scale, int block_size",
    outputs=lambda q, *_: [(q.shape, q.dtype), (q.shape[:3], torch.float32)],
    output_names=("out", "lse"), static=_ops.Spec(_prepare), operands=("q", "k", "v"),
    forward=_dlpack.Kernel(into=jax_landmark.forward_into, plain=jax_landmark.forward),
    backward=_dlpack.Kernel(into=jax_landmark.backward_into, plain=jax_landmark.backward),
    wrt=("q", "k", "v")))
_fwd, _bwd = _LANDMARK.fwd, _LANDMARK.bwd


def _scale(sm_scale):
  return None if sm_scale is None else float(sm_scale)


class FusedLandmarkAttention(torch.autograd.Function):
  """The original's autograd class: apply(q, k, v, n_prefix_q, sm_scale, block_size) -> out.

  q (batch, nheads, seqlen_q, d), k/v (batch, nheads, seqlen_k, d) with
  seqlen_k = seqlen_q + n_prefix_q * block_size. The backward takes any seqlen_q (the original
  needed multiples of block_size).
  """

  @staticmethod
  def forward(ctx, q, k, v, n_prefix_q, sm_scale, block_size):
    out, lse = _fwd(q, k, v, int(n_prefix_q), _scale(sm_scale), int(block_size))
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.static = (int(n_prefix_q), _scale(sm_scale), int(block_size))
    return out

  @staticmethod
  def backward(ctx, do):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _bwd(do, None, q, k, v, *ctx.static, out, lse)
    return dq, dk, dv, None, None, None


def _check_is_mem(is_mem, seqlen_k, block_size):
  if not isinstance(is_mem, torch.Tensor):
    jax_landmark.check_is_mem(is_mem, seqlen_k, block_size)
  elif torch.compiler.is_compiling():
    # No values while torch.compile traces (and no JAX objects in its graph): only the shape.
    if is_mem.dim() == 0 or is_mem.shape[-1] != seqlen_k:
      raise ValueError(f"is_mem: expected shape (..., {seqlen_k}) (one entry per key position), "
                       f"got {tuple(is_mem.shape)}")
  else:
    # A device-to-host read, as the original's `assert (is_mem == expected).all()`.
    jax_landmark.check_is_mem(is_mem.detach().to("cpu", torch.bool).numpy(), seqlen_k, block_size)


def fused_landmark_attention(q, k, v, is_mem, sm_scale=None, block_size=64):
  """Landmark attention (SPEC section 3): grouped softmax over earlier blocks' landmarks and the
  query's own block.

  Key positions j with j % block_size == block_size - 1 are landmarks. Query m sits at position
  p = m + seqlen_k - seqlen_q in block p // block_size; each earlier block enters the softmax through
  its landmark's logit, and the weight it wins is spread over the block's ordinary tokens by their
  own softmax; the query's own block contributes its ordinary tokens j <= p (j < p when p is a
  landmark). Landmark value vectors never contribute.

  Arguments:
    q: (batch, nheads, seqlen_q, headdim); k, v: (batch, nheads, seqlen_k, headdim), seqlen_k =
      seqlen_q + n_hist with n_hist a multiple of block_size. float16, bfloat16 or float32, all on one
      device (CUDA: the current device; CPU tensors run the kernels in Pallas interpret mode).
    is_mem: bool (..., seqlen_k), True exactly at the landmarks, e.g.
      `torch.arange(seqlen_k) % block_size == block_size - 1`; anything else raises ValueError.
    sm_scale: default 1 / sqrt(headdim).
    block_size: 16, 32, 64 or 128.
  Returns:
    out (batch, nheads, seqlen_q, headdim), differentiable in q, k and v.
  """
  _ops.require_tensor("q", q, "(batch, nheads, seqlen_q, headdim)")
  _ops.require_tensor("k", k, "(batch, nheads, seqlen_k, headdim)")
  _ops.require_tensor("v", v, "(batch, nheads, seqlen_k, headdim)")
  if q.dim() != 4 or k.dim() != 4:
    raise ValueError(f"q, k: expected 4-D (batch, nheads, seqlen, headdim) tensors, got shapes "
                     f"{tuple(q.shape)} and {tuple(k.shape)}")
  if block_size not in jax_landmark.BLOCK_SIZES:
    raise ValueError(f"block_size: expected one of {jax_landmark.BLOCK_SIZES}, got {block_size!r}")
  seqlen_k, n_hist = k.shape[2], k.shape[2] - q.shape[2]
  if n_hist < 0 or n_hist % block_size:
    raise ValueError(f"k: expected seqlen_k = seqlen_q + n_hist with n_hist >= 0 a multiple of block_size="
                     f"{block_size}, got seqlen_q={q.shape[2]}, seqlen_k={seqlen_k}")
  _check_is_mem(is_mem, seqlen_k, block_size)
  return _LANDMARK.call(q, k, v, n_hist // block_size, _scale(sm_scale), int(block_size))[0]


_PUBLIC = dict(fused_landmark_attention=fused_landmark_attention,
               FusedLandmarkAttention=FusedLandmarkAttention)
# The original's import path: llama_mem.py does `from ltriton.flash_landmark_attention import ...`.
compat.register("ltriton.flash_landmark_attention", **_PUBLIC)
