"""Mask rules as structure, not arrays: the kernels turn them into loop bounds over key or query tiles.

A rule answers three questions: is key j visible to query i (the element test used on boundary tiles);
which key tiles can a query tile see at all; and which of those it sees completely, so the kernel can
drop the element test there. The tile questions have transposed twins for the dK/dV pass, which walks
query tiles for a fixed key tile.

All tile arithmetic works on traced int32 scalars (program ids) as well as Python ints.
"""
from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
from jax import lax


def _floor_div(x, n: int):
  # lax.div truncates; clamping at 0 first makes it a floor and keeps Triton's integer ops simple.
  return lax.div(jnp.maximum(x, 0), jnp.int32(n))


def _ceil_div(x, n: int):
  return _floor_div(x + (n - 1), n)


@dataclasses.dataclass(frozen=True)
class BandMask:
  """Key j is visible to query i iff 0 <= j < sk and i + off - left <= j <= i + off + right.

  off = sk - sq aligns the band to the bottom-right corner (FlashAttention-2's causal convention);
  top_left makes off = 0, the convention of jax.nn.dot_product_attention, where query i and key i
  share a position whatever the lengths (in varlen calls: per sequence, from its own start).
  left/right None means unbounded on that side; causal is right = 0.

  shift, when set, is off (whatever top_left says): query row i sits at key position i + shift. A
  ring step (pallas_attn/ring.py) uses it for a block of a longer sequence, with shift the distance
  between the block's first query and first key, so both the band and ALiBi's |i + off - j| are the
  global ones.
  """
  sq: int
  sk: int
  left: int | None = None
  right: int | None = None
  top_left: bool = False
  shift: int | None = None

  @property
  def off(self):
    if self.shift is not None:
      return self.shift
    return 0 if self.top_left else self.sk - self.sq

  @property
  def is_dense(self) -> bool:
    return self.left is None and self.right is None

  def visible(self, rows, cols, transposed: bool = False):
    """[len(rows), len(cols)] bool (or [len(cols), len(rows)] when transposed): the element test."""
    i = rows[None, :] if transposed else rows[:, None]
    j = cols[:, None] if transposed else cols[None, :]
    return self.visible_at(i, j)

  def visible_at(self, i, j):
    """The element test on broadcastable query-row indices i and key indices j (a kernel's own
    index tiles, e.g. Mosaic GPU's register layouts)."""
    i = i + self.off
    ok = j < self.sk
    if self.right is not None:
      ok = ok & (j <= i + self.right)
    if self.left is not None:
      ok = ok & (j >= i - self.left)
    return ok

  def kv_tiles(self, q_tile, block_q: int, block_k: int):
    """(lo, full_lo, full_hi, hi): visit key tiles [lo, hi); [full_lo, full_hi) need no element test."""
    r0 = q_tile * block_q + self.off
    r1 = jnp.minimum(q_tile * block_q + block_q, self.sq) - 1 + self.off
    lo, hi = jnp.int32(0), _ceil_div(self.sk, block_k)
    full_lo, full_hi = jnp.int32(0), _floor_div(self.sk, block_k)
    if self.right is not None:
      hi = jnp.minimum(hi, _ceil_div(r1 + self.right + 1, block_k))
      full_hi = jnp.minimum(full_hi, _floor_div(r0 + self.right + 1, block_k))
    if self.left is not None:
      lo = _floor_div(r0 - self.left, block_k)
      full_lo = _ceil_div(r1 - self.left, block_k)
    return _nest(lo, full_lo, full_hi, hi)

  def q_tiles(self, kv_tile, block_q: int, block_k: int):
    """(lo, full_lo, full_hi, hi) over query tiles for one key tile (the dK/dV pass).

    Key rows past sk are never stored, so they need no element test here; query tiles that run past
    sq are boundary tiles (their loads are masked).
    """
    c0 = kv_tile * block_k - self.off
    c1 = kv_tile * block_k + block_k - 1 - self.off
    lo, hi = jnp.int32(0), _ceil_div(self.sq, block_q)
    full_lo, full_hi = jnp.int32(0), _floor_div(self.sq, block_q)
    if self.right is not None:
      lo = _floor_div(c0 - self.right, block_q)
      full_lo = _ceil_div(c1 - self.right, block_q)
    if self.left is not None:
      hi = jnp.minimum(hi, _ceil_div(c1 + self.left + 1, block_q))
      full_hi = jnp.minimum(full_hi, _floor_div(c0 + self.left + 1, block_q))
    return _nest(lo, full_lo, full_hi, hi)


def _nest(lo, full_lo, full_hi, hi):
  """Clamps so that lo <= full_lo <= full_hi <= hi; an empty full range sits inside [lo, hi)."""
  hi = jnp.maximum(hi, lo)
  full_lo = jnp.clip(full_lo, lo, hi)
  full_hi = jnp.clip(full_hi, full_lo, hi)
  return lo, full_lo, full_hi, hi


def _rem(x, n: int):
  # Truncating remainder in both worlds: numpy on the host (tables), lax in kernels.
  return np.fmod(x, n) if isinstance(x, np.ndarray) else lax.rem(x, jnp.int32(n))


@dataclasses.dataclass(frozen=True)
class StridedCausalMask:
  """OpenAI sparse transformer's strided pattern: j <= i and (i - j) % stride == 0.

  It has no contiguous band, so kernels visit it through tile tables (see `tile_tables`).
  """
  sq: int
  sk: int
  stride: int
  tabled = True

  @property
  def off(self) -> int:
    return self.sk - self.sq

  def visible(self, rows, cols, transposed: bool = False):
    i = (rows[None, :] if transposed else rows[:, None]) + self.off
    j = cols[:, None] if transposed else cols[None, :]
    d = i - j
    return (j < self.sk) & (d >= 0) & (_rem(d, self.stride) == 0)


BandMask.tabled = False


@dataclasses.dataclass(frozen=True)
class TileTables:
  """FlexAttention-style block mask for one tiling: per tile, the tiles of the other axis to visit,
  split into partial ones (need the element test) and full ones (do not). Index lists are padded
  with 0 past their counts. `transposed` tables list query tiles per key tile (the dK/dV pass)."""
  partial_num: np.ndarray  # [n] int32
  partial_idx: np.ndarray  # [n, m] int32
  full_num: np.ndarray
  full_idx: np.ndarray

  def arrays(self):
    return (self.partial_num, self.partial_idx, self.full_num, self.full_idx)


@functools.lru_cache(maxsize=64)
def tile_tables(mask, block_q: int, block_k: int, transposed: bool = False) -> TileTables:
  """Classifies every (query tile, key tile) pair of any mask rule by evaluating it on the host.

  Query rows past sq count as invisible, so a boundary query tile is never 'full'.
  """
  n_q, n_k = -(-mask.sq // block_q), -(-mask.sk // block_k)
  counts = np.zeros((n_q, n_k), np.int64)
  rows_all = np.arange(n_q * block_q)
  cols_all = np.arange(n_k * block_k)
  for qt in range(n_q):
    rows = rows_all[qt * block_q:(qt + 1) * block_q]
    vis = np.asarray(mask.visible(rows, cols_all)) & (rows < mask.sq)[:, None]
    counts[qt] = vis.reshape(block_q, n_k, block_k).sum(axis=(0, 2))
  kind = np.where(counts == block_q * block_k, 2, np.where(counts > 0, 1, 0))
  if transposed:
    kind = kind.T
  return TileTables(*_lists(kind == 1), *_lists(kind == 2))


def _lists(sel: np.ndarray):
  num = sel.sum(axis=1).astype(np.int32)
  width = max(int(num.max(initial=0)), 1)
  idx = np.zeros((sel.shape[0], width), np.int32)
  for t in range(sel.shape[0]):
    hits = np.nonzero(sel[t])[0]
    idx[t, :len(hits)] = hits
  return num, idx


def band_tiles(mask: BandMask, block_q: int, block_k: int, transposed: bool = False):
  """The band's loop bounds as (partial, full) tile lists, for checking them against a dense mask."""
  out = []
  n = -(-(mask.sk if transposed else mask.sq) // (block_k if transposed else block_q))
  for t in range(n):
    bounds = (mask.q_tiles if transposed else mask.kv_tiles)(t, block_q, block_k)
    lo, flo, fhi, hi = (int(x) for x in bounds)
    out.append((sorted(set(range(lo, flo)) | set(range(fhi, hi))), list(range(flo, fhi))))
  return out


def dynamic_counts(keep, mask, grain_q: int, grain_k: int):
  """Visible elements per (grain_q x grain_k) block of a data-dependent element mask: the one pass
  over the whole mask that tile tables need (`tables_from_counts` turns it into any coarser tiling).

  keep (b, hk, sq, sk): key j is visible to query i where keep > 0 and the rule `mask` allows it.
  Returns (b, hk, ceil(sq / grain_q), ceil(sk / grain_k)) int32; rows and columns past the ends
  count as invisible.
  """
  b, hk, sq, sk = keep.shape
  n_q, n_k = -(-sq // grain_q), -(-sk // grain_k)
  vis = (keep > 0) & mask.visible(jnp.arange(sq), jnp.arange(sk))
  vis = jnp.pad(vis, ((0, 0), (0, 0), (0, n_q * grain_q - sq), (0, n_k * grain_k - sk)))
  return jnp.sum(vis.reshape(b, hk, n_q, grain_q, n_k, grain_k), axis=(3, 5), dtype=jnp.int32)


def tables_from_counts(counts, grain_q: int, grain_k: int, block_q: int, block_k: int,
                       transposed: bool = False):
  """Tile tables of a tiling with blocks that are multiples of the counts' grain, per (batch, kv head).

  Returns (partial_num, partial_idx, full_num, full_idx) with the TileTables layout plus two leading
  axes (b, hk): a tile with no visible element is listed nowhere, so the kernels never load it (nor
  its slice of the mask), and a fully visible one skips the element test.
  """
  rq, rk = block_q // grain_q, block_k // grain_k
  b, hk, n_q, n_k = counts.shape
  counts = jnp.pad(counts, ((0, 0), (0, 0), (0, -n_q % rq), (0, -n_k % rk)))
  counts = jnp.sum(counts.reshape(b, hk, -(-n_q // rq), rq, -(-n_k // rk), rk), axis=(3, 5))
  if transposed:
    counts = jnp.swapaxes(counts, -1, -2)
  full = counts == block_q * block_k
  partial = (counts > 0) & ~full
  return (*_traced_lists(partial), *_traced_lists(full))


def dynamic_tables(keep, mask, block_q: int, block_k: int, transposed: bool = False):
  """tables_from_counts of dynamic_counts at the tiling's own block size."""
  counts = dynamic_counts(keep, mask, block_q, block_k)
  return tables_from_counts(counts, block_q, block_k, block_q, block_k, transposed)


def _traced_lists(sel):
  # A stable sort of "not selected" puts each row's selected indices first, in ascending order.
  num = jnp.sum(sel, axis=-1, dtype=jnp.int32)
  idx = jnp.argsort(jnp.logical_not(sel), axis=-1, stable=True).astype(jnp.int32)
  return num, idx
