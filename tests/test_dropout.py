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
from pallas_attn.reference import attention_reference


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


@pytest.mark.parametrize("opts,dtype", [
    (dict(causal=True), "float32"),
    (dict(window_size=(5, 3), softcap=5.0), "float32"),
    (dict(causal=True), "bfloat16"),
])
def test_parity_with_the_kernels_keep_mask(opts, dtype):
  b, sq, sk, h, hk, d, p = 2, 70, 50, 4, 2, 32, 0.3
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
