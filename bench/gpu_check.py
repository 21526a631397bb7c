"""One-call GPU session script: parity of the Triton-lowered kernels, then forward / forward+backward
TFLOP/s at (4, 16, 4096, 128) next to jax's own Pallas attention. Prints a short table last."""
from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_attn as pa
from pallas_attn.reference import attention_reference


def rel(a, b):
  a = jnp.asarray(a, jnp.float32); b = jnp.asarray(b, jnp.float32)
  fin = jnp.isfinite(b)
  return float(jnp.linalg.norm(jnp.where(fin, a - b, 0)) / (jnp.linalg.norm(jnp.where(fin, b, 0)) + 1e-30))


def parity():
  rows = []
  key = jax.random.PRNGKey(1)
  cases = [
      dict(b=2, sq=128, sk=128, h=4, hk=4, d=128, causal=False),
      dict(b=2, sq=113, sk=203, h=4, hk=2, d=64, causal=True),
      dict(b=2, sq=203, sk=113, h=4, hk=1, d=96, causal=True, alibi=True),
      dict(b=1, sq=255, sk=257, h=2, hk=2, d=256, causal=False, window=(32, 16)),
      dict(b=1, sq=1, sk=64, h=8, hk=2, d=128, causal=True, softcap=20.0),
      dict(b=2, sq=7, sk=8, h=2, hk=2, d=32, causal=False),
      dict(b=1, sq=512, sk=512, h=2, hk=2, d=128, causal=True, dtype="float32"),
  ]
  for c in cases:
    dtype = jnp.dtype(c.get("dtype", "bfloat16"))
    ks = jax.random.split(key, 5); key = ks[4]
    q = jax.random.normal(ks[0], (c["b"], c["sq"], c["h"], c["d"]), dtype)
    k = jax.random.normal(ks[1], (c["b"], c["sk"], c["hk"], c["d"]), dtype)
    v = jax.random.normal(ks[2], (c["b"], c["sk"], c["hk"], c["d"]), dtype)
    do = jax.random.normal(ks[3], q.shape, dtype)
    kw = dict(causal=c["causal"], window_size=c.get("window", (-1, -1)), softcap=c.get("softcap", 0.0),
              alibi_slopes=jnp.linspace(0.05, 0.5, c["h"]).astype(jnp.float32) if c.get("alibi") else None)
    (out, lse, _), vjp = jax.vjp(lambda q, k, v: pa.flash_attn_func(q, k, v, return_attn_probs=True, **kw), q, k, v)
    grads = vjp((do, jnp.zeros_like(lse), jnp.zeros((0,), dtype)))
    ref = lambda up: (lambda q, k, v: attention_reference(q, k, v, upcast=up, **kw))
    (ro, rl), rvjp = jax.vjp(ref(True), q, k, v)
    rgrads = rvjp((do, jnp.zeros_like(rl)))
    (lo, _), lvjp = jax.vjp(ref(False), q, k, v)
    lgrads = lvjp((do, jnp.zeros_like(rl)))
    errs = [rel(out, ro), rel(lse, rl)] + [rel(g, r) for g, r in zip(grads, rgrads)]
    lowp = [rel(lo, ro), 0.0] + [rel(g, r) for g, r in zip(lgrads, rgrads)]
    nan = any(bool(jnp.any(jnp.isnan(x))) for x in (out, lse, *grads))
    ok = (not nan) and all(e <= 2 * l + (2e-3 if dtype != jnp.float32 else 2e-5) for e, l in zip(errs, lowp))
    rows.append((c, ok, errs, lowp))
    print("PARITY", "ok " if ok else "BAD", c, "ours", ["%.2e" % e for e in errs], "lowp", ["%.2e" % e for e in lowp], flush=True)
  return all(r[1] for r in rows)


def bench(fn, *args, iters=20):
  out = fn(*args); jax.block_until_ready(out)
  for _ in range(2): jax.block_until_ready(fn(*args))
  times = []
  for _ in range(5):
    t = time.perf_counter()
    for _ in range(iters): out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t) / iters)
  return float(np.median(times))


def perf(tile_variants=()):
  from jax.experimental.pallas.ops.gpu import attention as jax_attn
  b, h, s, d = 4, 16, 4096, 128
  key = jax.random.PRNGKey(0)
  ks = jax.random.split(key, 4)
  q, k, v, do = (jax.random.normal(kk, (b, s, h, d), jnp.bfloat16) for kk in ks)
  table = []
  for causal in (False, True):
    flops = 4 * b * h * s * s * d / (2 if causal else 1)
    ours_f = jax.jit(lambda q, k, v, t=None: pa.flash_attn_func(q, k, v, causal=causal, tiles=t), static_argnums=3)
    def fb(q, k, v, t=None):
      o, vjp = jax.vjp(lambda q, k, v: pa.flash_attn_func(q, k, v, causal=causal, tiles=t), q, k, v)
      return vjp(do)
    ours_fb = jax.jit(fb, static_argnums=3)
    variants = [("ours", None)] + list(tile_variants)
    for name, t in variants:
      try:
        tf = bench(ours_f, q, k, v, t); tfb = bench(ours_fb, q, k, v, t)
        table.append((name, causal, flops / tf / 1e12, 3.5 * flops / tfb / 1e12))
      except Exception as e:  # noqa: BLE001
        print("FAIL", name, causal, repr(e)[:300], flush=True)
    bs = jax_attn.BlockSizes(block_q=128, block_k=64, block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
    jf = jax.jit(lambda q, k, v: jax_attn.mha(q, k, v, None, sm_scale=d ** -0.5, causal=causal, block_sizes=bs, num_warps=4, num_stages=2))
    def jfb(q, k, v):
      o, vjp = jax.vjp(lambda q, k, v: jax_attn.mha(q, k, v, None, sm_scale=d ** -0.5, causal=causal, block_sizes=bs, num_warps=4, num_stages=2), q, k, v)
      return vjp(do)
    try:
      table.append(("jax-pallas(tuned)", causal, flops / bench(jf, q, k, v) / 1e12, 3.5 * flops / bench(jax.jit(jfb), q, k, v) / 1e12))
    except Exception as e:  # noqa: BLE001
      print("FAIL jax-pallas", causal, repr(e)[:300], flush=True)
    jd = jax.jit(lambda q, k, v: jax_attn.mha(q, k, v, None, sm_scale=d ** -0.5, causal=causal))
    try:
      table.append(("jax-pallas(default)", causal, flops / bench(jd, q, k, v) / 1e12, float("nan")))
    except Exception as e:  # noqa: BLE001
      print("FAIL jax-pallas default", causal, repr(e)[:300], flush=True)
  print("\n%-22s %-7s %10s %10s" % ("provider", "causal", "fwd TF/s", "f+b TF/s"))
  for name, causal, f, fb in table:
    print("%-22s %-7s %10.1f %10.1f" % (name, causal, f, fb))


if __name__ == "__main__":
  print(jax.devices(), jax.__version__, flush=True)
  from pallas_attn.tiles import KernelConfigs as K, TileConfig as T
  variants = []
  if "--sweep" in sys.argv:
    variants = [
        ("f128x128w8s3", K(T(128, 128, 8, 3), T(64, 64, 4, 2), T(64, 64, 4, 2))),
        ("f128x64w4s3", K(T(128, 64, 4, 3), T(64, 64, 4, 2), T(64, 64, 4, 2))),
        ("b128x64w8", K(T(128, 64, 4, 2), T(128, 64, 8, 2), T(64, 128, 8, 2))),
        ("b64x64s3", K(T(128, 64, 4, 2), T(64, 64, 4, 3), T(64, 64, 4, 3))),
        ("b32x64", K(T(128, 64, 4, 2), T(64, 32, 4, 2), T(32, 64, 4, 2))),
    ]
  ok = parity()
  perf(variants)
  print("PARITY_ALL_OK" if ok else "PARITY_FAILED")
