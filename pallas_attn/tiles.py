"""Tile shapes, warps and pipeline stages per kernel, chosen from H100 measurements.

Resolution: an explicit TileConfig passed by the caller, else the table below, else the fallback.
Every table row names the measurement behind it.
"""
from __future__ import annotations

import dataclasses

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


def resolve(head_dim_padded: int, sq: int, sk: int, override: KernelConfigs | None = None,
            itemsize: int = 2) -> KernelConfigs:
  bucket = min(max(head_dim_padded, 64), 256)
  base = override or (_FP32_256 if bucket == 256 and itemsize > 2 else _TABLE[bucket])
  return KernelConfigs(*(_fit(c, sq, sk) for c in (base.fwd, base.bwd_dq, base.bwd_dkv)))
