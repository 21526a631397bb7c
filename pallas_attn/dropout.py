"""Dropout's keep mask: a pure function of (seed, batch, head, i, j), the same in kernels and reference.

A counter-based hash (two xorshift-multiply rounds over a mix of the coordinates) replaces a stored
mask: the forward draws it tile by tile, the backward redraws the identical bits, and tests rebuild
it densely. Each hash serves two elements (16 bits each): the hash was the kernels' largest cost
with dropout on, about 12 integer operations per element before pairing. All arithmetic is int32
with wrap-around multiplication and logical shifts, which Triton, XLA and numpy agree on bit for
bit.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _i32(c: int):
  return jnp.int32(np.uint32(c).view(np.int32))


def _srl(x, n: int):
  return lax.shift_right_logical(x, jnp.int32(n))


def _fmix(x):
  x = x ^ _srl(x, 16)
  x = x * _i32(0x85EBCA6B)
  x = x ^ _srl(x, 13)
  x = x * _i32(0xC2B2AE35)
  return x ^ _srl(x, 16)


def stream(seed, batch, head, nheads: int):
  """Per-(batch, head) hash state: one scalar, computed once per program."""
  return _fmix(seed ^ ((batch * nheads + head + 1) * _i32(0x27D4EB2F)))


_ROW, _PAIR = 0x9E3779B1, 0x85EBCA77


def _xs16(x):
  return x ^ _srl(x, 16)


def _row_term(i):
  return _xs16(i * _i32(_ROW))


def _pair_term(pair, state):
  return _xs16(pair * _i32(_PAIR) + state)


def _pair_hash(row_term, pair_term):
  """32 random bits per (row, key pair): C. Wellons' lowbias32 integer hash (two xorshift-multiply
  rounds; its final xorshift left out, each 16-bit half still depends on every input bit) of
  (i * _ROW) ^ (pair * _PAIR + state). The first xorshift is linear over XOR, so it is applied to
  each coordinate's term on its own (_row_term, _pair_term): once per row or key pair, not per hash.
  """
  x = (row_term ^ pair_term) * _i32(0x7FEB352D)
  return (x ^ _srl(x, 15)) * _i32(0x846CA68B)


def threshold(p: float) -> int:
  """A 16-bit draw d keeps its element iff d >= threshold(p): probability 1 - p to within 2**-17."""
  return min(int(round(p * 2.0 ** 16)), 2 ** 16 - 1)


def kept(draw, p: float):
  """True where an element's draw (its 16 random bits in the top half of an int32) keeps it."""
  # unsigned draw >= t << 16 as a signed compare: flipping the sign bit maps unsigned order onto
  # signed order.
  return (draw ^ _i32(0x80000000)) >= jnp.int32(threshold(p) * 2 ** 16 - 2 ** 31)


def keep_at(state, i, j, p: float):
  """The definition, elementwise over broadcastable int32 rows i and key columns j: True where kept.

  Keys pair up as j and j + 8 inside each aligned group of 16, and a pair shares one 32-bit hash of
  (row, pair): key j draws its low half when (j // 8) is even, its high half when odd. The pairing
  is tiling-independent, and in Hopper's matrix-product accumulator layout one thread holds both
  keys of a pair (in either orientation), so a kernel hashes once per two elements and never
  moves mask bits between threads.
  """
  i, j = jnp.asarray(i, jnp.int32), jnp.asarray(j, jnp.int32)
  pair = (j // 16) * 8 + j % 8
  x = _pair_hash(_row_term(i), _pair_term(pair, state))
  return kept(jnp.where((j // 8) % 2 == 1, x, x << 16), p)


def draws(state, row0, n_rows: int, col0, n_cols: int, transposed: bool = False):
  """Each element's draw (see `kept`) over rows row0 + [0, n_rows) x keys col0 + [0, n_cols), as
  [n_rows, n_cols] int32 ([n_cols, n_rows] when transposed). col0 and n_cols are multiples of 16
  (a kernel's key tile).

  Hashes the [rows, n_cols / 2] pairs once and interleaves the halves back in groups of 8; the
  reshapes follow the accumulator layout, so Triton lowers them without data movement. Each
  coordinate's term is a scalar per tile plus constants (row0 * _ROW + r * _ROW, not
  (row0 + r) * _ROW): written as a product of a sum, LLVM folds the tile offset into the index with
  an OR, can no longer split off the constants, and rebuilds every row's term from the thread id
  each tile (about six instructions per hash in the dK/dV pass).
  """
  if n_cols % 16:
    raise ValueError(f"n_cols must be a multiple of 16, got {n_cols}")
  k = jnp.arange(n_cols // 2, dtype=jnp.int32)
  pair_term = _xs16(((k // 8) * 8 + k % 8) * _i32(_PAIR)
                    + (jnp.asarray(col0, jnp.int32) // 2 * _i32(_PAIR) + state))
  row_term = _xs16(jnp.arange(n_rows, dtype=jnp.int32) * _i32(_ROW)
                   + jnp.asarray(row0, jnp.int32) * _i32(_ROW))
  x = (_pair_hash(row_term[None, :], pair_term[:, None]) if transposed
       else _pair_hash(row_term[:, None], pair_term[None, :]))
  low, high = x << 16, x
  if transposed:  # [pairs, rows] -> [groups, 8, rows, 2] -> [groups, 2, 8, rows]
    low, high = low.reshape(n_cols // 16, 8, n_rows), high.reshape(n_cols // 16, 8, n_rows)
    return jnp.stack([low, high], axis=-1).transpose(0, 3, 1, 2).reshape(n_cols, n_rows)
  low, high = low.reshape(n_rows, n_cols // 16, 8), high.reshape(n_rows, n_cols // 16, 8)
  return jnp.stack([low, high], axis=-1).transpose(0, 1, 3, 2).reshape(n_rows, n_cols)


def keep(state, row0, n_rows: int, col0, n_cols: int, p: float, transposed: bool = False):
  """keep_at over a tile, laid out as `draws`."""
  return kept(draws(state, row0, n_rows, col0, n_cols, transposed), p)


def seed_from_key(key):
  """int32 (1,) seed drawn from a JAX PRNG key (typed or raw uint32)."""
  bits = jax.random.bits(key, (1,), jnp.uint32)
  return lax.bitcast_convert_type(bits, jnp.int32)


def dense_keep(seed, batch: int, nheads: int, sq: int, sk: int, p: float):
  """(batch, nheads, sq, sk) bool: the whole keep mask (tests and S_dmask)."""
  rows, cols = jnp.arange(sq)[:, None], jnp.arange(sk)[None, :]
  per = lambda b, h: keep_at(stream(seed[0], b, h, nheads), rows, cols, p)
  return jax.vmap(lambda b: jax.vmap(lambda h: per(b, h))(jnp.arange(nheads)))(jnp.arange(batch))
