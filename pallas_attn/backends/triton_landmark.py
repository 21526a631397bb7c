"""Landmark attention (SPEC section 3) as Triton-lowered Pallas calls, on the flash kernel family's pieces.

Layout is the original's: q (B, H, Lq, dp), k/v (B, H, Lk, dp), Lk = Lq + n_hist, query row m at absolute
position p = m + n_hist; dp is the head dim padded to a power of two (masked on load, as in triton_flash).

A key tile is exactly one landmark block (block_k = bs), so a tile's within-block softmax never leaves
the tile and its landmark logit is one more entry of flash's online (outer) softmax. Query p sees key
tile t in one of three modes:
- landmark (t < p // bs): the outer logit L_t (the tile's last key); the tile's ordinary values enter
  with weight exp(L_t) * w_t, w_t the softmax of the tile's ordinary logits;
- own (t == p // bs): the ordinary keys j <= p join the outer softmax themselves (the landmark is
  never among them: it is >= p, and equal only when p is the landmark, which then skips itself);
- invisible (t > p // bs).
A query tile spanning positions [p0, p1] sees tiles [0, p0 // bs) all in landmark mode, so those run
without an element test, and [p0 // bs, p1 // bs] in mixed modes with it.

Backward: with P the effective weights (a_t * w_t in landmark mode, a_t = exp(L_t - lse); exp(s - lse)
in own mode), dP = dO V^T, delta = rowsum(dO * O) and E_t = rowsum(w_t * dP) over the tile:
  dV = P^T dO;  own: dS = P (dP - delta);  landmark: dS = P (dP - E_t) on ordinary keys and
  a_t (E_t - delta) on the landmark key. An lse cotangent enters as delta - dlse (as in flash).
E_t is tile-local, so the two passes keep flash's shape: dQ per query tile (also writing delta), and
dK/dV per key tile walking the query tiles that see it (no atomics, deterministic).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_attn import _compat
from pallas_attn.backends import kernel_math as km
from pallas_attn.backends.triton_flash import (_alias_into, _and, _dot, _head_mask, _load, _store,
                                              _tile_loops)
from pallas_attn.masking import _ceil_div, _floor_div, _nest
from pallas_attn.spec import LOG2E
from pallas_attn.tiles import KernelConfigs, TileConfig

_INF = float("inf")


@dataclasses.dataclass(frozen=True)
class LandmarkSpec:
  """Static description of one landmark problem (hashable: a jit static argument)."""
  sq: int
  sk: int
  block_size: int
  scale: float

  @property
  def n_hist(self) -> int:
    return self.sk - self.sq


# Unmeasured starting points (bench/landmark.py measures them): the forward takes flash's 128-row query
# tiles, both backward passes flash's 64-row ones; 128-key blocks double the score tile, hence 8 warps.
_SMEM_BUDGET = 160 * 1024  # of the H100's 227 KiB per block, leaving room for Triton's own scratch


def configs(spec: LandmarkSpec, head_dim_padded: int, itemsize: int,
            override: KernelConfigs | None = None) -> KernelConfigs:
  """Tile configs with block_k forced to the landmark block and block_q fitted to the problem.

  Pipelined key/value tiles take num_stages * 2 * bs * dp elements of shared memory next to the
  query tile's block_q * dp (twice that in the backward, for dout); stages, then query rows, are cut
  until that fits (fp32 at bs = 128).
  """
  bs, dp = spec.block_size, head_dim_padded
  if override is None:
    warps = 8 if bs >= 128 or dp > 128 else 4
    fwd_q = 64 if dp > 128 else 128
    bwd_q = 32 if dp > 128 else 64
    override = KernelConfigs(TileConfig(fwd_q, bs, warps, 2), TileConfig(bwd_q, bs, warps, 2),
                             TileConfig(bwd_q, bs, warps, 2))

  def fit(cfg: TileConfig, resident_rows: int) -> TileConfig:
    bq = max(16, min(cfg.block_q, _compat.next_power_of_2(max(spec.sq, 1))))
    stages = cfg.num_stages
    smem = lambda bq, stages: itemsize * dp * (resident_rows * bq + 2 * bs * stages)
    while stages > 1 and smem(bq, stages) > _SMEM_BUDGET:
      stages -= 1
    while bq > 16 and smem(bq, stages) > _SMEM_BUDGET:
      bq //= 2
    return dataclasses.replace(cfg, block_q=bq, block_k=bs, num_stages=stages)

  # The backward passes hold two row tiles (q and dout) where the forward holds one: an fp32 bs = 128,
  # d = 128 backward fitted with one asked the H100 for 256 KiB.
  return KernelConfigs(fit(override.fwd, 1), fit(override.bwd_dq, 2), fit(override.bwd_dkv, 2))


# ----------------------------------------------------------------------------------------------------
# Tile-local pieces. Every pass lays its scores out [queries, keys]: the within-block softmax then
# reduces along the keys inside each thread's rows. The dK/dV pass once used flash's transposed
# [keys, queries] tile, where those reductions cross warps through shared memory; on the H100 at
# (2, 16, 8192, 128) its forward+backward took 9.04 ms against 5.99 ms in this layout (2026-11-27).


def _landmark_key(bs: int):
  return (jnp.arange(bs) == bs - 1)[None, :]


def _split_block(s):
  """(L, pn, inv): each query's landmark logit in this tile, and the tile's within-block softmax
  over its ordinary keys as pn * inv (pn = exp2(logit - max), 0 on the landmark; inv = 1 / sum pn).

  s holds log2-domain logits. Every block has bs - 1 >= 15 finite ordinary logits (keys past the end
  load as 0), so the within-block max is finite and sum pn >= 1. The normalization stays a per-query
  factor so callers fold it into their own per-query scale instead of dividing the whole tile.
  """
  landmark = _landmark_key(s.shape[1])
  lmk = jnp.max(jnp.where(landmark, s, -_INF), axis=1)
  ordinary = jnp.where(landmark, -_INF, s)
  pn = jnp.exp2(ordinary - jnp.max(ordinary, axis=1)[:, None])
  return lmk, pn, 1.0 / jnp.sum(pn, axis=1)


def _modes(pos, start, bs: int):
  """(landmark rows [n], own-visible keys [n, bs]) of key tile [start, start + bs)."""
  cols = start + jnp.arange(bs)
  landmark_mode = pos >= start + bs
  p, j = pos[:, None], cols[None, :]
  # j >= start makes j <= p imply p >= start; j <= p on an ordinary key is j <= p'.
  own = (j <= p) & (pos < start + bs)[:, None] & ~_landmark_key(bs)
  return landmark_mode, own


def _grad_scores(p, dpv, a, e, delta, dlt):
  """dS (natural-log logits) of one tile; dlt is E_t for landmark-mode queries and delta for own mode."""
  landmark = _landmark_key(p.shape[1])
  return km.logit_grad(p, p, dpv, dlt[:, None]) + jnp.where(landmark, (a * (e - delta))[:, None], 0.0)


# ----------------------------------------------------------------------------------------------------
# Forward


def _q_tile(pid, n_q_tiles: int):
  # Later query tiles see more blocks; launching them first evens out the tail (as flash's causal).
  return n_q_tiles - 1 - pid


def _kv_bounds(spec: LandmarkSpec, q_tile, bq: int):
  """Key tiles of a query tile: [0, full_hi) all in landmark mode, [full_hi, hi) mixed."""
  p0 = q_tile * bq + spec.n_hist
  p1 = jnp.minimum(q_tile * bq + bq, spec.sq) - 1 + spec.n_hist
  full_hi = _floor_div(p0, spec.block_size)
  hi = _floor_div(p1, spec.block_size) + 1
  zero = jnp.int32(0)
  return zero, zero, full_hi, hi


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, spec: LandmarkSpec, cfg: TileConfig,
                head_dim: int, n_q_tiles: int):
  bq, bs = cfg.block_q, spec.block_size
  dp = q_ref.shape[-1]
  q_tile = _q_tile(pl.program_id(0), n_q_tiles)
  rows = q_tile * bq + jnp.arange(bq)
  row_ok = rows < spec.sq
  pos = rows + spec.n_hist
  head_ok = _head_mask(dp, head_dim)
  tile_mask = _and(row_ok[:, None], head_ok)
  q = _load(q_ref, tile_mask, 0.0)
  scale = spec.scale * LOG2E

  def body(kv_tile, carry, masked):
    acc, m_i, l_i = carry
    start = kv_tile * bs
    kv_mask = _and(((start + jnp.arange(bs)) < spec.sk)[:, None], head_ok) if masked else head_ok
    k = _load(k_ref.at[pl.ds(start, bs), :], kv_mask, 0.0)
    v = _load(v_ref.at[pl.ds(start, bs), :], kv_mask, 0.0)
    s = _dot(q, k, trans_b=True) * scale  # [bq, bs]
    lmk, pn, inv = _split_block(s)
    if masked:
      landmark_mode, own = _modes(pos, start, bs)
      lmk = jnp.where(landmark_mode, lmk, -_INF)
      s_own = jnp.where(own, s, -_INF)
      m_new, m_use, alpha = km.running_max(m_i, jnp.maximum(lmk, jnp.max(s_own, axis=1)), True)
      # Each row is either landmark or own mode here (or sees nothing yet), so the terms just add.
      beta = jnp.exp2(lmk - m_use)
      p_own = jnp.exp2(s_own - m_use[:, None])
      p = pn * (beta * inv)[:, None] + p_own
      l_add = beta + jnp.sum(p_own, axis=1)
    else:
      m_new, m_use, alpha = km.running_max(m_i, lmk, False)
      beta = jnp.exp2(lmk - m_use)
      p = pn * (beta * inv)[:, None]
      l_add = beta
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, l_i * alpha + l_add

  carry = (jnp.zeros((bq, dp), jnp.float32), jnp.full((bq,), -_INF, jnp.float32),
           jnp.zeros((bq,), jnp.float32))
  acc, m_i, l_i = _tile_loops(_kv_bounds(spec, q_tile, bq), body, carry)
  # Every real row sees at least its own block's first key, so l_i > 0; padding rows are not stored.
  out, lse = km.finish(acc, m_i, l_i)
  _store(o_ref, out.astype(o_ref.dtype), tile_mask)
  _store(lse_ref, lse, row_ok)


def _skip_aliased(kernel, n_inputs: int, n_outputs: int):
  """The kernel as pallas_call sees it when `into` buffers are aliased: they arrive as inputs after the
  real ones, and the kernel only writes its outputs, so it never looks at them."""
  return lambda *refs: kernel(*refs[:n_inputs], *refs[len(refs) - n_outputs:])


def _row_tiles(n_q: int):
  return lambda i, b, h: (b, h, _q_tile(i, n_q), 0)


def _row_vec(n_q: int):
  return lambda i, b, h: (b, h, _q_tile(i, n_q))


def forward(q, k, v, *, spec: LandmarkSpec, cfgs: KernelConfigs, head_dim: int, interpret: bool,
            into=None):
  """out like q and lse (B, H, Lq) fp32 (natural log of the outer softmax's normalizer)."""
  b, h, sq, d = q.shape
  dp = _compat.next_power_of_2(max(d, 16))
  cfg = cfgs.fwd
  n_q = pl.cdiv(sq, cfg.block_q)
  q_spec = pl.BlockSpec((None, None, cfg.block_q, dp), _row_tiles(n_q))
  kv_spec = pl.BlockSpec((None, None, spec.sk, dp), lambda i, bb, hh: (bb, hh, 0, 0))
  out_specs = [q_spec, pl.BlockSpec((None, None, cfg.block_q), _row_vec(n_q))]
  in_specs, args, aliases = _alias_into([q_spec, kv_spec, kv_spec], [q, k, v], out_specs, into)
  return pl.pallas_call(
      _skip_aliased(functools.partial(_fwd_kernel, spec=spec, cfg=cfg, head_dim=head_dim, n_q_tiles=n_q),
                    3, 2),
      grid=(n_q, b, h),
      in_specs=in_specs,
      out_specs=out_specs,
      input_output_aliases=aliases,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, sq), jnp.float32)],
      compiler_params=_compat.triton_params(cfg.num_warps, cfg.num_stages),
      interpret=interpret,
      name="pallas_attn_landmark_fwd",
  )(*args)


# ----------------------------------------------------------------------------------------------------
# Backward


def _tile_grads(spec: LandmarkSpec, q, k, v, do, lse2, delta, pos, start, masked: bool):
  """(P, dS) of one [queries, keys] tile, both backward passes' shared core: P the attention weights,
  dS the gradient of the natural-log logits."""
  bs = spec.block_size
  s = _dot(q, k, trans_b=True) * (spec.scale * LOG2E)  # [bq, bs]
  lmk, pn, inv = _split_block(s)
  dpv = _dot(do, v, trans_b=True)
  e = jnp.sum(pn * dpv, axis=1) * inv
  if masked:
    landmark_mode, own = _modes(pos, start, bs)
    a = jnp.exp2(jnp.where(landmark_mode, lmk, -_INF) - lse2)
    p = pn * (a * inv)[:, None] + jnp.exp2(jnp.where(own, s, -_INF) - lse2[:, None])
    return p, _grad_scores(p, dpv, a, e, delta, jnp.where(landmark_mode, e, delta))
  a = jnp.exp2(lmk - lse2)
  p = pn * (a * inv)[:, None]
  return p, _grad_scores(p, dpv, a, e, delta, e)


def _dq_kernel(q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, dlse_ref, dq_ref, delta_ref, *,
               spec: LandmarkSpec, cfg: TileConfig, head_dim: int, n_q_tiles: int):
  bq, bs = cfg.block_q, spec.block_size
  dp = q_ref.shape[-1]
  q_tile = _q_tile(pl.program_id(0), n_q_tiles)
  rows = q_tile * bq + jnp.arange(bq)
  row_ok = rows < spec.sq
  pos = rows + spec.n_hist
  head_ok = _head_mask(dp, head_dim)
  tile_mask = _and(row_ok[:, None], head_ok)
  q = _load(q_ref, tile_mask, 0.0)
  do = _load(do_ref, tile_mask, 0.0)
  o = _load(o_ref, tile_mask, 0.0)
  # d lse / d (outer logit) is its outer probability, so an lse cotangent folds into delta (as in flash).
  delta = km.o_dot_do(o, do) - _compat.load(dlse_ref, mask=row_ok, other=0.0)
  # Padding rows get lse = +inf, which zeroes every weight they would contribute.
  lse2 = _compat.load(lse_ref, mask=row_ok, other=_INF) * LOG2E

  def body(kv_tile, dq, masked):
    start = kv_tile * bs
    kv_mask = _and(((start + jnp.arange(bs)) < spec.sk)[:, None], head_ok) if masked else head_ok
    k = _load(k_ref.at[pl.ds(start, bs), :], kv_mask, 0.0)
    v = _load(v_ref.at[pl.ds(start, bs), :], kv_mask, 0.0)
    _, ds = _tile_grads(spec, q, k, v, do, lse2, delta, pos, start, masked)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = _tile_loops(_kv_bounds(spec, q_tile, bq), body, jnp.zeros((bq, dp), jnp.float32))
  _store(dq_ref, (dq * spec.scale).astype(dq_ref.dtype), tile_mask)
  _store(delta_ref, delta, row_ok)


def _q_bounds(spec: LandmarkSpec, kv_tile, bq: int):
  """Query tiles that see key tile kv_tile: [lo, full_lo) own/mixed, [full_lo, full_hi) all landmark."""
  bs = spec.block_size
  n_q = -(-spec.sq // bq)
  lo = _floor_div(kv_tile * bs - spec.n_hist, bq)
  full_lo = _ceil_div(kv_tile * bs + bs - spec.n_hist, bq)
  return _nest(lo, full_lo, jnp.int32(spec.sq // bq), jnp.int32(n_q))


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, spec: LandmarkSpec,
                cfg: TileConfig, head_dim: int):
  bq, bs = cfg.block_q, spec.block_size
  dp = k_ref.shape[-1]
  kv_tile = pl.program_id(0)
  start_k = kv_tile * bs
  col_ok = start_k + jnp.arange(bs) < spec.sk
  head_ok = _head_mask(dp, head_dim)
  tile_mask = _and(col_ok[:, None], head_ok)
  k = _load(k_ref, tile_mask, 0.0)
  v = _load(v_ref, tile_mask, 0.0)

  def body(q_tile, carry, masked):
    dk, dv = carry
    start = q_tile * bq
    rows = start + jnp.arange(bq)
    row_ok = rows < spec.sq
    q_mask = _and(row_ok[:, None], head_ok) if masked else head_ok
    q = _load(q_ref.at[pl.ds(start, bq), :], q_mask, 0.0)
    do = _load(do_ref.at[pl.ds(start, bq), :], q_mask, 0.0)
    lse2 = _compat.load(lse_ref.at[pl.ds(start, bq)], mask=row_ok, other=_INF) * LOG2E
    delta = _compat.load(delta_ref.at[pl.ds(start, bq)], mask=row_ok, other=0.0)
    p, ds = _tile_grads(spec, q, k, v, do, lse2, delta, rows + spec.n_hist, start_k, masked)
    return (dk + _dot(ds.astype(q.dtype), q, trans_a=True),
            dv + _dot(p.astype(do.dtype), do, trans_a=True))

  zeros = jnp.zeros((bs, dp), jnp.float32)
  dk, dv = _tile_loops(_q_bounds(spec, kv_tile, bq), body, (zeros, zeros))
  _store(dk_ref, (dk * spec.scale).astype(dk_ref.dtype), tile_mask)
  _store(dv_ref, dv.astype(dv_ref.dtype), tile_mask)


def backward(q, k, v, out, lse, dout, dlse, *, spec: LandmarkSpec, cfgs: KernelConfigs, head_dim: int,
             interpret: bool, into=None):
  """dq, dk, dv for cotangents dout (like out) and dlse ((B, H, Lq) fp32) in the input dtypes.

  into: optional (dq, dk, dv) buffers to write them into.
  """
  b, h, sq, d = q.shape
  dp = _compat.next_power_of_2(max(d, 16))
  bs = spec.block_size

  cfg = cfgs.bwd_dq
  n_q = pl.cdiv(sq, cfg.block_q)
  q_spec = pl.BlockSpec((None, None, cfg.block_q, dp), _row_tiles(n_q))
  rows_spec = pl.BlockSpec((None, None, cfg.block_q), _row_vec(n_q))
  kv_full = pl.BlockSpec((None, None, spec.sk, dp), lambda i, bb, hh: (bb, hh, 0, 0))
  dq_into = None if into is None else (into[0], jnp.empty((b, h, sq), jnp.float32))
  in_specs, args, aliases = _alias_into([q_spec, kv_full, kv_full, q_spec, q_spec, rows_spec, rows_spec],
                                        [q, k, v, out, dout, lse, dlse], [q_spec, rows_spec], dq_into)
  dq, delta = pl.pallas_call(
      _skip_aliased(functools.partial(_dq_kernel, spec=spec, cfg=cfg, head_dim=head_dim, n_q_tiles=n_q),
                    7, 2),
      grid=(n_q, b, h),
      in_specs=in_specs,
      out_specs=[q_spec, rows_spec],
      input_output_aliases=aliases,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, sq), jnp.float32)],
      compiler_params=_compat.triton_params(cfg.num_warps, cfg.num_stages),
      interpret=interpret,
      name="pallas_attn_landmark_bwd_dq",
  )(*args)

  cfg = cfgs.bwd_dkv
  n_k = pl.cdiv(spec.sk, bs)
  kv_spec = pl.BlockSpec((None, None, bs, dp), lambda i, bb, hh: (bb, hh, i, 0))
  q_full = pl.BlockSpec((None, None, sq, dp), lambda i, bb, hh: (bb, hh, 0, 0))
  rows_full = pl.BlockSpec((None, None, sq), lambda i, bb, hh: (bb, hh, 0))
  in_specs, args, aliases = _alias_into([q_full, kv_spec, kv_spec, q_full, rows_full, rows_full],
                                        [q, k, v, dout, lse, delta], [kv_spec, kv_spec],
                                        None if into is None else into[1:])
  dk, dv = pl.pallas_call(
      _skip_aliased(functools.partial(_dkv_kernel, spec=spec, cfg=cfg, head_dim=head_dim), 6, 2),
      grid=(n_k, b, h),
      in_specs=in_specs,
      out_specs=[kv_spec, kv_spec],
      input_output_aliases=aliases,
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_compat.triton_params(cfg.num_warps, cfg.num_stages),
      interpret=interpret,
      name="pallas_attn_landmark_bwd_dkv",
  )(*args)
  return dq, dk, dv
