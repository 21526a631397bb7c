"""The band mask's tile ranges against its element test, exhaustively over small shapes.

The kernels visit key tiles [lo, hi) per query tile (and query tiles per key tile in the dK/dV pass)
and drop the element test on [full_lo, full_hi). An off-by-one there only shows in a parity test when a
band edge lands on a particular residue modulo the tile size, which a sampled sweep rarely hits; here
every residue is checked without compiling a kernel.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from pallas_attn.spec import band_from_window

LENGTHS = [1, 7, 16, 17, 31, 48, 113, 203]
WINDOWS = [(False, (-1, -1)), (True, (-1, -1)), (False, (0, 0)), (False, (-1, 0)), (True, (5, -1)),
           (False, (3, -1)), (False, (17, -1)), (False, (-1, 1)), (False, (-1, 16)), (False, (15, 2)),
           (False, (40, 33)), (False, (1, 0))]
TILES = [(16, 16), (32, 16), (16, 32), (64, 32), (128, 64)]


def _per_tile(m, bq, bk, reduce):
  """[n_q, n_k] reduction of an (n_q * bq, n_k * bk) bool matrix over each tile."""
  n_q, n_k = m.shape[0] // bq, m.shape[1] // bk
  return reduce(m.reshape(n_q, bq, n_k, bk), axis=(1, 3))


def _ranges(fn, n, bq, bk):
  return [np.asarray(x) * np.ones(n, np.int64) for x in fn(np.arange(n, dtype=np.int32), bq, bk)]


@pytest.mark.parametrize("bq,bk", TILES)
def test_tile_ranges_cover_the_band(bq, bk):
  checked = 0
  for sq, sk, (causal, window) in itertools.product(LENGTHS, LENGTHS, WINDOWS):
    mask = band_from_window(sq, sk, causal, window)
    n_q, n_k = -(-sq // bq), -(-sk // bk)
    rows_ok = np.arange(n_q * bq) < sq
    cols_ok = np.arange(n_k * bk) < sk
    vis = np.zeros((n_q * bq, n_k * bk), bool)
    vis[:sq, :sk] = mask.visible(np.arange(sq), np.arange(sk))
    seen = _per_tile(vis, bq, bk, np.any)
    # Forward and dQ: a full key tile lies inside sk and is visible to every real row of the query tile.
    full_fwd = _per_tile(vis | ~rows_ok[:, None], bq, bk, np.all)
    # dK/dV: a full query tile lies inside sq and sees every real key of the key tile.
    full_bwd = _per_tile(vis | ~cols_ok[None, :], bq, bk, np.all)
    where = f"sq={sq} sk={sk} causal={causal} window={window} tiles=({bq}, {bk})"

    lo, full_lo, full_hi, hi = _ranges(mask.kv_tiles, n_q, bq, bk)
    u = np.arange(n_k)[None, :]
    assert np.all((0 <= lo) & (lo <= full_lo) & (full_lo <= full_hi) & (full_hi <= hi) & (hi <= n_k)), where
    visit = (lo[:, None] <= u) & (u < hi[:, None])
    full = (full_lo[:, None] <= u) & (u < full_hi[:, None])
    assert not np.any(seen & ~visit), f"kv_tiles skips a key tile with visible keys: {where}"
    assert not np.any(full & ~full_fwd), f"kv_tiles drops the element test on a partial tile: {where}"

    lo, full_lo, full_hi, hi = _ranges(mask.q_tiles, n_k, bq, bk)
    t = np.arange(n_q)[None, :]
    assert np.all((0 <= lo) & (lo <= full_lo) & (full_lo <= full_hi) & (full_hi <= hi) & (hi <= n_q)), where
    visit = (lo[:, None] <= t) & (t < hi[:, None])
    full = (full_lo[:, None] <= t) & (t < full_hi[:, None])
    assert not np.any(seen.T & ~visit), f"q_tiles skips a query tile that sees the key tile: {where}"
    assert not np.any(full & ~full_bwd.T), f"q_tiles drops the element test on a partial tile: {where}"
    checked += 1
  assert checked == len(LENGTHS) ** 2 * len(WINDOWS)


# ----------------------------------------------------------------------------------------------------
# Shared-memory fit (tiles.fit_shared_memory): estimates against what Triton requested on the H200.

from pallas_attn import tiles  # noqa: E402


def test_smem_estimate_reproduces_the_reported_overflow():
  """flash_dma.fwd, fp32, d=64 (bias and keep fp32): Triton asked for 262144 bytes, the H200 has
  232448 (measured while fp32 dots were Triton's ieee loop, before the bf16 split); the fitted
  config must drop below that limit and keep the tile shape if it can."""
  cfg = tiles.resolve(64, 80, 96, None, 4).fwd
  staged = (tiles.shared_memory_bytes("fwd", cfg, 64, 4, pair_bytes=8)
            - tiles.split_operand_bytes("fwd", cfg, 64, 4))
  assert staged == 262144
  fitted = tiles.fit_shared_memory("fwd", cfg, 64, 4, pair_bytes=8, limit=232448)
  assert tiles.shared_memory_bytes("fwd", fitted, 64, 4, pair_bytes=8) <= 232448
  assert (fitted.block_q, fitted.block_k, fitted.num_stages) == (128, 64, 2)


def test_fp32_split_operands_are_counted():
  """fp32 dots run as BF16_BF16_F32_X6: every B operand of a loop step is held again as three bf16
  pieces (6 bytes per element) next to its fp32 tile; 16-bit inputs add nothing."""
  cfg = tiles.TileConfig(128, 64, 4, 2)
  assert tiles.split_operand_bytes("fwd", cfg, 128, 4) == 2 * 6 * 64 * 128  # k and v
  assert tiles.split_operand_bytes("bwd_dq", cfg, 128, 4) == 3 * 6 * 64 * 128  # k, v, k
  assert tiles.split_operand_bytes("bwd_dkv", cfg, 128, 4) == 4 * 6 * 128 * 128  # q, dO, dO, q
  for kind in ("fwd", "bwd_dq", "bwd_dkv"):
    assert tiles.split_operand_bytes(kind, cfg, 128, 2) == 0


def test_fit_configs_shrinks_fp32_where_bf16_fits():
  """flash_dma fp32 d=128 (fp32 bias and keep) on an H200-sized limit: the table's tiles fitted
  without the split pieces (224 KiB of 227 KiB for the forward) but not with them, so fit_configs
  picks smaller tiles for every kernel, each within the limit; bf16 keeps the table's tiles."""
  limit, dp = 232448, 128
  cfgs = tiles.resolve(dp, 4096, 4096, None, 4)
  fwd_staged = (tiles.shared_memory_bytes("fwd", cfgs.fwd, dp, 4, 8)
                - tiles.split_operand_bytes("fwd", cfgs.fwd, dp, 4))
  assert fwd_staged <= limit < tiles.shared_memory_bytes("fwd", cfgs.fwd, dp, 4, 8)
  fitted = tiles.fit_configs(cfgs, dp, 4, 8, limit)
  for kind in ("fwd", "bwd_dq", "bwd_dkv"):
    got, table = getattr(fitted, kind), getattr(cfgs, kind)
    assert got.block_q * got.block_k < table.block_q * table.block_k, kind
    assert tiles.shared_memory_bytes(kind, got, dp, 4, 8) <= limit, kind
  assert (fitted.fwd.block_q, fitted.fwd.block_k) == (64, 32)
  bf16 = tiles.resolve(dp, 4096, 4096, None, 2)
  assert tiles.fit_configs(bf16, dp, 2, 4, limit) == bf16
  # A limit that fits nothing larger ends at the 16 x 16 floor rather than looping.
  floor = tiles.fit_configs(cfgs, dp, 4, 8, 1)
  assert all((c.block_q, c.block_k) == (16, 16) for c in (floor.fwd, floor.bwd_dq, floor.bwd_dkv))


@pytest.mark.parametrize("limit", [48 * 1024, 101376, 232448])
@pytest.mark.parametrize("dp", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("itemsize,pair", [(2, 0), (4, 0), (2, 4), (4, 8)])
def test_fit_respects_any_limit(limit, dp, itemsize, pair):
  """Every kernel of the table, shrunk for a limit, fits it (or is at the 16 x 16 floor); configs
  that fit already come back unchanged."""
  for kind in ("fwd", "bwd_dq", "bwd_dkv"):
    cfg = getattr(tiles.resolve(dp, 4096, 4096, None, itemsize), kind)
    fitted = tiles.fit_shared_memory(kind, cfg, dp, itemsize, pair, limit)
    need = tiles.shared_memory_bytes(kind, fitted, dp, itemsize, pair)
    assert need <= limit or (fitted.block_q, fitted.block_k) == (16, 16), (kind, fitted, need)
    if tiles.shared_memory_bytes(kind, cfg, dp, itemsize, pair) <= limit:
      assert fitted == cfg
    assert tiles.fit_shared_memory(kind, cfg, dp, itemsize, pair, None) == cfg


def test_gpu_lowering_fits_the_device_limit(monkeypatch):
  """The GPU branch of each kernel call asks fit_configs with the device's limit and the dynamic
  mask's element bytes (lowered for CUDA on the CPU, with a pretend limit)."""
  import jax
  import jax.numpy as jnp
  from pallas_attn import flash_dma

  seen = []
  real = tiles.fit_configs
  monkeypatch.setattr(tiles, "shared_memory_limit", lambda: 100_000)

  def spy(cfgs, dp, itemsize, pair_bytes=0, limit=None):
    fitted = real(cfgs, dp, itemsize, pair_bytes, limit)
    seen.append((dp, itemsize, pair_bytes, limit, fitted))
    return fitted

  monkeypatch.setattr(tiles, "fit_configs", spy)
  q = jnp.zeros((2, 80, 4, 64), jnp.float32)
  k = jnp.zeros((2, 96, 2, 64), jnp.float32)
  zoh = jnp.zeros((2, 2, 80, 96), jnp.float32)

  def f(q, k, v, zoh, mask):
    fwd = lambda q, k, v, z: tuple(flash_dma.fwd(q, k, v, z, mask, is_causal=True)[:2])
    (out, _), vjp = jax.vjp(fwd, q, k, v, zoh)
    return vjp((out, jnp.zeros((2, 4, 80), jnp.float32)))

  jax.jit(f).trace(q, k, k, zoh, zoh).lower(lowering_platforms=("cuda",))
  assert len(seen) == 2  # forward and backward
  for dp, itemsize, pair, limit, fitted in seen:
    assert (dp, itemsize, pair, limit) == (64, 4, 8, 100_000)
    for kind in ("fwd", "bwd_dq", "bwd_dkv"):
      assert tiles.shared_memory_bytes(kind, getattr(fitted, kind), 64, 4, 8) <= 100_000


def test_fp32_gets_its_own_gpu_tiles_and_overrides_do_not():
  """fp32 kernels on the GPU use _FP32_GPU's smaller tiles (compile time, spills); interpret mode and
  a caller's override keep theirs."""
  from pallas_attn.backends import triton_flash  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  cfgs = tiles.resolve(128, 4096, 4096, itemsize=4)
  assert cfgs.on_gpu is not None and cfgs.on_gpu.fwd == tiles._FP32_GPU[128].fwd  # pylint: disable=protected-access
  assert tiles.resolve(128, 4096, 4096, itemsize=2).on_gpu is None
  override = tiles.KernelConfigs(tiles.TileConfig(32, 32), tiles.TileConfig(32, 32), tiles.TileConfig(32, 32))
  assert tiles.resolve(128, 4096, 4096, override, itemsize=4).on_gpu is None
  q = jnp.zeros((1, 8, 1, 128), jnp.float32)
  assert triton_flash._fit_device(cfgs, 128, q, None, None, interpret=True) == cfgs  # pylint: disable=protected-access
  on_gpu = triton_flash._fit_device(cfgs, 128, q, None, None, interpret=False)  # pylint: disable=protected-access
  assert on_gpu.fwd.block_q <= tiles._FP32_GPU[128].fwd.block_q and on_gpu.fwd.num_warps == 8  # pylint: disable=protected-access
