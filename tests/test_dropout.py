"""Dropout: keep rate, replay (same key, same bits), and parity with the reference run on the
kernel's own keep mask, read back through S_dmask."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numerics
import pallas_attn as pa
from pallas_attn import dropout
from pallas_attn.reference import attention_logits, attention_reference


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_fraction(p):
  seed = dropout.seed_from_key(jax.random.PRNGKey(3))
  keep = dropout.dense_keep(seed, 2, 8, 256, 512, p)
  assert abs(float(keep.mean()) - (1 - p)) < 0.01


def test_keep_mask_depends_on_every_coordinate():
  seed = dropout.seed_from_key(jax.random.PRNGKey(0))
  keep = np.asarray(dropout.dense_keep(seed, 2, 2, 64, 64, 0.5))
  assert not np.array_equal(keep[0], keep[1])        # batch
  assert not np.array_equal(keep[:, 0], keep[:, 1])  # head
  assert not np.array_equal(keep[..., 0, :], keep[..., 1, :])  # row
  assert not np.array_equal(keep[..., 0], keep[..., 1])  # column
  other = np.asarray(dropout.dense_keep(dropout.seed_from_key(jax.random.PRNGKey(1)), 2, 2, 64, 64, 0.5))
  assert not np.array_equal(keep, other)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("col0,n_cols", [(0, 16), (48, 32), (128, 64)])
def test_tiled_keep_matches_its_elementwise_definition(col0, n_cols, transposed):
  # The kernels draw the mask through the paired, reshaped `keep`; the references through `keep_at`.
  state = dropout.stream(dropout.seed_from_key(jax.random.PRNGKey(7))[0], 1, 3, 4)
  rows = 40 + jnp.arange(32)
  tiled = np.asarray(dropout.keep(state, 40, 32, col0, n_cols, 0.3, transposed))
  want = np.asarray(dropout.keep_at(state, rows[:, None], col0 + jnp.arange(n_cols)[None, :], 0.3))
  np.testing.assert_array_equal(tiled, want.T if transposed else want)


def test_paired_keys_are_not_copies():
  # Keys j and j + 8 share a hash; their halves must still decide independently.
  keep = np.asarray(dropout.dense_keep(dropout.seed_from_key(jax.random.PRNGKey(2)), 1, 1, 512, 512, 0.5))
  j = np.arange(512)
  first = j[(j // 8) % 2 == 0]
  agree = float(np.mean(keep[0, 0][:, first] == keep[0, 0][:, first + 8]))
  assert abs(agree - 0.5) < 0.01


_SMALL, _LARGE = (2, 70, 50, 4, 2, 32), (2, 600, 520, 4, 2, 128)


# On a GPU the kernels compare and select through inline PTX, which interpret mode never runs: the
# large cases check that path against the same definition.
@pytest.mark.parametrize("opts,dtype,dims", [
    (dict(causal=True), "float32", _SMALL),
    (dict(window_size=(5, 3), softcap=5.0), "float32", _SMALL),
    (dict(causal=True), "bfloat16", _SMALL),
    pytest.param(dict(causal=True), "bfloat16", _LARGE, marks=pytest.mark.gpu),
    pytest.param(dict(softcap=5.0), "float16", _LARGE, marks=pytest.mark.gpu),
    pytest.param(dict(window_size=(100, 30)), "float32", _LARGE, marks=pytest.mark.gpu),
])
def test_parity_with_the_kernels_keep_mask(opts, dtype, dims):
  (b, sq, sk, h, hk, d), p = dims, 0.3
  q, k, v, _, dout, _ = numerics.random_inputs(11, b, sq, sk, h, hk, d, dtype)
  key = jax.random.PRNGKey(5)

  def ours(q, k, v):
    return pa.flash_attn_func(q, k, v, dropout_p=p, dropout_key=key, return_attn_probs=True, **opts)

  (out, lse, s_dmask), vjp = jax.vjp(ours, q, k, v)
  grads = vjp((dout, jnp.zeros_like(lse), jnp.zeros_like(s_dmask)))
  assert s_dmask.shape == (b, h, sq, sk)
  keep = ~jnp.signbit(s_dmask)  # dropped entries are negated (a masked 0 is dropped as -0.0)
  frac = float(jnp.mean(keep))
  assert 0.6 < frac < 0.8

  def ref(upcast):
    fn = lambda q, k, v: attention_reference(q, k, v, dropout_p=p, dropout_keep=keep, upcast=upcast, **opts)
    (o, l), rvjp = jax.vjp(fn, q, k, v)
    return (o, l, *rvjp((dout.astype(o.dtype), jnp.zeros_like(l))))

  numerics.check_attention((out, lse, *grads), ref(False), ref(True))


def test_same_key_is_bitwise_identical_and_other_keys_differ():
  q, k, v, *_ = numerics.random_inputs(2, 1, 64, 64, 2, 2, 32)
  run = lambda key: pa.flash_attn_func(q, k, v, dropout_p=0.2, dropout_key=key, causal=True)
  a, b = run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, run(jax.random.PRNGKey(2)))
  g = lambda key: jax.grad(lambda q: (pa.flash_attn_func(q, k, v, dropout_p=0.2, dropout_key=key) ** 2).sum())(q)
  np.testing.assert_array_equal(g(jax.random.PRNGKey(1)), g(jax.random.PRNGKey(1)))


def test_dropout_needs_a_key():
  q = jnp.ones((1, 8, 2, 16))
  with pytest.raises(ValueError, match="dropout_key"):
    pa.flash_attn_func(q, q, q, dropout_p=0.1)


def test_lowers_for_cuda():
  q = jnp.zeros((2, 1000, 8, 128), jnp.bfloat16)
  k = jnp.zeros((2, 1000, 2, 128), jnp.bfloat16)

  def f(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: pa.flash_attn_func(q, k, v, dropout_p=0.1, causal=True,
                                                          dropout_key=jax.random.PRNGKey(0)), q, k, v)
    return vjp(out)

  assert jax.jit(f).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text().count(
      "__gpu$xla.gpu.triton") == 3


# ----------------------------------------------------------------------------------------------------
# Varlen: the kernels hash (sequence index, head, row, column) with within-sequence coordinates.


def _cu(lengths):
  return jnp.asarray(np.concatenate([[0], np.cumsum(lengths)]), jnp.int32)


def _varlen_inputs(seed, lq, lk, h, hk, d, dtype):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = jax.random.normal(ks[0], (sum(lq), h, d), dtype)
  k = jax.random.normal(ks[1], (sum(lk), hk, d), dtype)
  v = jax.random.normal(ks[2], (sum(lk), hk, d), dtype)
  dout = jax.random.normal(ks[3], q.shape, dtype)
  slopes = jax.random.uniform(ks[4], (len(lq), h), jnp.float32, 0.01, 0.3)
  return q, k, v, dout, slopes


def varlen_references(q, k, v, dout, lq, lk, keep, p, slopes, opts):
  """(accurate, lowp, probabilities): per-sequence attention_reference on the kernel's keep mask
  (keep (batch, H, max_q, max_k)), packed like the varlen outputs; probabilities padded like S_dmask."""
  cq, ck = np.concatenate([[0], np.cumsum(lq)]), np.concatenate([[0], np.cumsum(lk)])
  h = q.shape[1]
  results, probs = [], np.zeros(keep.shape, np.float32)
  for upcast in (True, False):
    out = [np.zeros(q.shape, np.float32), np.full((h, q.shape[0]), np.inf, np.float32),
           np.zeros(q.shape, np.float32), np.zeros(k.shape, np.float32), np.zeros(v.shape, np.float32)]
    for s, (a, e, c, f) in enumerate(zip(cq[:-1], cq[1:], ck[:-1], ck[1:])):
      if a == e or c == f:
        continue
      sl = None if slopes is None else slopes[s]
      kp = keep[s:s + 1, :, :e - a, :f - c]
      fn = lambda q, k, v: attention_reference(q, k, v, alibi_slopes=sl, upcast=upcast, dropout_p=p,
                                               dropout_keep=kp, **opts)
      (o, l), vjp = jax.vjp(fn, q[a:e][None], k[c:f][None], v[c:f][None])
      dq, dk, dv = vjp((dout[a:e][None], jnp.zeros_like(l)))
      out[0][a:e], out[1][:, a:e], out[2][a:e] = o[0], l[0], dq[0]
      out[3][c:f] += np.asarray(dk[0], np.float32)
      out[4][c:f] += np.asarray(dv[0], np.float32)
      if upcast:
        t = attention_logits(q[a:e][None], k[c:f][None], alibi_slopes=sl, **opts)
        probs[s, :, :e - a, :f - c] = np.asarray(jnp.exp(t - l[..., None]))[0]
    results.append(out)
  return results[0], results[1], probs


VARLEN_CASES = [
    ([7, 0, 20, 1], [12, 4, 17, 1], dict(causal=True), False, "float32"),
    ([9, 16, 3], [20, 5, 3], dict(window_size=(4, 2), softcap=5.0), True, "float32"),
    ([12, 5], [9, 18], dict(causal=True), True, "bfloat16"),
]


@pytest.mark.parametrize("lq,lk,opts,alibi,dtype", VARLEN_CASES)
def test_varlen_parity_with_the_kernels_keep_mask(lq, lk, opts, alibi, dtype):
  h, hk, d, p = 4, 2, 32, 0.3
  q, k, v, dout, slopes = _varlen_inputs(sum(lq) + sum(lk), lq, lk, h, hk, d, jnp.dtype(dtype))
  slopes = slopes if alibi else None
  cq, ck = _cu(lq), _cu(lk)
  max_q, max_k = max(lq) + 3, max(lk) + 1  # upper bounds, not the exact maxima

  def ours(q, k, v):
    return pa.flash_attn_varlen_func(q, k, v, cq, ck, max_q, max_k, dropout_p=p, alibi_slopes=slopes,
                                     return_attn_probs=True, dropout_key=jax.random.PRNGKey(7), **opts)

  (out, lse, s_dmask), vjp = jax.vjp(ours, q, k, v)
  grads = vjp((dout, jnp.zeros_like(lse), jnp.zeros_like(s_dmask)))
  assert s_dmask.shape == (len(lq), h, max_q, max_k) and s_dmask.dtype == q.dtype
  sd = np.asarray(s_dmask, np.float32)
  keep = ~np.signbit(sd)
  inside = (np.arange(max_q)[None, :, None] < np.asarray(lq)[:, None, None]) & (
      np.arange(max_k)[None, None, :] < np.asarray(lk)[:, None, None])
  assert np.all(sd[~np.broadcast_to(inside[:, None], sd.shape)] == 0)
  assert np.all(keep[~np.broadcast_to(inside[:, None], sd.shape)])  # +0 outside, never -0
  frac = keep[np.broadcast_to(inside[:, None], sd.shape)].mean()
  assert 0.6 < frac < 0.8, frac

  ref, lowp, probs = varlen_references(q, k, v, dout, lq, lk, jnp.asarray(keep), p, slopes, opts)
  numerics.check_attention((out, lse, *grads), lowp, ref)
  # |S_dmask| is P of each sequence: its own alignment, band and ALiBi distances.
  # S_dmask is stored in the input dtype: its rounding is the yardstick.
  lowp_probs = numerics.as_f32(jnp.asarray(probs).astype(q.dtype))
  numerics.assert_rule("|S_dmask|", np.abs(sd), lowp_probs, probs, factor=numerics.OUT_FACTOR,
                       dtype=q.dtype)


def test_varlen_same_key_is_bitwise_identical_and_forms_agree():
  lq = [9, 0, 14]
  cu = _cu(lq)
  qkv = jax.random.normal(jax.random.PRNGKey(4), (sum(lq), 3, 2, 16))
  run = lambda key, fn=pa.flash_attn_varlen_qkvpacked_func: fn(
      qkv, cu, 14, dropout_p=0.25, causal=True, dropout_key=key)
  a = run(jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, run(jax.random.PRNGKey(1)))
  assert not np.array_equal(a, run(jax.random.PRNGKey(2)))
  plain = pa.flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, 14, 14, dropout_p=0.25,
                                    causal=True, dropout_key=jax.random.PRNGKey(1))
  kvpacked = pa.flash_attn_varlen_kvpacked_func(qkv[:, 0], qkv[:, 1:], cu, cu, 14, 14, dropout_p=0.25,
                                                causal=True, dropout_key=jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, plain)
  np.testing.assert_array_equal(a, kvpacked)

  def loss(qkv, key):
    return (pa.flash_attn_varlen_qkvpacked_func(qkv, cu, 14, dropout_p=0.25, dropout_key=key) ** 2).sum()

  g = lambda key: jax.grad(loss)(qkv, key)
  np.testing.assert_array_equal(g(jax.random.PRNGKey(1)), g(jax.random.PRNGKey(1)))
  assert not np.array_equal(g(jax.random.PRNGKey(1)), g(jax.random.PRNGKey(3)))


def test_varlen_matches_the_dense_face_sequence_by_sequence():
  # One sequence at batch index 0 of the varlen call is batch row 0 of the dense call: same bits.
  q, k, v, *_ = numerics.random_inputs(3, 1, 24, 30, 2, 1, 16)
  key = jax.random.PRNGKey(9)
  dense = pa.flash_attn_func(q, k, v, dropout_p=0.4, causal=True, dropout_key=key)
  packed = pa.flash_attn_varlen_func(q[0], k[0], v[0], _cu([24]), _cu([30]), 24, 30, dropout_p=0.4,
                                     causal=True, dropout_key=key)
  np.testing.assert_allclose(np.asarray(packed), np.asarray(dense[0]), rtol=1e-6, atol=1e-6)


def test_varlen_dropout_needs_a_key_and_empty_s_dmask_without_dropout():
  q = jnp.ones((8, 2, 16))
  cu = _cu([8])
  with pytest.raises(ValueError, match="dropout_key"):
    pa.flash_attn_varlen_func(q, q, q, cu, cu, 8, 8, dropout_p=0.1)
  _, _, s_dmask = pa.flash_attn_varlen_func(q, q, q, cu, cu, 8, 8, return_attn_probs=True)
  assert s_dmask.shape == (0,)


def test_varlen_sink_with_dropout():
  lq = [6, 11]
  cu = _cu(lq)
  q, k, v, *_ = _varlen_inputs(5, lq, lq, 2, 2, 16, jnp.float32)
  sink = jnp.asarray([[0.5, -1.0]], jnp.float32)
  key = jax.random.PRNGKey(2)
  out, lse, s_dmask = pa.fa2_varlen_func_with_sink(q, k, v, cu, cu, 11, 11, sink, dropout_p=0.3,
                                                   causal=True, return_attn_probs=True,
                                                   dropout_key=key)
  assert s_dmask.shape == (2, 2, 11, 11)
  # The sink takes probability mass: each row's P sums to below 1.
  row_sums = np.abs(np.asarray(s_dmask)).sum(-1)
  assert np.all(row_sums[0, :, :6] < 1) and np.all(row_sums[1] < 1)
  again = pa.fa2_varlen_func_with_sink(q, k, v, cu, cu, 11, 11, sink, dropout_p=0.3, causal=True,
                                       dropout_key=key)
  np.testing.assert_array_equal(out, again)


def test_varlen_lowers_for_cuda():
  q = jnp.zeros((300, 8, 64), jnp.bfloat16)
  k = jnp.zeros((300, 2, 64), jnp.bfloat16)
  cu = _cu([100, 200])

  def f(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: pa.flash_attn_varlen_func(
        q, k, v, cu, cu, 200, 200, dropout_p=0.1, causal=True, dropout_key=jax.random.PRNGKey(0)),
                       q, k, v)
    return vjp(out)

  assert jax.jit(f).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text().count(
      "__gpu$xla.gpu.triton") == 3
