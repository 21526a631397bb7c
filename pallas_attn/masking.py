"""Mask rules as structure, not arrays: the kernels turn them into loop bounds over key or query tiles.

A rule answers three questions: is key j visible to query i (the element test used on boundary tiles);
which key tiles can a query tile see at all; and which of those it sees completely, so the kernel can
drop the element test there. The tile questions have transposed twins for the dK/dV pass, which walks
query tiles for a fixed key tile.

All tile arithmetic works on traced int32 scalars (program ids) as well as Python ints.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax


def _floor_div(x, n: int):
  # lax.div truncates; clamping at 0 first makes it a floor and keeps Triton's integer ops simple.
  return lax.div(jnp.maximum(x, 0), jnp.int32(n))


def _ceil_div(x, n: int):
  return _floor_div(x + (n - 1), n)


@dataclasses.dataclass(frozen=True)
class BandMask:
  """Key j is visible to query i iff 0 <= j < sk and i + off - left <= j <= i + off + right.

  off = sk - sq aligns the band to the bottom-right corner (FlashAttention-2's causal convention).
  left/right None means unbounded on that side; causal is right = 0.
  """
  sq: int
  sk: int
  left: int | None = None
  right: int | None = None

  @property
  def off(self) -> int:
    return self.sk - self.sq

  @property
  def is_dense(self) -> bool:
    return self.left is None and self.right is None

  def visible(self, rows, cols, transposed: bool = False):
    """[len(rows), len(cols)] bool (or [len(cols), len(rows)] when transposed): the element test."""
    i = (rows[None, :] if transposed else rows[:, None]) + self.off
    j = cols[:, None] if transposed else cols[None, :]
    ok = j < self.sk
    if self.right is not None:
      ok = ok & (j <= i + self.right)
    if self.left is not None:
      ok = ok & (j >= i - self.left)
    return ok

  def kv_tiles(self, q_tile, block_q: int, block_k: int):
    """(lo, full_lo, full_hi, hi): visit key tiles [lo, hi); [full_lo, full_hi) need no element test."""
    n_k = -(-self.sk // block_k)
    r0 = q_tile * block_q + self.off
    r1 = jnp.minimum(q_tile * block_q + block_q, self.sq) - 1 + self.off
    lo, hi = jnp.int32(0), jnp.int32(n_k)
    full_lo, full_hi = jnp.int32(0), jnp.int32(self.sk // block_k)
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
    n_q = -(-self.sq // block_q)
    c0 = kv_tile * block_k - self.off
    c1 = kv_tile * block_k + block_k - 1 - self.off
    lo, hi = jnp.int32(0), jnp.int32(n_q)
    full_lo, full_hi = jnp.int32(0), jnp.int32(self.sq // block_q)
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
