"""Flash dynamic mask attention (flash-dmattn's `flash_dma`, SPEC section 5) on the JAX face.

`fwd(q, k, v, zoh, active_mask, ...)` keeps the original's arguments and its list return
[out, softmax_lse, p, rng_state]; gradients reach q, k, v and zoh through jax.grad (the original
has no backward), and `bwd` exposes the backward explicitly. JAX idioms: dropout takes the
keyword-only PRNG key `dropout_key` instead of a torch generator, and `out` cannot be written in place
(it is accepted for signature compatibility and checked, and the result is returned as a new array).

The kernels are the shared flash family with its dynamic-mask option: zoh is an additive bias and
active_mask an element mask, read tile by tile, and tiles where active_mask (after the causal rule) is
all zero are skipped without being read, through per-(batch, kv head) tile tables summarizing the mask.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from pallas_attn import checks, dropout, sharding
from pallas_attn.flash import attention, backward
from pallas_attn.flash_attn import dropout_seed
from pallas_attn.reference import attention_logits
from pallas_attn.spec import AttentionSpec, band_from_window


def _check_pair(name: str, x, q, k):
  b, sq, _, _ = q.shape
  shape = (b, k.shape[2], sq, k.shape[1])
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name}: expected an array of shape (batch, nheads_k, seqlen_q, seqlen_k) = "
                    f"{shape}, got {type(x).__name__}")
  if tuple(x.shape) != shape:
    raise ValueError(f"{name}: expected shape (batch, nheads_k, seqlen_q, seqlen_k) = {shape}, got "
                     f"{tuple(x.shape)}")


def prepare(q, k, v, zoh, active_mask, p_dropout=0.0, softmax_scale=None, is_causal=False,
            keep_window_size=2048, softcap=0.0):
  """Validates fwd's arguments; returns the kernel spec and the keep mask (active_mask or top-k)."""
  checks.check_qkv(q, k, v)
  _check_pair("zoh", zoh, q, k)
  checks.require_same_dtype(q=q, zoh=zoh)
  if active_mask is not None:
    _check_pair("active_mask", active_mask, q, k)
  b, sq, h, d = q.shape
  checks.check_options(dropout_p=p_dropout, softmax_scale=softmax_scale, window_size=(-1, -1),
                       softcap=softcap, alibi_slopes=None, batch=b, nheads=h)
  if not isinstance(keep_window_size, int) or keep_window_size < 1:
    raise ValueError(f"keep_window_size: expected a positive int, got {keep_window_size!r}")
  spec = AttentionSpec(
      mask=band_from_window(sq, k.shape[1], bool(is_causal), (-1, -1)),
      scale=float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d),
      softcap=float(softcap),
      dropout_p=float(p_dropout),
      bias_mask=True,
  )
  if active_mask is None:
    active_mask = topk_mask(zoh, keep_window_size, is_causal)
  return spec, active_mask


def topk_mask(zoh, keep_window_size: int, is_causal: bool = False):
  """active_mask for `active_mask=None`: per query row, 1 on the keep_window_size largest zoh entries
  among the keys the causal rule allows (ties to the lower index), else 0; all allowed keys when
  seqlen_k <= keep_window_size. Same shape and dtype as zoh."""
  lead = "bh"[:max(zoh.ndim - 2, 0)] + "." * max(zoh.ndim - 4, 0)
  return sharding.local(lambda z: (_topk_mask(z, keep_window_size, is_causal),), [zoh],
                        [lead + "ss"], [lead + "ss"], what="flash_dma.topk_mask")[0]


def _topk_mask(zoh, keep_window_size: int, is_causal: bool):
  sq, sk = zoh.shape[-2:]
  allowed = band_from_window(sq, sk, is_causal, (-1, -1)).visible(jnp.arange(sq), jnp.arange(sk))
  if sk <= keep_window_size:
    return jnp.broadcast_to(allowed, zoh.shape).astype(zoh.dtype)
  scores = jnp.where(allowed, zoh.astype(jnp.float32), -jnp.inf)
  _, idx = lax.top_k(scores, keep_window_size)
  hit = jnp.zeros(zoh.shape, jnp.bool_)
  hit = jnp.put_along_axis(hit, idx, True, axis=-1, inplace=False)
  return (hit & allowed).astype(zoh.dtype)


def keep_mask(active_mask):
  """active_mask as the kernels read it (> 0 keeps): as given, so no extra pass over an s x s array,
  except that bool becomes int8 (Triton loads numbers; a bool array is one byte per entry anyway)."""
  if active_mask.dtype == jnp.bool_:
    return active_mask.astype(jnp.int8)
  return active_mask


def softmax_probs(q, k, zoh, active_mask, lse, spec: AttentionSpec, seed):
  """(b, H, sq, sk) P from the kernel's lse, dropped entries negated (return_softmax's `p`)."""
  group = q.shape[2] // k.shape[2]
  t = attention_logits(q, k, softmax_scale=spec.scale, causal=spec.mask.right is not None,
                       softcap=spec.softcap, bias=jnp.repeat(zoh, group, axis=1),
                       keep=jnp.repeat(active_mask > 0, group, axis=1))
  p = jnp.exp(t - lse[..., None])
  if seed is not None:
    b, h = q.shape[0], q.shape[2]
    keep = dropout.dense_keep(seed, b, h, q.shape[1], k.shape[1], spec.dropout_p)
    p = jnp.where(keep, p, -p)
  return lax.stop_gradient(p).astype(q.dtype)


def _rng_state(seed):
  """(2,) int32 [seed, offset]: what identifies a run's dropout mask (offset is always 0 here)."""
  if seed is None:
    return jnp.zeros((0,), jnp.int32)
  return jnp.concatenate([seed, jnp.zeros((1,), jnp.int32)])


def fwd(q, k, v, zoh, active_mask, out=None, p_dropout=0.0, softmax_scale=None, is_causal=False,
        keep_window_size=2048, softcap=0.0, return_softmax=False, *, dropout_key=None):
  """Attention with a dynamic bias and mask; returns [out, softmax_lse, p, rng_state].

  Arguments:
    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim); float16,
      bfloat16 or float32; nheads a multiple of nheads_k.
    zoh: (batch, nheads_k, seqlen_q, seqlen_k), q's dtype: added to every score after scaling and
      softcap (never capped), shared by the query heads of a kv head. Differentiable.
    active_mask: like zoh; keys where it is <= 0 are masked (always, on every tile). None builds it
      with `topk_mask(zoh, keep_window_size, is_causal)`.
    out: accepted for the torch signature; must be None or an array shaped like q (JAX arrays are
      immutable, so the result is returned, not written into it).
    p_dropout: dropout on the normalized probabilities; needs dropout_key.
    softmax_scale: default 1 / sqrt(headdim).
    is_causal: bottom-right aligned causal mask, combined with active_mask.
    keep_window_size: keys kept per row when active_mask is None (ignored otherwise).
    softcap: > 0 applies softcap * tanh(scaled score / softcap) before zoh is added.
    return_softmax: also return P (dropped entries negated) as `p`.
    dropout_key: PRNG key for dropout (keyword-only).
  Returns:
    [out (batch, seqlen_q, nheads, headdim), softmax_lse (batch, nheads, seqlen_q) float32 (+inf on
    rows with no visible key, whose out is 0), p ((batch, nheads, seqlen_q, seqlen_k) or empty),
    rng_state ((2,) int32 [seed, 0] with dropout, else empty)].
  """
  spec, active_mask = prepare(q, k, v, zoh, active_mask, p_dropout, softmax_scale, is_causal,
                              keep_window_size, softcap)
  if out is not None and tuple(getattr(out, "shape", ())) != tuple(q.shape):
    raise ValueError(f"out: expected None or an array of shape {tuple(q.shape)} (the shape of q), "
                     f"got {getattr(out, 'shape', type(out).__name__)}")
  seed = dropout_seed(p_dropout, dropout_key, "p_dropout")
  result, lse = attention(q, k, v, None, spec, None, None, None, seed, zoh, keep_mask(active_mask))
  p = (softmax_probs(q, k, zoh, active_mask, lse, spec, seed) if return_softmax
       else jnp.zeros((0,), q.dtype))
  return [result, lse, p, _rng_state(seed)]


def bwd(dout, q, k, v, zoh, active_mask, out, softmax_lse, p_dropout=0.0, softmax_scale=None,
        is_causal=False, softcap=0.0, rng_state=None):
  """[dq, dk, dv, dzoh] for the cotangent dout of fwd's out (explicit form of jax.grad through fwd).

  active_mask must be the one the forward used (pass topk_mask(...) if it built one); rng_state is
  fwd's fourth result when p_dropout > 0. dzoh is the logit gradient summed over the query heads of
  each kv head, zero where masked.
  """
  spec, active_mask = prepare(q, k, v, zoh, active_mask, p_dropout, softmax_scale, is_causal, 1,
                              softcap)
  seed = None
  if p_dropout > 0:
    if rng_state is None or tuple(rng_state.shape) != (2,):
      raise ValueError("rng_state: p_dropout > 0 needs fwd's rng_state, a (2,) int32 array, got "
                       f"{None if rng_state is None else tuple(rng_state.shape)}")
    seed = rng_state[:1].astype(jnp.int32)
  dq, dk, dv, dzoh = backward(q, k, v, None, out, softmax_lse, dout, None, spec, None, None, None,
                              seed, zoh, keep_mask(active_mask))
  return [dq, dk, dv, dzoh]


__all__ = ["fwd", "bwd", "topk_mask"]
