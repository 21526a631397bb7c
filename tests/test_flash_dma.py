"""Flash dynamic mask attention (SPEC section 5) on the JAX face: parity of out, lse, dq, dk, dv and
dzoh with the reference, the top-k mask, tile skipping, dropout, errors and CUDA lowering."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_attn import dropout, flash_dma, masking, spec as spec_mod
from pallas_attn.reference import dynamic_mask_reference, topk_mask_reference

import numerics


def _inputs(seed, b, sq, sk, h, hk, d, dtype, density, block_cols=None):
  """q, k, v, zoh, active_mask, dout, dlse; active_mask keeps each key with probability `density`.

  block_cols: (start, stop) columns zeroed in active_mask for every row (whole skipped tiles).
  """
  q, k, v, _, dout, dlse = numerics.random_inputs(seed, b, sq, sk, h, hk, d, dtype)
  ks = jax.random.split(jax.random.PRNGKey(seed + 7), 2)
  zoh = jax.random.normal(ks[0], (b, hk, sq, sk), jnp.dtype(dtype))
  active = jax.random.uniform(ks[1], (b, hk, sq, sk)) < density
  if block_cols is not None:
    active = active.at[..., block_cols[0]:block_cols[1]].set(False)
  return q, k, v, zoh, active.astype(dtype), dout, dlse


@functools.partial(jax.jit, static_argnames=("upcast", "causal", "softcap"))
def _ref_vjp(q, k, v, zoh, active, dout, dlse, *, upcast, causal, softcap):
  fn = lambda q, k, v, z: dynamic_mask_reference(q, k, v, z, active, is_causal=causal,
                                                 softcap=softcap, upcast=upcast)
  (out, lse), vjp = jax.vjp(fn, q, k, v, zoh)
  return (out, lse, *vjp((dout.astype(out.dtype), dlse)))


def _ours_vjp(q, k, v, zoh, active, dout, dlse, causal, softcap, **kw):
  fn = lambda q, k, v, z: tuple(flash_dma.fwd(q, k, v, z, active, is_causal=causal, softcap=softcap,
                                              **kw)[:2])
  (out, lse), vjp = jax.vjp(fn, q, k, v, zoh)
  return (out, lse, *vjp((dout, dlse)))


def _check(ours, q, k, v, zoh, active, dout, dlse, causal, softcap):
  ref = _ref_vjp(q, k, v, zoh, active, dout, dlse, upcast=True, causal=causal, softcap=softcap)
  lowp = _ref_vjp(q, k, v, zoh, active, dout, dlse, upcast=False, causal=causal, softcap=softcap)
  numerics.check_attention(ours[:5], lowp[:5], ref[:5])
  numerics.assert_grad("dzoh", ours[5], lowp[5], ref[5])
  assert ours[5].dtype == zoh.dtype


def _np_dynamic_mask(q, k, v, zoh, active, scale, causal, softcap):
  """Row-by-row float64 statement of SPEC section 5, independent of the jnp reference."""
  q, k, v, zoh, active = (np.asarray(x, np.float64) for x in (q, k, v, zoh, active))
  b, sq, h, d = q.shape
  sk, hk = k.shape[1], k.shape[2]
  out = np.zeros_like(q)
  lse = np.full((b, h, sq), np.inf)
  for bb in range(b):
    for hh in range(h):
      g = hh // (h // hk)
      for i in range(sq):
        raw = k[bb, :, g] @ q[bb, i, hh] * scale
        t = softcap * np.tanh(raw / softcap) if softcap > 0 else raw
        t = t + zoh[bb, g, i]
        ok = active[bb, g, i] > 0
        if causal:
          ok &= np.arange(sk) <= i + sk - sq
        if not ok.any():
          continue
        m = t[ok].max()
        w = np.where(ok, np.exp(t - m), 0.0)
        lse[bb, hh, i] = m + np.log(w.sum())
        out[bb, i, hh] = (w / w.sum()) @ v[bb, :, g]
  return out, lse


@pytest.mark.parametrize("causal,softcap", [(False, 0.0), (True, 5.0)])
def test_reference_matches_the_row_by_row_formula(causal, softcap):
  with jax.enable_x64(True):
    q, k, v, zoh, active, *_ = _inputs(3, 2, 9, 13, 4, 2, 8, "float64", 0.5)
    active = active.at[0, 0, 2].set(0.0)  # an empty row
    out, lse = dynamic_mask_reference(q, k, v, zoh, active, softmax_scale=0.3, is_causal=causal,
                                      softcap=softcap)
    want_out, want_lse = _np_dynamic_mask(q, k, v, zoh, active, 0.3, causal, softcap)
    # The reference computes in float32 (upcast), so agreement is to float32 rounding.
    np.testing.assert_allclose(np.asarray(out), want_out, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("b,sq,sk,h,hk,d,causal,softcap,density,dtype", [
    (1, 40, 72, 4, 2, 32, False, 0.0, 0.5, "float32"),
    (2, 64, 48, 2, 2, 64, True, 0.0, 0.1, "float32"),    # sq > sk causal: empty rows
    (1, 33, 130, 4, 1, 32, True, 20.0, 1.0, "float32"),  # MQA, full mask, softcap
    (1, 50, 50, 4, 2, 96, False, 10.0, 0.5, "bfloat16"),
    (1, 24, 90, 2, 1, 64, True, 0.0, 0.1, "bfloat16"),
    (1, 17, 40, 2, 2, 32, False, 0.0, 0.0, "float32"),   # nothing active: every row empty
])
def test_parity(b, sq, sk, h, hk, d, causal, softcap, density, dtype):
  q, k, v, zoh, active, dout, dlse = _inputs(sq * sk, b, sq, sk, h, hk, d, dtype, density)
  ours = _ours_vjp(q, k, v, zoh, active, dout, dlse, causal, softcap)
  _check(ours, q, k, v, zoh, active, dout, dlse, causal, softcap)
  if density == 0.0:
    assert np.all(np.asarray(ours[0], np.float32) == 0)
    assert np.all(np.isposinf(np.asarray(ours[1])))
    for g in ours[2:]:
      assert np.all(np.asarray(g, np.float32) == 0)


def test_empty_tiles_are_never_read():
  """Keys in tiles the mask leaves empty are not loaded at all: an inf there would otherwise turn
  0 * inf into NaN in P @ V (forward) and in dV / dK (backward)."""
  b, sq, sk, h, hk, d = 1, 48, 256, 2, 1, 32
  q, k, v, zoh, active, dout, dlse = _inputs(5, b, sq, sk, h, hk, d, "float32", 0.5,
                                             block_cols=(16, sk))
  v = v.at[:, 128:].set(jnp.inf)
  k = k.at[:, 128:].set(jnp.inf)
  zoh = zoh.at[..., 128:].set(jnp.nan)
  out, lse, dq, dk, dv, dzoh = _ours_vjp(q, k, v, zoh, active, dout, dlse, False, 0.0)
  for name, x in (("out", out), ("lse", lse), ("dq", dq), ("dk", dk[:, :128]), ("dv", dv[:, :128]),
                  ("dzoh", dzoh)):
    numerics.assert_no_nan(name, x)
  assert np.all(np.asarray(dzoh[..., 16:]) == 0)
  assert np.all(np.asarray(dv[:, 128:]) == 0)
  clean = _inputs(5, b, sq, sk, h, hk, d, "float32", 0.5, block_cols=(16, sk))
  want = flash_dma.fwd(*clean[:5])[0]
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want))


@pytest.mark.parametrize("grain", [(16, 32), (8, 16), (16, 8)])
@pytest.mark.parametrize("transposed", [False, True])
def test_dynamic_tables_list_exactly_the_visible_tiles(transposed, grain):
  """Tables of 16 x 32 tiles, from counts taken at that size or at a finer grain (the backward
  counts once at the finer of its two tilings)."""
  keep = jax.random.uniform(jax.random.PRNGKey(1), (2, 3, 70, 90)) < 0.02
  keep = keep.at[:, :, :32, :].set(True)
  band = spec_mod.band_from_window(70, 90, True, (-1, -1))
  counts = masking.dynamic_counts(keep.astype(jnp.bfloat16), band, *grain)
  tables = masking.tables_from_counts(counts, *grain, 16, 32, transposed)
  pnum, pidx, fnum, fidx = (np.asarray(t) for t in tables)
  vis = np.asarray(keep) & np.asarray(band.visible(jnp.arange(70), jnp.arange(90)))
  vis = np.pad(vis, ((0, 0), (0, 0), (0, 80 - 70), (0, 96 - 90)))
  counts = vis.reshape(2, 3, 5, 16, 3, 32).sum(axis=(3, 5))
  if transposed:
    counts = counts.swapaxes(-1, -2)
  for bb in range(2):
    for g in range(3):
      for t in range(counts.shape[2]):
        row = counts[bb, g, t]
        assert list(pidx[bb, g, t, :pnum[bb, g, t]]) == list(np.nonzero((row > 0) & (row < 512))[0])
        assert list(fidx[bb, g, t, :fnum[bb, g, t]]) == list(np.nonzero(row == 512)[0])


@pytest.mark.parametrize("causal", [False, True])
def test_topk_mask(causal):
  zoh = jax.random.normal(jax.random.PRNGKey(2), (1, 2, 20, 40), jnp.float32)
  got = flash_dma.topk_mask(zoh, 8, causal)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(topk_mask_reference(zoh, 8, causal)))
  counts = np.asarray(got).sum(-1)
  allowed = np.minimum(8, np.arange(20) + 21) if causal else np.full(20, 8)
  np.testing.assert_array_equal(counts, np.broadcast_to(allowed, counts.shape))
  # sk <= keep_window_size: every key the causal rule allows.
  full = flash_dma.topk_mask(zoh, 40, causal)
  assert np.asarray(full).sum() == (2 * sum(range(21, 41)) if causal else 2 * 20 * 40)


def test_active_mask_none_uses_the_topk_mask():
  q, k, v, zoh, _, dout, dlse = _inputs(4, 1, 24, 64, 2, 1, 32, "float32", 1.0)
  out, lse, _, _ = flash_dma.fwd(q, k, v, zoh, None, is_causal=True, keep_window_size=16)
  mask = topk_mask_reference(zoh, 16, True)
  want_out, want_lse = dynamic_mask_reference(q, k, v, zoh, mask, is_causal=True)
  numerics.assert_rule("out", out, want_out, want_out, factor=1.0)
  numerics.assert_lse(lse, want_lse, want_lse)
  # An explicit active_mask ignores keep_window_size.
  explicit = flash_dma.fwd(q, k, v, zoh, jnp.ones_like(zoh), keep_window_size=1)[0]
  plain = dynamic_mask_reference(q, k, v, zoh, jnp.ones_like(zoh))[0]
  numerics.assert_rule("out", explicit, plain, plain, factor=1.0)


def test_dropout_replays_the_kernels_mask():
  b, sq, sk, h, hk, d, p = 1, 40, 56, 2, 1, 32, 0.2
  q, k, v, zoh, active, dout, dlse = _inputs(6, b, sq, sk, h, hk, d, "float32", 0.6)
  key = jax.random.PRNGKey(11)
  ours = _ours_vjp(q, k, v, zoh, active, dout, dlse, True, 0.0, p_dropout=p, dropout_key=key)
  _, _, probs, rng_state = flash_dma.fwd(q, k, v, zoh, active, is_causal=True, p_dropout=p,
                                         dropout_key=key, return_softmax=True)
  keep = dropout.dense_keep(rng_state[:1], b, h, sq, sk, p)
  # p holds P with the dropped entries negated: its signs are the mask wherever P > 0.
  nonzero = np.asarray(probs) != 0
  np.testing.assert_array_equal(np.asarray(probs > 0)[nonzero], np.asarray(keep)[nonzero])
  fn = lambda upcast: jax.vjp(lambda q, k, v, z: dynamic_mask_reference(
      q, k, v, z, active, is_causal=True, upcast=upcast, dropout_p=p, dropout_keep=keep), q, k, v, zoh)
  refs = []
  for upcast in (True, False):
    (o, l), vjp = fn(upcast)
    refs.append((o, l, *vjp((dout, dlse))))
  numerics.check_attention(ours[:5], refs[1][:5], refs[0][:5])
  numerics.assert_grad("dzoh", ours[5], refs[1][5], refs[0][5])
  again = _ours_vjp(q, k, v, zoh, active, dout, dlse, True, 0.0, p_dropout=p, dropout_key=key)
  for a, b_ in zip(ours, again):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b_))


def test_return_softmax_and_bwd():
  q, k, v, zoh, active, dout, _ = _inputs(8, 1, 20, 36, 4, 2, 32, "float32", 0.5)
  out, lse, probs, rng_state = flash_dma.fwd(q, k, v, zoh, active, is_causal=True, softcap=3.0,
                                             return_softmax=True)
  assert probs.shape == (1, 4, 20, 36) and rng_state.shape == (0,)
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-5)
  assert np.all(np.asarray(probs)[np.repeat(np.asarray(active) <= 0, 2, axis=1)] == 0)
  got = flash_dma.bwd(dout, q, k, v, zoh, active, out, lse, is_causal=True, softcap=3.0)
  _, vjp = jax.vjp(lambda q, k, v, z: flash_dma.fwd(q, k, v, z, active, is_causal=True,
                                                    softcap=3.0)[0], q, k, v, zoh)
  for a, b_ in zip(got, vjp(dout)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b_))
  assert flash_dma.fwd(q, k, v, zoh, active)[2].shape == (0,)


def test_under_jit_and_vmap():
  q, k, v, zoh, active, *_ = _inputs(9, 2, 16, 32, 2, 1, 16, "float32", 0.5)
  eager = flash_dma.fwd(q, k, v, zoh, active)[0]
  jitted = jax.jit(lambda *a: flash_dma.fwd(*a)[0])(q, k, v, zoh, active)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6, atol=1e-6)
  mapped = jax.vmap(lambda *a: flash_dma.fwd(*(x[None] for x in a))[0][0])(q, k, v, zoh, active)
  np.testing.assert_allclose(np.asarray(mapped), np.asarray(eager), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("change,err,match", [
    (dict(zoh=jnp.zeros((1, 2, 8, 9))), ValueError, r"zoh: expected shape .*\(1, 1, 8, 16\)"),
    (dict(zoh=jnp.zeros((1, 1, 8, 16), jnp.bfloat16)), TypeError, "zoh: expected dtype float32"),
    (dict(active_mask=jnp.zeros((1, 1, 16, 8))), ValueError, "active_mask: expected shape"),
    (dict(keep_window_size=0), ValueError, "keep_window_size"),
    (dict(p_dropout=0.1), ValueError, "dropout_key"),
    (dict(p_dropout=1.0), ValueError, "dropout_p"),
    (dict(out=jnp.zeros((1, 8, 2, 4))), ValueError, "out: expected None or an array of shape"),
])
def test_errors_name_the_argument(change, err, match):
  args = dict(q=jnp.ones((1, 8, 2, 16)), k=jnp.ones((1, 16, 1, 16)), v=jnp.ones((1, 16, 1, 16)),
              zoh=jnp.zeros((1, 1, 8, 16)), active_mask=jnp.ones((1, 1, 8, 16)))
  args.update(change)
  with pytest.raises(err, match=match):
    flash_dma.fwd(**args)


@pytest.mark.parametrize("causal,softcap,p_dropout", [(True, 0.0, 0.0), (False, 30.0, 0.1)])
def test_lowers_for_cuda(causal, softcap, p_dropout):
  q = jnp.zeros((2, 1000, 8, 128), jnp.bfloat16)
  k = jnp.zeros((2, 1000, 2, 128), jnp.bfloat16)
  z = jnp.zeros((2, 2, 1000, 1000), jnp.bfloat16)

  def f(q, k, v, z):
    key = jax.random.PRNGKey(0) if p_dropout else None
    out, vjp = jax.vjp(lambda q, k, v, z: flash_dma.fwd(
        q, k, v, z, z, is_causal=causal, softcap=softcap, p_dropout=p_dropout,
        dropout_key=key)[0], q, k, v, z)
    return vjp(out)

  text = jax.jit(f).trace(q, k, k, z).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 3


@pytest.mark.gpu
@pytest.mark.parametrize("causal,density", [(True, 0.25), (False, 1.0)])
def test_parity_gpu(causal, density):
  q, k, v, zoh, active, dout, dlse = _inputs(0, 2, 1024, 1024, 8, 2, 128, "bfloat16", density)
  ours = jax.jit(lambda *a: _ours_vjp(*a, causal, 0.0))(q, k, v, zoh, active, dout, dlse)
  _check(ours, q, k, v, zoh, active, dout, dlse, causal, 0.0)


def test_mask_dtypes_agree():
  """active_mask counts where it is > 0, whatever its dtype (bool, int8, the input dtype)."""
  q, k, v, zoh, active, *_ = _inputs(12, 1, 20, 40, 2, 1, 16, "float32", 0.5)
  want = flash_dma.fwd(q, k, v, zoh, active, is_causal=True)[:2]
  for mask in (active > 0, active.astype(jnp.int8), active * 3.0 - 1.0 * (active == 0)):
    got = flash_dma.fwd(q, k, v, zoh, mask, is_causal=True)[:2]
    for a, b_ in zip(got, want):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b_))
