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


# Keyed by (head dim bucket). Evidence: ../shared/PERF_NOTES.md sweep of jax's Pallas-Triton kernel on
# the H100 at (4, 16, 4096, 128) bf16: forward 128x64/4 warps/2 stages 465 TFLOP/s (best), backward
# 64x64/4 warps best (342 non-causal); larger head dims halve the tiles to stay inside shared memory.
_TABLE = {
    64: KernelConfigs(TileConfig(128, 64, 4, 3), TileConfig(64, 64, 4, 2), TileConfig(64, 64, 4, 2)),
    128: KernelConfigs(TileConfig(128, 64, 4, 2), TileConfig(64, 64, 4, 2), TileConfig(64, 64, 4, 2)),
    256: KernelConfigs(TileConfig(64, 32, 4, 2), TileConfig(32, 32, 4, 2), TileConfig(32, 32, 4, 2)),
}


def _fit(cfg: TileConfig, sq: int, sk: int) -> TileConfig:
  """Shrinks tiles for short sequences (never below 16, Triton's smallest dot)."""
  bq = max(16, min(cfg.block_q, _compat.next_power_of_2(max(sq, 1))))
  bk = max(16, min(cfg.block_k, _compat.next_power_of_2(max(sk, 1))))
  return dataclasses.replace(cfg, block_q=bq, block_k=bk)


def resolve(head_dim_padded: int, sq: int, sk: int, override: KernelConfigs | None = None) -> KernelConfigs:
  base = override or _TABLE[min(max(head_dim_padded, 64), 256)]
  return KernelConfigs(*(_fit(c, sq, sk) for c in (base.fwd, base.bwd_dq, base.bwd_dkv)))
