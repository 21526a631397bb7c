"""The dense API's behaviour around the numbers: jax transforms, packed forms, output buffers that the
kernels must fill completely, and argument validation."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numerics
from pallas_attn import (KernelConfigs, TileConfig, flash_attn_func, flash_attn_kvpacked_func,
                         flash_attn_qkvpacked_func)
from pallas_attn import flash
from pallas_attn.flash_attn import prepare


def _same(name, a, b):
  """Equal up to the fp32 noise floor of a (transforms may change XLA fusion around the kernels)."""
  a, b = numerics.as_f32(a), numerics.as_f32(b)
  numerics.assert_no_nan(name, a)
  fin = np.isfinite(b)
  assert np.array_equal(np.isfinite(a), fin), f"{name}: inf pattern differs"
  err = float(np.max(np.abs(a[fin] - b[fin]), initial=0.0))
  floor = numerics.noise_floor(b[fin], jnp.float32)
  assert err <= floor, f"{name}: differs by {err:.3e} > {floor:.3e}"


def _loss(out, w):
  return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32))


# ------------------------------------------------------------------------------------------------
# jit, grad, vmap


def test_jit_matches_eager():
  q, k, v, alibi, _, _ = numerics.random_inputs(0, 2, 45, 70, 4, 2, 64, "float32", alibi="h")
  kw = dict(causal=True, window_size=(20, -1), softcap=10.0)
  eager = flash_attn_func(q, k, v, alibi_slopes=alibi, return_attn_probs=True, **kw)[:2]
  jitted = jax.jit(lambda q, k, v, a: flash_attn_func(q, k, v, alibi_slopes=a, return_attn_probs=True,
                                                      **kw)[:2])(q, k, v, alibi)
  for name, a, b in zip(("out", "lse"), jitted, eager):
    _same(name, a, b)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grad_matches_vjp(dtype):
  q, k, v, _, w, _ = numerics.random_inputs(1, 2, 33, 50, 6, 2, 32, dtype)
  fn = functools.partial(flash_attn_func, causal=True)
  grads = jax.jit(jax.grad(lambda q, k, v: _loss(fn(q, k, v), w), argnums=(0, 1, 2)))(q, k, v)
  _, vjp = jax.vjp(fn, q, k, v)
  for name, a, b in zip(("dq", "dk", "dv"), grads, vjp(w)):
    assert a.dtype == jnp.dtype(dtype), f"{name}: dtype {a.dtype}, expected {dtype}"
    _same(name, a, b)


def test_vmap_over_leading_axis():
  n = 3
  ks = jax.random.split(jax.random.PRNGKey(2), 5)
  q = jax.random.normal(ks[0], (n, 2, 21, 4, 32))
  k = jax.random.normal(ks[1], (n, 2, 30, 2, 32))
  v = jax.random.normal(ks[2], (n, 2, 30, 2, 32))
  w = jax.random.normal(ks[3], q.shape)
  slopes = jax.random.uniform(ks[4], (n, 4), jnp.float32, 0.01, 0.3)

  def one(q, k, v, a, w):
    fn = lambda q, k, v, a: _loss(flash_attn_func(q, k, v, causal=True, alibi_slopes=a), w)
    return flash_attn_func(q, k, v, causal=True, alibi_slopes=a), jax.grad(fn, (0, 1, 2, 3))(q, k, v, a)

  out, grads = jax.vmap(one)(q, k, v, slopes, w)
  # SPEC: ALiBi slopes get no gradient (zeros, not an error).
  assert not np.any(np.asarray(grads[3])), "d alibi_slopes must be zero"
  for i in range(n):
    out_i, grads_i = one(q[i], k[i], v[i], slopes[i], w[i])
    _same(f"out[{i}]", out[i], out_i)
    for name, a, b in zip(("dq", "dk", "dv"), grads[:3], grads_i[:3]):
      _same(f"{name}[{i}]", a[i], b)


# ------------------------------------------------------------------------------------------------
# Packed forms


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qkvpacked_equals_unpacked(dtype):
  b, s, h, d = 2, 37, 4, 64
  key = jax.random.PRNGKey(3)
  qkv = jax.random.normal(key, (b, s, 3, h, d), dtype)
  w = jax.random.normal(jax.random.fold_in(key, 1), (b, s, h, d), dtype)
  kw = dict(causal=True, softcap=8.0, window_size=(12, -1))
  packed = lambda qkv: flash_attn_qkvpacked_func(qkv, return_attn_probs=True, **kw)[:2]
  plain = lambda q, k, v: flash_attn_func(q, k, v, return_attn_probs=True, **kw)[:2]
  (out_p, lse_p), vjp_p = jax.vjp(packed, qkv)
  (out, lse), vjp = jax.vjp(plain, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
  dlse = jnp.zeros_like(lse)
  _same("out", out_p, out)
  _same("lse", lse_p, lse)
  (dqkv,) = vjp_p((w, dlse))
  for i, (name, g) in enumerate(zip(("dq", "dk", "dv"), vjp((w, dlse)))):
    _same(name, dqkv[:, :, i], g)


@pytest.mark.parametrize("hk", [4, 1])
def test_kvpacked_equals_unpacked(hk):
  b, sq, sk, h, d = 2, 29, 53, 4, 96
  ks = jax.random.split(jax.random.PRNGKey(4), 3)
  q = jax.random.normal(ks[0], (b, sq, h, d), jnp.bfloat16)
  kv = jax.random.normal(ks[1], (b, sk, 2, hk, d), jnp.bfloat16)
  w = jax.random.normal(ks[2], q.shape, jnp.bfloat16)
  slopes = jnp.linspace(0.05, 0.25, h, dtype=jnp.float32)
  kw = dict(causal=True, alibi_slopes=slopes)
  (out_p, lse_p), vjp_p = jax.vjp(
      lambda q, kv: flash_attn_kvpacked_func(q, kv, return_attn_probs=True, **kw)[:2], q, kv)
  (out, lse), vjp = jax.vjp(
      lambda q, k, v: flash_attn_func(q, k, v, return_attn_probs=True, **kw)[:2], q, kv[:, :, 0], kv[:, :, 1])
  dlse = jnp.zeros_like(lse)
  _same("out", out_p, out)
  _same("lse", lse_p, lse)
  dq_p, dkv = vjp_p((w, dlse))
  dq, dk, dv = vjp((w, dlse))
  _same("dq", dq_p, dq)
  _same("dk", dkv[:, :, 0], dk)
  _same("dv", dkv[:, :, 1], dv)


def test_window_minus_one_zero_is_causal():
  q, k, v, _, _, _ = numerics.random_inputs(7, 1, 19, 23, 2, 1, 32, "bfloat16")
  a = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
  b = flash_attn_func(q, k, v, window_size=(-1, 0), return_attn_probs=True)
  assert np.asarray(a[0]).tobytes() == np.asarray(b[0]).tobytes()
  assert np.asarray(a[1]).tobytes() == np.asarray(b[1]).tobytes()


def test_return_attn_probs_shapes():
  q, k, v, _, _, _ = numerics.random_inputs(5, 2, 9, 12, 4, 2, 32, "bfloat16")
  out, lse, s_dmask = flash_attn_func(q, k, v, return_attn_probs=True, deterministic=True)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert lse.shape == (2, 4, 9) and lse.dtype == jnp.float32
  assert s_dmask.size == 0


# ------------------------------------------------------------------------------------------------
# Every output element is written: NaN-filled buffers go in, no NaN may come out.

POISON_CASES = [
    # (b, sq, sk, h, hk, d, dtype, causal, window, tiles): lengths and head dims off the tile grid
    (2, 113, 203, 6, 2, 96, "float32", False, (-1, -1), None),
    (1, 203, 113, 4, 1, 40, "float32", True, (-1, -1), (16, 16)),
    (2, 77, 61, 2, 2, 72, "bfloat16", False, (9, 5), (32, 16)),
]


@pytest.mark.parametrize("b,sq,sk,h,hk,d,dtype,causal,window,tiles", POISON_CASES)
def test_into_buffers_are_fully_written(b, sq, sk, h, hk, d, dtype, causal, window, tiles):
  q, k, v, _, dout, dlse = numerics.random_inputs(6, b, sq, sk, h, hk, d, dtype)
  spec, alibi = prepare(q, k, v, causal=causal, window_size=window)
  cfgs = None if tiles is None else KernelConfigs(*(TileConfig(*tiles),) * 3)
  out_ref, lse_ref = flash.forward(q, k, v, alibi, spec, cfgs)
  grads_ref = flash.backward(q, k, v, alibi, out_ref, lse_ref, dout, dlse, spec, cfgs)

  nan = lambda shape, dtype=q.dtype: jnp.full(shape, jnp.nan, dtype)
  out, lse = flash.forward_into(q, k, v, alibi, nan(q.shape), nan((b, h, sq), jnp.float32), spec, cfgs)
  grads = flash.backward_into(q, k, v, alibi, out, lse, dout, dlse, nan(q.shape), nan(k.shape),
                              nan(v.shape), spec, cfgs)
  for name, a, ref in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads),
                          (out_ref, lse_ref, *grads_ref)):
    _same(name, a, ref)


# ------------------------------------------------------------------------------------------------
# Validation: bad input raises, and the message names the argument.

_B, _S, _H, _D = 2, 16, 4, 32


def _arr(shape, dtype=jnp.float32):
  return jnp.ones(shape, dtype)


def _qkv(**over):
  args = dict(q=_arr((_B, _S, _H, _D)), k=_arr((_B, _S, 2, _D)), v=_arr((_B, _S, 2, _D)))
  args.update(over)
  return args


BAD_INPUTS = [
    # (id, kwargs for flash_attn_func, exception, the argument the message must start with)
    ("q-rank", _qkv(q=_arr((_B, _S, _H))), ValueError, "q"),
    ("k-rank", _qkv(k=_arr((_B, _S, 2, _D, 1))), ValueError, "k"),
    ("q-not-array", _qkv(q=[[1.0]]), TypeError, "q"),
    ("q-int-dtype", _qkv(q=_arr((_B, _S, _H, _D), jnp.int32)), TypeError, "q"),
    ("k-dtype-mismatch", _qkv(k=_arr((_B, _S, 2, _D), jnp.bfloat16)), TypeError, "k"),
    ("v-dtype-mismatch", _qkv(v=_arr((_B, _S, 2, _D), jnp.float16)), TypeError, "v"),
    ("k-batch", _qkv(k=_arr((_B + 1, _S, 2, _D)), v=_arr((_B + 1, _S, 2, _D))), ValueError, "k"),
    ("k-headdim", _qkv(k=_arr((_B, _S, 2, _D * 2)), v=_arr((_B, _S, 2, _D * 2))), ValueError, "k"),
    ("v-shape", _qkv(v=_arr((_B, _S + 1, 2, _D))), ValueError, "v"),
    ("heads-not-multiple", _qkv(k=_arr((_B, _S, 3, _D)), v=_arr((_B, _S, 3, _D))), ValueError, "k"),
    ("headdim-257", _qkv(q=_arr((_B, _S, _H, 257)), k=_arr((_B, _S, 2, 257)), v=_arr((_B, _S, 2, 257))),
     ValueError, "q"),
    ("empty-seq", _qkv(q=_arr((_B, 0, _H, _D))), ValueError, "q"),
    ("window-below-minus-1", dict(_qkv(), window_size=(-2, 0)), ValueError, "window_size"),
    ("window-length-1", dict(_qkv(), window_size=(4,)), ValueError, "window_size"),
    ("window-float", dict(_qkv(), window_size=(1.5, 2)), ValueError, "window_size"),
    ("window-int", dict(_qkv(), window_size=3), ValueError, "window_size"),
    ("softcap-negative", dict(_qkv(), softcap=-1.0), ValueError, "softcap"),
    ("scale-string", dict(_qkv(), softmax_scale="0.1"), TypeError, "softmax_scale"),
    ("alibi-shape", dict(_qkv(), alibi_slopes=_arr((_H + 1,))), ValueError, "alibi_slopes"),
    ("alibi-rank3", dict(_qkv(), alibi_slopes=_arr((_B, _H, 1))), ValueError, "alibi_slopes"),
    ("alibi-dtype", dict(_qkv(), alibi_slopes=_arr((_H,), jnp.bfloat16)), TypeError, "alibi_slopes"),
    ("dropout-negative", dict(_qkv(), dropout_p=-0.1), ValueError, "dropout_p"),
    ("dropout-one", dict(_qkv(), dropout_p=1.0), ValueError, "dropout_p"),
]


@pytest.mark.parametrize("kwargs,exc,name", [pytest.param(*c[1:], id=c[0]) for c in BAD_INPUTS])
def test_bad_input_raises(kwargs, exc, name):
  # checks.py's convention: "<argument>: expected ..., got ..."
  with pytest.raises(exc, match=rf"^{name}\b"):
    flash_attn_func(**kwargs)


def test_dropout_needs_a_key():
  with pytest.raises(ValueError, match=r"^dropout_key\b"):
    flash_attn_func(**_qkv(), dropout_p=0.1)


@pytest.mark.parametrize("fn,arg,shape", [
    (flash_attn_qkvpacked_func, "qkv", (_B, _S, 2, _H, _D)),
    (flash_attn_qkvpacked_func, "qkv", (_B, _S, 3, _H)),
    (flash_attn_kvpacked_func, "kv", (_B, _S, 3, 2, _D)),
])
def test_packed_bad_shape(fn, arg, shape):
  with pytest.raises(ValueError, match=rf"^{arg}\b"):
    if arg == "qkv":
      fn(_arr(shape))
    else:
      fn(_arr((_B, _S, _H, _D)), _arr(shape))
