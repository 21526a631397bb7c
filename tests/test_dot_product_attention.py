"""pallas_attn.dot_product_attention against jax.nn.dot_product_attention itself.

The accurate reference is jax.nn on float32 inputs at HIGHEST matmul precision, the low-precision one
jax.nn on the inputs' dtype; outputs, the residual (logsumexp) and the gradients of query, key,
value and bias follow the project's rule (numerics.py). Every case keeps at least one visible key
per valid query row: rows with none are where the two differ by design (see the module docstring).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numerics
import pallas_attn

B, T, S, N, K, H = 2, 13, 21, 4, 2, 16
LENS = dict(query_seq_lengths=np.array([13, 7], np.int32),
            key_value_seq_lengths=np.array([21, 9], np.int32))
CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "window": dict(local_window_size=(3, 2)),
    "window-int-scale": dict(local_window_size=4, scale=0.3),
    "causal-lengths": dict(is_causal=True, **LENS),
    "kv-lengths": dict(key_value_seq_lengths=np.array([5, 21], np.int32)),
    "bias": dict(bias="b1ts"),
    "bias-per-head-causal": dict(bias="bnts", is_causal=True),
    "mask-lengths": dict(mask="1nts", **LENS),
    "bias-mask-window": dict(bias="b1ts", mask="11ts", local_window_size=(5, 0)),
}


def _inputs(dtype, t=T, s=S, k_heads=K, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  q = jax.random.normal(ks[0], (B, t, N, H), jnp.float32)
  k = jax.random.normal(ks[1], (B, s, k_heads, H), jnp.float32)
  v = jax.random.normal(ks[2], (B, s, k_heads, H), jnp.float32)
  dout = jax.random.normal(ks[3], (B, t, N, H), jnp.float32)
  arrays = {"b1ts": jax.random.normal(ks[4], (B, 1, t, s)), "bnts": jax.random.normal(ks[4], (B, N, t, s)),
            # random masks with the diagonal kept, so no valid row is empty
            "1nts": jax.random.bernoulli(ks[5], 0.6, (1, N, t, s)) | jnp.eye(t, s, dtype=bool),
            "11ts": jax.random.bernoulli(ks[5], 0.6, (1, 1, t, s)) | jnp.eye(t, s, dtype=bool)}
  cast = lambda x: x.astype(dtype)
  return tuple(map(cast, (q, k, v, dout))), arrays


def _run(fn, q, k, v, dout, opts):
  """(out, residual, dq, dk, dv[, dbias]) of fn at these inputs (residual at valid rows only)."""
  opts = dict(opts)
  bias = opts.pop("bias", None)

  def f(q, k, v, bias):
    out, res = fn(q, k, v, bias, return_residual=True, **opts)
    return out, res

  (out, res), vjp = jax.vjp(f, q, k, v, bias)
  grads = vjp((dout, jnp.zeros_like(res)))
  if "query_seq_lengths" in opts:  # padding rows' residual is undefined on both sides
    valid = np.arange(q.shape[1])[None, :] < opts["query_seq_lengths"][:, None]
    res = jnp.where(valid[..., None], res, 0)
  return (out, res, *grads[:3]) + (() if bias is None else (grads[3],))


def _check(ours, lowp, ref, dtype):
  names = ("out", "residual", "dq", "dk", "dv", "dbias")
  for name, o, lo, r in zip(names, ours, lowp, ref):
    factor = numerics.OUT_FACTOR if name in ("out", "residual") else numerics.GRAD_FACTOR
    numerics.assert_rule(name, o, lo, r, factor=factor, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_jax_nn(case, dtype):
  if dtype == "bfloat16" and case not in ("causal-lengths", "bias-mask-window", "plain"):
    pytest.skip("bf16 on three representative cases (interpret mode is slow)")
  (q, k, v, dout), arrays = _inputs(dtype)
  opts = {key: arrays[val] if isinstance(val, str) else val for key, val in CASES[case].items()}
  f32 = lambda x: x if x is None or not hasattr(x, "dtype") or x.dtype == bool else jnp.asarray(x, jnp.float32)
  with jax.default_matmul_precision("highest"):
    ref = _run(jax.nn.dot_product_attention, *map(f32, (q, k, v, dout)),
               {key: f32(val) if key == "bias" else val for key, val in opts.items()})
  lowp = _run(jax.nn.dot_product_attention, q, k, v, dout, {
      key: val.astype(dtype) if key == "bias" else val for key, val in opts.items()})
  ours = _run(pallas_attn.dot_product_attention, q, k, v, dout, {
      key: val.astype(dtype) if key == "bias" else val for key, val in opts.items()})
  _check(ours, lowp, ref, dtype)


def test_unbatched_mqa_and_jit():
  (q, k, v, _), _ = _inputs("float32", k_heads=1)
  fn = jax.jit(lambda q, k, v: pallas_attn.dot_product_attention(q, k, v, is_causal=True))
  with jax.default_matmul_precision("highest"):
    ref = jax.nn.dot_product_attention(q[0], k[0], v[0], is_causal=True)
  ours = fn(q[0], k[0], v[0])
  assert ours.shape == (T, N, H)
  numerics.assert_rule("out", ours, ref, ref, factor=numerics.OUT_FACTOR, dtype="float32")


def test_traced_lengths_under_jit():
  """Lengths are run-time values: one compile serves every length."""
  (q, k, v, _), _ = _inputs("float32")
  fn = jax.jit(lambda q, k, v, lq, lk: pallas_attn.dot_product_attention(
      q, k, v, query_seq_lengths=lq, key_value_seq_lengths=lk))
  for lq, lk in (([13, 3], [21, 2]), ([1, 13], [4, 21])):
    lq, lk = np.array(lq, np.int32), np.array(lk, np.int32)
    with jax.default_matmul_precision("highest"):
      ref = jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lq, key_value_seq_lengths=lk)
    numerics.assert_rule("out", fn(q, k, v, lq, lk), ref, ref, factor=numerics.OUT_FACTOR,
                         dtype="float32")
  assert fn._cache_size() == 1  # pylint: disable=protected-access


def test_flax_attention_fn_keywords():
  """Flax's MultiHeadDotProductAttention calls attention_fn(q, k, v, mask=..., dropout_rng=...,
  dropout_rate=..., broadcast_dropout=..., deterministic=..., dtype=..., precision=...)."""
  (q, k, v, _), arrays = _inputs("float32", t=S)
  mask = jnp.tril(jnp.ones((1, 1, S, S), bool))
  flax_kw = dict(mask=mask, dropout_rng=jax.random.PRNGKey(1), dropout_rate=0.1,
                 broadcast_dropout=False, deterministic=True, dtype=jnp.float32,
                 precision=None, module=None)
  with jax.default_matmul_precision("highest"):
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask)
  ours = pallas_attn.dot_product_attention(q, k, v, **flax_kw)  # deterministic: no dropout
  numerics.assert_rule("out", ours, ref, ref, factor=numerics.OUT_FACTOR, dtype="float32")
  dropped = pallas_attn.dot_product_attention(q, k, v, **{**flax_kw, "deterministic": False})
  again = pallas_attn.dot_product_attention(q, k, v, **{**flax_kw, "deterministic": False})
  assert not np.allclose(dropped, ours) and np.array_equal(dropped, again)
  with pytest.raises(ValueError, match="broadcast_dropout"):
    pallas_attn.dot_product_attention(q, k, v, **{**flax_kw, "deterministic": False,
                                                  "broadcast_dropout": True})


def test_float_mask_reads_as_flax():
  """Flax's masks are float 0/1 (nn.make_causal_mask): nonzero takes part, the same as the bool mask."""
  (q, k, v, _), _ = _inputs("float32")
  keep = jax.random.bernoulli(jax.random.PRNGKey(5), 0.7, (1, 1, T, S)).at[..., 0].set(True)
  ours = pallas_attn.dot_product_attention(q, k, v, mask=keep.astype(jnp.float32))
  np.testing.assert_array_equal(ours, pallas_attn.dot_product_attention(q, k, v, mask=keep))
  assert not np.allclose(ours, pallas_attn.dot_product_attention(q, k, v))


@pytest.mark.parametrize("kwargs,match", [
    (dict(implementation="cudnn"), "implementation"),
    (dict(bias=jnp.ones((1, 3, T, S))), r"bias: expected a shape broadcastable"),
    (dict(query_seq_lengths=np.array([1, 2, 3], np.int32)), "query_seq_lengths"),
    (dict(local_window_size=(1, 2, 3)), "local_window_size"),
    (dict(local_window_size=(-1, 2)), "local_window_size"),
])
def test_bad_arguments_name_themselves(kwargs, match):
  (q, k, v, _), _ = _inputs("float32")
  with pytest.raises(ValueError, match=match):
    pallas_attn.dot_product_attention(q, k, v, **kwargs)


def test_as_flax_attention_fn():
  """Flax's own module with our function as its attention_fn (flax is not a test dependency: this
  runs where flax is installed, as on the GPU machine)."""
  nn = pytest.importorskip("flax.linen")
  x = jax.random.normal(jax.random.PRNGKey(3), (B, T, 32), jnp.float32)
  mask = nn.make_causal_mask(jnp.ones((B, T)))
  ours = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32,
                                         attention_fn=pallas_attn.dot_product_attention)
  theirs = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32)
  params = theirs.init(jax.random.PRNGKey(4), x, mask=mask)
  with jax.default_matmul_precision("highest"):
    ref = theirs.apply(params, x, mask=mask)
  out = ours.apply(params, x, mask=mask)
  numerics.assert_rule("out", out, ref, ref, factor=numerics.OUT_FACTOR, dtype="float32")
