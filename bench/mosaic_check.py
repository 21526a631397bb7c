"""One GPU call's worth of checks of the Mosaic GPU forward (pallas_attn/backends/mosaic_flash.py).

  PYTHONPATH=. python bench/mosaic_check.py [--quick] [--tune] [--semantics lane|warpgroup]

1. Environment: jax, jaxlib, device, compute capability, lowering semantics.
2. Correctness, small cases from the simplest up: our forward against the float32 reference under
   the tolerance rule (tests/numerics.py: err <= 2 x the input-dtype reference's err + floor, for
   out and for lse with its +inf pattern), and against the Triton backend (triton_flash.forward,
   called directly: the kernel pallas_attn.flash.forward runs today, whatever a backend registry
   picks later). Every exception is printed with its traceback (the first of each kind in full,
   with jax's frames; repeats in one line); if a case fails to build with one lowering semantics,
   the first such case is retried with the other.
3. Timing (skipped with --quick): bf16 forward at the issue's headline shapes for mosaic, triton and
   jax.nn.dot_product_attention(implementation="cudnn"); TFLOP/s (4 b h sq sk d, halved when
   causal) and the ratios.
4. With --tune (another call: about 3 more minutes), the mosaic kernel at other key tile sizes and
   ring depths on the same shapes.

Output is flushed line by line; a watchdog reports a call that runs past --call-limit seconds (a
barrier deadlock hangs the GPU) and exits, so the lead gets what was printed before it.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
import traceback

# Lowering errors are easier to place with jax's own frames (set before jax is imported).
os.environ.setdefault("JAX_TRACEBACK_FILTERING", "off")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_REPO, "tests"))  # numerics.py: the tolerance rule
sys.path.insert(0, _REPO)

import numerics  # noqa: E402
from bench import timing  # noqa: E402
from pallas_attn import _compat, tiles  # noqa: E402
from pallas_attn.backends import mosaic_flash, triton_flash  # noqa: E402
from pallas_attn.operands import Operands  # noqa: E402
from pallas_attn.reference import attention_reference  # noqa: E402
from pallas_attn.spec import AttentionSpec, band_from_window  # noqa: E402

SEMANTICS_ENV = "PALLAS_ATTN_MGPU_SEMANTICS"


def log(*args):
  print(*args, flush=True)


class Watchdog:
  """Exits the process when one call runs longer than `limit` seconds."""

  def __init__(self, limit: float):
    self.limit, self.what, self.since = limit, None, None
    threading.Thread(target=self._run, daemon=True).start()

  def start(self, what: str):
    self.what, self.since = what, time.time()

  def stop(self):
    self.what = None

  def _run(self):
    while True:
      time.sleep(1.0)
      if self.what is not None and time.time() - self.since > self.limit:
        log(f"\nWATCHDOG: {self.what} still running after {self.limit:.0f} s (deadlock or "
            "very slow compile); exiting")
        os._exit(3)  # pylint: disable=protected-access


# ---------------------------------------------------------------------------------------------------
# The three forwards on one problem


def make_spec(sq, sk, d, opts):
  return AttentionSpec(mask=band_from_window(sq, sk, opts.get("causal", False),
                                             opts.get("window", (-1, -1))),
                       scale=1.0 / math.sqrt(d), softcap=opts.get("softcap", 0.0),
                       alibi=opts.get("alibi", False), sink="sh" if opts.get("n_sink") else None)


class AOT:
  """A jitted function whose executables can be compiled ahead, on other threads (compiles are
  CPU-bound and the H200 host has 16 cores; run sequentially they would take most of the
  budget). A failed ahead compile is retried on the calling thread before it counts."""

  def __init__(self, fn):
    self.fn = jax.jit(fn)
    self.compiled = {}

  @staticmethod
  def _key(args):
    return tuple(None if a is None else (tuple(a.shape), str(a.dtype)) for a in args)

  def compile(self, *args, ahead=False):
    key = self._key(args)
    got = self.compiled.get(key)
    if got is None or (isinstance(got, Exception) and not ahead and key not in self._retried):
      if isinstance(got, Exception):
        self._retried.add(key)
      try:
        got = self.fn.lower(*args).compile()
      except Exception as e:  # pylint: disable=broad-except
        got = e
      self.compiled[key] = got
    if isinstance(got, Exception) and not ahead:
      raise got
    return got

  _retried: set = set()

  def __call__(self, *args):
    return self.compile(*args)(*args)


SERIAL = False  # --serial: no ahead compiles


def precompile(jobs, dog, what):
  """Compiles (AOT, args) jobs on a thread pool; errors surface when each is called."""
  if SERIAL or not jobs:
    return
  from concurrent import futures  # pylint: disable=import-outside-toplevel
  t0 = time.time()
  dog.start(f"compiling {len(jobs)} executables for {what}")
  with futures.ThreadPoolExecutor(max_workers=max(1, min(8, (os.cpu_count() or 2) - 1))) as pool:
    list(pool.map(lambda job: job[0].compile(*job[1], ahead=True), jobs))
  dog.stop()
  log(f"  (compiled {len(jobs)} executables for {what} in {time.time() - t0:.0f} s on threads)")


_MOSAIC = {}
INTERPRET = False  # --interpret: a CPU dry run of this script (interpret mode, tiny problems)


def mosaic_fn(spec, d, semantics, config=None):
  key = (spec, d, semantics, config)
  if key not in _MOSAIC:
    def fn(q, k, v, alibi, sink):
      os.environ[SEMANTICS_ENV] = semantics  # read while tracing
      return mosaic_flash.forward(q, k, v, alibi, sink, spec=spec, cfgs=None, head_dim=d,
                                  interpret=INTERPRET, config=config)
    _MOSAIC[key] = AOT(fn)
  return _MOSAIC[key]


_TRITON = {}


def triton_fn(spec, d, itemsize):
  key = (spec, d, itemsize)
  if key not in _TRITON:
    cfgs = tiles.resolve(_compat.next_power_of_2(max(d, 16)), spec.sq, spec.sk, None, itemsize)
    _TRITON[key] = AOT(lambda q, k, v, alibi, sink: triton_flash.forward(
        q, k, v, Operands(alibi=None if alibi is None else alibi.reshape(*alibi.shape[:2], 1),
                         sink=sink), spec=spec, cfgs=cfgs, head_dim=d,
        interpret=INTERPRET))
  return _TRITON[key]


def inputs(b, sq, sk, h, hk, d, dtype, opts, seed=0):
  q, k, v, _, _, _ = numerics.random_inputs(seed, b, sq, sk, h, hk, d, dtype)
  ks = jax.random.split(jax.random.PRNGKey(seed + 1), 2)
  slopes = jax.random.uniform(ks[0], (b, h), jnp.float32, 0.01, 0.3) if opts.get("alibi") else None
  n_sink = opts.get("n_sink", 0)
  sink = jax.random.normal(ks[1], (h, n_sink), jnp.float32) if n_sink else None
  return q, k, v, slopes, sink


def reference_fn(opts, upcast):
  return AOT(lambda q, k, v, s, z: attention_reference(
      q, k, v, causal=opts.get("causal", False), window_size=opts.get("window", (-1, -1)),
      softcap=opts.get("softcap", 0.0), alibi_slopes=s, upcast=upcast,
      sink=None if z is None else z.T))


# ---------------------------------------------------------------------------------------------------
# Correctness

CASES = [
    ("plain", dict(b=1, sq=256, sk=256, h=1, hk=1, d=64, dtype="bfloat16"), {}),
    ("plain gqa", dict(b=2, sq=512, sk=512, h=4, hk=2, d=128, dtype="bfloat16"), {}),
    ("causal", dict(b=2, sq=512, sk=512, h=4, hk=4, d=128, dtype="bfloat16"), dict(causal=True)),
    ("causal ragged mqa", dict(b=2, sq=77, sk=300, h=4, hk=1, d=64, dtype="float16"),
     dict(causal=True)),
    ("causal sq>sk (empty rows)", dict(b=1, sq=300, sk=77, h=2, hk=1, d=128, dtype="bfloat16"),
     dict(causal=True)),
    ("window (128,0)", dict(b=1, sq=1000, sk=1000, h=4, hk=2, d=128, dtype="bfloat16"),
     dict(window=(128, 0))),
    ("window (48,16)", dict(b=2, sq=300, sk=300, h=2, hk=2, d=64, dtype="bfloat16"),
     dict(window=(48, 16))),
    ("softcap causal", dict(b=1, sq=512, sk=512, h=2, hk=1, d=128, dtype="bfloat16"),
     dict(softcap=30.0, causal=True)),
    ("d256", dict(b=1, sq=300, sk=300, h=2, hk=1, d=256, dtype="bfloat16"), {}),
    ("d256 causal fp16", dict(b=2, sq=128, sk=1, h=2, hk=2, d=256, dtype="float16"),
     dict(causal=True)),
    ("alibi causal", dict(b=2, sq=300, sk=300, h=4, hk=2, d=128, dtype="bfloat16"),
     dict(alibi=True, causal=True)),
    ("sinks causal", dict(b=2, sq=300, sk=300, h=4, hk=2, d=128, dtype="bfloat16"),
     dict(n_sink=2, causal=True)),
    ("everything", dict(b=1, sq=77, sk=77, h=2, hk=1, d=64, dtype="float16"),
     dict(window=(64, 0), softcap=15.0, alibi=True, n_sink=1)),
    ("decode sq=1", dict(b=4, sq=1, sk=1000, h=8, hk=1, d=128, dtype="bfloat16"), {}),
]


def _rule(ours, lowp, ref, dtype, lse=False):
  """(ok, err, bound) of the tolerance rule; lse must also match the reference's +inf pattern."""
  ours, lowp, ref = numerics.as_f32(ours), numerics.as_f32(lowp), numerics.as_f32(ref)
  if np.isnan(ours).any():
    return False, float("nan"), 0.0, "NaN"
  note = ""
  if lse:
    inf_o, inf_r = np.isposinf(ours), np.isposinf(ref)
    if not np.array_equal(inf_o, inf_r):
      note = f"+inf pattern differs at {int((inf_o != inf_r).sum())} rows"
    fin = ~inf_r & ~inf_o
    ours, lowp, ref = ours[fin], np.where(np.isfinite(lowp), lowp, ref)[fin], ref[fin]
    dtype = "float32"
  err, el = numerics.max_err(ours, ref), numerics.max_err(lowp, ref)
  bound = numerics.OUT_FACTOR * el + numerics.noise_floor(ref, dtype)
  return err <= bound and not note, err, bound, note


class Errors:
  """Prints the first traceback of each distinct error in full, repeats in one line."""

  def __init__(self):
    self.seen = set()

  def report(self, what, exc):
    key = (type(exc).__name__, str(exc)[:300])
    if key in self.seen:
      log(f"    {what}: {type(exc).__name__} (same as above): {str(exc).splitlines()[0][:200]}")
      return
    self.seen.add(key)
    log(f"    {what}: {type(exc).__name__}, traceback:")
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    for line in text.rstrip().splitlines():
      log("      | " + line)


class Problem:
  """One correctness case's inputs and the four executables it runs."""

  def __init__(self, name, shape, opts, semantics):
    self.name, self.shape, self.opts = name, shape, opts
    b, sq, sk, h, hk, d, dtype = (shape[x] for x in ("b", "sq", "sk", "h", "hk", "d", "dtype"))
    self.d, self.dtype = d, dtype
    self.q, self.k, self.v, self.slopes, self.sink = inputs(b, sq, sk, h, hk, d, dtype, opts)
    self.alibi = None if self.slopes is None else self.slopes[..., None]
    self.spec = make_spec(sq, sk, d, opts)
    self.mosaic = mosaic_fn(self.spec, d, semantics)
    self.triton = triton_fn(self.spec, d, self.q.dtype.itemsize)
    self.ref, self.lowp = reference_fn(opts, True), reference_fn(opts, False)

  def jobs(self):
    kernel_args = (self.q, self.k, self.v, self.alibi, self.sink)
    ref_args = (self.q, self.k, self.v, self.slopes, self.sink)
    return [(self.mosaic, kernel_args), (self.triton, kernel_args), (self.ref, ref_args),
            (self.lowp, ref_args)]

  def describe(self):
    sh = self.shape
    return (f"[{self.name}] b={sh['b']} sq={sh['sq']} sk={sh['sk']} h={sh['h']} hk={sh['hk']} "
            f"d={sh['d']} {sh['dtype']} {self.opts or ''}")


def check_case(problem, errors, dog):
  pr = problem
  q, k, v, alibi, sink, d, dtype, name = (pr.q, pr.k, pr.v, pr.alibi, pr.sink, pr.d, pr.dtype,
                                          pr.name)
  log("  " + pr.describe())
  reason = mosaic_flash.covers(pr.spec, q.dtype, d, has_alibi=alibi is not None,
                               has_sink=sink is not None, n_sink=0 if sink is None else sink.shape[-1])
  if reason is not None:
    log(f"    covers() refuses: {reason}")
    return "refused"
  ref = jax.block_until_ready(pr.ref(q, k, v, pr.slopes, sink))
  lowp = jax.block_until_ready(pr.lowp(q, k, v, pr.slopes, sink))
  status = "ok"
  ours = None
  dog.start(f"mosaic forward [{name}]")
  t0 = time.time()
  try:
    ours = jax.block_until_ready(pr.mosaic(q, k, v, alibi, sink))
  except Exception as e:  # pylint: disable=broad-except
    errors.report("mosaic", e)
    status = "error"
  dog.stop()
  if ours is not None:
    ok_o, e_o, b_o, n_o = _rule(ours[0], lowp[0], ref[0], dtype)
    ok_l, e_l, b_l, n_l = _rule(ours[1], lowp[1], ref[1], dtype, lse=True)
    log(f"    mosaic ({time.time() - t0:.1f} s): out err {e_o:.3e} (bound {b_o:.3e}) "
        f"{'ok' if ok_o else 'FAIL ' + n_o} | lse err {e_l:.3e} (bound {b_l:.3e}) "
        f"{'ok' if ok_l else 'FAIL ' + n_l}")
    if not (ok_o and ok_l):
      status = "fail"
      _where(ours[0], ref[0], "out")
  dog.start(f"triton forward [{name}]")
  try:
    tri = jax.block_until_ready(pr.triton(q, k, v, alibi, sink))
    ok_o, e_o, b_o, _ = _rule(tri[0], lowp[0], ref[0], dtype)
    line = f"    triton: out err {e_o:.3e} {'ok' if ok_o else 'FAIL'}"
    if ours is not None:
      fin = np.isfinite(numerics.as_f32(tri[1])) & np.isfinite(numerics.as_f32(ours[1]))
      dl = float(np.max(np.abs(numerics.as_f32(ours[1]) - numerics.as_f32(tri[1]))[fin], initial=0))
      line += (f" | |mosaic - triton|: out {numerics.max_err(ours[0], tri[0]):.3e}, "
               f"lse {dl:.3e} (finite rows)")
    log(line)
  except Exception as e:  # pylint: disable=broad-except
    errors.report("triton", e)
  dog.stop()
  return status


def _where(ours, ref, name):
  """Where the largest errors sit: (batch, row, head) of the worst rows, to tell masks from tiles."""
  err = np.max(np.abs(numerics.as_f32(ours) - numerics.as_f32(ref)), axis=-1)  # (b, sq, h)
  worst = np.argsort(err.ravel())[::-1][:5]
  idx = [np.unravel_index(i, err.shape) for i in worst]
  log(f"    worst {name} rows (b, row, head): " +
      ", ".join(f"{tuple(int(x) for x in ix)}={err[ix]:.2e}" for ix in idx))
  bad_rows = np.nonzero(np.max(err, axis=(0, 2)) > 0.05)[0]
  if bad_rows.size:
    log(f"    rows with err > 0.05: {bad_rows.size} of {err.shape[1]}, first {bad_rows[:8].tolist()}, "
        f"last {bad_rows[-4:].tolist()}")


def correctness(semantics, dog):
  log(f"\n== Correctness (lowering semantics: {semantics})")
  errors = Errors()
  problems = [Problem(name, shape, opts, semantics) for name, shape, opts in CASES]
  precompile([job for p in problems for job in p.jobs()], dog, "the correctness cases")
  results = {}
  for problem in problems:
    results[problem.name] = check_case(problem, errors, dog)
  failed = [n for n, s in results.items() if s != "ok"]
  log(f"  summary: {len(results) - len(failed)} of {len(results)} ok" +
      (f"; not ok: {', '.join(f'{n} ({results[n]})' for n in failed)}" if failed else ""))
  first_error = next((n for n, s in results.items() if s == "error"), None)
  if first_error is not None:
    other = "warpgroup" if semantics == "lane" else "lane"
    log(f"\n== Retrying [{first_error}] with lowering semantics {other}")
    name, shape, opts = next(c for c in CASES if c[0] == first_error)
    check_case(Problem(name, shape, opts, other), Errors(), dog)
  return results


# ---------------------------------------------------------------------------------------------------
# Timing

TIMED = [
    (4, 16, 4096, 128, False), (4, 16, 4096, 128, True),
    (1, 16, 16384, 128, False), (1, 16, 16384, 128, True),
    (4, 32, 4096, 64, False), (4, 8, 4096, 256, False),
]


def cudnn_fn(causal):
  return AOT(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                          implementation="cudnn"))


def timings(semantics, dog, deadline):
  log("\n== Timing (bf16 forward, TFLOP/s; median of the host-timed batches of bench/timing.py)")
  cfg = timing.TimingConfig(warmup=2, min_reps=5, max_reps=20, budget_s=0.25, min_batch_s=20e-3)
  rows = []
  table = []
  for b, h, s, d, causal in TIMED:
    q, k, v, _, _ = inputs(b, s, s, h, h, d, "bfloat16", {})
    spec = make_spec(s, s, d, dict(causal=causal))
    fns = {"mosaic": (mosaic_fn(spec, d, semantics), (q, k, v, None, None)),
           "triton": (triton_fn(spec, d, 2), (q, k, v, None, None)),
           "cudnn": (cudnn_fn(causal), (q, k, v))}
    table.append(((b, h, s, d, causal), fns))
  precompile([job for _, fns in table for job in fns.values()], dog, "the timed shapes")
  for (b, h, s, d, causal), fns in table:
    if time.time() > deadline:
      log(f"  (time limit reached: skipping the rest from {(b, h, s, d, causal)})")
      break
    flops = 4.0 * b * h * s * s * d / (2.0 if causal else 1.0)
    providers = {name: (lambda f=f, a=a: f(*a)) for name, (f, a) in fns.items()}
    row = {}
    for name, call in providers.items():
      what = f"{name} (b={b} h={h} s={s} d={d}{' causal' if causal else ''})"
      dog.start(what)
      try:
        t0 = time.time()
        jax.block_until_ready(call())
        compile_s = time.time() - t0
        ms = timing.measure(call, jax.block_until_ready, cfg).median_s * 1e3
        row[name] = flops / (ms * 1e-3) / 1e12
        log(f"  {what}: {ms:.3f} ms, {row[name]:.0f} TFLOP/s (first call {compile_s:.1f} s)")
      except Exception as e:  # pylint: disable=broad-except
        log(f"  {what}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        row[name] = None
      dog.stop()
    rows.append(((b, h, s, d, causal), row))
  log("\n  (b, H, s, d)           causal   mosaic   triton    cudnn   mosaic/cudnn  mosaic/triton")
  for (b, h, s, d, causal), row in rows:
    f = lambda x: "     -" if x is None else f"{x:6.0f}"  # noqa: E731
    r = lambda a, c: "     -" if a is None or c is None else f"{a / c:6.2f}"  # noqa: E731
    log(f"  {str((b, h, s, d)):22s} {'yes' if causal else 'no ':6s} {f(row.get('mosaic'))}   "
        f"{f(row.get('triton'))}   {f(row.get('cudnn'))}        {r(row.get('mosaic'), row.get('cudnn'))}"
        f"         {r(row.get('mosaic'), row.get('triton'))}")


TUNE = {  # (block_k, stages) alternatives per head dim, timed with --tune
    64: [(128, 2), (128, 4), (64, 4), (192, 2)],
    128: [(128, 3), (64, 2), (64, 4), (192, 2)],
    256: [(32, 4), (64, 1)],
}


def tune(semantics, dog, deadline):
  log("\n== Tuning (mosaic only, bf16 forward, TFLOP/s per (block_k, stages))")
  cfg = timing.TimingConfig(warmup=2, min_reps=5, max_reps=20, budget_s=0.25, min_batch_s=20e-3)
  for b, h, s, d, causal in TIMED:
    q, k, v, _, _ = inputs(b, s, s, h, h, d, "bfloat16", {})
    spec = make_spec(s, s, d, dict(causal=causal))
    flops = 4.0 * b * h * s * s * d / (2.0 if causal else 1.0)
    line = []
    for bk, stages in [(mosaic_flash.CONFIGS[d].block_k, mosaic_flash.CONFIGS[d].stages)] + TUNE[d]:
      if time.time() > deadline:
        line.append("(time limit)")
        break
      config = mosaic_flash.MosaicConfig(bk, stages)
      if config.smem_bytes(d, 2) > mosaic_flash._SMEM_BYTES:  # pylint: disable=protected-access
        line.append(f"{bk}x{stages}: no smem")
        continue
      call = lambda c=config: mosaic_fn(spec, d, semantics, c)(q, k, v, None, None)  # noqa: E731
      dog.start(f"tune {(b, h, s, d, causal)} {config}")
      try:
        jax.block_until_ready(call())
        ms = timing.measure(call, jax.block_until_ready, cfg).median_s * 1e3
        line.append(f"{bk}x{stages}: {flops / (ms * 1e-3) / 1e12:.0f}")
      except Exception as e:  # pylint: disable=broad-except
        line.append(f"{bk}x{stages}: {type(e).__name__}")
      dog.stop()
    log(f"  {str((b, h, s, d)):22s} {'causal' if causal else 'full  '}  " + "  ".join(line))


def environment(semantics):
  log("== Environment")
  log(f"  python {sys.version.split()[0]}, jax {jax.__version__}, jaxlib {_jaxlib_version()}")
  for dev in jax.devices():
    log(f"  device {dev.id}: {dev.platform} {getattr(dev, 'device_kind', '?')} compute capability "
        f"{getattr(dev, 'compute_capability', '?')}")
  log(f"  Mosaic GPU import: {'ok' if mosaic_flash.plgpu is not None else mosaic_flash._UNAVAILABLE}")
  log(f"  lowering semantics: {semantics} ({SEMANTICS_ENV}); configs {mosaic_flash.CONFIGS}")
  log(f"  XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


def _jaxlib_version():
  try:
    import jaxlib  # pylint: disable=import-outside-toplevel
    return jaxlib.__version__
  except Exception:  # pylint: disable=broad-except
    return "?"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="correctness only")
  parser.add_argument("--semantics", choices=("lane", "warpgroup"),
                      default=os.environ.get(SEMANTICS_ENV, "lane"))
  parser.add_argument("--time-limit", type=float, default=225.0,
                      help="seconds after which no new timing row starts")
  parser.add_argument("--call-limit", type=float, default=120.0,
                      help="seconds one call may take before the watchdog exits")
  parser.add_argument("--serial", action="store_true",
                      help="compile on the main thread only (no ahead compiles on a thread pool)")
  parser.add_argument("--tune", action="store_true",
                      help="after the timing, time the mosaic kernel at other (block_k, stages)")
  parser.add_argument("--interpret", type=int, default=0, metavar="N",
                      help="CPU dry run of this script: the first N cases in interpret mode and "
                           "one tiny timing row")
  args = parser.parse_args(argv)
  global SERIAL  # pylint: disable=global-statement
  SERIAL = args.serial
  start = time.time()
  environment(args.semantics)
  if args.interpret:
    global INTERPRET, CASES, TIMED  # pylint: disable=global-statement
    INTERPRET, CASES, TIMED = True, CASES[:args.interpret], [(1, 1, 128, 64, False)]
  elif not any(d.platform == "gpu" for d in jax.devices()):
    log("no GPU: nothing to run (tests/test_mosaic.py covers the CPU side)")
    return 1
  dog = Watchdog(args.call_limit)
  results = correctness(args.semantics, dog)
  if not args.quick:
    timings(args.semantics, dog, start + args.time_limit)
  if args.tune:
    tune(args.semantics, dog, start + args.time_limit + 200.0)
  log(f"\ndone in {time.time() - start:.0f} s")
  return 0 if all(s == "ok" for s in results.values()) else 2


if __name__ == "__main__":
  sys.exit(main())
