"""Tile shapes, warps and pipeline stages per kernel, chosen from H100 measurements.

Resolution: an explicit TileConfig passed by the caller, else the table below, else the fallback.
Every table row names the measurement behind it.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import os

import jax

from pallas_attn import _compat


@dataclasses.dataclass(frozen=True)
class TileConfig:
  block_q: int
  block_k: int
  num_warps: int = 4
  num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class KernelConfigs:
  fwd: TileConfig
  bwd_dq: TileConfig
  bwd_dkv: TileConfig
  # Tiles the GPU lowering uses instead (interpret mode keeps the ones above): set by resolve() for
  # fp32 from _FP32_GPU, never for a caller's override.
  on_gpu: "KernelConfigs | None" = None


# Keyed by head dim bucket. Evidence, H100 bf16 at (b, H, s, d) = (4, 16, 4096, 128), TFLOP/s (fwd / fwd+bwd):
# - ours, this table (fwd 128x64 w4 s2, both backward passes 64x64 w4 s2): 453 / 379 non-causal,
#   390 / 344 causal (bench/tune.py, 2026-11-23). Backward alternatives, non-causal fwd+bwd:
#   dQ 128x32 + dK/dV 32x128 (3 stages) 200; dK/dV 64x128 w8 364; dQ 128x64 w8 + dK/dV 64x128 w8 352;
#   both passes with 3 stages 344.
# - forward alternatives (jax's kernel, ../shared/PERF_NOTES.md, confirmed with ours): 128x128 w8 s3
#   450, 128x64 w4 s3 409; 128x128 w4 and 4 stages at 128-wide keys run out of shared memory.
# d=64 at (4, 32, 4096, 64) non-causal (bench/tune.py, 2026-11-27): this row 355 / 308; forward
#   64x64 w4 s3 353, 128x64 w4 s2 319, 128x128 w8 s2 282; backward dK/dV 64x128 w4 121, w8 280.
# d=256 at (4, 8, 4096, 256) non-causal (same run): backward dQ 32x64 + dK/dV 64x32 (this row) 227
#   f+b against 181 with both at 32x32; dQ 64x64 w8 s1 193, 32x32 s3 188, dQ 64x32 + dK/dV 32x64
#   113; forward 64x32 w4 s2 354 (64x64 s1 348, 128x32 w8 302).
_TABLE = {
    64: KernelConfigs(TileConfig(128, 64, 4, 3), TileConfig(64, 64, 4, 2), TileConfig(64, 64, 4, 2)),
    128: KernelConfigs(TileConfig(128, 64, 4, 2), TileConfig(64, 64, 4, 2), TileConfig(64, 64, 4, 2)),
    256: KernelConfigs(TileConfig(64, 32, 4, 2), TileConfig(32, 64, 4, 2), TileConfig(64, 32, 4, 2)),
}


def _fit(cfg: TileConfig, sq: int, sk: int) -> TileConfig:
  """Shrinks tiles for short sequences (never below 16, Triton's smallest dot)."""
  bq = max(16, min(cfg.block_q, _compat.next_power_of_2(max(sq, 1))))
  bk = max(16, min(cfg.block_k, _compat.next_power_of_2(max(sk, 1))))
  return dataclasses.replace(cfg, block_q=bq, block_k=bk)


# fp32 at d=256 keeps the smaller backward tiles: the d=256 row's 64-row tiles were measured in bf16,
# and fp32 doubles every tile's shared memory.
_FP32_256 = KernelConfigs(TileConfig(64, 32, 4, 2), TileConfig(32, 32, 4, 2), TileConfig(32, 32, 4, 2))


# fp32 on the GPU: each fp32 dot is six bf16 tensor-core products (triton_flash._FP32_DOT), so the
# bf16 table's tiles make kernels that spill and take ptxas long: at d=128 causal the forward, dQ and
# dK/dV compiled in 7.6, 9.2 and 15.4 s with 3.5, 1.5 and 4.2 KB of spills; these tiles compile in
# 2.3, 2.0 and 2.4 s with at most 48 bytes (d=64: 4.9 / 4.0 / 6.4 s -> 1.1 / 0.9 / 1.5 s, no
# spills; d=256: 6.4 / 7.2 / 14.1 s -> 2.8 / 2.4 / 3.0 s). bench/regs.py for sm_90a on a 2-core
# CPU; the H200's host compiles about 1.8x faster. Not used in interpret mode, where smaller tiles
# only mean more (slow) interpreted programs.
_FP32_GPU = {
    64: KernelConfigs(TileConfig(64, 32, 4, 2), TileConfig(32, 32, 4, 2), TileConfig(32, 32, 4, 2)),
    128: KernelConfigs(TileConfig(64, 32, 8, 2), TileConfig(32, 32, 8, 2), TileConfig(32, 32, 8, 2)),
    256: KernelConfigs(TileConfig(32, 32, 8, 1), TileConfig(16, 32, 8, 1), TileConfig(32, 16, 8, 1)),
}


def _fitted(base: KernelConfigs, sq: int, sk: int) -> KernelConfigs:
  return KernelConfigs(*(_fit(c, sq, sk) for c in (base.fwd, base.bwd_dq, base.bwd_dkv)))


def resolve(head_dim_padded: int, sq: int, sk: int, override: KernelConfigs | None = None,
            itemsize: int = 2) -> KernelConfigs:
  bucket = min(max(head_dim_padded, 64), 256)
  if override is not None:
    return _fitted(override, sq, sk)
  base = _FP32_256 if bucket == 256 and itemsize > 2 else _TABLE[bucket]
  on_gpu = _fitted(_FP32_GPU[bucket], sq, sk) if itemsize > 2 else None
  return dataclasses.replace(_fitted(base, sq, sk), on_gpu=on_gpu)


# -- shared-memory fit: the table's tiles shrunk until the kernel fits the device's per-block limit

_CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97


def _cuda_optin_limit(ordinal: int) -> int | None:
  """cuDeviceGetAttribute(MAX_SHARED_MEMORY_PER_BLOCK_OPTIN) from the driver (None if unreadable)."""
  try:
    cuda = ctypes.CDLL("libcuda.so.1")
    dev, value = ctypes.c_int(), ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(dev), ordinal) != 0:
      return None
    if cuda.cuDeviceGetAttribute(ctypes.byref(value),
                                 _CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev) != 0:
      return None
    return int(value.value)
  except (OSError, AttributeError):
    return None


# Every CUDA device since Kepler gives a block 48 KiB without opting in: the fallback when the
# driver cannot be asked.
_GUARANTEED_SMEM = 48 * 1024


@functools.lru_cache(maxsize=None)
def shared_memory_limit() -> int | None:
  """Bytes of shared memory one block of our kernels may use on this process's first GPU, read
  from the device at run time; None without a GPU (interpret mode has no such limit).

  PALLAS_ATTN_SMEM_LIMIT (bytes) overrides it, e.g. to lower for a smaller device from a CPU host.
  """
  env = os.environ.get("PALLAS_ATTN_SMEM_LIMIT", "")
  if env:
    return int(env)
  try:
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
  except RuntimeError:
    return None
  if not gpus:
    return None
  limit = _cuda_optin_limit(getattr(gpus[0], "local_hardware_id", None) or 0)
  return limit if limit is not None else _GUARANTEED_SMEM


# The products each kernel takes per loop step whose B operand is a tile of the loop's axis (keys for
# the forward and dQ, queries for dK/dV): forward q.k^T and p.v; dQ q.k^T, dO.v^T and dS.k; dK/dV
# k.q^T, p^T.dO, v.dO^T and dS^T.q (triton_flash's kernels).
_LOOP_B_OPERANDS = {"fwd": 2, "bwd_dq": 3, "bwd_dkv": 4}


def split_operand_bytes(kind: str, cfg: TileConfig, dp: int, itemsize: int) -> int:
  """Shared memory that fp32 dots add on top of their staged fp32 tiles (0 for 16-bit inputs).

  Our fp32 dots use BF16_BF16_F32_X6 (triton_flash._FP32_DOT): Triton's F32DotTC pass splits each
  fp32 operand, in registers, into three bf16 pieces (hi, mid, lo) and takes the products of the
  pieces. The pieces are computed values, so they cannot come straight from the pipelined copy of
  the load: a tensor-core B operand must be in shared memory (wgmma reads B only from there), and
  each piece of each B operand gets a buffer of its own, 3 x 2 bytes per element on top of the
  fp32 tile (the A pieces stay in registers, as P does for bf16). Counted for every B operand of a
  loop step (_LOOP_B_OPERANDS), since the pieces of one product are live while the next is issued.
  An estimate from the passes' structure, not yet checked against Triton's request on a GPU.
  """
  if itemsize != 4:
    return 0
  rows = cfg.block_q if kind == "bwd_dkv" else cfg.block_k
  return _LOOP_B_OPERANDS[kind] * 3 * 2 * rows * dp


def shared_memory_bytes(kind: str, cfg: TileConfig, dp: int, itemsize: int,
                        pair_bytes: int = 0) -> int:
  """Estimated shared memory of one program of `kind` ("fwd", "bwd_dq", "bwd_dkv").

  Triton keeps the tiles a program holds for its whole loop (q for the forward, q and dO for dQ,
  k and v for dK/dV), num_stages - 1 pipelined copies of each tile its loop loads (k and v, or q,
  dO and their row statistics; plus the dynamic mask's bias and keep tiles, pair_bytes per
  element), and fp32 [bq, bk] scratch for the layout change of P (and dS) into a dot operand.
  fp32 inputs add the bf16 pieces of their split dot operands (split_operand_bytes).
  The staged part was checked against Triton 3.6 on the H200 while fp32 dots were still Triton's
  ieee FMA loop (no split): flash_dma fp32 d=64 with the forward's 128x64 tiles and 3 stages came
  to 262144 bytes, the request Triton reported (32 KiB q + 2 x 96 KiB of k, v, bias and keep +
  32 KiB of P).
  """
  if kind not in _LOOP_B_OPERANDS:
    raise ValueError(f"kind: expected 'fwd', 'bwd_dq' or 'bwd_dkv', got {kind!r}")
  bq, bk = cfg.block_q, cfg.block_k
  copies = max(cfg.num_stages - 1, 1)
  pair = pair_bytes * bq * bk
  split = split_operand_bytes(kind, cfg, dp, itemsize)
  if kind == "fwd":
    staged = bq * dp * itemsize + copies * (2 * bk * dp * itemsize + pair) + 4 * bq * bk
  elif kind == "bwd_dq":
    staged = 2 * bq * dp * itemsize + copies * (2 * bk * dp * itemsize + pair) + 8 * bq * bk
  else:
    staged = (2 * bk * dp * itemsize + copies * (2 * bq * dp * itemsize + 8 * bq + pair)
              + 8 * bq * bk)
  return staged + split


def fit_shared_memory(kind: str, cfg: TileConfig, dp: int, itemsize: int, pair_bytes: int = 0,
                      limit: int | None = None) -> TileConfig:
  """cfg, or the largest step-down of it that fits `limit` bytes: first fewer pipeline stages (down
  to 2), then the larger tile axis halved (the loop's axis on ties), never below 16."""
  if limit is None:
    return cfg
  loop_axis = "block_q" if kind == "bwd_dkv" else "block_k"
  while shared_memory_bytes(kind, cfg, dp, itemsize, pair_bytes) > limit:
    if cfg.num_stages > 2:
      cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
      continue
    other = "block_k" if loop_axis == "block_q" else "block_q"
    axis = loop_axis if getattr(cfg, loop_axis) >= getattr(cfg, other) else other
    if getattr(cfg, axis) <= 16:
      axis = other if axis == loop_axis else loop_axis
      if getattr(cfg, axis) <= 16:
        break  # nothing left to shrink: Triton reports the overflow
    cfg = dataclasses.replace(cfg, **{axis: getattr(cfg, axis) // 2})
  return cfg


def fit_configs(cfgs: KernelConfigs, dp: int, itemsize: int, pair_bytes: int = 0,
                limit: int | None = None) -> KernelConfigs:
  """fit_shared_memory for all three kernels."""
  return KernelConfigs(*(fit_shared_memory(kind, getattr(cfgs, kind), dp, itemsize, pair_bytes, limit)
                         for kind in ("fwd", "bwd_dq", "bwd_dkv")))
