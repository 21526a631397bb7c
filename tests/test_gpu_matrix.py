"""GPU smoke matrix (#16): every public function of both faces over dtype {fp16, bf16, fp32} x head
dim {32, 64, 96, 128, 256} x {MHA, GQA, MQA}, forward and backward where the family has one, at small
shapes, each result against the family's reference under the tolerance rule (numerics.py).

One test per family, parametrized over the matrix. The packed forms of a family (qkvpacked,
kvpacked, the FA3 sink names) run in the same test on the same inputs, so a matrix cell compiles
each family's kernels once. Landmark and sparse attention have no kv heads of their own (MHA only).
The torch face runs on CUDA tensors and is checked against the same references, not against the
JAX face. Everything here needs the GPU: on the CPU the same code paths are covered by the
family test files at interpret-mode sizes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import numerics
import pallas_attn
import test_flash_dma as flash_dma_tests
import test_kvcache as kvcache_tests
import test_landmark as landmark_tests
import test_sink as sink_tests
import test_sparse as sparse_tests
import test_varlen as varlen_tests
import test_varlen_paged as varlen_paged_tests
import torch_bridge
from torch_bridge import flash_dma as torch_flash_dma
from torch_bridge import landmark as torch_landmark

pytestmark = pytest.mark.gpu

DTYPES = ("float16", "bfloat16", "float32")
HEAD_DIMS = (32, 64, 96, 128, 256)
LAYOUTS = {"mha": 4, "gqa": 2, "mqa": 1}  # kv heads for 4 query heads
H = 4
B, SQ, SK = 2, 80, 96  # awkward lengths: partial tiles on both axes
MATRIX = [pytest.param(dt, d, lay, id=f"{dt}-d{d}-{lay}")
          for dt in DTYPES for d in HEAD_DIMS for lay in LAYOUTS]
MHA_MATRIX = [pytest.param(dt, d, id=f"{dt}-d{d}") for dt in DTYPES for d in HEAD_DIMS]

_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _t(x, grad=False):
  """A JAX array as a CUDA tensor of the same dtype."""
  dt = jnp.dtype(x.dtype).name
  t = torch.from_numpy(np.array(jnp.asarray(x, jnp.float32) if dt == "bfloat16" else x))
  t = t.to(device="cuda", dtype=_TORCH.get(dt, t.dtype))
  return t.requires_grad_() if grad else t


def _j(t):
  """A torch tensor back as a JAX array of the same dtype (bf16 through fp32)."""
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    return jnp.asarray(t.float().numpy()).astype(jnp.bfloat16)
  return jnp.asarray(t.numpy())


def _dense_inputs(dtype, d, layout, seed=0):
  return numerics.random_inputs(seed, B, SQ, SK, H, LAYOUTS[layout], d, dtype)


# ----------------------------------------------------------------------------------------------------
# FlashAttention-2 dense: flash_attn_func, kvpacked, qkvpacked (MHA, sq = sk)


@pytest.mark.parametrize("dtype,d,layout", MATRIX)
def test_dense(dtype, d, layout):
  q, k, v, _, dout, dlse = _dense_inputs(dtype, d, layout)
  opts = dict(causal=True)
  ref, lowp = numerics.references(q, k, v, None, dout, dlse, **opts)

  def jax_face(fn):
    (out, lse), vjp = jax.vjp(lambda q, k, v: fn(q, k, v)[:2], q, k, v)
    return (out, lse, *vjp((dout, dlse)))

  numerics.check_attention(jax_face(lambda q, k, v: pallas_attn.flash_attn_func(
      q, k, v, return_attn_probs=True, **opts)), lowp, ref)
  numerics.check_attention(jax_face(lambda q, k, v: pallas_attn.flash_attn_kvpacked_func(
      q, jnp.stack([k, v], axis=2), return_attn_probs=True, **opts)), lowp, ref)

  tq, tk, tv = _t(q, True), _t(k, True), _t(v, True)
  out, lse, _ = torch_bridge.flash_attn_func(tq, tk, tv, return_attn_probs=True, **opts)
  loss = (out.float() * _t(dout).float()).sum() + (lse * _t(dlse)).sum()
  grads = torch.autograd.grad(loss, (tq, tk, tv))
  numerics.check_attention([_j(x) for x in (out, lse, *grads)], lowp, ref)

  if layout == "mha":
    qs, ks, vs, _, douts, dlses = numerics.random_inputs(1, B, SQ, SQ, H, H, d, dtype)
    ref, lowp = numerics.references(qs, ks, vs, None, douts, dlses, **opts)
    qkv = jnp.stack([qs, ks, vs], axis=2)
    (out, lse), vjp = jax.vjp(lambda x: pallas_attn.flash_attn_qkvpacked_func(
        x, return_attn_probs=True, **opts)[:2], qkv)
    (dqkv,) = vjp((douts, dlses))
    numerics.check_attention((out, lse, dqkv[:, :, 0], dqkv[:, :, 1], dqkv[:, :, 2]), lowp, ref)
    tqkv = _t(qkv, True)
    out = torch_bridge.flash_attn_qkvpacked_func(tqkv, **opts)
    (dqkv,) = torch.autograd.grad(out, tqkv, _t(douts))
    ref, lowp = numerics.references(qs, ks, vs, None, douts, jnp.zeros_like(dlses), **opts)
    numerics.assert_output("out", _j(out), lowp[0], ref[0])
    for n, name in enumerate(("dq", "dk", "dv")):
      numerics.assert_grad(name, _j(dqkv[:, :, n]), lowp[2 + n], ref[2 + n])


# ----------------------------------------------------------------------------------------------------
# FlashAttention-2 varlen (and its packed forms, and paged keys: forward only)

LQ, LK = [30, 1, 49], [41, 0, 55]


@pytest.mark.parametrize("dtype,d,layout", MATRIX)
def test_varlen(dtype, d, layout):
  hk = LAYOUTS[layout]
  cq, ck = varlen_tests._cu(LQ), varlen_tests._cu(LK)
  ks = jax.random.split(jax.random.PRNGKey(d), 4)
  dt = jnp.dtype(dtype)
  q = jax.random.normal(ks[0], (sum(LQ), H, d), dt)
  k = jax.random.normal(ks[1], (sum(LK), hk, d), dt)
  v = jax.random.normal(ks[2], (sum(LK), hk, d), dt)
  dout = jax.random.normal(ks[3], q.shape, dt)
  opts = dict(causal=True)
  ref, lowp = varlen_tests._packed_references(q, k, v, dout, cq, ck, **opts)

  def jax_face(fn):
    (out, lse), vjp = jax.vjp(lambda q, k, v: fn(q, k, v)[:2], q, k, v)
    return (out, lse, *vjp((dout, jnp.zeros_like(lse))))

  numerics.check_attention(jax_face(lambda q, k, v: pallas_attn.flash_attn_varlen_func(
      q, k, v, cq, ck, max(LQ), max(LK), return_attn_probs=True, **opts)), lowp, ref)
  numerics.check_attention(jax_face(lambda q, k, v: pallas_attn.flash_attn_varlen_kvpacked_func(
      q, jnp.stack([k, v], axis=1), cq, ck, max(LQ), max(LK), return_attn_probs=True, **opts)),
                           lowp, ref)

  tq, tk, tv = _t(q, True), _t(k, True), _t(v, True)
  tcq, tck = _t(cq), _t(ck)
  out, lse, _ = torch_bridge.flash_attn_varlen_func(tq, tk, tv, tcq, tck, max(LQ), max(LK),
                                                    return_attn_probs=True, **opts)
  grads = torch.autograd.grad(out, (tq, tk, tv), _t(dout))
  numerics.check_attention([_j(x) for x in (out, lse, *grads)], lowp, ref)

  # Paged keys (forward only), pages of 16 and 256.
  for page in (16, 256):
    k_cache, v_cache, table = varlen_paged_tests._paged(k, v, LK, page, seed=page)
    out, lse, _ = pallas_attn.flash_attn_varlen_func(q, k_cache, v_cache, cq, ck, max(LQ), max(LK),
                                                     block_table=table, return_attn_probs=True,
                                                     **opts)
    numerics.assert_output("out", out, lowp[0], ref[0])
    numerics.assert_lse(lse, lowp[1], ref[1])
    with torch.no_grad():
      out, lse, _ = torch_bridge.flash_attn_varlen_func(
          tq, _t(k_cache), _t(v_cache), tcq, tck, max(LQ), max(LK), block_table=_t(table),
          return_attn_probs=True, **opts)
    numerics.assert_output("out", _j(out), lowp[0], ref[0])
    numerics.assert_lse(_j(lse), lowp[1], ref[1])

  if layout == "mha":
    cu = cq
    qs, ks_, vs = q, jax.random.normal(ks[1], q.shape, dt), jax.random.normal(ks[2], q.shape, dt)
    ref, lowp = varlen_tests._packed_references(qs, ks_, vs, dout, cu, cu, **opts)
    qkv = jnp.stack([qs, ks_, vs], axis=1)
    (out, lse), vjp = jax.vjp(lambda x: pallas_attn.flash_attn_varlen_qkvpacked_func(
        x, cu, max(LQ), return_attn_probs=True, **opts)[:2], qkv)
    (dqkv,) = vjp((dout, jnp.zeros_like(lse)))
    numerics.check_attention((out, lse, dqkv[:, 0], dqkv[:, 1], dqkv[:, 2]), lowp, ref)


# ----------------------------------------------------------------------------------------------------
# KV cache (forward only): contiguous and paged, both faces


@pytest.mark.parametrize("dtype,d,layout", MATRIX)
def test_kvcache(dtype, d, layout):
  for case in (kvcache_tests.Case(b=2, sq=2, s_new=2, h=H, hk=LAYOUTS[layout], d=d, capacity=96,
                                 causal=True, rotary=0.5, dtype=dtype, splits=0),
               kvcache_tests.Case(b=2, sq=1, s_new=1, h=H, hk=LAYOUTS[layout], d=d, capacity=128,
                                 page=32, leftpad=True, dtype=dtype, splits=3)):
    kvcache_tests.check_case(case)
    kw = kvcache_tests.make_inputs(case)
    (r_out, r_lse), _, _ = kvcache_tests.reference(kw)
    (l_out, l_lse), _, _ = kvcache_tests.reference(kw, upcast=False)
    tkw = {n: (_t(x) if hasattr(x, "shape") else x) for n, x in kw.items()}
    out, lse = torch_bridge.flash_attn_with_kvcache(**tkw, return_softmax_lse=True)
    numerics.assert_output("out", _j(out), l_out, r_out)
    numerics.assert_lse(_j(lse), l_lse, r_lse)


# ----------------------------------------------------------------------------------------------------
# Attention sinks: FA2 and FA3 names, dense and varlen


@pytest.mark.parametrize("dtype,d,layout", MATRIX)
def test_sink(dtype, d, layout):
  hk = LAYOUTS[layout]
  q, k, v, z, dout, dlse = sink_tests._inputs(d, B, SQ, SK, H, hk, d, 2, "sh", dtype)
  for fn in (lambda q, k, v, z: pallas_attn.fa2_func_with_sink(q, k, v, z, "sh", causal=True,
                                                               return_attn_probs=True)[:2],
             lambda q, k, v, z: pallas_attn.fa3_func_with_sink(q, k, v, z, "sh", causal=True,
                                                               return_attn_probs=True)[:2]):
    (out, lse), vjp = jax.vjp(fn, q, k, v, z)
    sink_tests._check((out, lse, *vjp((dout, dlse))), q, k, v, z, dout, dlse, True, (-1, -1), "sh")
  tq, tk, tv, tz = _t(q, True), _t(k, True), _t(v, True), _t(z, True)
  out, lse, _ = torch_bridge.fa2_func_with_sink(tq, tk, tv, tz, "sh", causal=True,
                                                return_attn_probs=True)
  loss = (out.float() * _t(dout).float()).sum() + (lse * _t(dlse)).sum()
  grads = torch.autograd.grad(loss, (tq, tk, tv, tz))
  sink_tests._check([_j(x) for x in (out, lse, *grads)], q, k, v, z, dout, dlse, True, (-1, -1),
                   "sh")


# ----------------------------------------------------------------------------------------------------
# Flash dynamic mask: fwd / bwd (and autograd through fwd on the torch face)


@pytest.mark.parametrize("dtype,d,layout", MATRIX)
def test_flash_dma(dtype, d, layout):
  q, k, v, zoh, active, dout, dlse = flash_dma_tests._inputs(d, B, SQ, SK, H, LAYOUTS[layout], d,
                                                            dtype, 0.6)
  ours = flash_dma_tests._ours_vjp(q, k, v, zoh, active, dout, dlse, True, 0.0)
  flash_dma_tests._check(ours, q, k, v, zoh, active, dout, dlse, True, 0.0)
  # The explicit bwd: dlse does not enter it, so check it against a dlse-free reference.
  zero = jnp.zeros_like(dlse)
  out, lse = ours[:2]
  got = pallas_attn.flash_dma.bwd(dout, q, k, v, zoh, active, out, lse, is_causal=True)
  ref = flash_dma_tests._ref_vjp(q, k, v, zoh, active, dout, zero, upcast=True, causal=True,
                                softcap=0.0)
  lowp = flash_dma_tests._ref_vjp(q, k, v, zoh, active, dout, zero, upcast=False, causal=True,
                                 softcap=0.0)
  for name, o, lo, r in zip(("dq", "dk", "dv", "dzoh"), got[:4], lowp[2:], ref[2:]):
    numerics.assert_grad(name, o, lo, r)

  tq, tk, tv, tz = _t(q, True), _t(k, True), _t(v, True), _t(zoh, True)
  out, lse, _, _ = torch_flash_dma.fwd(tq, tk, tv, tz, _t(active), is_causal=True)
  loss = (out.float() * _t(dout).float()).sum() + (lse * _t(dlse)).sum()
  grads = torch.autograd.grad(loss, (tq, tk, tv, tz))
  flash_dma_tests._check([_j(x) for x in (out, lse, *grads)], q, k, v, zoh, active, dout, dlse,
                        True, 0.0)


# ----------------------------------------------------------------------------------------------------
# MHA-only families: landmark attention and the sparse transformer


@pytest.mark.parametrize("dtype,d", MHA_MATRIX)
def test_landmark(dtype, d):
  case = landmark_tests.Case(b=1, h=2, sq=80, n_hist=32, d=d, bs=16, dtype=dtype)
  landmark_tests.check_case(case)
  q, k, v, dout = case.inputs(1)
  is_mem = torch.from_numpy(np.asarray(landmark_tests.required_is_mem(case.sk, case.bs))).cuda()
  tq, tk, tv = _t(q, True), _t(k, True), _t(v, True)
  out = torch_landmark.fused_landmark_attention(tq, tk, tv, is_mem, block_size=case.bs)
  grads = torch.autograd.grad(out, (tq, tk, tv), _t(dout))
  ref, lowp = (landmark_tests.reference_vjp(q, k, v, dout, sm_scale=case.sm_scale,
                                           block_size=case.bs, upcast=up) for up in (True, False))
  numerics.assert_output("out", _j(out), lowp[0], ref[0])
  for name, o, lo, r in zip(("dq", "dk", "dv"), grads, lowp[1:], ref[1:]):
    numerics.assert_grad(name, _j(o), lo, r)


@pytest.mark.parametrize("dtype,d", MHA_MATRIX)
def test_sparse(dtype, d):
  heads, n = 2, 97
  q, k, v, dout = sparse_tests._inputs(d, 1, n, heads * d, dtype)
  for mode, ctx in (("local", 16), ("strided", 8)):
    sparse_tests._check(q, k, v, dout, heads, mode, ctx)
    attn = torch_bridge.SparseAttention(heads=heads, attn_mode=mode, local_attn_ctx=ctx)
    tq, tk, tv = _t(q, True), _t(k, True), _t(v, True)
    out = attn(tq, tk, tv)
    grads = torch.autograd.grad(out, (tq, tk, tv), _t(dout))
    ref = sparse_tests._reference(q, k, v, dout, heads=heads, mode=mode, ctx=ctx, upcast=True)
    lowp = sparse_tests._reference(q, k, v, dout, heads=heads, mode=mode, ctx=ctx, upcast=False)
    numerics.assert_output("out", _j(out), lowp[0], ref[0])
    for name, o, lo, r in zip(("dq", "dk", "dv"), grads, lowp[1:], ref[1:]):
      numerics.assert_grad(name, _j(o), lo, r)
