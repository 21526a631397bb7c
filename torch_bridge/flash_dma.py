"""Flash dynamic mask attention on the torch face: flash-dmattn's `flash_dma.fwd`, plus the backward
the original lacks.

`fwd(q, k, v, zoh, active_mask, out=None, p_dropout=0.0, softmax_scale=None, is_causal=False,
keep_window_size=2048, softcap=0.0, return_softmax=False, gen=None)` returns
[out, softmax_lse, p, rng_state] and is differentiable with respect to q, k, v and zoh; `bwd` is the
explicit backward. Two custom ops carry the work (`pallas_attn::flash_dma_fwd` / `flash_dma_bwd`),
computed by pallas_attn's flash kernels with their dynamic-mask option.
"""
from __future__ import annotations

import functools

import jax
import torch

from pallas_attn import flash, flash_dma as jax_dma
from torch_bridge import _dlpack, _ops, compat
from torch_bridge.flash_attn import _fwd_outputs, dropout_seed


_FWD_ARGS = ("Tensor q, Tensor k, Tensor v, Tensor zoh, Tensor active_mask, Tensor? seed, "
             "float p_dropout, float? softmax_scale, bool is_causal, float softcap")


# ------------------------------------------------------------------------------------------------
# Kernels: operands (q, k, v, zoh, active_mask, seed); seed None without dropout.


@functools.partial(jax.jit, static_argnums=(8, 9), donate_argnums=(6, 7))
def _forward_into(q, k, v, zoh, active, seed, out, lse, kernel_spec, cfgs):
  return flash.forward_into(q, k, v, None, out, lse, kernel_spec, cfgs, None, None, seed, zoh,
                            jax_dma.keep_mask(active))


@functools.partial(jax.jit, static_argnums=(6, 7))
def _forward(q, k, v, zoh, active, seed, kernel_spec, cfgs):
  return flash.forward(q, k, v, None, kernel_spec, cfgs, None, None, seed, zoh,
                       jax_dma.keep_mask(active))


# dzoh arrives zero-filled (the kernel writes only the tiles the mask keeps) and must stay aliased.
@functools.partial(jax.jit, static_argnums=(14, 15), donate_argnums=(10, 11, 12, 13), keep_unused=True)
def _backward_into(q, k, v, zoh, active, seed, out, lse, dout, dlse, dq, dk, dv, dzoh, kernel_spec,
                   cfgs):
  return flash.backward_into(q, k, v, None, out, lse, dout, dlse, dq, dk, dv, kernel_spec, cfgs,
                             None, None, seed, zoh, jax_dma.keep_mask(active), dzoh)


@functools.partial(jax.jit, static_argnums=(10, 11))
def _backward(q, k, v, zoh, active, seed, out, lse, dout, dlse, kernel_spec, cfgs):
  return flash.backward(q, k, v, None, out, lse, dout, dlse, kernel_spec, cfgs, None, None, seed, zoh,
                        jax_dma.keep_mask(active))


_FORWARD = _dlpack.Kernel(into=_forward_into, plain=_forward)
_BACKWARD = _dlpack.Kernel(into=_backward_into, plain=_backward)


# ------------------------------------------------------------------------------------------------
# Ops


def _prepare(q, k, v, zoh, active_mask, p_dropout, softmax_scale, is_causal, softcap):
  """The kernel spec of one static configuration, validated by pallas_attn's own checks."""
  spec, _ = jax_dma.prepare(q, k, v, zoh, active_mask, p_dropout, softmax_scale, is_causal, 1, softcap)
  return spec, None


def _check_seed(seed, p_dropout):
  if (seed is None) != (p_dropout == 0):
    raise ValueError(f"seed: expected an int32 (1,) tensor exactly when p_dropout > 0 "
                     f"(p_dropout={p_dropout}), got {None if seed is None else tuple(seed.shape)}")


# The backward's dzoh is zero-filled: the dK/dV kernel writes only the tiles the mask keeps.
_DMA = _ops.build(_ops.OpDesc(
    "flash_dma_fwd", _FWD_ARGS, outputs=_fwd_outputs, static=_ops.Spec(_prepare, check=_check_seed),
    operands=("q", "k", "v", "zoh", "active_mask", "seed"), forward=_FORWARD, backward=_BACKWARD,
    wrt=("q", "k", "v", "zoh"), zero_grads=("out", "softmax_lse"), zeroed=("zoh",)))
_attention_op, _bwd_op, _static = _DMA.call, _DMA.bwd, _DMA.static


# ------------------------------------------------------------------------------------------------
# Public functions


def topk_mask(zoh, keep_window_size: int, is_causal: bool = False):
  """active_mask for `active_mask=None`: per query row, 1 on the keep_window_size largest zoh entries
  among the keys the causal rule allows, else 0; every allowed key when seqlen_k <= keep_window_size.
  Same shape, dtype and device as zoh."""
  _ops.require_tensor("zoh", zoh, "(batch, nheads_k, seqlen_q, seqlen_k)")
  if not isinstance(keep_window_size, int) or keep_window_size < 1:
    raise ValueError(f"keep_window_size: expected a positive int, got {keep_window_size!r}")
  sq, sk = zoh.shape[-2:]
  i = torch.arange(sq, device=zoh.device)[:, None] + (sk - sq)
  allowed = torch.arange(sk, device=zoh.device)[None, :] <= i if is_causal else torch.ones(
      sq, sk, dtype=torch.bool, device=zoh.device)
  if sk <= keep_window_size:
    return allowed.expand(zoh.shape).to(zoh.dtype)
  scores = zoh.detach().float().masked_fill(~allowed, float("-inf"))
  idx = torch.topk(scores, keep_window_size, dim=-1, largest=True, sorted=False).indices
  hit = torch.zeros(zoh.shape, dtype=torch.bool, device=zoh.device).scatter_(-1, idx, True)
  return (hit & allowed).to(zoh.dtype)


def _draw_seed(gen, device) -> torch.Tensor:
  """int32 (1,) dropout seed: from `gen` when given, else from torch's default generator of the
  tensors' device, as the flash_attn functions draw theirs (torch.manual_seed replays a run)."""
  if gen is None:
    return dropout_seed(1.0, device)
  seed = torch.randint(-2 ** 31, 2 ** 31, (1,), dtype=torch.int64, generator=gen, device=gen.device)
  return seed.to(device=device, dtype=torch.int32)


@functools.lru_cache(maxsize=64)
def _probs_fn(kernel_spec):
  return jax.jit(lambda q, k, zoh, active, lse, seed: jax_dma.softmax_probs(
      q, k, zoh, active, lse, kernel_spec, seed))


def _softmax_probs(q, k, zoh, active_mask, lse, seed, p_dropout, softmax_scale, is_causal, softcap):
  # v has k's shape and dtype, and only shapes and dtypes enter the spec.
  kernel_spec, _ = _static(q, k, k, zoh, active_mask, seed, p_dropout, softmax_scale, is_causal,
                           softcap)
  arrays = [None if t is None else _dlpack.to_jax(t) for t in (q, k, zoh, active_mask, lse, seed)]
  p = _probs_fn(kernel_spec)(*arrays)
  return torch.from_dlpack(p).clone()


def fwd(q, k, v, zoh, active_mask, out=None, p_dropout=0.0, softmax_scale=None, is_causal=False,
        keep_window_size=2048, softcap=0.0, return_softmax=False, gen=None):
  """Attention with a dynamic bias (zoh) and mask (active_mask); returns [out, softmax_lse, p, rng_state].

  Arguments:
    q: (batch_size, seqlen_q, num_heads, head_dim); k, v: (batch_size, seqlen_k, num_heads_k,
      head_dim); float16, bfloat16 or float32 (CPU tensors run in Pallas interpret mode).
    zoh: (batch_size, num_heads_k, seqlen_q, seqlen_k), q's dtype: added to each score after the
      scale and softcap, shared by the query heads of a kv head. Gets a gradient.
    active_mask: like zoh; keys where it is <= 0 are masked. None builds the top-keep_window_size mask
      of zoh (`topk_mask`).
    out: optional (batch_size, seqlen_q, num_heads, head_dim) tensor the output is written into.
    p_dropout: dropout probability on the normalized attention weights.
    softmax_scale: default 1 / sqrt(head_dim).
    is_causal: bottom-right aligned causal mask, combined with active_mask.
    keep_window_size: keys kept per query when active_mask is None and seqlen_k > keep_window_size.
    softcap: > 0 applies softcap * tanh(scaled score / softcap) before zoh is added.
    return_softmax: also return the attention weights P (dropped entries negated) as `p`.
    gen: torch.Generator for the dropout seed (default: torch's default generator of q's device).
  Returns:
    [out, softmax_lse (batch_size, num_heads, seqlen_q) float32 (+inf on rows with no visible key,
    whose output is 0), p ((batch_size, num_heads, seqlen_q, seqlen_k) or empty), rng_state ((2,)
    int64 [seed, 0] with dropout, else empty)].
  """
  for name, x, layout in (("q", q, "(batch_size, seqlen_q, num_heads, head_dim)"),
                          ("k", k, "(batch_size, seqlen_k, num_heads_k, head_dim)"),
                          ("v", v, "(batch_size, seqlen_k, num_heads_k, head_dim)"),
                          ("zoh", zoh, "(batch_size, num_heads_k, seqlen_q, seqlen_k)")):
    _ops.require_tensor(name, x, layout)
  if not isinstance(keep_window_size, int) or keep_window_size < 1:
    raise ValueError(f"keep_window_size: expected a positive int, got {keep_window_size!r}")
  if active_mask is None:
    active_mask = topk_mask(zoh, keep_window_size, bool(is_causal))
  _ops.require_tensor("active_mask", active_mask, "(batch_size, num_heads_k, seqlen_q, seqlen_k)")
  if out is not None:
    _ops.require_tensor("out", out, "(batch_size, seqlen_q, num_heads, head_dim)")
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
      raise ValueError(f"out: expected a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}, "
                       f"got {out.dtype} {tuple(out.shape)} on {out.device}")
  p_dropout = float(p_dropout)
  if not 0.0 <= p_dropout < 1.0:
    raise ValueError(f"p_dropout: expected a float in [0, 1), got {p_dropout!r}")
  seed = _draw_seed(gen, q.device) if p_dropout > 0 else None
  args = (seed, p_dropout, None if softmax_scale is None else float(softmax_scale), bool(is_causal),
          float(softcap))
  result, lse = _attention_op(q, k, v, zoh, active_mask, *args)
  if out is not None:
    out.copy_(result)
    result = out
  probs = (_softmax_probs(q, k, zoh, active_mask, lse.detach(), *args) if return_softmax
           else torch.empty(0, dtype=q.dtype, device=q.device))
  rng_state = (torch.cat([seed.to(torch.int64), seed.new_zeros(1, dtype=torch.int64)]) if seed is not None
               else torch.empty(0, dtype=torch.int64, device=q.device))
  return [result, lse, probs, rng_state]


def bwd(dout, q, k, v, zoh, active_mask, out, softmax_lse, p_dropout=0.0, softmax_scale=None,
        is_causal=False, softcap=0.0, rng_state=None):
  """[dq, dk, dv, dzoh] for the gradient dout of fwd's output.

  active_mask must be the mask the forward used (topk_mask(...) if it built one); rng_state is fwd's
  fourth result when p_dropout > 0. dzoh sums the score gradient over the query heads of each kv
  head and is 0 where masked.
  """
  for name, x in (("dout", dout), ("q", q), ("k", k), ("v", v), ("zoh", zoh),
                  ("active_mask", active_mask), ("out", out), ("softmax_lse", softmax_lse)):
    _ops.require_tensor(name, x, "as fwd takes or returns it")
  seed = None
  if p_dropout > 0:
    if rng_state is None or tuple(rng_state.shape) != (2,):
      raise ValueError("rng_state: p_dropout > 0 needs fwd's rng_state, a (2,) tensor, got "
                       f"{None if rng_state is None else tuple(rng_state.shape)}")
    seed = rng_state[:1].to(device=q.device, dtype=torch.int32)
  return list(_bwd_op(dout, None, q, k, v, zoh, active_mask, seed, float(p_dropout),
                      None if softmax_scale is None else float(softmax_scale), bool(is_causal),
                      float(softcap), out, softmax_lse))


compat.register("flash_dma", fwd=fwd, bwd=bwd, topk_mask=topk_mask)
