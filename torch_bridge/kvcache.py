"""flash_attn_with_kvcache on the torch face: flash-attn 2.8's signature and return, caches updated
in place.

Three steps: rotary on q and the new keys (custom op `pallas_attn::kvcache_rotary`), the append of
the new keys/values into the caller's k_cache/v_cache with torch indexing (in place, no copy of the
cache), and attention over the updated caches (custom op `pallas_attn::kvcache_attend`, the JAX
face's split-KV decode kernel reading pages in the kernel). Arguments are validated once per static
configuration by the JAX face's own checks, before anything is written.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import torch

from pallas_attn import kvcache as jax_kvcache
from torch_bridge import _dlpack, _ops, compat
from torch_bridge.flash_attn import _window

_TENSORS = ("q", "k_cache", "v_cache", "k", "v", "rotary_cos", "rotary_sin", "cache_seqlens",
            "cache_batch_idx", "cache_leftpad", "block_table", "alibi_slopes")


def _meta(name, t):
  return None if t is None else (tuple(t.shape), t.dtype)


@functools.lru_cache(maxsize=1024)
def _plan(metas, softmax_scale, causal, window, softcap, rotary_interleaved, num_splits):
  """The JAX face's plan for shape-only stand-ins of the tensors (validates every argument)."""
  args = {}
  for name, meta in zip(_TENSORS, metas):
    if meta is None:
      args[name] = None
    elif name == "cache_seqlens" and isinstance(meta, int):
      args[name] = meta
    else:
      args[name] = jax.ShapeDtypeStruct(meta[0], _dlpack.jax_dtype(name, meta[1]))
  return jax_kvcache.prepare(**args, softmax_scale=softmax_scale, causal=causal, window_size=window,
                             softcap=softcap, rotary_interleaved=rotary_interleaved,
                             num_splits=num_splits)


# What a backward through either op raises (inputs that require grad still get a forward).
_FORWARD_ONLY = ("flash_attn_with_kvcache: forward-only (a decoding step, as in flash-attn), it has no "
                 "backward; run it under torch.no_grad(), or use flash_attn_func for attention to train")


def _rotary_outputs(q, k, *_):
  return [(q.shape, q.dtype), (k.shape, k.dtype)]


def _rotary_prepare(interleaved, per_row):
  return (bool(interleaved), bool(per_row))


_rotary_op = _ops.build(_ops.OpDesc(
    "kvcache_rotary",
    "Tensor q, Tensor k, Tensor rotary_cos, Tensor rotary_sin, Tensor cache_seqlens, "
    "bool interleaved, bool per_row", outputs=_rotary_outputs, output_names=("q", "k"),
    static=_ops.Spec(_rotary_prepare),
    operands=("q", "k", "rotary_cos", "rotary_sin", "cache_seqlens"),
    forward=_dlpack.Kernel(into=jax_kvcache.rotate_into, plain=jax_kvcache.rotate_plain),
    forward_only=_FORWARD_ONLY)).call


# -- attention over the updated cache

_ATTEND_ARGS = ("Tensor q, Tensor k_cache, Tensor v_cache, Tensor end, Tensor leftpad, Tensor table, "
                "Tensor? alibi_slopes, float? softmax_scale, bool causal, int window_left, "
                "int window_right, float softcap, int num_splits")


def _attend_outputs(q, *_):
  b, sq, h, _ = q.shape
  return [(q.shape, q.dtype), ((b, h, sq), torch.float32)]


def _attend_static(q, k_cache, v_cache, end, leftpad, table, alibi_slopes, softmax_scale, causal,
                   window_left, window_right, softcap, num_splits):
  # The public function's plan, keyed the same way (table is a block table when 2-D, else the rows).
  paged = table.dim() == 2
  metas = (_meta("q", q), _meta("k_cache", k_cache), _meta("v_cache", v_cache), None, None, None,
           None, _meta("cache_seqlens", end), None if paged else _meta("cache_batch_idx", table),
           _meta("cache_leftpad", leftpad), _meta("block_table", table) if paged else None,
           _meta("alibi_slopes", alibi_slopes))
  return (_plan(metas, softmax_scale, causal, (window_left, window_right), softcap, True, num_splits),)


_attend_op = _ops.build(_ops.OpDesc(
    "kvcache_attend", _ATTEND_ARGS, outputs=_attend_outputs, static=_attend_static,
    operands=("q", "k_cache", "v_cache", "end", "leftpad", "table", "alibi_slopes"),
    forward=_dlpack.Kernel(into=jax_kvcache.attend_into, plain=jax_kvcache.attend_plain),
    forward_only=_FORWARD_ONLY)).call


def _host_values(x):
  """x's values as numpy where reading them costs no device sync (an int, a CPU tensor), else None;
  the kernel clamps the others (see pallas_attn/backends/triton_decode.py)."""
  if isinstance(x, (int, np.integer)):
    return np.asarray(x)
  if isinstance(x, torch.Tensor) and x.device.type == "cpu" and not torch.compiler.is_compiling():
    return x.detach().numpy()
  return None


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None,
                            block_table=None, softmax_scale=None, causal=False, window_size=(-1, -1),
                            softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                            return_softmax_lse=False):
  """Attention of q over a KV cache after appending k, v to it *in place*. Forward only.

  If k and v are given they are written into k_cache/v_cache at positions cache_seqlens[b] + j
  (after rotary on k), then q attends to positions [cache_leftpad[b], cache_seqlens[b] + seqlen_new)
  of its cache row: logical keys 0 .. sk_b - 1. causal / window_size / ALiBi act on those logical
  indices, aligned to the bottom-right corner (seqlen_q=2, sk=5 causal: 1 1 1 1 0 / 1 1 1 1 1); a
  row with no visible key gives out 0 and softmax_lse +inf. MQA/GQA: query head h reads kv head
  h // (nheads / nheads_k).

  Rotary (rotary_cos/rotary_sin (seqlen_ro, rotary_dim / 2), rotary_dim <= headdim, only with k and
  v): new key j is rotated at row cache_seqlens + j; q at rows cache_seqlens + i when causal or
  windowed, else all at cache_seqlens (q itself is not modified). rotary_interleaved: pairs
  (2r, 2r + 1) if True, (r, r + rotary_dim / 2) (GPT-NeoX) if False. fp32 math, rounded to q's dtype.

  Arguments:
    q: (batch, seqlen_q, nheads, headdim).
    k_cache, v_cache: (batch_size_cache, seqlen_cache, nheads_k, headdim), or with block_table
      (num_blocks, page_block_size, nheads_k, headdim), page_block_size a power of two >= 16 or a
      multiple of 256.
    k, v: optional (batch, seqlen_new, nheads_k, headdim).
    cache_seqlens: int or (batch,) int32: cache lengths before the append. None: the whole cache
      (then k and v must be None).
    cache_batch_idx: optional (batch,) int32 cache rows (not with block_table). With duplicate
      indices the appended values may come from any of the duplicates.
    cache_leftpad: optional (batch,) int32 first valid position of each row.
    block_table: optional (batch, max_num_blocks_per_seq) int32.
    softmax_scale, causal, window_size, softcap, alibi_slopes: as in flash_attn_func.
    num_splits: 0 heuristic, 1 no split, n: split each row's keys n ways (only rounding changes).
    return_softmax_lse: also return softmax_lse (batch, nheads, seqlen_q) float32.
  Returns:
    out (batch, seqlen_q, nheads, headdim), or (out, softmax_lse).
  """
  for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v),
                  ("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin),
                  ("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad),
                  ("block_table", block_table), ("alibi_slopes", alibi_slopes)):
    _ops.require_tensor(name, x, "(see flash_attn_with_kvcache's docstring)", optional=True)
  if q is None or k_cache is None or v_cache is None:
    raise TypeError("q, k_cache and v_cache: expected torch.Tensors, got None")
  if cache_seqlens is not None and not isinstance(cache_seqlens, (int, np.integer, torch.Tensor)):
    raise TypeError(f"cache_seqlens: expected an int or an int32 tensor (batch,), got "
                    f"{type(cache_seqlens).__name__}")
  window = _window(window_size)
  tensors = dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, rotary_cos=rotary_cos,
                 rotary_sin=rotary_sin, cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
                 cache_leftpad=cache_leftpad, block_table=block_table, alibi_slopes=alibi_slopes)
  metas = tuple(int(x) if isinstance(x, (int, np.integer)) else _meta(n, x)
                for n, x in tensors.items())
  plan = _plan(metas, None if softmax_scale is None else float(softmax_scale), bool(causal), window,
               float(softcap), bool(rotary_interleaved), int(num_splits))

  # Values are checked before anything is written (the append below indexes with them).
  jax_kvcache.check_values(plan, k_cache.shape[0], _host_values(cache_seqlens),
                           _host_values(cache_leftpad), _host_values(cache_batch_idx),
                           _host_values(block_table),
                           None if rotary_cos is None else rotary_cos.shape[0])

  b, device = q.shape[0], q.device
  if cache_seqlens is None:
    seqlens = torch.full((b,), plan.capacity, dtype=torch.int32, device=device)
  elif isinstance(cache_seqlens, torch.Tensor):
    seqlens = cache_seqlens
  else:
    seqlens = torch.full((b,), int(cache_seqlens), dtype=torch.int32, device=device)
  leftpad = cache_leftpad if cache_leftpad is not None else torch.zeros_like(seqlens)

  if k is not None:
    if plan.rotary:
      q, k = _rotary_op(q, k, rotary_cos, rotary_sin, seqlens, plan.rotary_interleaved,
                        plan.rotate_q_per_row)
    pos = seqlens.long()[:, None] + torch.arange(plan.s_new, device=device)[None, :]
    if block_table is not None:
      page = k_cache.shape[1]
      at = (block_table.long().gather(1, torch.div(pos, page, rounding_mode="floor")), pos % page)
    else:
      rows = (torch.arange(b, device=device) if cache_batch_idx is None else cache_batch_idx.long())
      at = (rows[:, None].expand_as(pos), pos)
    with torch.no_grad():
      k_cache.index_put_(at, k.detach())
      v_cache.index_put_(at, v.detach())

  table = block_table
  if table is None:
    table = (torch.arange(b, dtype=torch.int32, device=device) if cache_batch_idx is None
             else cache_batch_idx)
  out, lse = _attend_op(q, k_cache, v_cache, seqlens + plan.s_new, leftpad, table, alibi_slopes,
                        None if softmax_scale is None else float(softmax_scale), bool(causal),
                        window[0], window[1], float(softcap), plan.decode.num_splits)
  return (out, lse) if return_softmax_lse else out


compat.register("flash_attn", flash_attn_with_kvcache=flash_attn_with_kvcache)
compat.register("flash_attn.flash_attn_interface", flash_attn_with_kvcache=flash_attn_with_kvcache)
