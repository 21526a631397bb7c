"""FlashAttention-2's varlen API on the JAX face: sequences packed along the token axis.

Sequence s owns rows [cu_seqlens[s], cu_seqlens[s + 1]) and gets its own bottom-right causal
alignment and window. The kernels read the offsets themselves (no padding, no Python loop), and
max_seqlen is rounded up to a power of two before it reaches the compiled kernel, so a new value
recompiles only when it crosses a power of two.

With block_table (forward only, as in flash-attn), k and v are paged caches
(num_blocks, page_block_size, nheads_k, headdim): key p of sequence s sits in page
block_table[s, p // page_block_size], row p % page_block_size, and cu_seqlens_k still gives each
sequence's key count. The kernel reads the pages in place, one key tile from one page.

Dropout hashes (sequence index, head, row, column) with rows and columns counted within the
sequence, exactly as the dense face hashes (batch, head, i, j); S_dmask is therefore returned per
sequence, padded to (batch, nheads, max_seqlen_q, max_seqlen_k).
"""
from __future__ import annotations

import math

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_attn import _compat, checks
from pallas_attn.flash import attention
from pallas_attn.flash_attn import _alibi_rows, dropout_seed, signed_probs
from pallas_attn.reference import attention_logits
from pallas_attn.spec import AttentionSpec, band_from_window


def bucket(max_seqlen: int) -> int:
  return max(16, _compat.next_power_of_2(int(max_seqlen)))


def _values(x):
  """x as numpy, or None while it is traced (its values are then checked by nobody)."""
  try:
    return np.asarray(x)
  except Exception:  # noqa: BLE001  (a tracer, or the torch face's shape-only stand-in)
    return None


def _check_paged_qkv(q, k, v):
  """q (total_q, H, d) and paged k/v (num_blocks, page_block_size, Hk, d); returns the page size."""
  layout = "(num_blocks, page_block_size, nheads_k, headdim) with block_table"
  checks.require_array("q", q, 3, "(total_q, nheads, headdim)")
  checks.require_array("k", k, 4, layout)
  checks.require_array("v", v, 4, layout)
  checks.require_same_dtype(q=q, k=k, v=v)
  _, h, d = q.shape
  if k.shape[3] != d:
    raise ValueError(f"k: expected shape (num_blocks, page_block_size, nheads_k, {d}) to match q "
                     f"{tuple(q.shape)}, got {tuple(k.shape)}")
  if tuple(v.shape) != tuple(k.shape):
    raise ValueError(f"v: expected shape {tuple(k.shape)} (the shape of k), got {tuple(v.shape)}")
  if k.shape[2] == 0 or h % k.shape[2] != 0:
    raise ValueError(f"k: nheads ({h}) must be a multiple of nheads_k, got nheads_k={k.shape[2]}")
  if not 0 < d <= checks.MAX_HEAD_DIM:
    raise ValueError(f"q: expected head dim in [1, {checks.MAX_HEAD_DIM}], got {d}")
  if k.shape[0] == 0:
    raise ValueError(f"k: expected at least one page with block_table, got shape {tuple(k.shape)}")
  return checks.check_page_size("block_table: the page size (k.shape[1])", k.shape[1])


def _check_block_table(block_table, batch: int, num_blocks: int, page: int, cu_seqlens_k):
  """block_table int32 (batch, max_blocks) covering every sequence's keys, and cu_seqlens_k, which
  with paged keys gives only lengths."""
  checks.check_block_table(block_table, batch)
  max_blocks = block_table.shape[1]
  # Paged keys are not packed: the offsets bound no buffer, and each length is checked against
  # the table's capacity below.
  checks.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, np.iinfo(np.int32).max, batch)
  cu, table = _values(cu_seqlens_k), _values(block_table)
  if cu is None:
    return
  lengths = np.diff(cu)
  if np.any(lengths > max_blocks * page):
    raise checks.CapacityError(f"block_table: {max_blocks} pages of {page} keys hold at most "
                     f"{max_blocks * page} keys per sequence, but cu_seqlens_k gives lengths "
                     f"{lengths.tolist()}")
  if table is not None:
    # Only the pages that hold keys are read; entries past a sequence's end may be anything.
    used = np.arange(max_blocks)[None, :] < -(-lengths[:, None] // page)
    if np.any(used & ((table < 0) | (table >= num_blocks))):
      raise ValueError(f"block_table: expected page indices in [0, {num_blocks}) (k's num_blocks) "
                       "for every page that holds keys")


def prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                   softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                   alibi_slopes=None, block_table=None):
  """Validates flash_attn_varlen_func's arguments; returns (spec, alibi rows, seqlens), seqlens
  being (cu_seqlens_q, cu_seqlens_k), plus block_table when k/v are paged."""
  page = 0
  if block_table is None:
    checks.check_qkv_varlen(q, k, v)
  else:
    page = _check_paged_qkv(q, k, v)
  batch = checks.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], rows="q")
  if page:
    _check_block_table(block_table, batch, k.shape[0], page, cu_seqlens_k)
  else:
    checks.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], batch, rows="k")
  max_q = checks.check_max_seqlen("max_seqlen_q", max_seqlen_q, cu_seqlens_q)
  max_k = checks.check_max_seqlen("max_seqlen_k", max_seqlen_k, cu_seqlens_k)
  h, d = q.shape[1], q.shape[2]
  checks.check_options(dropout_p=dropout_p, softmax_scale=softmax_scale, window_size=window_size,
                       softcap=softcap, alibi_slopes=alibi_slopes, batch=batch, nheads=h)
  if page and dropout_p > 0:
    raise ValueError(f"block_table: paged keys/values are a forward-only (inference) path without "
                     f"dropout; expected dropout_p=0, got {dropout_p!r}")
  spec = AttentionSpec(
      mask=band_from_window(bucket(max_q), bucket(max_k), causal, tuple(window_size)),
      scale=float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d),
      softcap=float(softcap),
      alibi=alibi_slopes is not None,
      varlen=True,
      dropout_p=float(dropout_p),
      page=page,
  )
  seqlens = (cu_seqlens_q, cu_seqlens_k) + ((block_table,) if page else ())
  return spec, _alibi_rows(alibi_slopes, batch, h), seqlens


def s_dmask_varlen(q, k, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                   spec: AttentionSpec, alibi, seed):
  """(batch, H, max_seqlen_q, max_seqlen_k) debugging output: sequence s's P (from the kernel's lse,
  (H, total_q)) in [s, :, :len_q, :len_k] with dropped entries negated, +0 outside the sequence."""
  batch = cu_seqlens_q.shape[0] - 1
  i, j = jnp.arange(max_seqlen_q), jnp.arange(max_seqlen_k)
  len_q = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
  len_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
  row_ok = i[None, :] < len_q[:, None]  # (batch, max_q)
  col_ok = j[None, :] < len_k[:, None]
  # Out-of-range positions gather from one past the end, which mode="fill" reads as the fill value.
  rows = jnp.where(row_ok, cu_seqlens_q[:-1, None] + i, q.shape[0])
  cols = jnp.where(col_ok, cu_seqlens_k[:-1, None] + j, k.shape[0])
  qs = jnp.take(q, rows, axis=0, mode="fill", fill_value=0)  # (batch, max_q, H, d)
  ks = jnp.take(k, cols, axis=0, mode="fill", fill_value=0)
  lses = jnp.moveaxis(jnp.take(lse, rows, axis=1, mode="fill", fill_value=jnp.inf), 0, 1)
  t = attention_logits(qs, ks, softmax_scale=spec.scale, softcap=spec.softcap)
  # ALiBi and the band follow each sequence's own bottom-right alignment, which the padded
  # logits above cannot know.
  off = (len_k - len_q)[:, None, None]
  if alibi is not None:
    t = t - alibi[:, :, :, None] * jnp.abs(i[:, None] + off - j[None, :])[:, None]
  visible = jax.vmap(lambda sq, sk: dataclasses.replace(spec.mask, sq=sq, sk=sk).visible(i, j))(
      len_q, len_k)
  valid = row_ok[:, :, None] & col_ok[:, None, :]
  t = jnp.where((visible & valid)[:, None], t, -jnp.inf)
  signed = jnp.where(valid[:, None], signed_probs(t, lses, seed, spec.dropout_p), 0.0)
  assert signed.shape == (batch, q.shape[1], max_seqlen_q, max_seqlen_k)
  return lax.stop_gradient(signed).astype(q.dtype)


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
            softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs,
            block_table, dropout_key, tiles, backend=None):
  spec, alibi, seqlens = prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                                        softcap, alibi_slopes, block_table)
  spec = dataclasses.replace(spec, backend=backend)
  seed = dropout_seed(dropout_p, dropout_key)
  out, lse = attention(q, k, v, alibi, spec, tiles, None, seqlens, seed)
  if return_attn_probs:
    if seed is None:
      return out, lse, jnp.zeros((0,), q.dtype)
    return out, lse, s_dmask_varlen(q, k, lse, *seqlens[:2], int(max_seqlen_q), int(max_seqlen_k),
                                    spec, alibi, seed)
  return out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None, *, dropout_key=None,
                           tiles=None, backend=None):
  """flash_attn_func over packed sequences.

  Arguments:
    q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim), or with block_table paged
      caches (num_blocks, page_block_size, nheads_k, headdim), page_block_size a power of two >= 16
      or a multiple of 256.
    cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) row offsets of each sequence (paged: cu_seqlens_k
      gives only the key counts).
    max_seqlen_q, max_seqlen_k: Python ints, upper bounds of the sequence lengths.
    dropout_p, dropout_key: as flash_attn_func; the keep mask hashes (sequence index, head, row,
      column) with rows and columns counted within the sequence.
    Other arguments as flash_attn_func; alibi_slopes (nheads,) or (batch, nheads).
    block_table: optional int32 (batch, max_num_blocks_per_seq); key p of sequence s is row
      p % page_block_size of page block_table[s, p // page_block_size]. Forward only: no dropout,
      and differentiating through the call raises NotImplementedError.
    backend: (keyword-only) as flash_attn_func.
  Returns:
    out (total_q, nheads, headdim), or (out, softmax_lse (nheads, total_q) fp32, S_dmask). S_dmask
    is empty without dropout, else (batch, nheads, max_seqlen_q, max_seqlen_k): sequence s's P in
    [s, :, :seqlen_q, :seqlen_k] with dropped entries negated, zeros outside each sequence.
  """
  del deterministic
  return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                 softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs,
                 block_table, dropout_key, tiles, backend)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                     causal=False, window_size=(-1, -1), softcap=0.0,
                                     alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, dropout_key=None, tiles=None,
                                     backend=None):
  """flash_attn_varlen_func with qkv (total, 3, nheads, headdim) and one set of offsets."""
  del deterministic
  checks.require_array("qkv", qkv, 4, "(total, 3, nheads, headdim)")
  if qkv.shape[1] != 3:
    raise ValueError(f"qkv: expected shape (total, 3, nheads, headdim), got {tuple(qkv.shape)}")
  return _varlen(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                 dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                 return_attn_probs, None, dropout_key, tiles, backend)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None, causal=False,
                                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                    deterministic=False, return_attn_probs=False, *,
                                    dropout_key=None, tiles=None, backend=None):
  """flash_attn_varlen_func with kv (total_k, 2, nheads_k, headdim)."""
  del deterministic
  checks.require_array("kv", kv, 4, "(total_k, 2, nheads_k, headdim)")
  if kv.shape[1] != 2:
    raise ValueError(f"kv: expected shape (total_k, 2, nheads_k, headdim), got {tuple(kv.shape)}")
  return _varlen(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                 return_attn_probs, None, dropout_key, tiles, backend)
