"""`jax.nn.dot_product_attention`'s signature and semantics on our kernels, usable as Flax's
`attention_fn`.

jax.nn aligns every mask at the top-left corner: query i and key i share a position, whatever the
lengths (flash-attn aligns causal masks at the bottom-right). The kernels take that as a flag of the
band rule (masking.BandMask.top_left), so causal and windowed calls with T != S skip tiles as usual.

Which kernel runs:
  - no bias, no mask, no lengths: the dense flash kernels;
  - query_seq_lengths / key_value_seq_lengths: each batch row's valid tokens are moved to the front
    of one packed sequence (a permutation, as bert_padding's unpad does, but with static sizes so it
    traces under jit) and the varlen kernels read the offsets at run time; outputs move back;
  - bias and/or mask (arrays the caller already holds at (.., T, S)): the dynamic-mask kernels of
    flash_dma (an additive bias and an element mask read tile by tile); lengths fold into the mask.

Differences from jax.nn, all on rows jax.nn itself leaves undefined: a valid query row that sees no
key gives output 0 (jax.nn: the mean of all values, from its large-negative fill) and the residual
(logsumexp) is +inf there; the residual of padding rows (past query_seq_lengths) is not defined
either (jax.nn returns a fill-derived constant).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_attn import checks, sharding
from pallas_attn.flash import attention
from pallas_attn.flash_attn import dropout_seed
from pallas_attn.flash_dma import keep_mask
from pallas_attn.masking import BandMask
from pallas_attn.spec import AttentionSpec

_IMPLEMENTATIONS = (None, "pallas")


def _window(local_window_size, is_causal: bool):
  """(left, right) of the band, None meaning unbounded; causal caps right at 0."""
  if local_window_size is None:
    left = right = None
  else:
    if isinstance(local_window_size, int) and not isinstance(local_window_size, bool):
      local_window_size = (local_window_size, local_window_size)
    try:
      left, right = (int(w) for w in local_window_size)
    except (TypeError, ValueError):
      raise ValueError(f"local_window_size: expected an int or a pair of ints (left, right), got "
                       f"{local_window_size!r}") from None
    if left < 0 or right < 0:
      raise ValueError(f"local_window_size: expected sizes >= 0, got {local_window_size!r}")
  if is_causal:
    right = 0 if right is None else min(right, 0)
  return left, right


def _lengths(name: str, lengths, batch: int, limit: int):
  if lengths is None:
    return None
  lengths = jnp.asarray(lengths)
  if lengths.shape != (batch,) or lengths.dtype != jnp.int32:
    raise ValueError(f"{name}: expected int32 of shape ({batch},), got {lengths.dtype} of shape "
                     f"{lengths.shape}")
  return jnp.clip(lengths, 0, limit)


def _as_4d(name: str, x):
  if x is None:
    return None
  x = jnp.asarray(x)
  if x.ndim > 4:
    raise ValueError(f"{name}: expected at most 4 dims broadcastable to (B, N, T, S), got shape "
                     f"{x.shape}")
  return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _pack_order(lengths, rows: int):
  """Where each (batch, position) row goes in the packed layout: valid rows of batch b at
  cu[b] + position, then every padding row after cu[-1] (rows that belong to no sequence)."""
  batch = lengths.shape[0]
  pos = jnp.arange(rows, dtype=jnp.int32)
  valid = pos[None, :] < lengths[:, None]  # (batch, rows)
  cu = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(lengths, dtype=jnp.int32)])
  pad_rank = jnp.cumsum((~valid).reshape(-1), dtype=jnp.int32).reshape(batch, rows) - 1
  dest = jnp.where(valid, cu[:-1, None] + pos[None, :], cu[-1] + pad_rank)
  return dest.reshape(-1), valid, cu


def _pack(x, dest, valid):
  """(batch, rows, ...) -> (batch * rows, ...) in the packed order; padding rows become 0, so
  neither their values nor the gradients the kernels leave there reach the caller."""
  flat = jnp.where(valid.reshape(-1, *(1,) * (x.ndim - 2)), x.reshape(-1, *x.shape[2:]), 0)
  return jnp.zeros_like(flat).at[dest].set(flat, unique_indices=True, indices_are_sorted=False)


def _packed_attention(q, k, v, q_len, kv_len, spec, seed):
  """(out (B, T, N, H), lse (B, N, T)) with per-row lengths, through the varlen kernels."""
  b, t = q.shape[:2]
  s = k.shape[1]
  q_len = jnp.full((b,), t, jnp.int32) if q_len is None else q_len
  kv_len = jnp.full((b,), s, jnp.int32) if kv_len is None else kv_len
  q_dest, q_valid, cu_q = _pack_order(q_len, t)
  k_dest, k_valid, cu_k = _pack_order(kv_len, s)
  qp = _pack(q, q_dest, q_valid)
  kp, vp = _pack(k, k_dest, k_valid), _pack(v, k_dest, k_valid)
  out, lse = attention(qp, kp, vp, None, spec, None, None, (cu_q, cu_k), seed)
  out = out[q_dest].reshape(q.shape)  # (B*T, N, H) back to (B, T, N, H)
  lse = jnp.moveaxis(lse[:, q_dest].reshape(lse.shape[0], b, t), 1, 0)  # (H, B*T) -> (B, H, T)
  return out, lse, q_valid


def _masked_attention(q, k, v, bias, mask, q_len, kv_len, spec, seed):
  """(out, lse) with an additive bias and/or element mask at (.., T, S): the dynamic-mask kernels."""
  b, t, n, _ = q.shape
  s, hk = k.shape[1], k.shape[2]
  per_query_head = any(x is not None and x.shape[1] == n and n != hk for x in (bias, mask))
  if per_query_head:  # the kernels share bias/mask across a kv head's query heads
    k, v = jnp.repeat(k, n // hk, axis=2), jnp.repeat(v, n // hk, axis=2)
    hk = n
  shape = (b, hk, t, s)
  for name, x in (("bias", bias), ("mask", mask)):
    if x is not None and not all(a in (1, c) for a, c in zip(x.shape, (b, n, t, s))):
      raise ValueError(f"{name}: expected a shape broadcastable to (B, N, T, S) = {(b, n, t, s)}, "
                       f"got {x.shape}")
  keep = jnp.ones((1, 1, t, s), jnp.bool_) if mask is None else mask
  if q_len is not None:
    keep = keep & (jnp.arange(t)[None, None, :, None] < q_len[:, None, None, None])
  if kv_len is not None:
    keep = keep & (jnp.arange(s)[None, None, None, :] < kv_len[:, None, None, None])
  keep = keep_mask(jnp.broadcast_to(keep, shape))
  zeros = jnp.zeros((1, 1, 1, 1), q.dtype)
  bias = jnp.broadcast_to((zeros if bias is None else bias).astype(q.dtype), shape)
  spec = AttentionSpec(mask=spec.mask, scale=spec.scale, dropout_p=spec.dropout_p, bias_mask=True)
  return attention(q, k, v, None, spec, None, None, None, seed, bias, keep)


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                          query_seq_lengths=None, key_value_seq_lengths=None,
                          local_window_size=None, implementation=None, return_residual=False,
                          dropout_rng=None, dropout_rate=0.0, broadcast_dropout=True,
                          deterministic=False, dtype=None, precision=None, module=None,
                          force_fp32_for_softmax=None):
  """softmax(query key^T * scale + bias, masked) value, as jax.nn.dot_product_attention.

  Arguments (jax.nn's; B batch, T query length, S key length, N query heads, K kv heads, H head dim):
    query (B, T, N, H) or (T, N, H); key, value (B, S, K, H) or (S, K, H), N a multiple of K.
    bias: additive logits term broadcastable to (B, N, T, S); gets a gradient.
    mask: bool, broadcastable to (B, N, T, S); True takes part (numbers, as Flax's float masks:
      nonzero takes part).
    scale: defaults to 1 / sqrt(H).
    is_causal: key j visible to query i iff j <= i (top-left aligned, as jax.nn).
    query_seq_lengths, key_value_seq_lengths: int32 (B,): rows past them are padding (output 0).
    local_window_size: int w (= (w, w)) or (left, right): query i sees keys [i - left, i + right].
    implementation: None or "pallas" (our kernels); other values raise.
    return_residual: also return the logsumexp of the logits, (B, T, N) or (T, N), in key's dtype.
  Flax's attention_fn arguments (nn.MultiHeadDotProductAttention(attention_fn=...)):
    dropout_rate with dropout_rng, unless deterministic: drops each probability independently,
      which needs broadcast_dropout=False (Flax's default shares one mask across batch and heads;
      the kernels draw per element, so that default raises rather than silently differ).
    dtype: computation dtype (inputs are cast to it); precision, module, force_fp32_for_softmax:
      accepted and unused (the kernels accumulate in fp32; nothing to sow).
  Returns:
    the output like query, or (output, residual) with return_residual.
  """
  del precision, module, force_fp32_for_softmax
  if implementation not in _IMPLEMENTATIONS:
    raise ValueError(f"implementation: expected one of {_IMPLEMENTATIONS} (this function always "
                     f"runs pallas_attn's kernels), got {implementation!r}")
  q, k, v = (jnp.asarray(x) for x in (query, key, value))
  if dtype is not None:
    q, k, v = (x.astype(dtype) for x in (q, k, v))
  unbatched = q.ndim == 3
  if unbatched:
    if k.ndim != 3 or v.ndim != 3:
      raise ValueError(f"key, value: expected (S, K, H) like the unbatched query, got {k.shape}, "
                       f"{v.shape}")
    q, k, v = q[None], k[None], v[None]
  checks.check_qkv(q, k, v)
  b, t, n, h = q.shape
  s = k.shape[1]
  bias, mask = _as_4d("bias", bias), _as_4d("mask", mask)
  if mask is not None and mask.dtype != jnp.bool_:
    # Flax's masks (nn.make_attention_mask, make_causal_mask) are float 0/1 and Flax reads any
    # nonzero as "takes part"; jax.nn only takes bool. Read numbers as Flax does so the function
    # works as Flax's attention_fn unchanged (additive masks belong in bias).
    if not (jnp.issubdtype(mask.dtype, jnp.number)):
      raise ValueError(f"mask: expected bool or a 0/1 number array (nonzero takes part), got "
                       f"{mask.dtype}")
    mask = mask != 0
  q_len = _lengths("query_seq_lengths", query_seq_lengths, b, t)
  kv_len = _lengths("key_value_seq_lengths", key_value_seq_lengths, b, s)

  rate = 0.0 if deterministic else float(dropout_rate)
  if rate and broadcast_dropout:
    raise ValueError("broadcast_dropout: the kernels drop each probability independently; expected "
                     "broadcast_dropout=False with dropout_rate > 0, got True")
  seed = dropout_seed(rate, dropout_rng, "dropout_rate")
  left, right = _window(local_window_size, bool(is_causal))
  scale = float(scale) if scale is not None else 1.0 / math.sqrt(h)
  band = BandMask(sq=t, sk=s, left=left, right=right, top_left=True)

  def run(q, k, v, bias, mask, q_len, kv_len, seed):
    t = q.shape[1]
    if bias is not None or mask is not None:
      spec = AttentionSpec(mask=band, scale=scale, dropout_p=rate)
      out, lse = _masked_attention(q, k, v, bias, mask, q_len, kv_len, spec, seed)
      q_valid = None if q_len is None else jnp.arange(t)[None, :] < q_len[:, None]
    elif q_len is not None or kv_len is not None:
      spec = AttentionSpec(mask=band, scale=scale, dropout_p=rate, varlen=True)
      out, lse, q_valid = _packed_attention(q, k, v, q_len, kv_len, spec, seed)
    else:
      spec = AttentionSpec(mask=band, scale=scale, dropout_p=rate)
      out, lse = attention(q, k, v, None, spec, None, None, None, seed)
      q_valid = None
    if q_valid is not None:  # jax.nn zeroes padding rows
      out = jnp.where(q_valid[:, :, None, None], out, 0).astype(q.dtype)
    return out, lse

  # Under Explicit mesh axes the whole call runs per batch / head shard: the length packing and the
  # per-query-head bias mix what a kernel-level shard would see (pallas_attn/sharding.py).
  full = lambda x: None if x is None else "".join(  # noqa: E731
      r if x.shape[i] == size else "." for i, (r, size) in enumerate(zip("bhss", (b, n, t, s))))
  out, lse = sharding.local(
      run, [q, k, v, bias, mask, q_len, kv_len, seed],
      ["bsh.", "bsh.", "bsh.", full(bias), full(mask), "b", "b", "."], ["bsh.", "bhs"],
      what="dot_product_attention", explicit_only=True,
      no_shard_reason=None if seed is None else "dropout (dropout_rate > 0)")
  if unbatched:
    out, lse = out[0], lse[0]
  if not return_residual:
    return out
  residual = lax.stop_gradient(jnp.moveaxis(lse, -2, -1)).astype(k.dtype)  # (.., N, T) -> (.., T, N)
  return out, residual
