"""Where the torch bridge's host time goes, piece by piece, and what a new sequence length costs.

Each row times one step of a bridged call on its own (wall per call, back-to-back, medians):
the jitted JAX forward/backward on JAX-owned arrays, on DLPack-imported arrays, their donating
`_into` forms, the imports, the stream fences, the torch custom-op layers; then the first-call
(compile) time of forward and forward+backward for new sequence lengths, per dtype.

    python -m bench.bridge_probe [--compile] [--out FILE]
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
import torch_bridge  # noqa: E402  first: JAX's GPU memory policy

import jax  # pylint: disable=g-import-not-at-top,wrong-import-order
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-order

from pallas_attn import flash, flash_attn as jax_fa  # pylint: disable=g-import-not-at-top
from torch_bridge import _dlpack  # pylint: disable=g-import-not-at-top


def _sync():
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def _time(fn, sync, iters=200, repeats=7, warmup=20):
  for _ in range(warmup):
    fn()
  sync()
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(iters):
      fn()
    sync()
    ts.append((time.perf_counter() - t0) / iters)
  return statistics.median(ts) * 1e6


def pieces(shape, dtype, device):
  g = torch.Generator().manual_seed(0)
  mk = lambda: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
  q, k, v, do = mk(), mk(), mk(), mk()
  b, s, h, d = shape
  target = _dlpack._target(q.device)  # pylint: disable=protected-access
  imp = _dlpack._import  # pylint: disable=protected-access
  qj, kj, vj, doj = (imp(x, target, True) for x in (q, k, v, do))
  qo, ko, vo, doo = (x + 0 for x in (qj, kj, vj, doj))  # JAX-owned
  spec, _ = jax_fa.prepare(qj, kj, vj, causal=True)
  oj, lj = flash.forward(qo, ko, vo, None, spec)
  last = {}
  sync = lambda: (jax.block_until_ready(list(last.values())), _sync())

  def keep(name, fn):
    def run():
      last[name] = fn()
    return run

  out_t = torch.empty_like(q)
  lse_t = torch.empty((b, h, s), dtype=torch.float32, device=device)
  dq_t, dk_t, dv_t = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
  lse_tt = torch.empty((b, h, s), dtype=torch.float32, device=device)

  def fwd_into_imported():
    o, l = imp(out_t, target, False), imp(lse_t, target, False)
    last["fi"] = flash.forward_into(qj, kj, vj, None, o, l, spec)

  def fwd_into_owned():
    o, l = jnp.empty(q.shape, qo.dtype), jnp.empty((b, h, s), jnp.float32)
    last["fo"] = flash.forward_into(qo, ko, vo, None, o, l, spec)

  ot = torch.empty_like(q)
  _dlpack.run(_kernel_fwd(), (q, k, v, None, None), (ot, lse_tt), (spec, None))
  ojt, ljt = imp(ot, target, False), imp(lse_tt, target, False)

  def bwd_into_imported():
    a = [imp(x, target, False) for x in (dq_t, dk_t, dv_t)]
    last["bi"] = flash.backward_into(qj, kj, vj, None, ojt, ljt, doj, None, *a, spec)

  def bwd_into_owned():
    a = [jnp.empty(x.shape, x.dtype) for x in (qo, ko, vo)]
    last["bo"] = flash.backward_into(qo, ko, vo, None, oj, lj, doo, None, *a, spec)

  fargs = (q, k, v, None, 0.0, None, True, -1, -1, 0.0, None)
  fwd_op = torch.ops.pallas_attn.flash_attn_fwd.default
  bwd_op = torch.ops.pallas_attn.flash_attn_bwd.default
  out, lse = fwd_op(*fargs)
  qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

  def fwd_bwd_autograd():
    o = torch_bridge.flash_attn_func(qg, kg, vg, causal=True)
    torch.autograd.grad(o, (qg, kg, vg), do)

  rows = {
      "jax_fwd_owned": keep("a", lambda: flash.forward(qo, ko, vo, None, spec)),
      "jax_fwd_imported": keep("b", lambda: flash.forward(qj, kj, vj, None, spec)),
      "jax_fwd_into_owned": fwd_into_owned,
      "jax_fwd_into_imported(+2 imports)": fwd_into_imported,
      "jax_bwd_owned": keep("c", lambda: flash.backward(qo, ko, vo, None, oj, lj, doo, None, spec)),
      "jax_bwd_imported": keep("d", lambda: flash.backward(qj, kj, vj, None, ojt, ljt, doj, None, spec)),
      "jax_bwd_into_owned": bwd_into_owned,
      "jax_bwd_into_imported(+3 imports)": bwd_into_imported,
      "import_no_fence": lambda: imp(q, target, False),
      "import_fence": lambda: imp(q, target, True),
      "torch_waits_for": lambda: _dlpack._torch_waits_for(target, [oj]),  # pylint: disable=protected-access
      "fwd_op": lambda: fwd_op(*fargs),
      "bwd_op": lambda: bwd_op(do, None, *fargs, out, lse),
      "public_fwd": lambda: torch_bridge.flash_attn_func(q, k, v, causal=True),
      "public_fwd_bwd_autograd": fwd_bwd_autograd,
  }
  it = 200 if device.type == "cuda" else 3
  return {n: _time(fn, sync, iters=it, repeats=3 if it == 3 else 7, warmup=2 if it == 3 else 20) for n, fn in rows.items()}


def _kernel_fwd():
  from torch_bridge import flash_attn as tfa  # pylint: disable=g-import-not-at-top
  return _dlpack.Kernel(into=tfa._forward_into, plain=tfa._forward)  # pylint: disable=protected-access


def compile_times(device, lengths, dtypes, h=4, d=64):
  rows = []
  for dt in dtypes:
    for s in lengths:
      q = torch.randn(1, s, h, d, device=device, dtype=dt, requires_grad=True)
      k = torch.randn(1, s, h, d, device=device, dtype=dt, requires_grad=True)
      v = torch.randn(1, s, h, d, device=device, dtype=dt, requires_grad=True)
      t0 = time.perf_counter()
      o = torch_bridge.flash_attn_func(q, k, v, causal=True)
      _sync()
      t1 = time.perf_counter()
      o.sum().backward()
      _sync()
      t2 = time.perf_counter()
      rows.append({"dtype": str(dt), "s": s, "fwd_s": t1 - t0, "bwd_s": t2 - t1})
      print(f"compile {dt} s={s}: fwd {t1 - t0:.2f} s, bwd {t2 - t1:.2f} s", flush=True)
  return rows


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--compile", action="store_true")
  p.add_argument("--out", default="bench/out/bridge_probe.json")
  a = p.parse_args(argv)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  small = (1, 128, 4, 64) if device.type == "cuda" else (1, 16, 2, 16)
  rep = {"pieces": pieces(small, torch.bfloat16 if device.type == "cuda" else torch.float32, device)}
  for n, us in rep["pieces"].items():
    print(f"{n:<40} {us:9.1f} us", flush=True)
  if a.compile:
    rep["compile"] = (compile_times(device, (200, 333), (torch.bfloat16,))
                      + compile_times(device, (200,), (torch.float32,)))
  os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(rep, f, indent=2)


if __name__ == "__main__":
  main()
