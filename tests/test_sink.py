"""Attention sinks: the reference against an independent formula, then every fa2/fa3 form against it."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numerics
from pallas_attn import sink as sk_api
from pallas_attn.reference import attention_reference


def _np_sink_attention(q, k, v, z, causal, layout):
  """float64 numpy: append the sink logits as columns, softmax, drop them, multiply by V."""
  q, k, v, z = (np.asarray(x, np.float64) for x in (q, k, v, z))
  b, sq, h, d = q.shape
  sk, hk = k.shape[1], k.shape[2]
  k = np.repeat(k, h // hk, axis=2)
  v = np.repeat(v, h // hk, axis=2)
  t = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
  if causal:
    vis = np.arange(sk)[None, :] <= np.arange(sq)[:, None] + (sk - sq)
    t = np.where(vis, t, -np.inf)
  zz = (np.broadcast_to(z.T[None, :, None, :], (b, h, sq, z.shape[0])) if layout == "sh"
        else np.transpose(z, (0, 3, 1, 2)))
  full = np.concatenate([t, zz], axis=-1)
  m = full.max(-1, keepdims=True)
  e = np.exp(full - m)
  p = e / e.sum(-1, keepdims=True)
  lse = (np.log(e.sum(-1)) + m[..., 0])
  return np.einsum("bhqk,bkhd->bqhd", p[..., :sk], v), lse


@pytest.mark.parametrize("layout", ["sh", "ssh"])
def test_reference_matches_appended_columns(layout):
  with jax.enable_x64(True):
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(ks[0], (2, 9, 4, 8), jnp.float64)
    k = jax.random.normal(ks[1], (2, 6, 2, 8), jnp.float64)
    v = jax.random.normal(ks[2], (2, 6, 2, 8), jnp.float64)
    z = jax.random.normal(ks[3], (3, 4) if layout == "sh" else (2, 9, 3, 4), jnp.float64)
    out, lse = attention_reference(q, k, v, causal=True, sink=z, sink_layout=layout)
    want_out, want_lse = _np_sink_attention(q, k, v, z, True, layout)
    np.testing.assert_allclose(np.asarray(out), want_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=1e-6, atol=1e-6)


@functools.partial(jax.jit, static_argnames=("upcast", "causal", "window", "layout"))
def _ref_vjp(q, k, v, z, dout, dlse, *, upcast, causal, window, layout):
  fn = lambda q, k, v, z: attention_reference(q, k, v, causal=causal, window_size=window, sink=z,
                                              sink_layout=layout, upcast=upcast)
  (out, lse), vjp = jax.vjp(fn, q, k, v, z)
  return (out, lse, *vjp((dout.astype(out.dtype), dlse)))


def _inputs(seed, b, sq, sk, h, hk, d, n_sink, layout, dtype):
  q, k, v, _, dout, dlse = numerics.random_inputs(seed, b, sq, sk, h, hk, d, dtype)
  shape = (n_sink, h) if layout == "sh" else (b, sq, n_sink, h)
  z = jax.random.normal(jax.random.PRNGKey(seed + 100), shape, jnp.float32)
  return q, k, v, z, dout, dlse


def _check(ours, q, k, v, z, dout, dlse, causal, window, layout):
  ref = _ref_vjp(q, k, v, z, dout, dlse, upcast=True, causal=causal, window=window, layout=layout)
  lowp = _ref_vjp(q, k, v, z, dout, dlse, upcast=False, causal=causal, window=window, layout=layout)
  numerics.check_attention(ours[:5], lowp[:5], ref[:5])
  numerics.assert_rule("dsink", ours[5], lowp[5], ref[5], factor=numerics.GRAD_FACTOR, dtype=jnp.float32)
  assert ours[5].dtype == jnp.float32


@pytest.mark.parametrize("b,sq,sk,h,hk,d,n_sink,layout,causal,window,dtype", [
    (2, 70, 50, 4, 2, 32, 2, "sh", True, (-1, -1), "float32"),    # sq > sk causal: empty rows
    (1, 33, 40, 2, 2, 64, 1, "ssh", False, (-1, -1), "float32"),
    (2, 64, 64, 4, 1, 64, 4, "sh", False, (8, 0), "bfloat16"),    # MQA, window
    (1, 17, 80, 4, 2, 96, 3, "ssh", True, (-1, -1), "bfloat16"),
])
def test_fa2_func_with_sink(b, sq, sk, h, hk, d, n_sink, layout, causal, window, dtype):
  q, k, v, z, dout, dlse = _inputs(sq + sk, b, sq, sk, h, hk, d, n_sink, layout, dtype)
  f = lambda q, k, v, z: sk_api.fa2_func_with_sink(q, k, v, z, layout, causal=causal,
                                                   window_size=window, return_attn_probs=True)[:2]
  (out, lse), vjp = jax.vjp(f, q, k, v, z)
  _check((out, lse, *vjp((dout, dlse))), q, k, v, z, dout, dlse, causal, window, layout)
  if sq > sk and causal:
    empty = np.asarray(out[:, :sq - sk], np.float32)
    assert np.all(empty == 0)
    assert np.all(np.isfinite(np.asarray(lse)))


def test_packed_and_fa3_forms_equal_the_plain_one():
  q, k, v, z, dout, _ = _inputs(5, 2, 40, 40, 4, 2, 32, 2, "sh", "float32")
  base, lse = sk_api.fa2_func_with_sink(q, k, v, z, causal=True, return_attn_probs=True)[:2]
  kv = jnp.stack([k, v], axis=2)
  np.testing.assert_array_equal(sk_api.fa2_kvpacked_func_with_sink(q, kv, z, causal=True), base)
  out3, lse3 = sk_api.fa3_func_with_sink(q, k, v, z, causal=True, return_attn_probs=True)
  np.testing.assert_array_equal(out3, base)
  np.testing.assert_array_equal(lse3, lse)
  packed4 = jnp.concatenate([q, k, v], axis=2)  # [H | Hk | Hk]
  np.testing.assert_array_equal(
      sk_api.fa3_qkvpacked_func_with_sink(packed4, z, causal=True, num_heads_q=4), base)
  qm, km, vm = (jax.random.normal(jax.random.PRNGKey(i), (2, 40, 4, 32)) for i in range(3))
  qkv = jnp.stack([qm, km, vm], axis=2)
  want = sk_api.fa2_func_with_sink(qm, km, vm, z, causal=True)
  np.testing.assert_array_equal(sk_api.fa2_qkvpacked_func_with_sink(qkv, z, causal=True), want)
  np.testing.assert_array_equal(sk_api.fa3_qkvpacked_func_with_sink(qkv, z, causal=True), want)
  # dsink through a packed form equals dsink through the plain one
  g1 = jax.grad(lambda z: (sk_api.fa2_qkvpacked_func_with_sink(qkv, z, causal=True) * dout).sum())(z)
  g2 = jax.grad(lambda z: (sk_api.fa2_func_with_sink(qm, km, vm, z, causal=True) * dout).sum())(z)
  np.testing.assert_array_equal(g1, g2)


@pytest.mark.parametrize("layout,causal", [("sh", True), ("ssh", False)])
def test_varlen_with_sink(layout, causal):
  lq, lk = [5, 0, 33, 1], [9, 3, 20, 4]
  cq = jnp.asarray(np.concatenate([[0], np.cumsum(lq)]), jnp.int32)
  ck = jnp.asarray(np.concatenate([[0], np.cumsum(lk)]), jnp.int32)
  h, hk, d, n_sink = 4, 2, 32, 2
  ks = jax.random.split(jax.random.PRNGKey(3), 5)
  q = jax.random.normal(ks[0], (int(cq[-1]), h, d))
  k = jax.random.normal(ks[1], (int(ck[-1]), hk, d))
  v = jax.random.normal(ks[2], (int(ck[-1]), hk, d))
  dout = jax.random.normal(ks[3], q.shape)
  z = jax.random.normal(ks[4], (n_sink, h) if layout == "sh" else (q.shape[0], n_sink, h))

  def ours(q, k, v, z):
    return sk_api.fa2_varlen_func_with_sink(q, k, v, cq, ck, max(lq), max(lk), z, layout,
                                            causal=causal, return_attn_probs=True)[:2]

  (out, lse), vjp = jax.vjp(ours, q, k, v, z)
  grads = vjp((dout, jnp.zeros_like(lse)))
  out3, lse3 = sk_api.fa3_varlen_func_with_sink(q, k, v, cq, ck, max(lq), max(lk), z, layout,
                                                causal=causal, return_attn_probs=True)
  np.testing.assert_array_equal(out3, out)
  np.testing.assert_array_equal(lse3, lse)
  want = [np.zeros(x.shape, np.float32) for x in (q, k, v, z)]
  for s in range(len(lq)):
    a, e, c, f = int(cq[s]), int(cq[s + 1]), int(ck[s]), int(ck[s + 1])
    if a == e:
      continue
    zs = z if layout == "sh" else z[a:e][None]
    fn = lambda q_, k_, v_, z_: attention_reference(q_[None], k_[None], v_[None], causal=causal,
                                                    sink=z_, sink_layout=layout)
    (ro, rl), rvjp = jax.vjp(fn, q[a:e], k[c:f], v[c:f], zs)
    rg = rvjp((dout[a:e][None], jnp.zeros_like(rl)))
    np.testing.assert_allclose(out[a:e], ro[0], atol=2e-5)
    np.testing.assert_allclose(lse[:, a:e], rl[0], atol=2e-5)
    want[0][a:e] = rg[0]
    want[1][c:f] += rg[1]
    want[2][c:f] += rg[2]
    if layout == "sh":
      want[3] += np.asarray(rg[3])
    else:
      want[3][a:e] = rg[3][0]
  for name, g, w in zip(("dq", "dk", "dv", "dsink"), grads, want):
    np.testing.assert_allclose(np.asarray(g), w, atol=5e-5, err_msg=name)


def test_packed_varlen_forms():
  lens = [7, 12]
  cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
  ks = jax.random.split(jax.random.PRNGKey(9), 2)
  qkv = jax.random.normal(ks[0], (19, 3, 2, 16))
  z = jax.random.normal(ks[1], (2, 2))
  base = sk_api.fa2_varlen_func_with_sink(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, 12, 12, z, causal=True)
  np.testing.assert_array_equal(
      sk_api.fa2_varlen_qkvpacked_func_with_sink(qkv, cu, 12, z, causal=True), base)
  np.testing.assert_array_equal(
      sk_api.fa2_varlen_kvpacked_func_with_sink(qkv[:, 0], qkv[:, 1:], cu, cu, 12, 12, z, causal=True),
      base)


def test_no_sink_is_plain_attention():
  from pallas_attn import flash_attn_func
  q, k, v, *_ = numerics.random_inputs(1, 1, 20, 20, 2, 2, 16)
  np.testing.assert_array_equal(sk_api.fa2_func_with_sink(q, k, v, None, causal=True),
                                flash_attn_func(q, k, v, causal=True))


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(sink=jnp.zeros((2, 3))), ValueError, "sink"),
    (dict(sink=jnp.zeros((2, 2), jnp.bfloat16)), TypeError, "sink"),
    (dict(sink=jnp.zeros((2, 2)), sink_layout="hs"), ValueError, "sink_layout"),
    (dict(sink=jnp.zeros((1, 8, 2, 2)), sink_layout="ssh"), ValueError, "sink"),
])
def test_bad_sink(kwargs, err, match):
  q = jnp.ones((1, 16, 2, 16))
  with pytest.raises(err, match=match):
    sk_api.fa2_func_with_sink(q, q, q, **kwargs)


@pytest.mark.parametrize("kwargs,match", [(dict(qv=jnp.ones(1)), "qv"),
                                          (dict(q_descale=jnp.ones(1)), "q_descale"),
                                          (dict(attention_chunk=64), "attention_chunk")])
def test_fa3_unsupported_inputs(kwargs, match):
  q = jnp.ones((1, 16, 2, 16))
  with pytest.raises(NotImplementedError, match=match):
    sk_api.fa3_func_with_sink(q, q, q, jnp.zeros((1, 2)), **kwargs)


def test_fa3_qkvpacked_needs_num_heads_q():
  with pytest.raises(ValueError, match="num_heads_q"):
    sk_api.fa3_qkvpacked_func_with_sink(jnp.ones((1, 8, 6, 16)), jnp.zeros((1, 2)))


@pytest.mark.parametrize("layout", ["sh", "ssh"])
def test_lowers_for_cuda(layout):
  q = jnp.zeros((2, 1000, 8, 128), jnp.bfloat16)
  k = jnp.zeros((2, 1000, 2, 128), jnp.bfloat16)
  z = jnp.zeros((2, 8) if layout == "sh" else (2, 1000, 2, 8), jnp.float32)

  def f(q, k, v, z):
    out, vjp = jax.vjp(lambda q, k, v, z: sk_api.fa2_func_with_sink(q, k, v, z, layout, causal=True),
                       q, k, v, z)
    return vjp(out)

  text = jax.jit(f).trace(q, k, k, z).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 3


@pytest.mark.gpu
@pytest.mark.parametrize("layout,causal", [("sh", True), ("ssh", False)])
def test_fa2_func_with_sink_gpu(layout, causal):
  q, k, v, z, dout, dlse = _inputs(0, 2, 1024, 1024, 8, 2, 128, 2, layout, "bfloat16")
  f = lambda q, k, v, z: sk_api.fa2_func_with_sink(q, k, v, z, layout, causal=causal,
                                                   return_attn_probs=True)[:2]
  (out, lse), vjp = jax.jit(lambda *a: jax.vjp(f, *a))(q, k, v, z)
  _check((out, lse, *vjp((dout, dlse))), q, k, v, z, dout, dlse, causal, (-1, -1), layout)
