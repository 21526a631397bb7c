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
  both = [_packed_reference(q, k, v, dout, cq, ck, i, **dict(opts)) for i in (0, 1)]
  return both[0], both[1]


def _packed_reference(q, k, v, dout, cq, ck, which, **opts):
  outs = [np.zeros(q.shape, np.float32), np.full((q.shape[1], q.shape[0]), np.inf, np.float32),
          np.zeros(q.shape, np.float32), np.zeros(k.shape, np.float32), np.zeros(v.shape, np.float32)]
  slopes = opts.pop("alibi_slopes", None)
  for s in range(len(cq) - 1):
    a, e, c, f = int(cq[s]), int(cq[s + 1]), int(ck[s]), int(ck[s + 1])
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
