"""Main job: every public API on one small problem, checked against the reference and timed.

    python -m pallas_attn.demo [--cpu] [--problem small|large]

On a GPU the kernels run through Triton on a larger problem; without one, Pallas interpret mode runs a
tiny problem on the CPU. Each API is one `Entry` in `ENTRIES`; a new family adds one entry. An entry
passes when its error against the float32 reference is at most 2x (outputs) or 3x (gradients) the error
of the same reference computed in the input dtype, plus a few ulps (the rule of tests/numerics.py).
Exit status 1 when any entry fails.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
import traceback
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import pallas_attn
from pallas_attn import flash_dma
from pallas_attn.kvcache_reference import kvcache_reference
from pallas_attn.reference import (attention_reference, dynamic_mask_reference,
                                   landmark_attention_reference, sparse_attention_reference)


@dataclasses.dataclass(frozen=True)
class Problem:
  b: int
  s: int
  h: int
  hk: int
  d: int
  dtype: str

  def __str__(self):
    return f"b={self.b} s={self.s} H={self.h} Hk={self.hk} d={self.d} {self.dtype}"


PROBLEMS = {
    "small": Problem(b=1, s=80, h=4, hk=2, d=64, dtype="float32"),
    "large": Problem(b=2, s=1024, h=8, hk=2, d=128, dtype="bfloat16"),
}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One public API call. Inputs are a dict of named arrays; `wrt` names the differentiable ones.

  ours(inputs, face) and reference(inputs, upcast) return the same tuple of outputs, named by
  `outputs`; `face` is JAX_FACE or TORCH_FACE (the module whose function runs, and how to make an
  index array for it), so one closure calls the same API on both faces. An
  output named "lse" may hold +inf (empty rows) and is compared on its finite part. Inputs are arrays
  only (they become jit arguments); static values (max_seqlen, block sizes) belong in the closures.
  An empty `wrt` makes a forward-only entry (kvcache).
  """
  name: str
  make_inputs: Callable[[Problem, jax.Array], dict]
  ours: Callable[[dict], tuple]
  reference: Callable[[dict, bool], tuple]
  wrt: tuple[str, ...]
  outputs: tuple[str, ...] = ("out", "lse")
  torch_face: bool = True  # False: a JAX-only API (jax.nn's convention)


@dataclasses.dataclass(frozen=True)
class Face:
  """Where an entry's call goes: the module with the public functions, and how an index array the
  call builds (cu_seqlens, a landmark mask) becomes one of that face's arrays."""
  name: str
  lib: object
  array: Callable[[np.ndarray], object]


JAX_FACE = Face("jax", pallas_attn, jnp.asarray)
TORCH_FACE = None  # set by _torch_face() when torch imports


def _normal(key, shape, dtype):
  return jax.random.normal(key, shape, jnp.dtype(dtype))


def _qkv_inputs(p: Problem, key, hk=None):
  ks = jax.random.split(key, 3)
  hk = p.hk if hk is None else hk
  return dict(q=_normal(ks[0], (p.b, p.s, p.h, p.d), p.dtype),
              k=_normal(ks[1], (p.b, p.s, hk, p.d), p.dtype),
              v=_normal(ks[2], (p.b, p.s, hk, p.d), p.dtype))


def _dense(name, hk_equals_h=False, alibi=False, **options):
  """flash_attn_func with fixed options; ALiBi slopes (H,) become an extra non-differentiable input."""
  def make(p, key):
    x = _qkv_inputs(p, key, hk=p.h if hk_equals_h else None)
    if alibi:
      x["alibi_slopes"] = jnp.linspace(0.02, 0.3, p.h, dtype=jnp.float32)
    return x

  def ours(x, face):
    out, lse, _ = face.lib.flash_attn_func(x["q"], x["k"], x["v"], alibi_slopes=x.get("alibi_slopes"),
                                  return_attn_probs=True, **options)
    return out, lse

  def reference(x, upcast):
    return attention_reference(x["q"], x["k"], x["v"], alibi_slopes=x.get("alibi_slopes"),
                               upcast=upcast, **options)

  return Entry(name, make, ours, reference, wrt=("q", "k", "v"))


def _qkvpacked(name, **options):
  def make(p, key):
    return dict(qkv=_normal(key, (p.b, p.s, 3, p.h, p.d), p.dtype))

  def ours(x, face):
    out, lse, _ = face.lib.flash_attn_qkvpacked_func(x["qkv"], return_attn_probs=True, **options)
    return out, lse

  def reference(x, upcast):
    qkv = x["qkv"]
    return attention_reference(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], upcast=upcast, **options)

  return Entry(name, make, ours, reference, wrt=("qkv",))


def _kvpacked(name, **options):
  def make(p, key):
    x = _qkv_inputs(p, key)
    return dict(q=x["q"], kv=jnp.stack([x["k"], x["v"]], axis=2))

  def ours(x, face):
    out, lse, _ = face.lib.flash_attn_kvpacked_func(x["q"], x["kv"], return_attn_probs=True, **options)
    return out, lse

  def reference(x, upcast):
    kv = x["kv"]
    return attention_reference(x["q"], kv[:, :, 0], kv[:, :, 1], upcast=upcast, **options)

  return Entry(name, make, ours, reference, wrt=("q", "kv"))


def _varlen(name, **options):
  """Two sequences per batch row of unequal lengths, packed; the reference runs them one by one."""
  def lengths(p):
    cut = max(1, p.s // 3)
    return [cut, p.s - cut] * p.b

  def make(p, key):
    x = _qkv_inputs(p, key)
    return {n: a.reshape(p.b * p.s, *a.shape[2:]) for n, a in x.items()}

  def ours(x, face):
    lens = lengths(_problem_of(x))
    cu = face.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
    out, lse, _ = face.lib.flash_attn_varlen_func(x["q"], x["k"], x["v"], cu, cu, max(lens), max(lens),
                                                  return_attn_probs=True, **options)
    return out, lse

  def reference(x, upcast):
    lens = lengths(_problem_of(x))
    outs, lses, start = [], [], 0
    for n in lens:
      sl = slice(start, start + n)
      o, l = attention_reference(x["q"][None, sl], x["k"][None, sl], x["v"][None, sl], upcast=upcast,
                                 **options)
      outs.append(o[0])
      lses.append(l[0])
      start += n
    return jnp.concatenate(outs), jnp.concatenate(lses, axis=1)

  return Entry(name, make, ours, reference, wrt=("q", "k", "v"))


def _problem_of(x) -> Problem:
  # Varlen entries recover the split from the packed shape: the demo's problems have b rows of s.
  total = x["q"].shape[0]
  for p in PROBLEMS.values():
    if p.b * p.s == total:
      return p
  raise ValueError(f"no demo problem with {total} tokens")


def _sink(name, **options):
  def make(p, key):
    x = _qkv_inputs(p, key)
    x["sink"] = jax.random.normal(jax.random.fold_in(key, 7), (2, p.h), jnp.float32)
    return x

  def ours(x, face):
    out, lse, _ = face.lib.fa2_func_with_sink(x["q"], x["k"], x["v"], x["sink"],
                                              return_attn_probs=True, **options)
    return out, lse

  def reference(x, upcast):
    return attention_reference(x["q"], x["k"], x["v"], sink=x["sink"], upcast=upcast, **options)

  return Entry(name, make, ours, reference, wrt=("q", "k", "v", "sink"))


def _sparse(name, mode, ctx):
  def make(p, key):
    x = _qkv_inputs(p, key, hk=p.h)
    return {n: a.reshape(p.b, p.s, p.h * p.d) for n, a in x.items()}

  def heads(x):
    return next(p.h for p in PROBLEMS.values() if p.h * p.d == x["q"].shape[-1])

  def ours(x, face):
    return (face.lib.sparse_attention(x["q"], x["k"], x["v"], heads(x), mode, ctx),)

  def reference(x, upcast):
    return (sparse_attention_reference(x["q"], x["k"], x["v"], heads(x), mode, ctx, upcast=upcast),)

  return Entry(name, make, ours, reference, wrt=("q", "k", "v"), outputs=("out",))


def _landmark(name, block_size=16):
  """(B, H, L, d) layout; one history block precedes the queries."""
  def make(p, key):
    ks = jax.random.split(key, 3)
    lq = p.s
    lk = lq + block_size
    return dict(q=_normal(ks[0], (p.b, p.h, lq, p.d), p.dtype),
                k=_normal(ks[1], (p.b, p.h, lk, p.d), p.dtype),
                v=_normal(ks[2], (p.b, p.h, lk, p.d), p.dtype))

  def is_mem(x):
    return (np.arange(x["k"].shape[2]) % block_size) == block_size - 1

  def ours(x, face):
    return (face.lib.fused_landmark_attention(x["q"], x["k"], x["v"], face.array(is_mem(x)),
                                              block_size=block_size),)

  def reference(x, upcast):
    scale = x["q"].shape[-1] ** -0.5
    return (landmark_attention_reference(x["q"], x["k"], x["v"], jnp.asarray(is_mem(x)), scale, block_size,
                                         upcast=upcast),)

  return Entry(name, make, ours, reference, wrt=("q", "k", "v"), outputs=("out",))


def _kvcache(name, page=16, s_new=2, **options):
  """Paged cache (pages in shuffled order), rotary on half the head dim, per-row lengths; the
  appended caches are outputs too (forward only)."""
  def make(p, key):
    ks = jax.random.split(key, 6)
    n_pages = p.b * (p.s // page)
    half = p.d // 4
    angles = jnp.arange(p.s + s_new)[:, None] * (10000.0 ** (-jnp.arange(half) / half))[None, :]
    return dict(
        q=_normal(ks[0], (p.b, s_new, p.h, p.d), p.dtype),
        k_cache=_normal(ks[1], (n_pages, page, p.hk, p.d), p.dtype),
        v_cache=_normal(ks[2], (n_pages, page, p.hk, p.d), p.dtype),
        k=_normal(ks[3], (p.b, s_new, p.hk, p.d), p.dtype),
        v=_normal(ks[4], (p.b, s_new, p.hk, p.d), p.dtype),
        rotary_cos=jnp.cos(angles).astype(p.dtype), rotary_sin=jnp.sin(angles).astype(p.dtype),
        cache_seqlens=jnp.maximum(p.s - s_new - 7 * jnp.arange(p.b, dtype=jnp.int32), 0),
        block_table=jax.random.permutation(ks[5], n_pages).astype(jnp.int32).reshape(p.b, -1))

  def args(x):
    return (x["q"], x["k_cache"], x["v_cache"], x["k"], x["v"], x["rotary_cos"], x["rotary_sin"],
            x["cache_seqlens"])

  def ours(x, face):
    result = face.lib.flash_attn_with_kvcache(*args(x), block_table=x["block_table"],
                                              return_softmax_lse=True, **options)
    if face is TORCH_FACE:  # torch appends to the caches in place, as flash-attn does
      return (*result, x["k_cache"], x["v_cache"])
    (out, lse), k_cache, v_cache = result
    return out, lse, k_cache, v_cache

  def reference(x, upcast):
    (out, lse), k_cache, v_cache = kvcache_reference(
        *args(x), block_table=x["block_table"], upcast=upcast,
        **{n: o for n, o in options.items() if n != "num_splits"})
    return out, lse, k_cache, v_cache

  return Entry(name, make, ours, reference, wrt=(), outputs=("out", "lse", "k_cache", "v_cache"))


def _dynamic_mask(name, keep_window_size, **options):
  """flash_dma.fwd with the top-k mask of zoh; zoh is differentiable, the mask is not."""
  def make(p, key):
    x = _qkv_inputs(p, key)
    x["zoh"] = _normal(jax.random.fold_in(key, 7), (p.b, p.hk, p.s, p.s), p.dtype)
    x["active_mask"] = flash_dma.topk_mask(x["zoh"], keep_window_size, options.get("is_causal", False))
    return x

  def ours(x, face):
    out, lse, _, _ = face.lib.flash_dma.fwd(x["q"], x["k"], x["v"], x["zoh"], x["active_mask"],
                                            **options)
    return out, lse

  def reference(x, upcast):
    return dynamic_mask_reference(x["q"], x["k"], x["v"], x["zoh"], x["active_mask"], upcast=upcast,
                                  **options)

  return Entry(name, make, ours, reference, wrt=("q", "k", "v", "zoh"))


def _dot_product(name, **options):
  """pallas_attn.dot_product_attention (jax.nn's signature: top-left causal, per-row lengths)."""
  def make(p, key):
    x = _qkv_inputs(p, key)
    x["lengths"] = jnp.asarray([max(1, p.s - 17 * r) for r in range(p.b)], jnp.int32)
    return x

  def ours(x, face):
    del face
    out, res = pallas_attn.dot_product_attention(
        x["q"], x["k"], x["v"], query_seq_lengths=x["lengths"], key_value_seq_lengths=x["lengths"],
        return_residual=True, **options)
    return out, _valid_rows(res, x["lengths"])

  def _valid_rows(res, lengths):  # a padding row's residual is undefined (jax.nn: a fill constant)
    return jnp.where(jnp.arange(res.shape[1])[None, :, None] < lengths[:, None, None], res, 0)

  def reference(x, upcast):
    f32 = (lambda a: a.astype(jnp.float32)) if upcast else (lambda a: a)
    with jax.default_matmul_precision("highest" if upcast else "default"):
      out, res = jax.nn.dot_product_attention(
          f32(x["q"]), f32(x["k"]), f32(x["v"]), query_seq_lengths=x["lengths"],
          key_value_seq_lengths=x["lengths"], return_residual=True, **options)
    return out, _valid_rows(res.astype(jnp.float32), x["lengths"])

  return Entry(name, make, ours, reference, wrt=("q", "k", "v"), outputs=("out", "residual"),
               torch_face=False)


ENTRIES = [
    _dense("flash_attn_func", hk_equals_h=True),
    _dense("flash_attn_func causal", hk_equals_h=True, causal=True),
    _dense("flash_attn_func window", hk_equals_h=True, window_size=(32, 8)),
    _dense("flash_attn_func softcap", hk_equals_h=True, causal=True, softcap=5.0),
    _dense("flash_attn_func alibi", hk_equals_h=True, causal=True, alibi=True),
    _dense("flash_attn_func GQA", causal=True),
    _qkvpacked("flash_attn_qkvpacked_func", causal=True),
    _kvpacked("flash_attn_kvpacked_func", causal=True),
    _varlen("flash_attn_varlen_func causal", causal=True),
    _sink("fa2_func_with_sink causal", causal=True),
    _sparse("sparse_attention local", "local", 24),
    _sparse("sparse_attention strided", "strided", 8),
    _landmark("fused_landmark_attention"),
    _dynamic_mask("flash_dma.fwd top-k causal", 24, is_causal=True),
    _kvcache("flash_attn_with_kvcache paged", causal=True, rotary_interleaved=False, num_splits=3),
    _dot_product("dot_product_attention causal", is_causal=True),
]


# ------------------------------------------------------------------------------------------------
# The tolerance rule (kept in step with tests/numerics.py; the package does not import its tests).

_FLOOR_ULPS = {"float32": 32.0, "bfloat16": 1.0, "float16": 1.0}


def _f32(x):
  return np.asarray(jnp.asarray(x, jnp.float32))


def _max_err(x, ref):
  return float(np.max(np.abs(_f32(x) - _f32(ref)), initial=0.0))


def _floor(ref, dtype):
  scale = max(float(np.max(np.abs(_f32(ref)), initial=0.0)), 1.0)
  return _FLOOR_ULPS[jnp.dtype(dtype).name] * float(jnp.finfo(dtype).eps) * scale


@dataclasses.dataclass
class Check:
  name: str
  err: float
  lowp: float
  atol: float
  factor: float
  note: str = ""

  @property
  def bound(self) -> float:
    return self.factor * self.lowp + self.atol

  @property
  def ok(self) -> bool:
    return not self.note and self.err <= self.bound


def _check(name, ours, lowp, ref, factor, floor_dtype=None):
  ours, lowp, ref = _f32(ours), _f32(lowp), _f32(ref)
  dtype = floor_dtype or "float32"
  if np.isnan(ours).any():
    return Check(name, float("nan"), 0.0, 0.0, factor, note="NaN")
  fin = np.isfinite(ref)
  if not np.array_equal(np.isfinite(ours), fin):
    return Check(name, float("inf"), 0.0, 0.0, factor, note="inf pattern differs")
  lowp = np.where(np.isfinite(lowp), lowp, ref)
  return Check(name, _max_err(ours[fin], ref[fin]), _max_err(lowp[fin], ref[fin]),
               _floor(ref[fin], dtype), factor)


# ------------------------------------------------------------------------------------------------
# Running


def _timed(fn, *args, iters: int) -> float:
  """Median wall time in ms after one warm-up call (which compiles)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def run_entry(entry: Entry, problem: Problem, key, iters: int):
  """(checks, forward ms, forward+backward ms or None for forward-only entries)."""
  inputs = entry.make_inputs(problem, key)
  diff = {n: inputs[n] for n in entry.wrt}
  rest = {n: x for n, x in inputs.items() if n not in diff}

  # Inputs travel as jit arguments, not closure constants (XLA would embed large arrays in the program).
  def ours(d, r):
    return entry.ours({**r, **d}, JAX_FACE)

  def reference(upcast):
    return lambda d: entry.reference({**rest, **d}, upcast)

  outs, vjp = jax.vjp(lambda d: ours(d, rest), diff)
  cot_key = jax.random.fold_in(key, 1)
  # A random cotangent for every output but lse: its gradient path is covered by the tests.
  cts = tuple(jnp.zeros_like(o) if n == "lse" else _normal(jax.random.fold_in(cot_key, i), o.shape, o.dtype)
              for i, (n, o) in enumerate(zip(entry.outputs, outs)))
  refs = {}
  for upcast in (True, False):
    ref_outs, ref_vjp = jax.vjp(reference(upcast), diff)
    ref_grads = ref_vjp(tuple(c.astype(o.dtype) for c, o in zip(cts, ref_outs)))[0] if diff else {}
    refs[upcast] = (ref_outs, ref_grads)

  checks = []
  for n, o, lo, r in zip(entry.outputs, outs, refs[False][0], refs[True][0]):
    checks.append(_check(n, o, lo, r, 2.0, "float32" if n == "lse" else o.dtype))
  if diff:
    grads = vjp(cts)[0]
    for n in entry.wrt:
      checks.append(_check("d" + n, grads[n], refs[False][1][n], refs[True][1][n], 3.0, grads[n].dtype))

  t_fwd = _timed(jax.jit(ours), diff, rest, iters=iters)
  t_all = None
  if diff:
    fwd_bwd = jax.jit(lambda d, r, c: jax.vjp(lambda d: ours(d, r), d)[1](c))
    t_all = _timed(fwd_bwd, diff, rest, cts, iters=iters)
  torch_run = None if TORCH_FACE is None or not entry.torch_face else lambda: run_torch_entry(entry, inputs, cts, refs, iters)
  return checks, t_fwd, t_all, torch_run


# ------------------------------------------------------------------------------------------------
# The torch face: the same entries through torch_bridge on torch tensors (CUDA when the JAX device
# is a GPU and torch sees one, else the CPU), checked against the same references.

def _torch_face(use_cuda: bool):
  global TORCH_FACE
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import torch_bridge  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f"torch face: skipped ({e}); `pip install torch` to run it too")
    return None
  device = "cuda" if use_cuda and torch.cuda.is_available() else "cpu"
  TORCH_FACE = Face("torch", torch_bridge, lambda a: torch.from_numpy(np.asarray(a)).to(device))
  return torch, device


_TORCH = {}


def _to_torch(x, grad=False):
  torch, device = _TORCH["torch"], _TORCH["device"]
  dt = jnp.dtype(x.dtype)
  host = np.asarray(x.astype(jnp.float32) if dt == jnp.bfloat16 else x)
  t = torch.from_numpy(host.copy()).to(device)
  if dt == jnp.bfloat16:
    t = t.to(torch.bfloat16)
  return t.requires_grad_() if grad else t


def _to_jax(t, dtype):
  t = t.detach().cpu()
  if str(t.dtype) == "torch.bfloat16":
    return jnp.asarray(t.float().numpy()).astype(jnp.bfloat16)
  return jnp.asarray(t.numpy()).astype(dtype)


def run_torch_entry(entry: Entry, inputs: dict, cts: tuple, refs: dict, iters: int):
  """(checks, forward ms, forward+backward ms) of the entry on the torch face."""
  torch = _TORCH["torch"]
  sync = torch.cuda.synchronize if _TORCH["device"] == "cuda" else (lambda: None)

  def call(grad: bool):
    x = {n: _to_torch(a, grad and n in entry.wrt) for n, a in inputs.items()}
    return x, entry.ours(x, TORCH_FACE)

  def loss_of(outs):
    return sum((o.float() * _to_torch(c).float()).sum()
               for n, o, c in zip(entry.outputs, outs, cts) if n != "lse")

  x, outs = call(grad=bool(entry.wrt))
  checks = []
  ref_outs = refs[True][0]
  for n, o, lo, r in zip(entry.outputs, outs, refs[False][0], ref_outs):
    checks.append(_check(n, _to_jax(o, r.dtype), lo, r, 2.0, "float32" if n == "lse" else r.dtype))
  if entry.wrt:
    grads = torch.autograd.grad(loss_of(outs), [x[n] for n in entry.wrt])
    for n, g in zip(entry.wrt, grads):
      ref_g = refs[True][1][n]
      checks.append(_check("d" + n, _to_jax(g, inputs[n].dtype), refs[False][1][n], ref_g, 3.0,
                           inputs[n].dtype))

  def timed(fn):
    fn()
    sync()
    times = []
    for _ in range(iters):
      t0 = time.perf_counter()
      fn()
      sync()
      times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)

  xs = {n: _to_torch(a, n in entry.wrt) for n, a in inputs.items()}
  with torch.no_grad():
    t_fwd = timed(lambda: entry.ours(xs, TORCH_FACE))
  t_all = None
  if entry.wrt:
    t_all = timed(lambda: torch.autograd.grad(loss_of(entry.ours(xs, TORCH_FACE)),
                                              [xs[n] for n in entry.wrt]))
  return checks, t_fwd, t_all


def _backend_name(device) -> str:
  if device.platform == "gpu" and os.environ.get("PALLAS_ATTN_INTERPRET", "0") in ("", "0"):
    return "Pallas Triton lowering"
  return "Pallas interpret mode"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m pallas_attn.demo", description=__doc__.splitlines()[0])
  parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
  parser.add_argument("--problem", choices=sorted(PROBLEMS), default=None,
                      help="problem size (default: large on a GPU, small on the CPU)")
  args = parser.parse_args(argv)

  device = jax.devices("cpu")[0] if args.cpu else jax.devices()[0]
  problem = PROBLEMS[args.problem or ("large" if device.platform == "gpu" else "small")]
  iters = 10 if device.platform == "gpu" else 2
  print(f"jax {jax.__version__}; device: {device.platform} ({device.device_kind}); "
        f"backend: {_backend_name(device)}")
  print(f"problem: {problem}")
  print("err = max|ours - float32 reference|; bound = 2x (outputs) or 3x (gradients) the error of the "
        "reference computed in the input dtype, plus a few ulps; grad = the gradient closest to its bound\n")

  face = _torch_face(use_cuda=device.platform == "gpu")
  if face is not None:
    _TORCH["torch"], _TORCH["device"] = face
    print(f"torch face: torch {face[0].__version__} on {face[1]} (the rows 'torch: ...')\n")
  header = (f"{'entry':30s} {'out err':>9s} {'bound':>9s} {'grad err':>9s} {'bound':>9s} "
            f"{'fwd ms':>9s} {'fwd+bwd ms':>10s}  result")
  print(header)
  print("-" * len(header))
  failures = []
  key = jax.random.PRNGKey(0)
  ctx = jax.default_device(device) if args.cpu else contextlib.nullcontext()
  with ctx:
    for i, entry in enumerate(ENTRIES):
      try:
        checks, t_fwd, t_all, torch_run = run_entry(entry, problem, jax.random.fold_in(key, i), iters)
      except Exception as e:  # one broken API must not hide the others' results
        traceback.print_exc()
        print(f"{entry.name:30s} raised {type(e).__name__}: {e}")
        failures.append((entry.name, f"raised {type(e).__name__}"))
        continue
      _report(entry, entry.name, checks, t_fwd, t_all, failures)
      if torch_run is not None:
        name = "torch: " + entry.name
        try:
          _report(entry, name, *torch_run(), failures)
        except Exception as e:  # pylint: disable=broad-except
          traceback.print_exc()
          print(f"{name:30s} raised {type(e).__name__}: {e}")
          failures.append((name, f"raised {type(e).__name__}"))

  print()
  total = len(ENTRIES) + (0 if TORCH_FACE is None else sum(e.torch_face for e in ENTRIES))
  if failures:
    print(f"FAILED: {len(failures)} of {total} entries")
    return 1
  print(f"all {total} entries within tolerance ({'both faces' if TORCH_FACE else 'JAX face'})")
  return 0


def _report(entry, name, checks, t_fwd, t_all, failures):
  out = checks[0]
  grads = checks[len(entry.outputs):]
  grad = max(grads, key=lambda c: c.err / c.bound) if grads else None
  bad = [c for c in checks if not c.ok]
  result = "ok" if not bad else "FAIL " + ", ".join(
      f"{c.name}: {c.note or f'{c.err:.2e} > {c.factor:g}*{c.lowp:.2e}+{c.atol:.2e}'}" for c in bad)
  grad_cols = f"{grad.err:9.2e} {grad.bound:9.2e}" if grad else f"{'-':>9s} {'-':>9s}"
  t_all = f"{t_all:10.2f}" if t_all is not None else f"{'-':>10s}"
  print(f"{name:30s} {out.err:9.2e} {out.bound:9.2e} {grad_cols} {t_fwd:9.2f} {t_all}  {result}",
        flush=True)
  if bad:
    failures.append((name, result))


if __name__ == "__main__":
  sys.exit(main())
