"""flash_attn_varlen_*: packed sequences against the dense reference run sequence by sequence."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numerics
from pallas_attn import flash
from pallas_attn.flash_attn_varlen import (flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                                           flash_attn_varlen_qkvpacked_func)


def _cu(lengths):
  return jnp.asarray(np.concatenate([[0], np.cumsum(lengths)]), jnp.int32)


def _packed_references(q, k, v, dout, cq, ck, **opts):
  """(accurate, lowp), each (out, lse (H, total_q), dq, dk, dv), from the dense reference run one
  sequence at a time."""
  spans = [(int(cq[s]), int(cq[s + 1]), int(ck[s]), int(ck[s + 1])) for s in range(len(cq) - 1)]
  return _span_references(q, k, v, dout, spans, **opts)


def _span_references(q, k, v, dout, spans, **opts):
  """_packed_references for sequences given as (q_start, q_end, k_start, k_end) row spans."""
  both = [_packed_reference(q, k, v, dout, spans, i, **dict(opts)) for i in (0, 1)]
  return both[0], both[1]


def _packed_reference(q, k, v, dout, spans, which, **opts):
  outs = [np.zeros(q.shape, np.float32), np.full((q.shape[1], q.shape[0]), np.inf, np.float32),
          np.zeros(q.shape, np.float32), np.zeros(k.shape, np.float32), np.zeros(v.shape, np.float32)]
  slopes = opts.pop("alibi_slopes", None)
  for s, (a, e, c, f) in enumerate(spans):
    if a == e:
      continue
    sl = None if slopes is None else (slopes[s] if slopes.ndim == 2 else slopes)
    if c == f:  # no keys at all: every row is empty
      continue
    res = numerics.references(q[a:e][None], k[c:f][None], v[c:f][None], sl, dout[a:e][None],
                              jnp.zeros((1, q.shape[1], e - a), jnp.float32), **opts)[which]
    outs[0][a:e] = res[0][0]
    outs[1][:, a:e] = res[1][0]
    outs[2][a:e] = res[2][0]
    outs[3][c:f] += np.asarray(res[3][0], np.float32)
    outs[4][c:f] += np.asarray(res[4][0], np.float32)
  return [o.astype(np.float32) for o in outs]


CASES = [
    ([5, 0, 33, 1, 17], [9, 3, 20, 1, 40], 4, 2, 32, dict(causal=True), "float32"),
    ([16, 64, 1], [16, 64, 1], 2, 2, 64, dict(), "float32"),
    ([7, 30, 12], [40, 9, 12], 4, 1, 64, dict(window_size=(4, 2), softcap=5.0), "bfloat16"),
    ([20, 3, 45], [20, 50, 45], 4, 2, 128, dict(causal=True, alibi="bh"), "bfloat16"),
    ([1, 1, 1], [0, 5, 9], 2, 2, 32, dict(window_size=(-1, 0)), "float32"),
]


@pytest.mark.parametrize("lq,lk,h,hk,d,opts,dtype", CASES)
def test_varlen_parity(lq, lk, h, hk, d, opts, dtype):
  opts = dict(opts)
  cq, ck = _cu(lq), _cu(lk)
  ks = jax.random.split(jax.random.PRNGKey(sum(lq) + sum(lk)), 5)
  q = jax.random.normal(ks[0], (int(cq[-1]), h, d), jnp.dtype(dtype))
  k = jax.random.normal(ks[1], (int(ck[-1]), hk, d), jnp.dtype(dtype))
  v = jax.random.normal(ks[2], (int(ck[-1]), hk, d), jnp.dtype(dtype))
  dout = jax.random.normal(ks[3], q.shape, jnp.dtype(dtype))
  if opts.pop("alibi", None):
    opts["alibi_slopes"] = jax.random.uniform(ks[4], (len(lq), h), jnp.float32, 0.01, 0.3)

  def f(q, k, v):
    return flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk), return_attn_probs=True, **opts)[:2]

  (out, lse), vjp = jax.vjp(f, q, k, v)
  ours = (out, lse, *vjp((dout, jnp.zeros_like(lse))))
  ref, lowp = _packed_references(q, k, v, dout, cq, ck, **opts)
  numerics.check_attention(ours, lowp, ref)


def test_packed_forms_equal_the_plain_one():
  cu = _cu([9, 4, 20])
  qkv = jax.random.normal(jax.random.PRNGKey(1), (33, 3, 2, 16))
  base = flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, 20, 20, causal=True)
  np.testing.assert_array_equal(flash_attn_varlen_qkvpacked_func(qkv, cu, 20, causal=True), base)
  np.testing.assert_array_equal(
      flash_attn_varlen_kvpacked_func(qkv[:, 0], qkv[:, 1:], cu, cu, 20, 20, causal=True), base)


def test_new_max_seqlen_within_a_bucket_does_not_recompile():
  cu = _cu([9, 30])
  q = jax.random.normal(jax.random.PRNGKey(2), (39, 2, 16))
  flash_attn_varlen_func(q, q, q, cu, cu, 30, 30)
  before = flash.forward._cache_size()
  for m in (31, 32, 30):
    flash_attn_varlen_func(q, q, q, cu, cu, m, m)
  assert flash.forward._cache_size() == before
  flash_attn_varlen_func(q, q, q, cu, cu, 33, 33)  # the next power of two compiles once more
  assert flash.forward._cache_size() == before + 1


def test_same_result_for_any_max_seqlen_bound():
  cu = _cu([9, 30])
  q = jax.random.normal(jax.random.PRNGKey(4), (39, 2, 16))
  a = flash_attn_varlen_func(q, q, q, cu, cu, 30, 30, causal=True)
  b = flash_attn_varlen_func(q, q, q, cu, cu, 100, 100, causal=True)
  # A larger bound may pick larger tiles, which only reorders the fp32 sums.
  np.testing.assert_allclose(a, b, atol=2e-6)


@pytest.mark.parametrize("mutate,err,match", [
    (lambda a: dict(a, cu_seqlens_q=np.asarray(a["cu_seqlens_q"], np.int64)), TypeError, "cu_seqlens_q"),
    (lambda a: dict(a, cu_seqlens_k=jnp.asarray([0, 5], jnp.int32)), ValueError, "cu_seqlens_k"),
    (lambda a: dict(a, cu_seqlens_q=jnp.asarray([0, 9, 8], jnp.int32)), ValueError, "cu_seqlens_q"),
    (lambda a: dict(a, max_seqlen_q=8), ValueError, "max_seqlen_q"),
    (lambda a: dict(a, max_seqlen_k=9.0), ValueError, "max_seqlen_k"),
    (lambda a: dict(a, q=a["q"][None]), ValueError, "q"),
    # Paged keys come as (num_blocks, page, nheads_k, headdim) caches (tests/test_varlen_paged.py).
    (lambda a: dict(a, block_table=jnp.zeros((2, 1), jnp.int32)), ValueError, "k: expected a 4-D"),
])
def test_bad_input(mutate, err, match):
  q = jnp.ones((19, 2, 16))
  args = dict(q=q, k=q, v=q, cu_seqlens_q=_cu([9, 10]), cu_seqlens_k=_cu([9, 10]), max_seqlen_q=10,
              max_seqlen_k=10)
  with pytest.raises(err, match=match):
    flash_attn_varlen_func(**mutate(args))


# ----------------------------------------------------------------------------------------------------
# Bounds: whatever cu_seqlens holds, no kernel reads or writes outside q, k, v and its outputs.
# Concrete offsets are checked on the host; traced ones (under jit) are clamped in the kernel to
# [0, total rows], each sequence's span to [its start, total], and the query length to the bucketed
# max_seqlen_q. Interpret mode reads past an array's end as NaN (within a tile) or from a start
# moved back (further out), and drops or moves back stores likewise, so a missing clamp shows up
# as NaN or as a mismatch with the reference on the spans the clamp defines.


def _bounds_inputs(total_q, total_k, h=4, hk=2, d=32, pad=0, seed=0):
  """q, k, v, dout with `pad` NaN rows after the packed totals (rows that belong to no sequence)."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q, dout = (jax.random.normal(kk, (total_q, h, d)) for kk in (ks[0], ks[3]))
  k, v = (jax.random.normal(kk, (total_k, hk, d)) for kk in ks[1:3])
  nan = lambda x: jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], jnp.nan, x.dtype)])
  return (q, k, v, dout) if pad == 0 else tuple(nan(x) for x in (q, k, v, dout))


def _run_traced(q, k, v, dout, cq, ck, max_q, max_k, **opts):
  """(out, lse, dq, dk, dv) with the offsets traced, so only the kernel sees their values."""
  @jax.jit
  def run(q, k, v, dout, cq, ck):
    f = lambda q, k, v: flash_attn_varlen_func(q, k, v, cq, ck, max_q, max_k,
                                               return_attn_probs=True, **opts)[:2]
    (out, lse), vjp = jax.vjp(f, q, k, v)
    return (out, lse, *vjp((dout, jnp.zeros_like(lse))))
  return run(q, k, v, dout, cq, ck)


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("opts", [dict(causal=True), dict(window_size=(5, 3))], ids=["causal", "window"])
def test_nan_rows_after_the_total_are_never_read(traced, opts):
  """Rows past cu_seqlens[-1] (allowed: flash-attn takes total >= cu_seqlens[-1]) hold NaN; the
  valid rows' outputs and every gradient on the valid rows match the reference."""
  lq, lk, pad = [5, 17, 1], [9, 3, 21], 24
  q, k, v, dout = _bounds_inputs(sum(lq), sum(lk), pad=pad, seed=1)
  cq, ck = _cu(lq), _cu(lk)
  if traced:
    ours = _run_traced(q, k, v, dout, cq, ck, max(lq), max(lk), **opts)
  else:
    f = lambda q, k, v: flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk),
                                               return_attn_probs=True, **opts)[:2]
    (out, lse), vjp = jax.vjp(f, q, k, v)
    ours = (out, lse, *vjp((dout, jnp.zeros_like(lse))))
  nq, nk = sum(lq), sum(lk)
  ref, lowp = _packed_references(q[:nq], k[:nk], v[:nk], dout[:nq], cq, ck, **opts)
  valid = (ours[0][:nq], ours[1][:, :nq], ours[2][:nq], ours[3][:nk], ours[4][:nk])
  numerics.check_attention(valid, lowp, ref)


def test_traced_offsets_past_the_total_are_clamped():
  """Sequence 1's offsets run past both totals (q: 45 of 20 rows, k: 80 of 30): it is computed on
  the rows that exist, [7, 20) and [9, 30), forward and backward; sequence 0 is untouched."""
  q, k, v, dout = _bounds_inputs(20, 30, seed=2)
  cq, ck = jnp.asarray([0, 7, 45], jnp.int32), jnp.asarray([0, 9, 80], jnp.int32)
  ours = _run_traced(q, k, v, dout, cq, ck, 38, 71, causal=True)
  ref, lowp = _span_references(q, k, v, dout, [(0, 7, 0, 9), (7, 20, 9, 30)], causal=True)
  numerics.check_attention(ours, lowp, ref)


def test_traced_decreasing_offsets_are_clamped():
  """Key offsets that go backwards: sequence 1's span [9, 4) is empty (its rows are empty rows:
  zeros, lse +inf), sequence 2 reads [4, 30) and sequence 3 starts past the end (no keys).
  Forward only: sequences sharing key rows would both write those rows' dK/dV."""
  lq = [7, 5, 6, 2]
  q, k, v, dout = _bounds_inputs(sum(lq), 30, seed=3)
  cq, ck = _cu(lq), jnp.asarray([0, 9, 4, 30, 50], jnp.int32)
  out, lse = jax.jit(lambda q, k, v, cq, ck: flash_attn_varlen_func(
      q, k, v, cq, ck, 8, 26, return_attn_probs=True)[:2])(q, k, v, cq, ck)
  spans = [(0, 7, 0, 9), (7, 12, 9, 9), (12, 18, 4, 30), (18, 20, 30, 30)]
  ref, lowp = _span_references(q, k, v, dout, spans)
  numerics.assert_output("out", out, lowp[0], ref[0])
  numerics.assert_lse(lse, lowp[1], ref[1])


def test_traced_query_length_past_max_seqlen_is_clamped():
  """A sequence longer than max_seqlen_q (unchecked under jit): the grid covers the first
  bucket(max_seqlen_q) = 16 rows, and the dK/dV pass must not read the dQ pass's per-sequence lse
  and delta (16 rows) past their end; dK and dV are those of the first 16 rows."""
  q, k, v, dout = _bounds_inputs(40, 24, seed=4)
  cq, ck = _cu([40]), _cu([24])
  ours = _run_traced(q, k, v, dout, cq, ck, 9, 24)
  ref, lowp = _span_references(q[:16], k, v, dout[:16], [(0, 16, 0, 24)])
  numerics.check_attention((ours[0][:16], ours[1][:, :16], ours[2][:16], ours[3], ours[4]),
                           lowp, ref)


@pytest.mark.parametrize("name,cu,want", [
    ("cu_seqlens_q", [0, 9, 20], r"^cu_seqlens_q: expected non-decreasing offsets from 0 to at most "
     r"19 \(the rows of q\), got \[0, 9, 20\]"),
    ("cu_seqlens_k", [0, 9, 25], r"^cu_seqlens_k: expected non-decreasing offsets from 0 to at most "
     r"19 \(the rows of k\), got \[0, 9, 25\]"),
    ("cu_seqlens_k", [0, 12, 9], r"^cu_seqlens_k: expected non-decreasing offsets .*got \[0, 12, 9\]"),
    ("cu_seqlens_q", [2, 9, 19], r"^cu_seqlens_q: expected non-decreasing offsets from 0 .*"
     r"got \[2, 9, 19\]"),
    ("cu_seqlens_q", [0, -1, 19], r"^cu_seqlens_q: expected non-decreasing offsets"),
])
@pytest.mark.parametrize("as_type", [jnp.asarray, np.asarray], ids=["jax", "numpy"])
def test_concrete_offsets_out_of_range_raise(name, cu, want, as_type):
  q = jnp.ones((19, 2, 16))
  args = dict(q=q, k=q, v=q, cu_seqlens_q=_cu([9, 10]), cu_seqlens_k=_cu([9, 10]), max_seqlen_q=32,
              max_seqlen_k=32)
  args[name] = as_type(np.asarray(cu, np.int32))
  with pytest.raises(ValueError, match=want):
    flash_attn_varlen_func(**args)


@pytest.mark.gpu
def test_varlen_parity_gpu():
  lq = [700, 1, 0, 1500, 333]
  cq = _cu(lq)
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(ks[0], (int(cq[-1]), 8, 128), jnp.bfloat16)
  k = jax.random.normal(ks[1], (int(cq[-1]), 2, 128), jnp.bfloat16)
  v = jax.random.normal(ks[2], (int(cq[-1]), 2, 128), jnp.bfloat16)
  dout = jax.random.normal(ks[3], q.shape, jnp.bfloat16)
  f = lambda q, k, v: flash_attn_varlen_func(q, k, v, cq, cq, 1500, 1500, causal=True,
                                             return_attn_probs=True)[:2]
  (out, lse), vjp = jax.vjp(f, q, k, v)
  ours = (out, lse, *vjp((dout, jnp.zeros_like(lse))))
  ref, lowp = _packed_references(q, k, v, dout, cq, cq, causal=True)
  numerics.check_attention(ours, lowp, ref)
