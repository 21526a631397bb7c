"""sparse_attention (OpenAI sparse transformer modes) against its reference, and its tile lists."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numerics
from pallas_attn import masking
from pallas_attn.reference import sparse_attention_mask, sparse_attention_reference
from pallas_attn.sparse import sparse_attention


@functools.partial(jax.jit, static_argnames=("heads", "mode", "ctx", "upcast"))
def _reference(q, k, v, dout, *, heads, mode, ctx, upcast):
  out, vjp = jax.vjp(lambda q, k, v: sparse_attention_reference(q, k, v, heads, mode, ctx, upcast=upcast),
                     q, k, v)
  return (out, *vjp(dout.astype(out.dtype)))


def _inputs(seed, b, n, e, dtype):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  return tuple(jax.random.normal(kk, (b, n, e), jnp.dtype(dtype)) for kk in ks)


def _check(q, k, v, dout, heads, mode, ctx, blocksize=32, impl="regroup"):
  out, vjp = jax.vjp(lambda q, k, v: sparse_attention(q, k, v, heads, mode, ctx, blocksize,
                                                      strided_impl=impl), q, k, v)
  ours = (out, *vjp(dout))
  ref = _reference(q, k, v, dout, heads=heads, mode=mode, ctx=ctx, upcast=True)
  lowp = _reference(q, k, v, dout, heads=heads, mode=mode, ctx=ctx, upcast=False)
  numerics.assert_output("out", ours[0], lowp[0], ref[0])
  for name, o, lo, r in zip(("dq", "dk", "dv"), ours[1:], lowp[1:], ref[1:]):
    numerics.assert_grad(name, o, lo, r)
  return ours


@pytest.mark.parametrize("mode,ctx,n,heads,blocksize,dtype", [
    ("all", None, 70, 2, 32, "float32"),
    ("all", None, 128, 4, 16, "bfloat16"),
    ("local", 16, 70, 2, 32, "float32"),
    ("local", 5, 97, 4, 16, "bfloat16"),
    ("local", 200, 130, 2, 64, "float32"),
    ("strided", 8, 70, 2, 32, "float32"),
    ("strided", 3, 97, 4, 16, "bfloat16"),
    ("strided", 16, 64, 2, 128, "float32"),
])
def test_parity(mode, ctx, n, heads, blocksize, dtype):
  q, k, v, dout = _inputs(n + heads, 2, n, 64 * heads // 2, dtype)
  _check(q, k, v, dout, heads, mode, ctx, blocksize)


@pytest.mark.parametrize("n,ctx", [(70, 8), (45, 4)])
def test_strided_tables_match_regroup(n, ctx):
  q, k, v, dout = _inputs(7, 1, n, 64, "float32")
  a = _check(q, k, v, dout, 2, "strided", ctx, impl="tables")
  b = _check(q, k, v, dout, 2, "strided", ctx, impl="regroup")
  for x, y in zip(a, b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5)


def test_blocksize_does_not_change_results():
  q, k, v, _ = _inputs(3, 1, 96, 64, "float32")
  outs = [sparse_attention(q, k, v, 2, "local", 24, bs) for bs in (16, 64, 128)]
  for o in outs[1:]:
    np.testing.assert_allclose(np.asarray(o), np.asarray(outs[0]), atol=2e-6)


def _dense_tiles(vis: np.ndarray, bq: int, bk: int, rows_valid: int):
  """(partial, full) key-tile lists per query tile of a dense mask."""
  n_q, n_k = -(-vis.shape[0] // bq), -(-vis.shape[1] // bk)
  pad = np.zeros((n_q * bq, n_k * bk), bool)
  pad[:vis.shape[0], :vis.shape[1]] = vis
  cnt = pad.reshape(n_q, bq, n_k, bk).sum(axis=(1, 3))
  full_size = np.full((n_q, n_k), bq * bk)
  out = []
  for t in range(n_q):
    whole = (t + 1) * bq <= rows_valid
    full = [j for j in range(n_k) if whole and cnt[t, j] == full_size[t, j]]
    out.append((sorted(set(np.nonzero(cnt[t])[0]) - set(full)), full))
  return out


@pytest.mark.parametrize("n,ctx,bq,bk", [(100, 9, 32, 16), (256, 64, 64, 64), (130, 1, 16, 32)])
def test_local_band_visits_exactly_the_nonzero_tiles(n, ctx, bq, bk):
  vis = np.asarray(sparse_attention_mask(n, "local", ctx))
  band = masking.BandMask(sq=n, sk=n, left=ctx - 1, right=0)
  for t, ((p, f), (dp, df)) in enumerate(zip(masking.band_tiles(band, bq, bk), _dense_tiles(vis, bq, bk, n))):
    # The last query tile may run past n: the band may call it full (its extra rows are never
    # stored), the dense count cannot; the union of visited tiles must still agree.
    if (t + 1) * bq <= n:
      assert (p, f) == (dp, df), f"query tile {t}"
    else:
      assert sorted(p + f) == sorted(dp + df), f"query tile {t}"
  band_t = masking.band_tiles(band, bq, bk, transposed=True)
  dense_t = _dense_tiles(vis.T, bk, bq, n)
  for t, ((p, f), (dp, df)) in enumerate(zip(band_t, dense_t)):
    assert sorted(p + f) == sorted(dp + df), f"key tile {t}"


@pytest.mark.parametrize("n,ctx,bq,bk", [(100, 8, 32, 16), (256, 128, 64, 64), (77, 3, 16, 16)])
def test_strided_tables_are_the_nonzero_tiles(n, ctx, bq, bk):
  vis = np.asarray(sparse_attention_mask(n, "strided", ctx))
  tables = masking.tile_tables(masking.StridedCausalMask(sq=n, sk=n, stride=ctx), bq, bk)
  for t, (dp, df) in enumerate(_dense_tiles(vis, bq, bk, n)):
    p = sorted(tables.partial_idx[t, :tables.partial_num[t]].tolist())
    f = sorted(tables.full_idx[t, :tables.full_num[t]].tolist())
    assert (p, f) == (dp, df), f"query tile {t}"
  t_tables = masking.tile_tables(masking.StridedCausalMask(sq=n, sk=n, stride=ctx), bq, bk, True)
  for t in range(t_tables.partial_num.shape[0]):
    got = set(t_tables.partial_idx[t, :t_tables.partial_num[t]].tolist())
    got |= set(t_tables.full_idx[t, :t_tables.full_num[t]].tolist())
    want = {qt for qt in range(-(-n // bq)) if vis[qt * bq:(qt + 1) * bq, t * bk:(t + 1) * bk].any()}
    assert got == want, f"key tile {t}"


@pytest.mark.parametrize("kwargs,match", [
    (dict(attn_mode="local", local_attn_ctx=None), "local_attn_ctx"),
    (dict(attn_mode="strided", local_attn_ctx=0), "local_attn_ctx"),
    (dict(attn_mode="dilated", local_attn_ctx=4), "attn_mode"),
    (dict(attn_mode="all", heads=3), "heads"),
    (dict(attn_mode="all", blocksize=24), "blocksize"),
    (dict(attn_mode="all", blocksize=8), "blocksize"),
])
def test_bad_input(kwargs, match):
  q = jnp.ones((1, 16, 64), jnp.float32)
  args = dict(heads=2, local_attn_ctx=None, blocksize=32)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    sparse_attention(q, q, q, **args)


def test_bad_shapes_and_dtypes():
  q = jnp.ones((1, 16, 64), jnp.float32)
  with pytest.raises(ValueError, match="k/v"):
    sparse_attention(q, q[:, :8], q, 2, "all")
  with pytest.raises(TypeError, match="k"):
    sparse_attention(q, q.astype(jnp.bfloat16), q, 2, "all")
  with pytest.raises(ValueError, match="q"):
    sparse_attention(q[0], q[0], q[0], 2, "all")


@pytest.mark.parametrize("mode,ctx,impl", [("local", 1024, "regroup"), ("strided", 128, "regroup"),
                                           ("strided", 128, "tables")])
def test_lowers_for_cuda(mode, ctx, impl):
  """The Pallas -> Triton lowering runs on the CPU too, so CI catches what only a GPU would reject."""
  q = jnp.zeros((1, 2048, 256), jnp.bfloat16)

  def f(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: sparse_attention(q, k, v, 2, mode, ctx, strided_impl=impl), q, k, v)
    return vjp(out)

  text = jax.jit(f).trace(q, q, q).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 3


@pytest.mark.gpu
@pytest.mark.parametrize("mode,ctx", [("all", None), ("local", 256), ("strided", 32)])
def test_parity_gpu(mode, ctx):
  q, k, v, dout = _inputs(11, 2, 1000, 512, "bfloat16")
  _check(q, k, v, dout, 4, mode, ctx)
