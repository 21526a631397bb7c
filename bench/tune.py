"""Tile-configuration sweep for our kernels on the GPU: one process, one shape, several configs.

  python -m bench.tune [--causal] [--s 4096] [--b 4] [--h 16] [--d 128] [--varlen]
                       [--configs NAME|QxKwWsS,QxKwWsS,QxKwWsS ...]

--configs takes names from CANDIDATES or explicit (fwd, dq, dkv) tiles as bench.run's --ours-tiles,
separated by spaces. --varlen runs flash_attn_varlen_func over bench.options' mixed lengths (16384
tokens; --b and --s are ignored).

Prints compile time and TFLOP/s per config (forward, and forward+backward). Its findings feed the
table in pallas_attn/tiles.py.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import pallas_attn as pa
from bench.options import VARLEN_LENGTHS, mixed_varlen
from bench.providers import parse_tiles
from bench.timing import jax_median_ms
from pallas_attn.tiles import KernelConfigs as K
from pallas_attn.tiles import TileConfig as T

FWD = T(128, 64, 4, 2)
CANDIDATES = {
    "default": None,
    "bwd_dq128x32_dkv32x128_s3": K(FWD, T(128, 32, 4, 3), T(32, 128, 4, 3)),
    "bwd_dq64x64_dkv64x128_w8": K(FWD, T(64, 64, 4, 2), T(64, 128, 8, 2)),
    "bwd_dq128x64_w8_dkv64x128_w8": K(FWD, T(128, 64, 8, 2), T(64, 128, 8, 2)),
    "bwd_s3": K(FWD, T(64, 64, 4, 3), T(64, 64, 4, 3)),
}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--causal", action="store_true")
  ap.add_argument("--b", type=int, default=4)
  ap.add_argument("--h", type=int, default=16)
  ap.add_argument("--s", type=int, default=4096)
  ap.add_argument("--d", type=int, default=128)
  ap.add_argument("--configs", nargs="+", default=list(CANDIDATES))
  ap.add_argument("--varlen", action="store_true")
  args = ap.parse_args()
  b, h, s, d = args.b, args.h, args.s, args.d
  pairs = b * s * s
  if args.varlen:
    b, s = 1, sum(VARLEN_LENGTHS)
    pairs = sum(l * l for l in VARLEN_LENGTHS)
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v, do = (jax.random.normal(kk, (b, s, h, d), jnp.bfloat16) for kk in ks)
  flops = 4 * h * pairs * d / (2 if args.causal else 1)
  rows = []
  for name in args.configs:
    cfg = CANDIDATES[name] if name in CANDIDATES else parse_tiles(name)[1]

    attend = (mixed_varlen(args.causal, cfg) if args.varlen else
              lambda q, k, v, cfg=cfg: pa.flash_attn_func(q, k, v, causal=args.causal, tiles=cfg))

    fwd = jax.jit(attend)

    def fb(q, k, v):
      _, vjp = jax.vjp(attend, q, k, v)
      return vjp(do)

    fb = jax.jit(fb)
    try:
      t0 = time.perf_counter()
      jax.block_until_ready(fb(q, k, v))
      compile_s = time.perf_counter() - t0
      tf, tfb = jax_median_ms(fwd, q, k, v) / 1e3, jax_median_ms(fb, q, k, v) / 1e3
      rows.append((name, compile_s, flops / tf / 1e12, 3.5 * flops / tfb / 1e12))
      print("TUNE", rows[-1], flush=True)
    except Exception as e:  # noqa: BLE001  (a config that does not compile is a result too)
      print("TUNE FAIL", name, repr(e)[:300], flush=True)
  print(f"\n(b, h, s, d) = {(b, h, s, d)} causal={args.causal} varlen={args.varlen}")
  print("%-32s %9s %10s %10s" % ("config", "compile s", "fwd TF/s", "f+b TF/s"))
  for name, c, f, fb_ in rows:
    print("%-32s %9.1f %10.1f %10.1f" % (name, c, f, fb_))


if __name__ == "__main__":
  main()
