"""What the torch bridge costs on top of calling the JAX kernels directly.

1. Host overhead per call at a small shape, where the device finishes each kernel long before the
   host issues the next, so back-to-back wall time per call is host time: the bridge
   (torch_bridge.flash_attn_func, forward and forward+backward through torch autograd) against the
   jitted JAX functions it wraps (pallas_attn.flash.forward / backward) on the same data.
   Targets (issue 15): <= 80 us added to a forward, <= 250 us to a forward+backward.
2. Throughput at (b, s, H, d) = (4, 4096, 16, 128) bf16: bridged against pure JAX
   (jax.jit of pallas_attn.flash_attn_func, and of its VJP). Target: >= 0.97x.

    python bench/bridge_overhead.py            # CUDA if torch sees it, else CPU
    python bench/bridge_overhead.py --smoke    # tiny shapes, a few iterations (runs on CPU)
    python bench/bridge_overhead.py --cpu      # host overhead only, on the CPU, many repetitions

Writes bench/out/bridge_overhead.json and prints a table. Each row is the median over `repeats`
interleaved rounds (the four variants take turns, so drift in machine load hits them alike) of
the wall time per call and of the calling thread's CPU time per call. On the CPU the kernels run
in Pallas interpret mode on XLA's worker threads and both sides wait for every result, so wall
time includes compute; the difference between bridge and JAX at the same shape is the overhead,
and the calling thread's CPU time (which excludes XLA's workers) is the steadier measure of it on
a shared machine. The CPU takes the "copy" output path (XLA's CPU client ignores donation of
imported buffers), CUDA the "aliased" one: the CPU numbers include one copy per output.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_bridge  # noqa: E402  first: sets JAX's GPU memory policy before JAX starts its backend

import jax  # pylint: disable=g-import-not-at-top,wrong-import-order

import pallas_attn as pa
from pallas_attn import flash, flash_attn as jax_fa
from torch_bridge import _dlpack

SMALL = (1, 128, 4, 64)
LARGE = (4, 4096, 16, 128)
SMOKE_SMALL = (1, 16, 2, 32)
SMOKE_LARGE = (1, 64, 2, 32)
CPU_SMALL = (1, 16, 2, 16)
CPU_ITERS, CPU_REPEATS = 100, 15


def _sync(device):
  if device.type == "cuda":
    torch.cuda.synchronize()


def _time_per_call(fn, sync, iters, repeats):
  """Median over `repeats` of the wall time of `iters` back-to-back calls, synced once at the end."""
  return _time_interleaved({"fn": fn}, sync, iters, repeats)["fn"][0]


def _time_interleaved(fns, sync, iters, repeats, warmup=3):
  """{name: (wall s, calling-thread CPU s)} per call: medians over `repeats` rounds, in each of
  which every function runs `iters` back-to-back calls (synced once at the end) in turn."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  sync()
  wall = {n: [] for n in fns}
  cpu = {n: [] for n in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      c0, t0 = time.thread_time(), time.perf_counter()
      for _ in range(iters):
        fn()
      sync()
      wall[name].append((time.perf_counter() - t0) / iters)
      cpu[name].append((time.thread_time() - c0) / iters)
  return {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in fns}


def _tensors(shape, dtype, device, seed):
  g = torch.Generator().manual_seed(seed)
  mk = lambda: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
  return mk(), mk(), mk(), mk()


def host_overhead(shape, dtype, device, iters, repeats):
  q, k, v, do = _tensors(shape, dtype, device, 0)
  qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
  qj, kj, vj, doj = (_dlpack.to_jax(x) for x in (q, k, v, do))
  spec, _ = jax_fa.prepare(qj, kj, vj, causal=True)

  last = {}
  # torch's CPU ops are synchronous and the bridge's CPU path copies each result, so on the CPU the
  # fair baseline waits for every JAX call too; on CUDA both sides queue work without waiting.
  settle = jax.block_until_ready if device.type == "cpu" else (lambda x: x)

  def jax_fwd():
    last["o"] = settle(flash.forward(qj, kj, vj, None, spec))

  def jax_fwd_bwd():
    out, lse = flash.forward(qj, kj, vj, None, spec)
    last["g"] = settle(flash.backward(qj, kj, vj, None, out, lse, doj, None, spec))

  def bridge_fwd():
    last["t"] = torch_bridge.flash_attn_func(q, k, v, causal=True)

  def bridge_fwd_bwd():
    out = torch_bridge.flash_attn_func(qg, kg, vg, causal=True)
    last["tg"] = torch.autograd.grad(out, (qg, kg, vg), do)

  def sync_all():
    jax.block_until_ready(list(last.get(n) for n in ("o", "g") if n in last))
    _sync(device)

  times = _time_interleaved(
      {"jax_fwd": jax_fwd, "bridge_fwd": bridge_fwd, "jax_fwd_bwd": jax_fwd_bwd,
       "bridge_fwd_bwd": bridge_fwd_bwd}, sync_all, iters, repeats, warmup=20)
  rows = {n: wall * 1e6 for n, (wall, _) in times.items()}
  cpu = {n: c * 1e6 for n, (_, c) in times.items()}
  return {
      "shape": list(shape), "dtype": str(dtype), "iters": iters, "repeats": repeats,
      "us_per_call": rows,
      "thread_cpu_us_per_call": cpu,
      "added_us_fwd": rows["bridge_fwd"] - rows["jax_fwd"],
      "added_us_fwd_bwd": rows["bridge_fwd_bwd"] - rows["jax_fwd_bwd"],
      "added_thread_cpu_us_fwd": cpu["bridge_fwd"] - cpu["jax_fwd"],
      "added_thread_cpu_us_fwd_bwd": cpu["bridge_fwd_bwd"] - cpu["jax_fwd_bwd"],
  }


def components(shape, dtype, device, iters, repeats):
  """Where the added host time goes: torch's op and autograd layers, and one DLPack import."""
  q, k, v, _ = _tensors(shape, dtype, device, 2)
  qg = q.clone().requires_grad_()
  b, sq, h, _ = shape

  def empty_kernel(*args):
    x = args[0]
    return x.new_empty(x.shape), x.new_empty((b, h, sq), dtype=torch.float32)

  schema = ("(Tensor q, Tensor k, Tensor v, Tensor? alibi_slopes, float dropout_p, float? softmax_scale, "
            "bool causal, int window_left, int window_right, float softcap) -> (Tensor, Tensor)")
  op = torch.library.custom_op("bridge_bench::empty", empty_kernel, mutates_args=(), schema=schema)
  op.register_fake(empty_kernel)

  class Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):
      out = op(*args)
      ctx.save_for_backward(*args[:3], *out)
      return out

    @staticmethod
    def backward(ctx, *grads):
      return (None,) * 10

  args = lambda x: (x, k, v, None, 0.0, None, True, -1, -1, 0.0)
  target = _dlpack._target(q.device)  # pylint: disable=protected-access
  importer = _dlpack._import  # pylint: disable=protected-access
  below_autograd = torch._C._AutoDispatchBelowAutograd  # pylint: disable=protected-access
  overload = torch.ops.bridge_bench.empty.default
  result = importer(q, target, False) + 0  # a JAX-owned array, as a kernel's result is
  out = torch.empty_like(q)

  def op_below_autograd():
    with below_autograd():
      overload(*args(q))

  def copy_back():
    _dlpack._copy_back(target, (result,), (out,))  # pylint: disable=protected-access

  sync = lambda: _sync(device)
  rows = {
      "custom_op_call": lambda: op(*args(q)),
      "custom_op_call_below_autograd": op_below_autograd,
      "custom_op_in_autograd_function": lambda: Function.apply(*args(qg)),
      "dlpack_import": lambda: importer(q, target, False),
      "dlpack_import_with_stream_fence": lambda: importer(q, target, True),
      "copy_back_one_output": copy_back,
  }
  return {n: _time_per_call(fn, sync, iters, repeats) * 1e6 for n, fn in rows.items()}


def backward_paths(shape, dtype, device, iters, repeats):
  """Where a bridged backward's host time goes: the backward op on the calling thread, on another
  persistent thread (torch runs CUDA backward on its own device thread), through autograd; and the
  jitted JAX backward on either thread."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  q, k, v, do = _tensors(shape, dtype, device, 4)
  qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
  fargs = (q, k, v, None, 0.0, None, True, -1, -1, 0.0, None)  # the fwd op's arguments (seed None)
  fwd_op, bwd_op = torch.ops.pallas_attn.flash_attn_fwd.default, torch.ops.pallas_attn.flash_attn_bwd.default
  out, lse = fwd_op(*fargs)
  out_g = torch_bridge.flash_attn_func(qg, kg, vg, causal=True)
  qj, kj, vj, doj, oj, lj = (_dlpack.to_jax(x) for x in (q, k, v, do, out, lse))
  spec, _ = jax_fa.prepare(qj, kj, vj, causal=True)
  worker = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  on_worker = lambda fn: (lambda: worker.submit(fn).result())
  bwd = lambda: bwd_op(do, None, *fargs, out, lse)
  jax_bwd = lambda: flash.backward(qj, kj, vj, None, oj, lj, doj, None, spec)
  last = {}

  def keep(fn, name):
    def run():
      last[name] = fn()
    return run

  def sync():
    jax.block_until_ready([x for x in last.values() if isinstance(x, (tuple, list))
                           and x and isinstance(x[0], jax.Array)])
    _sync(device)

  rows = {
      "bwd_op_calling_thread": bwd,
      "bwd_op_other_thread": on_worker(bwd),
      "bwd_autograd": lambda: torch.autograd.grad(out_g, (qg, kg, vg), do, retain_graph=True),
      "jax_bwd_calling_thread": keep(jax_bwd, "jm"),
      "jax_bwd_other_thread": keep(on_worker(jax_bwd), "jw"),
      "empty_task_other_thread": on_worker(lambda: None),
  }
  times = _time_interleaved(rows, sync, iters, repeats, warmup=10)
  worker.shutdown()
  return {n: {"wall_us": w * 1e6, "thread_cpu_us": c * 1e6} for n, (w, c) in times.items()}


def profile(shape, dtype, device, iters, path):
  """cProfile of `iters` bridged forward calls, then of `iters` forward+backward pairs: where the
  added host time goes, function by function (wall clock, so host waits show up too)."""
  import cProfile  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  import pstats  # pylint: disable=g-import-not-at-top
  q, k, v, do = _tensors(shape, dtype, device, 3)
  qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
  fwd = lambda: torch_bridge.flash_attn_func(q, k, v, causal=True)
  pair = lambda: torch.autograd.grad(torch_bridge.flash_attn_func(qg, kg, vg, causal=True), (qg, kg, vg), do)
  text = io.StringIO()
  for name, fn in (("forward", fwd), ("forward+backward", pair)):
    for _ in range(20):
      fn()
    _sync(device)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(iters):
      fn()
    _sync(device)
    prof.disable()
    for key in ("tottime", "cumulative"):
      text.write(f"===== {name}: {iters} calls at {tuple(shape)} {dtype}, sorted by {key}\n")
      pstats.Stats(prof, stream=text).sort_stats(key).print_stats(35)
  with open(path, "w") as f:
    f.write(text.getvalue())


def throughput(shape, dtype, device, iters, repeats):
  b, s, h, d = shape
  q, k, v, do = _tensors(shape, dtype, device, 1)
  qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
  qj, kj, vj, doj = (_dlpack.to_jax(x) for x in (q, k, v, do))
  out = []
  for causal in (False, True):
    flops = 4 * b * h * s * s * d / (2 if causal else 1)
    jf = jax.jit(lambda q, k, v, c=causal: pa.flash_attn_func(q, k, v, causal=c))

    def vjp(q, k, v, do, c=causal):
      _, pullback = jax.vjp(lambda q, k, v: pa.flash_attn_func(q, k, v, causal=c), q, k, v)
      return pullback(do)

    jfb = jax.jit(vjp)
    last = {}

    def sync_all():
      jax.block_until_ready([last[n] for n in ("j",) if n in last])
      _sync(device)

    def run_jf():
      last["j"] = jf(qj, kj, vj)

    def run_jfb():
      last["j"] = jfb(qj, kj, vj, doj)

    def run_bf(c=causal):
      torch_bridge.flash_attn_func(q, k, v, causal=c)

    def run_bfb(c=causal):
      o = torch_bridge.flash_attn_func(qg, kg, vg, causal=c)
      torch.autograd.grad(o, (qg, kg, vg), do)

    t = {name: _time_per_call(fn, sync_all, iters, repeats)
         for name, fn in (("jax_fwd", run_jf), ("bridge_fwd", run_bf), ("jax_fwd_bwd", run_jfb),
                          ("bridge_fwd_bwd", run_bfb))}
    out.append({
        "shape": list(shape), "dtype": str(dtype), "causal": causal,
        "tflops": {n: (flops if "bwd" not in n else 3.5 * flops) / sec / 1e12 for n, sec in t.items()},
        "ratio_fwd": t["jax_fwd"] / t["bridge_fwd"],
        "ratio_fwd_bwd": t["jax_fwd_bwd"] / t["bridge_fwd_bwd"],
    })
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true", help="tiny shapes and few iterations")
  parser.add_argument("--cpu", action="store_true",
                      help=f"host overhead only, on the CPU at {CPU_SMALL} float32 (b, s, H, d), "
                      f"{CPU_ITERS} calls x {CPU_REPEATS} rounds; no throughput section")
  parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
  parser.add_argument("--shape", default=None, help="small shape b,s,H,d for the host overhead")
  parser.add_argument("--iters", type=int, default=None, help="calls per round (host overhead)")
  parser.add_argument("--repeats", type=int, default=None, help="rounds (host overhead)")
  parser.add_argument("--profile", default=None,
                      help="also write a cProfile of the bridged calls at the small shape to this file")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "bridge_overhead.json"))
  args = parser.parse_args(argv)
  if args.cpu:
    args.device = "cpu"
  device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
  dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
  small, large = (SMOKE_SMALL, SMOKE_LARGE) if args.smoke else (SMALL, LARGE)
  iters, repeats = (5, 3) if args.smoke else (200, 5)
  if args.cpu:
    small, iters, repeats = CPU_SMALL, CPU_ITERS, CPU_REPEATS
  if args.shape:
    small = tuple(int(x) for x in args.shape.split(","))
  iters, repeats = args.iters or iters, args.repeats or repeats
  t_iters = 3 if args.smoke else 20

  report = {
      "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
      "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "jax": jax.__version__},
      "output_path": _dlpack.output_path(device),
      "smoke": args.smoke,
      "host_overhead": host_overhead(small, dtype, device, iters, repeats),
      "host_components_us": components(small, dtype, device, iters, repeats),
      "backward_paths_us": backward_paths(small, dtype, device, iters, repeats),
      "throughput": [] if args.cpu else throughput(large, dtype, device, t_iters, repeats),
  }
  if args.profile:
    profile(small, dtype, device, iters, args.profile)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=2)

  h = report["host_overhead"]
  print(f"device {report['device']}, output path {report['output_path']}, {report['versions']}")
  print(f"\nhost overhead per call at {tuple(h['shape'])} {h['dtype']} (us; medians of "
        f"{h['repeats']} rounds x {h['iters']} calls)")
  print(f"  {'':<16} {'wall':>10} {'thread cpu':>11}")
  for name, us in h["us_per_call"].items():
    print(f"  {name:<16} {us:10.1f} {h['thread_cpu_us_per_call'][name]:11.1f}")
  print(f"  added fwd        {h['added_us_fwd']:10.1f} {h['added_thread_cpu_us_fwd']:11.1f}   "
        "(target <= 80)")
  print(f"  added fwd+bwd    {h['added_us_fwd_bwd']:10.1f} {h['added_thread_cpu_us_fwd_bwd']:11.1f}   "
        "(target <= 250)")
  print("  of which (measured alone):")
  for name, us in report["host_components_us"].items():
    print(f"    {name:<34} {us:8.1f}")
  print("  backward paths (wall / calling-thread cpu, us):")
  for name, t in report["backward_paths_us"].items():
    print(f"    {name:<34} {t['wall_us']:8.1f} {t['thread_cpu_us']:8.1f}")
  if not report["throughput"]:
    print(f"\nwrote {args.out}")
    return report
  print(f"\nthroughput at {tuple(large)} (b, s, H, d) {dtype} (TFLOP/s)")
  print(f"  {'causal':<7}{'jax fwd':>9}{'bridge':>9}{'ratio':>7}{'jax f+b':>9}{'bridge':>9}{'ratio':>7}")
  for row in report["throughput"]:
    tf = row["tflops"]
    print(f"  {str(row['causal']):<7}{tf['jax_fwd']:9.2f}{tf['bridge_fwd']:9.2f}{row['ratio_fwd']:7.3f}"
          f"{tf['jax_fwd_bwd']:9.2f}{tf['bridge_fwd_bwd']:9.2f}{row['ratio_fwd_bwd']:7.3f}")
  print(f"\nwrote {args.out}")
  return report


if __name__ == "__main__":
  main()
