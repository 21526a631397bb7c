"""The tolerance rule shared by every parity test, and the references it needs.

Rule (FlashAttention's): against the accurate reference (float32 math at HIGHEST precision), our error
may be at most `factor` times the error of the same reference computed in the input dtype, plus a
rounding-noise floor. factor is 2 for outputs and lse, 3 for gradients. Errors are max-abs.

Floors are a few ulps of the compared dtype at the reference's largest magnitude (at least 1). For
float32 inputs the low-precision reference *is* the accurate one (error 0), so there the floor carries
the whole check: 32 ulps covers the fp32 summation-order noise we measured (at most ~9 ulps up to
sk = 257). For fp16/bf16 one ulp covers the final rounding of the output itself.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_attn.reference import attention_reference

OUT_FACTOR = 2.0
GRAD_FACTOR = 3.0
_FLOOR_ULPS = {"float32": 32.0, "bfloat16": 1.0, "float16": 1.0}


def eps(dtype) -> float:
  return float(jnp.finfo(jnp.dtype(dtype)).eps)


def as_f32(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x, jnp.float32))


def max_err(x, ref) -> float:
  return float(np.max(np.abs(as_f32(x) - as_f32(ref)), initial=0.0))


def noise_floor(ref, dtype) -> float:
  """A few ulps of `dtype` at max(max|ref|, 1): what rounding the exact answer alone can cost.

  The magnitude never drops below 1 because the inputs are unit normal: intermediate terms are O(1)
  even where the result cancels to ~0 (window (0, 0) makes dq exactly 0 in exact arithmetic).
  """
  scale = max(float(np.max(np.abs(as_f32(ref)), initial=0.0)), 1.0)
  return _FLOOR_ULPS[jnp.dtype(dtype).name] * eps(dtype) * scale


def assert_no_nan(name: str, x):
  n = int(np.isnan(as_f32(x)).sum())
  assert n == 0, f"{name}: {n} NaN of {np.size(x)}"


def assert_rule(name: str, ours, lowp, ref, *, factor: float, dtype=None):
  """err(ours) <= factor * err(lowp) + floor, all against ref; dtype picks the floor (default ours')."""
  assert tuple(np.shape(ours)) == tuple(np.shape(ref)), f"{name}: shape {np.shape(ours)} != {np.shape(ref)}"
  assert_no_nan(name, ours)
  dtype = jnp.dtype(dtype if dtype is not None else ours.dtype)
  e, el, atol = max_err(ours, ref), max_err(lowp, ref), noise_floor(ref, dtype)
  assert e <= factor * el + atol, (
      f"{name}: err(ours)={e:.3e} > {factor:g} * err(lowp)={el:.3e} + atol={atol:.3e} "
      f"({dtype.name}, max|ref|={float(np.max(np.abs(as_f32(ref)), initial=0.0)):.3e})")


def assert_output(name, ours, lowp, ref):
  assert_rule(name, ours, lowp, ref, factor=OUT_FACTOR)


def assert_grad(name, ours, lowp, ref):
  assert_rule(name, ours, lowp, ref, factor=GRAD_FACTOR)


def assert_lse(ours, lowp, ref, name: str = "lse"):
  """lse may hold +inf (empty rows): the inf pattern must match exactly, the finite part obeys the rule.

  lse is float32 whatever the input dtype, and our kernels compute it from exact fp32 products, so its
  floor is float32's.
  """
  ours, lowp, ref = as_f32(ours), as_f32(lowp), as_f32(ref)
  assert_no_nan(name, ours)
  assert not np.any(np.isneginf(ours)), f"{name}: -inf entries"
  inf_ours, inf_ref = np.isposinf(ours), np.isposinf(ref)
  assert np.array_equal(inf_ours, inf_ref), (
      f"{name}: +inf pattern (empty rows) differs from the reference: ours has {int(inf_ours.sum())}, "
      f"reference {int(inf_ref.sum())}, {int((inf_ours != inf_ref).sum())} positions disagree")
  fin = ~inf_ref
  assert_rule(name, ours[fin], np.where(np.isfinite(lowp), lowp, ref)[fin], ref[fin],
              factor=OUT_FACTOR, dtype=jnp.float32)


def check_attention(ours, lowp, ref):
  """ours/lowp/ref: (out, lse, dq, dk, dv)."""
  assert_output("out", ours[0], lowp[0], ref[0])
  assert_lse(ours[1], lowp[1], ref[1])
  for name, o, lo, r in zip(("dq", "dk", "dv"), ours[2:], lowp[2:], ref[2:]):
    assert_grad(name, o, lo, r)


@functools.partial(jax.jit, static_argnames=("options",))
def _reference_pair(q, k, v, alibi, dout, dlse, options: tuple):
  # One jit for both precisions: on the CPU, compiling dominates the cost of a parity case.
  results = []
  for upcast in (True, False):
    fn = functools.partial(attention_reference, alibi_slopes=alibi, upcast=upcast, **dict(options))
    (out, lse), vjp = jax.vjp(fn, q, k, v)
    results.append((out, lse, *vjp((dout.astype(out.dtype), dlse))))
  return tuple(results)


def references(q, k, v, alibi, dout, dlse, **options):
  """(accurate, lowp), each (out, lse, dq, dk, dv) of attention_reference for cotangents (dout, dlse):
  float32 at HIGHEST precision, and the same computation in the input dtype."""
  opts = tuple(sorted((name, tuple(x) if isinstance(x, list) else x) for name, x in options.items()))
  return _reference_pair(q, k, v, alibi, dout, dlse, opts)


def random_inputs(seed: int, b: int, sq: int, sk: int, h: int, hk: int, d: int, dtype="float32",
                  alibi: str | None = None):
  """q, k, v, alibi slopes (None, (h,) or (b, h)), dout, dlse: random normal, never zeros."""
  dtype = jnp.dtype(dtype)
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  q = jax.random.normal(ks[0], (b, sq, h, d), dtype)
  k = jax.random.normal(ks[1], (b, sk, hk, d), dtype)
  v = jax.random.normal(ks[2], (b, sk, hk, d), dtype)
  dout = jax.random.normal(ks[3], (b, sq, h, d), dtype)
  dlse = jax.random.normal(ks[4], (b, h, sq), jnp.float32)
  slopes = None
  if alibi is not None:
    shape = {"h": (h,), "bh": (b, h)}[alibi]
    # flash-attn's tests draw slopes in [0, 0.3); at sk ~ 256 that spans a wide range of biases.
    slopes = jax.random.uniform(ks[5], shape, jnp.float32, 0.01, 0.3)
  return q, k, v, slopes, dout, dlse
