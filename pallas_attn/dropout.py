"""Dropout's keep mask: a pure function of (seed, batch, head, i, j), the same in kernels and reference.

A counter-based hash (murmur3's 32-bit finalizer over a mix of the coordinates) replaces a stored
mask: the forward draws it tile by tile, the backward redraws the identical bits, and tests rebuild
it densely. All arithmetic is int32 with wrap-around multiplication and logical shifts, which Triton,
XLA and numpy agree on bit for bit.
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


def keep(state, rows, cols, p: float, transposed: bool = False):
  """bool [len(rows), len(cols)] ([len(cols), len(rows)] when transposed): True where kept.

  Each entry is kept with probability 1 - p (to within 2**-31).
  """
  i = (rows[None, :] if transposed else rows[:, None]).astype(jnp.int32)
  j = (cols[:, None] if transposed else cols[None, :]).astype(jnp.int32)
  x = _fmix((i * _i32(0x9E3779B1)) ^ (j * _i32(0x85EBCA77) + state))
  return _srl(x, 1) >= jnp.int32(min(int(round(p * 2.0 ** 31)), 2 ** 31 - 1))


def seed_from_key(key):
  """int32 (1,) seed drawn from a JAX PRNG key (typed or raw uint32)."""
  bits = jax.random.bits(key, (1,), jnp.uint32)
  return lax.bitcast_convert_type(bits, jnp.int32)


def dense_keep(seed, batch: int, nheads: int, sq: int, sk: int, p: float):
  """(batch, nheads, sq, sk) bool: the whole keep mask (tests and S_dmask)."""
  rows, cols = jnp.arange(sq), jnp.arange(sk)
  per = lambda b, h: keep(stream(seed[0], b, h, nheads), rows, cols, p)
  return jax.vmap(lambda b: jax.vmap(lambda h: per(b, h))(jnp.arange(nheads)))(jnp.arange(batch))
