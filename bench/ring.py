"""Ring attention (pallas_attn.ring_flash_attn_func): what a ring step costs, and how the ring scales.

Two parts, both at bf16, d=128, H=16 (Hk=16), b=1 by default:

- `one_gpu`: at each local length s, one flash_attn_func call on (b, s, H, d) against the ring on a
  one-device mesh with the same local shapes. A one-device ring is a single step, so its time over
  the plain call is the per-step overhead of the ring machinery (custom_vjp, fp32 partials, lse
  bookkeeping); the merge of one more partial (what every further step adds besides its kernel and
  its ppermute) is timed on its own (`merge_ms`), and `step_est_ratio` = (plain + merge) / plain
  estimates a full non-causal ring step against one plain call. Causal rows use layout "zigzag"
  (three block-pair calls, two merges: the same work split as on N devices) and "contiguous" (one
  call).
- `scaling`: with N = 1, 2, 4, ... up to the visible devices, the same per-device length s and the
  global sequence N * s: time and TFLOP/s of the whole ring, and the efficiency
  (TFLOP/s on N) / (N * TFLOP/s on 1). Runs only with more than one device.

FLOPs: 4 * b * H * d * pairs (pairs = L^2, or L^2 / 2 causal), x3.5 for forward plus backward.
JSON to --out (default bench/out/ring.json) and a table on stdout.

  python -m bench.ring [--smoke] [--seqlens 4096 8192] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from bench.timing import SMOKE_TIMING, TimingConfig, measure

import pallas_attn as pa
from pallas_attn import lse_merge


def _flops(b, h, d, length, causal, direction):
  pairs = length * length / (2 if causal else 1)
  return 4 * b * h * d * pairs * (3.5 if direction == "fwdbwd" else 1.0)


def _inputs(b, length, h, hk, d, dtype, sharding=None):
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(ks[0], (b, length, h, d), dtype)
  k = jax.random.normal(ks[1], (b, length, hk, d), dtype)
  v = jax.random.normal(ks[2], (b, length, hk, d), dtype)
  if sharding is not None:
    q, k, v = (jax.device_put(x, sharding) for x in (q, k, v))
  return q, k, v


def _fn(attn, direction):
  if direction == "fwd":
    return jax.jit(attn)
  return jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32)), (0, 1, 2)))


def _ms(fn, args, cfg):
  return measure(lambda: fn(*args), jax.block_until_ready, cfg).median_s * 1e3


def _mesh(n):
  return jax.make_mesh((n,), ("sp",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:n])


def _ring(mesh, causal, layout):
  return lambda q, k, v: pa.ring_flash_attn_func(q, k, v, mesh=mesh, seq_axis="sp", causal=causal,
                                                 layout=layout)


def one_gpu(seqlens, b, h, hk, d, dtype, cfg):
  rows = []
  mesh = _mesh(1)
  for s in seqlens:
    q, k, v = _inputs(b, s, h, hk, d, dtype, NamedSharding(mesh, P()))
    o32 = jnp.zeros((b, s, h, d), jnp.float32)
    lse = jnp.zeros((b, s, h), jnp.float32)
    merge = jax.jit(lambda o, l: lse_merge.merge_pair(o, l, o, l))
    merge_ms = _ms(merge, (o32, lse), cfg)
    for causal, layout in ((False, "contiguous"), (True, "contiguous"), (True, "zigzag")):
      for direction in ("fwd", "fwdbwd"):
        with jax.set_mesh(mesh):
          plain_fn = _fn(lambda q, k, v: pa.flash_attn_func(q, k, v, causal=causal), direction)
          ring_fn = _fn(_ring(mesh, causal, layout), direction)
          plain, ring = _ms(plain_fn, (q, k, v), cfg), _ms(ring_fn, (q, k, v), cfg)
          # N = 1 must match flash_attn_func (output, or each gradient): max |difference|.
          diff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                     for a, b in zip(jax.tree.leaves(ring_fn(q, k, v)),
                                     jax.tree.leaves(plain_fn(q, k, v))))
        rows.append(dict(seqlen=s, causal=causal, layout=layout, direction=direction,
                         plain_ms=plain, ring_n1_ms=ring, overhead_ratio=ring / plain,
                         merge_ms=merge_ms, step_est_ratio=(plain + merge_ms) / plain,
                         max_abs_diff=diff))
        print(f"one_gpu s={s:6d} causal={int(causal)} {layout:10s} {direction:6s} plain {plain:8.3f} ms"
              f"  ring(N=1) {ring:8.3f} ms  x{ring / plain:5.2f}  merge {merge_ms:6.3f} ms"
              f"  max|diff| {diff:.2e}")
  return rows


def scaling(s, b, h, hk, d, dtype, cfg, max_devices):
  rows, base = [], {}
  n = 1
  while n <= max_devices:
    mesh = _mesh(n)
    q, k, v = _inputs(b, n * s, h, hk, d, dtype, NamedSharding(mesh, P(None, "sp")))
    for causal in (False, True):
      for direction in ("fwd", "fwdbwd"):
        with jax.set_mesh(mesh):
          ms = _ms(_fn(_ring(mesh, causal, "zigzag"), direction), (q, k, v), cfg)
        tflops = _flops(b, h, d, n * s, causal, direction) / (ms * 1e-3) / 1e12
        base.setdefault((causal, direction), tflops)
        eff = tflops / (n * base[(causal, direction)])
        rows.append(dict(devices=n, seqlen_per_device=s, seqlen=n * s, causal=causal,
                         direction=direction, ms=ms, tflops=tflops, efficiency=eff))
        print(f"scaling N={n} L={n * s:7d} causal={int(causal)} {direction:6s} {ms:9.3f} ms "
              f"{tflops:8.2f} TFLOP/s  efficiency {eff:5.2f}")
    n *= 2
  return rows


def _git_commit():
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (interpret mode)")
  parser.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384],
                      help="local sequence lengths of the one-device part")
  parser.add_argument("--scaling-seqlen", type=int, default=8192, help="per-device length, scaling part")
  parser.add_argument("--max-devices", type=int, default=None)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "ring.json"))
  args = parser.parse_args(argv)
  if args.smoke:
    b, h, hk, d, dtype, cfg = 1, 2, 1, 16, jnp.float32, SMOKE_TIMING
    seqlens, s_scale = [32], 16
  else:
    b, h, hk, d, dtype, cfg = 1, 16, 16, 128, jnp.bfloat16, TimingConfig()
    seqlens, s_scale = args.seqlens, args.scaling_seqlen
  max_devices = min(args.max_devices or len(jax.devices()), len(jax.devices()))
  if args.smoke:
    max_devices = min(max_devices, 2)
  report = dict(
      device=dict(kind=jax.devices()[0].device_kind, platform=jax.devices()[0].platform,
                  count=len(jax.devices())),
      versions=dict(jax=jax.__version__, python=platform.python_version()), commit=_git_commit(),
      config=dict(smoke=args.smoke, b=b, h=h, hk=hk, d=d, dtype=jnp.dtype(dtype).name),
      one_gpu=one_gpu(seqlens, b, h, hk, d, dtype, cfg),
      scaling=scaling(s_scale, b, h, hk, d, dtype, cfg, max_devices) if max_devices > 1 else [])
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
  print(f"wrote {args.out}")
  return report


if __name__ == "__main__":
  main()
