"""One GPU call's worth of checks of the Mosaic GPU backward (pallas_attn/backends/mosaic_backward.py).

  PYTHONPATH=. python bench/mosaic_backward_check.py [--quick] [--interpret N]

1. Correctness, small cases from the simplest up: Mosaic forward + Mosaic backward (the kernels
   called directly) against the float32 reference under the tolerance rule of tests/numerics.py,
   for out, lse, dq, dk, dv and dsink; then the public face (flash_attn_func(backend="mosaic")
   under jax.vjp) against the same reference.
2. Timing (skipped with --quick), bf16 at the issue's headline shapes: forward and forward+backward
   (one jitted jax.vjp step) of pallas-attn[mosaic], pallas-attn[triton] and
   jax.nn.dot_product_attention(implementation="cudnn"); TFLOP/s (4 b h s s d, halved when causal,
   x3.5 for forward+backward) and the ratios; the backward alone is the difference of the two.

A watchdog exits when one call runs past --call-limit seconds (a barrier deadlock hangs the GPU).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

os.environ.setdefault("JAX_TRACEBACK_FILTERING", "off")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_REPO, "tests"))
sys.path.insert(0, _REPO)

import numerics  # noqa: E402
import pallas_attn  # noqa: E402
from bench import timing  # noqa: E402
from bench.mosaic_check import Watchdog, log  # noqa: E402
from pallas_attn.backends import mosaic_backward, mosaic_flash  # noqa: E402
from pallas_attn.operands import Operands  # noqa: E402
from pallas_attn.reference import attention_reference  # noqa: E402
from pallas_attn.spec import AttentionSpec, band_from_window  # noqa: E402

CASES = [  # (b, sq, sk, h, hk, d, dtype, options)
    (1, 64, 64, 1, 1, 64, "bfloat16", {}),
    (1, 128, 128, 2, 2, 128, "bfloat16", {}),
    (1, 77, 40, 2, 1, 64, "bfloat16", dict(causal=True)),
    (2, 300, 300, 4, 2, 128, "bfloat16", dict(causal=True)),
    (1, 130, 200, 2, 1, 128, "float16", dict(window=(40, 20), softcap=20.0, alibi=True)),
    (1, 65, 150, 2, 1, 64, "bfloat16", dict(causal=True, n_sink=2)),
    (2, 1000, 1000, 4, 1, 64, "bfloat16", dict(softcap=5.0)),
    (1, 1024, 3000, 4, 2, 128, "float16", dict(causal=True)),
    (1, 3000, 1024, 4, 4, 128, "bfloat16", dict(window=(256, 0), alibi=True)),
    (2, 513, 700, 8, 2, 64, "float16", dict(window=(100, 100), n_sink=3, softcap=10.0)),
]

TIMED = [(4, 16, 4096, 128, False), (4, 16, 4096, 128, True), (1, 16, 16384, 128, False),
         (1, 16, 16384, 128, True), (4, 32, 4096, 64, False), (4, 32, 4096, 64, True)]

INTERPRET = False


def _inputs(b, sq, sk, h, hk, d, dtype, opts):
  q, k, v, _, dout, dlse = numerics.random_inputs(0, b, sq, sk, h, hk, d, dtype)
  keys = jax.random.split(jax.random.PRNGKey(1), 2)
  slopes = jax.random.uniform(keys[0], (b, h), jnp.float32, 0.01, 0.3) if opts.get("alibi") else None
  n_sink = opts.get("n_sink", 0)
  sink = jax.random.normal(keys[1], (h, n_sink), jnp.float32) if n_sink else None
  return q, k, v, dout, dlse, slopes, sink


def check_case(case):
  b, sq, sk, h, hk, d, dtype, opts = case
  causal, window = opts.get("causal", False), opts.get("window", (-1, -1))
  softcap, alibi, n_sink = opts.get("softcap", 0.0), opts.get("alibi", False), opts.get("n_sink", 0)
  q, k, v, dout, dlse, slopes, sink = _inputs(b, sq, sk, h, hk, d, dtype, opts)
  spec = AttentionSpec(mask=band_from_window(sq, sk, causal, window), scale=1 / math.sqrt(d),
                       softcap=softcap, alibi=alibi, sink="sh" if n_sink else None)
  ops = Operands(alibi=None if slopes is None else slopes[..., None], sink=sink)

  @jax.jit
  def ours(q, k, v, dout, dlse, ops):
    out, lse = mosaic_flash.forward(q, k, v, ops.alibi, ops.sink, spec=spec, cfgs=None,
                                    head_dim=d, interpret=INTERPRET)
    g = mosaic_backward.backward(q, k, v, out, lse, dout, dlse, ops, spec=spec, cfgs=None,
                                 head_dim=d, interpret=INTERPRET)
    return out, lse, g.dq, g.dk, g.dv, g.dsink

  def reference(upcast):
    def f(q, k, v, sink):
      return attention_reference(q, k, v, causal=causal, window_size=window, softcap=softcap,
                                 alibi_slopes=slopes, upcast=upcast,
                                 sink=None if sink is None else sink.T)
    (o, lse), vjp = jax.vjp(f, q, k, v, sink)
    return (o, lse, *vjp((dout, dlse)))

  t0 = time.time()
  got = jax.block_until_ready(ours(q, k, v, dout, dlse, ops))
  first = time.time() - t0
  ref, lowp = reference(True), reference(False)
  errs = []
  for i, name in enumerate(("out", "lse", "dq", "dk", "dv", "dsink")):
    if got[i] is None:
      continue
    errs.append(f"{name} {numerics.max_err(got[i], ref[i]):.2g}/{numerics.max_err(lowp[i], ref[i]):.2g}")
  log(f"  {case}: first call {first:.1f} s; err ours/lowp: " + ", ".join(errs))
  numerics.assert_output("out", got[0], lowp[0], ref[0])
  numerics.assert_lse(got[1], lowp[1], ref[1])
  for i, name in ((2, "dq"), (3, "dk"), (4, "dv")):
    numerics.assert_grad(name, got[i], lowp[i], ref[i])
  if n_sink:
    numerics.assert_grad("dsink", got[5], lowp[5], ref[5])


def check_public_face():
  """flash_attn_func(backend="mosaic") under jax.vjp: both passes through the registry."""
  b, sq, sk, h, hk, d = 2, 300, 257, 4, 2, 128
  q, k, v, dout, _, _, _ = _inputs(b, sq, sk, h, hk, d, "bfloat16", {})
  for causal in (False, True):
    f = lambda q, k, v, up=None: pallas_attn.flash_attn_func(q, k, v, causal=causal, backend="mosaic")  # noqa: E731
    out, vjp = jax.vjp(f, q, k, v)
    got = (out, *vjp(dout))

    def ref_fn(upcast):
      g = lambda q, k, v: attention_reference(q, k, v, causal=causal, upcast=upcast)[0]  # noqa: E731
      o, vjp_ref = jax.vjp(g, q, k, v)
      return (o, *vjp_ref(dout))
    ref, lowp = ref_fn(True), ref_fn(False)
    for name, x, lo, r in zip(("out", "dq", "dk", "dv"), got, lowp, ref):
      (numerics.assert_output if name == "out" else numerics.assert_grad)(name, x, lo, r)
    log(f"  public face flash_attn_func(backend='mosaic', causal={causal}): ok")


def correctness(dog):
  log("\n== Correctness (Mosaic forward + backward against the reference)")
  failed = 0
  for case in CASES:
    dog.start(f"case {case}")
    try:
      check_case(case)
    except Exception as e:  # pylint: disable=broad-except
      failed += 1
      log(f"  FAILED {case}: {type(e).__name__}: {str(e)[:2000]}")
      if failed == 1:
        log(traceback.format_exc()[-6000:])
    dog.stop()
  if not INTERPRET:
    dog.start("public face")
    try:
      check_public_face()
    except Exception as e:  # pylint: disable=broad-except
      failed += 1
      log(f"  FAILED public face: {type(e).__name__}: {str(e)[:2000]}")
    dog.stop()
  log(f"  summary: {failed} failed")
  return failed


EXTRA_IMPLS = False


def timings(dog, deadline):
  log("\n== Timing (bf16, TFLOP/s: forward | forward+backward | backward alone)")
  cfg = timing.TimingConfig(warmup=2, min_reps=5, max_reps=20, budget_s=0.3, min_batch_s=20e-3)
  rows = []
  for b, h, s, d, causal in TIMED:
    if time.time() > deadline:
      log(f"  (time limit: skipping from {(b, h, s, d, causal)})")
      break
    q, k, v, dout, _, _, _ = _inputs(b, s, s, h, h, d, "bfloat16", {})
    fwd_flops = 4.0 * b * h * s * s * d / (2.0 if causal else 1.0)
    impls = {
        "mosaic": lambda q, k, v: pallas_attn.flash_attn_func(q, k, v, causal=causal, backend="mosaic"),
        "triton": lambda q, k, v: pallas_attn.flash_attn_func(q, k, v, causal=causal, backend="triton"),
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                              implementation="cudnn"),
    }
    if EXTRA_IMPLS:
      try:
        from bench.providers import import_tokamax  # pylint: disable=import-outside-toplevel
        tokamax = import_tokamax()
        impls["tokamax"] = lambda q, k, v: tokamax.dot_product_attention(
            q, k, v, is_causal=causal, implementation="mosaic")
      except ImportError as e:
        log(f"  tokamax does not import: {e}")
    row = {}
    for name, f in impls.items():
      fwd = jax.jit(f)
      step = jax.jit(lambda q, k, v, do, f=f: jax.vjp(f, q, k, v)[1](do))
      what = f"{name} {(b, h, s, d)}{' causal' if causal else ''}"
      dog.start(what)
      try:
        t0 = time.time()
        jax.block_until_ready(step(q, k, v, dout))
        jax.block_until_ready(fwd(q, k, v))
        compile_s = time.time() - t0
        t_f = timing.measure(lambda: fwd(q, k, v), jax.block_until_ready, cfg).median_s
        t_fb = timing.measure(lambda: step(q, k, v, dout), jax.block_until_ready, cfg).median_s
        row[name] = (t_f, t_fb)
        log(f"  {what}: fwd {t_f * 1e3:.3f} ms {fwd_flops / t_f / 1e12:.0f} TF/s, fwd+bwd "
            f"{t_fb * 1e3:.3f} ms {3.5 * fwd_flops / t_fb / 1e12:.0f} TF/s, bwd "
            f"{(t_fb - t_f) * 1e3:.3f} ms {2.5 * fwd_flops / max(t_fb - t_f, 1e-9) / 1e12:.0f} TF/s "
            f"(compile {compile_s:.1f} s)")
      except Exception as e:  # pylint: disable=broad-except
        log(f"  {what}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
      dog.stop()
    rows.append(((b, h, s, d, causal), fwd_flops, row))
  for key, flops, row in rows:
    if "cudnn" in row:
      log(f"  {key}: " + ", ".join(
          f"{n} {row['cudnn'][0] / t[0]:.2f}/{row['cudnn'][1] / t[1]:.2f}" for n, t in row.items())
          + " (x cuDNN, fwd/f+b)")
  log("\n  (b, H, s, d) causal | TF/s fwd: mosaic triton cudnn | f+b: mosaic triton cudnn | "
      "mosaic/cudnn fwd f+b | mosaic/triton f+b")
  for (b, h, s, d, causal), flops, row in rows:
    tf = {n: (flops / t[0] / 1e12, 3.5 * flops / t[1] / 1e12) for n, t in row.items()}
    g = lambda n, i: f"{tf[n][i]:4.0f}" if n in tf else "   -"  # noqa: E731
    r = lambda a, c, i: f"{tf[a][i] / tf[c][i]:.2f}" if a in tf and c in tf else "  - "  # noqa: E731
    log(f"  {str((b, h, s, d)):18s} {'yes' if causal else 'no ':3s} | {g('mosaic', 0)} "
        f"{g('triton', 0)} {g('cudnn', 0)} | {g('mosaic', 1)} {g('triton', 1)} {g('cudnn', 1)} | "
        f"{r('mosaic', 'cudnn', 0)} {r('mosaic', 'cudnn', 1)} | {r('mosaic', 'triton', 1)}")


TUNE = {  # (dq (block, stages, ...), dK/dV (block, stages, split, regs)) alternatives, with --tune
    # ncu at (4, 16, 4096, 128): the dK/dV pass spills registers (2.7M local spill requests, 136%
    # overhead) where dQ and the forward do not: a split schedule and 240-register consumers.
    64: [(None, (128, 2, True)), (None, (64, 2, True)), (None, (128, 2, True, 240)),
         (None, (64, 2, False, 240))],
    128: [(None, (64, 2, True)), (None, (64, 2, True, 240)), (None, (64, 2, False, 240)),
          ((64, 2, False, 240), None)],
}
TUNE_ROWS = [(4, 16, 4096, 128, False), (4, 16, 4096, 128, True), (4, 32, 4096, 64, False)]


def tune(dog, deadline):
  """The backward alone (mosaic_backward.backward on the forward's out and lse) per tile config."""
  log("\n== Tuning (bf16 backward alone, TFLOP/s = 2.5 x forward FLOPs / time)")
  cfg = timing.TimingConfig(warmup=2, min_reps=5, max_reps=20, budget_s=0.3, min_batch_s=20e-3)
  for b, h, s, d, causal in TUNE_ROWS:
    q, k, v, dout, dlse, _, _ = _inputs(b, s, s, h, h, d, "bfloat16", {})
    spec = AttentionSpec(mask=band_from_window(s, s, causal, (-1, -1)), scale=1 / math.sqrt(d))
    out, lse = jax.jit(lambda q, k, v: mosaic_flash.forward(q, k, v, None, None, spec=spec, cfgs=None,
                                                              head_dim=d, interpret=False))(q, k, v)
    flops = 2.5 * 4.0 * b * h * s * s * d / (2.0 if causal else 1.0)
    base = (mosaic_backward.DQ_CONFIGS[d], mosaic_backward.DKV_CONFIGS[d])
    line = []
    for dq_c, dkv_c in [(None, None)] + TUNE[d]:
      if time.time() > deadline:
        line.append("(time limit)")
        break
      cq = mosaic_backward.BwdConfig(*dq_c) if dq_c else base[0]
      ckv = mosaic_backward.BwdConfig(*dkv_c) if dkv_c else base[1]
      name = (f"dq{cq.block}x{cq.stages}r{cq.regs}/dkv{ckv.block}x{ckv.stages}r{ckv.regs}"
              f"{'split' if ckv.split else ''}")
      fn = jax.jit(lambda q, k, v, o, l, do, dl, cq=cq, ckv=ckv: mosaic_backward.backward(
          q, k, v, o, l, do, dl, Operands(), spec=spec, cfgs=None, head_dim=d, interpret=False,
          dq_config=cq, dkv_config=ckv).astuple()[:3])
      dog.start(f"tune {(b, h, s, d, causal)} {name}")
      try:
        call = lambda fn=fn: fn(q, k, v, out, lse, dout, dlse)  # noqa: E731
        jax.block_until_ready(call())
        t = timing.measure(call, jax.block_until_ready, cfg).median_s
        line.append(f"{name}: {flops / t / 1e12:.0f}")
      except Exception as e:  # pylint: disable=broad-except
        line.append(f"{name}: {type(e).__name__} {str(e).splitlines()[0][:120] if str(e) else ''}")
      dog.stop()
    log(f"  {str((b, h, s, d)):18s} {'causal' if causal else 'full  '}  " + "  ".join(line))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="correctness only")
  parser.add_argument("--time-limit", type=float, default=400.0)
  parser.add_argument("--call-limit", type=float, default=120.0)
  parser.add_argument("--tune", action="store_true", help="only the tile-config sweep")
  parser.add_argument("--extra", action="store_true",
                      help="time also tokamax's Mosaic GPU attention")
  parser.add_argument("--interpret", type=int, default=0, metavar="N",
                      help="CPU dry run: the first N cases in interpret mode, no timing")
  args = parser.parse_args(argv)
  start = time.time()
  log(f"jax {jax.__version__}, devices {[getattr(d, 'device_kind', d.platform) for d in jax.devices()]}")
  global INTERPRET, CASES, EXTRA_IMPLS  # pylint: disable=global-statement
  EXTRA_IMPLS = args.extra
  if args.interpret:
    INTERPRET, CASES = True, CASES[:args.interpret]
  elif not any(d.platform == "gpu" for d in jax.devices()):
    log("no GPU: nothing to run (tests/test_mosaic.py covers the CPU side)")
    return 1
  dog = Watchdog(args.call_limit)
  if args.tune:
    tune(dog, start + args.time_limit)
    return 0
  with jax.default_device(jax.devices("cpu")[0]) if INTERPRET else _nullcontext():
    failed = correctness(dog)
  if not args.quick and not INTERPRET:
    timings(dog, start + args.time_limit)
  log(f"\ndone in {time.time() - start:.0f} s")
  return 2 if failed else 0


class _nullcontext:  # pylint: disable=invalid-name
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


if __name__ == "__main__":
  sys.exit(main())
