"""Split-KV attention over a KV cache (contiguous or paged) as Triton-lowered Pallas calls.

Decoding reads the whole cache for one or a few query rows, so the work is memory-bound and the
kernel is organised around the keys: one program per (query-row tile, split, batch row, kv head)
walks its share of that row's key tiles once, for all G query heads of the group and all sq query
rows together (rows r = i * G + g of a [G * sq, d] query tile), so the tile fills the MMA even at
sq = 1. A split writes its normalized partial output and partial lse; `lse_merge.merge` combines
the splits by lse. With one split the kernel writes the final output and lse directly.

Cache addressing: the cache is a set of pages (num_pages, page, Hk, d), absolute position p of batch
row b living in page table[b, p // page], row p % page. A contiguous cache is the same thing with one
page per cache row (page = capacity) and table[b] = [cache_batch_idx[b]]. Key tiles are aligned to
absolute positions and never straddle a page (block_k divides the page), so each tile is one strided
load from one page. Logical key j (what masks and ALiBi see) is p - leftpad[b]; row b sees
j < sk_b = end[b] - leftpad[b], where end is the cache length after the append.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_attn import _compat
from pallas_attn.backends import kernel_math as km
from pallas_attn.backends.triton_flash import _and, _dot, _head_mask, _load, _whole
from pallas_attn.masking import BandMask

_INF = float("inf")
# Programs a split-KV launch aims for (two waves on the H100's 132 SMs).
_TARGET_PROGRAMS = 264
_MAX_SPLITS = 64


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
  """Static options of one decode call; the lengths themselves are traced (no recompiles)."""
  sq: int
  group: int  # G = H / Hk query heads per kv head
  head_dim: int
  scale: float
  softcap: float = 0.0
  alibi: bool = False
  left: int | None = None  # window bounds on logical indices; causal is right = 0
  right: int | None = None
  page_size: int = 0  # rows per page (a contiguous cache: its capacity)
  max_pages: int = 1  # pages per batch row in the table
  num_splits: int = 1
  block_m: int = 16
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2

  @property
  def rows(self) -> int:
    return self.sq * self.group


def choose_blocks(rows: int, dp: int, page_size: int, paged: bool, capacity: int):
  """(block_m, block_k): the query tile covers every row of a kv head up to 64, the key tile is
  as wide as fits in registers next to it and never crosses a page (untuned: H100 unmeasured)."""
  block_m = max(16, min(64, _compat.next_power_of_2(rows)))
  block_k = 128 if dp <= 64 else 64 if dp <= 128 else 32
  block_k = min(block_k, _compat.next_power_of_2(max(capacity, 1)))
  if paged:
    block_k = min(block_k, page_size & -page_size)  # the largest power of two dividing the page
  return block_m, max(16, block_k)


def heuristic_splits(batch: int, kv_heads: int, m_tiles: int, capacity: int, block_k: int) -> int:
  """Splits that bring the launch near _TARGET_PROGRAMS, each keeping at least 4 key tiles.

  A power of two, so power-of-two caches split into equal parts. H100, b=8, Hk=8, 8192 keys (64
  programs, 2026-11-27, two runs): 4 splits 102.9 / 102.6 us; 5 (the count this rounded up to
  before) 100.8 / 118.3 us.
  """
  programs = batch * kv_heads * m_tiles
  if programs * 2 > _TARGET_PROGRAMS:
    return 1
  tiles = -(-capacity // block_k)
  want = max(1, min(-(-_TARGET_PROGRAMS // programs), tiles // 4, _MAX_SPLITS))
  return 1 << (int(want).bit_length() - 1)


def _decode_kernel(q_ref, k_ref, v_ref, end_ref, pad_ref, table_ref, *refs, spec: DecodeSpec):
  alibi_ref = refs[0] if spec.alibi else None
  o_ref, lse_ref = refs[-2:]
  bm, bk, n_split = spec.block_m, spec.block_k, spec.num_splits
  dp = q_ref.shape[-1]
  # Program ids at the top level (interpret mode substitutes them only there).
  pid, batch = pl.program_id(0), pl.program_id(1)
  m_tile, split = lax.div(pid, n_split), lax.rem(pid, n_split)

  # Lengths and page indices may be traced (unchecked) values: clamped to what the caches and the
  # table hold, so no value can address memory outside them (the host checks reject the concrete ones).
  n_pages = k_ref.shape[0]
  end = jnp.clip(end_ref[batch], 0, spec.max_pages * spec.page_size)
  pad = jnp.clip(pad_ref[batch], 0, end)
  sk = end - pad
  # The band and ALiBi on logical indices (key j at position pad + j), bottom-right aligned.
  mask = BandMask(sq=spec.sq, sk=sk, left=spec.left, right=spec.right)
  off = mask.off
  rows = m_tile * bm + jnp.arange(bm)
  rows_at = pl.ds(m_tile * bm, bm)
  row_ok = rows < spec.rows
  i = lax.div(rows, spec.group)  # query row of each tile row
  head_ok = _head_mask(dp, spec.head_dim)
  tile_mask = _and(row_ok[:, None], head_ok)
  q = _load(q_ref.at[rows_at, :], tile_mask, 0.0)
  slope = None
  if alibi_ref is not None:
    slope = _compat.load(alibi_ref.at[rows_at], mask=row_ok, other=0.0)[:, None]
  scores = km.Scores(spec.scale, spec.softcap, mask, slope)

  # Key tiles any row of this tile can see, in absolute positions, then this split's share of them.
  i_first = lax.div(m_tile * bm, spec.group)
  i_last = lax.div(jnp.minimum(m_tile * bm + bm, spec.rows) - 1, spec.group)
  j_lo = jnp.int32(0) if spec.left is None else jnp.maximum(i_first + off - spec.left, 0)
  j_hi = sk if spec.right is None else jnp.minimum(sk, i_last + off + spec.right + 1)
  a_lo, a_hi = jnp.maximum(pad + j_lo, 0), jnp.maximum(pad + j_hi, 0)
  t_lo = lax.div(a_lo, bk)
  t_hi = jnp.maximum(lax.div(a_hi + (bk - 1), bk), t_lo)
  per = lax.div(t_hi - t_lo + (n_split - 1), n_split)
  s_lo = jnp.minimum(t_lo + split * per, t_hi)
  s_hi = jnp.minimum(s_lo + per, t_hi)

  def body(t, carry):
    acc, m_i, l_i = carry
    p0 = t * bk
    page = table_ref[batch * spec.max_pages + lax.div(p0, spec.page_size)]
    page = jnp.clip(page, 0, n_pages - 1)
    at = pl.ds(lax.rem(p0, spec.page_size), bk)
    pos = p0 + jnp.arange(bk)
    # Rows before leftpad or past the end may hold anything (even NaN): never load them.
    kv_mask = _and(((pos >= pad) & (pos < end))[:, None], head_ok)
    k = _load(k_ref.at[page, at, :], kv_mask, 0.0)
    s, _ = scores.logits(_dot(q, k, trans_b=True), i, pos - pad)  # [bm, bk]
    # mask.visible's j < sk is pos < end.
    visible = km.visible(mask, i, pos - pad) & (pos >= pad)[None, :] & row_ok[:, None]
    s = jnp.where(visible, s, -_INF)
    m_new, alpha, p, l_i = km.softmax_step(m_i, l_i, s, masked=True)
    v = _load(v_ref.at[page, at, :], kv_mask, 0.0)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, l_i

  carry = (jnp.zeros((bm, dp), jnp.float32), jnp.full((bm,), -_INF, jnp.float32),
           jnp.zeros((bm,), jnp.float32))
  acc, m_i, l_i = lax.fori_loop(s_lo, s_hi, body, carry)

  # A lone split reports an empty row as +inf (the final convention); partials use -inf, the
  # identity of the lse merge.
  out, lse = km.finish(acc, m_i, l_i, empty=_INF if n_split == 1 else -_INF)
  _compat.store(o_ref.at[rows_at, :], out.astype(o_ref.dtype), mask=tile_mask)
  _compat.store(lse_ref.at[rows_at], lse, mask=row_ok)


def decode(q, k_cache, v_cache, end, leftpad, table, alibi, *, spec: DecodeSpec, interpret: bool):
  """q (b, Hk, G * sq, d) with rows r = i * G + g; caches (num_pages, page, Hk, d); end, leftpad
  (b,) int32; table (b * max_pages,) int32; alibi (b, Hk, G * sq) fp32 slopes or None.

  Returns out (b, Hk, G * sq, d) in q's dtype and lse (b, Hk, G * sq) fp32 (+inf on empty rows);
  with spec.num_splits > 1, (n_split, b, Hk, rows, d) fp32 partials and their lse (-inf where a
  split saw nothing), to be combined by `lse_merge.merge`.
  """
  b, hk, m, d = q.shape
  dp = _compat.next_power_of_2(max(d, 16))
  n_split = spec.num_splits
  n_m = pl.cdiv(m, spec.block_m)
  n_pages, page = k_cache.shape[0], k_cache.shape[1]
  q_spec = pl.BlockSpec((None, None, m, dp), lambda p, bb, h: (bb, h, 0, 0))
  cache_spec = pl.BlockSpec((n_pages, page, None, dp), lambda p, bb, h: (0, 0, h, 0))
  in_specs = [q_spec, cache_spec, cache_spec, _whole(end), _whole(leftpad), _whole(table)]
  args = [q, k_cache, v_cache, end, leftpad, table]
  if spec.alibi:
    in_specs.append(pl.BlockSpec((None, None, m), lambda p, bb, h: (bb, h, 0)))
    args.append(alibi)
  if n_split == 1:
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hk, m), jnp.float32)]
    out_specs = [q_spec, pl.BlockSpec((None, None, m), lambda p, bb, h: (bb, h, 0))]
  else:
    out_shape = [jax.ShapeDtypeStruct((n_split, b, hk, m, d), jnp.float32),
                 jax.ShapeDtypeStruct((n_split, b, hk, m), jnp.float32)]
    out_specs = [
        pl.BlockSpec((None, None, None, m, dp), lambda p, bb, h: (lax.rem(p, n_split), bb, h, 0, 0)),
        pl.BlockSpec((None, None, None, m), lambda p, bb, h: (lax.rem(p, n_split), bb, h, 0)),
    ]
  return pl.pallas_call(
      functools.partial(_decode_kernel, spec=spec),
      grid=(n_m * n_split, b, hk),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_compat.triton_params(spec.num_warps, spec.num_stages),
      interpret=interpret,
      name="pallas_attn_decode",
  )(*args)

