"""Dropout on the torch face: torch.manual_seed replay, parity with pallas_attn's reference run on the
kernels' own keep mask (read back through S_dmask), S_dmask's layout, the ops' seed operand, and
torch.compile.

The reference is pallas_attn.reference.attention_reference (JAX) on the same values; the tolerance
rule is tests/numerics.py's. CPU tensors run the kernels in Pallas interpret mode: shapes stay tiny.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import numerics
import torch_bridge
from pallas_attn import dropout
from pallas_attn.reference import attention_logits, attention_reference
from test_dropout import varlen_references
from torch_bridge import flash_attn as bridge_fa

# pylint: disable=protected-access

P = 0.3


def _inputs(b, sq, sk, h, hk, d, dtype=torch.float32, seed=0):
  g = torch.Generator().manual_seed(seed)
  mk = lambda *s: torch.randn(*s, generator=g).to(dtype)
  q, k, v = (x.requires_grad_() for x in (mk(b, sq, h, d), mk(b, sk, hk, d), mk(b, sk, hk, d)))
  return q, k, v, mk(b, sq, h, d)


def _jnp(x):
  """A torch tensor as a JAX array of the same dtype (bf16 goes through an exact fp32 copy)."""
  x = x.detach()
  dtype = jnp.bfloat16 if x.dtype == torch.bfloat16 else None
  arr = jnp.asarray(x.float().numpy() if dtype is not None else x.numpy())
  return arr.astype(dtype) if dtype is not None else arr


def _np(x):
  return x.detach().float().numpy()


def _grads(out, lse, do, *wrt):
  return torch.autograd.grad((out.float() * do.float()).sum(), wrt)


def _keep_of(s_dmask):
  # Dropped entries are negated, so a dropped zero (a masked entry) is -0.0.
  return ~np.signbit(_np(s_dmask))


# ----------------------------------------------------------------------------------------------------
# Seeding


def test_manual_seed_reproduces_a_run_bitwise_and_other_seeds_differ():
  q, k, v, do = _inputs(1, 20, 24, 2, 1, 16, seed=1)

  def run(seed):
    if seed is not None:
      torch.manual_seed(seed)
    out = torch_bridge.flash_attn_func(q, k, v, dropout_p=P, causal=True)
    return (out, *_grads(out, None, do, q, k, v))

  first, again = run(5), run(5)
  for a, b in zip(first, again):
    assert torch.equal(a, b)
  assert not torch.equal(first[0], run(6)[0])
  # The generator advances: the next call without reseeding draws another mask.
  assert not torch.equal(again[0], run(None)[0])


def test_the_seed_is_the_generators_next_draw():
  # The kernels hash (seed, batch, head, i, j) with the seed the public function draws: S_dmask's
  # signs equal pallas_attn.dropout's mask for that seed.
  q, k, v, _ = _inputs(2, 12, 9, 2, 2, 16, seed=2)
  torch.manual_seed(11)
  seed = bridge_fa.dropout_seed(P, q.device)
  torch.manual_seed(11)
  _, _, s_dmask = torch_bridge.flash_attn_func(q, k, v, dropout_p=P, return_attn_probs=True)
  want = dropout.dense_keep(jnp.asarray(seed.numpy()), 2, 2, 12, 9, P)
  np.testing.assert_array_equal(_keep_of(s_dmask), np.asarray(want))
  assert seed.dtype == torch.int32 and seed.shape == (1,)
  assert bridge_fa.dropout_seed(0.0, q.device) is None


# ----------------------------------------------------------------------------------------------------
# Parity with the reference on the kernels' keep mask


DENSE_CASES = [
    (dict(causal=True), False, False, torch.float32),
    (dict(window_size=(5, 3), softcap=5.0), True, True, torch.float32),  # dropout + softcap allowed
    (dict(causal=True), False, False, torch.bfloat16),
]


@pytest.mark.parametrize("opts,alibi,with_sink,dtype", DENSE_CASES)
def test_dense_parity_with_the_kernels_keep_mask(opts, alibi, with_sink, dtype):
  b, sq, sk, h, hk, d = 2, 20, 24, 2, 1, 16
  q, k, v, do = _inputs(b, sq, sk, h, hk, d, dtype, seed=3)
  slopes = torch.tensor([0.2, 0.05]) if alibi else None
  sink = torch.tensor([[0.3, -0.7]], requires_grad=True) if with_sink else None
  torch.manual_seed(0)
  if with_sink:
    out, lse, s_dmask = torch_bridge.fa2_func_with_sink(q, k, v, sink, dropout_p=P, alibi_slopes=slopes,
                                                        return_attn_probs=True, **opts)
    wrt = (q, k, v, sink)
  else:
    out, lse, s_dmask = torch_bridge.flash_attn_func(q, k, v, dropout_p=P, alibi_slopes=slopes,
                                                     return_attn_probs=True, **opts)
    wrt = (q, k, v)
  grads = _grads(out, lse, do, *wrt)
  assert s_dmask.shape == (b, h, sq, sk) and s_dmask.dtype == dtype and not s_dmask.requires_grad
  keep = _keep_of(s_dmask)
  assert 0.6 < keep.mean() < 0.8, keep.mean()

  jq, jk, jv, jdo = (_jnp(x) for x in (q, k, v, do))
  jslopes = None if slopes is None else _jnp(slopes)
  jsink = None if sink is None else _jnp(sink)

  def ref(upcast):
    fn = lambda q, k, v, s: attention_reference(q, k, v, alibi_slopes=jslopes, upcast=upcast,
                                                sink=s, dropout_p=P, dropout_keep=jnp.asarray(keep),
                                                **opts)
    (o, l), vjp = jax.vjp(fn, jq, jk, jv, jsink)
    g = vjp((jdo.astype(o.dtype), jnp.zeros_like(l)))
    return (o, l, *g) if with_sink else (o, l, *g[:3])

  accurate, lowp = ref(True), ref(False)
  ours = (_jnp(out), _jnp(lse), *(_jnp(g) for g in grads))
  numerics.check_attention(ours[:5], lowp[:5], accurate[:5])
  if with_sink:
    numerics.assert_grad("dsink", ours[5], lowp[5], accurate[5])
  # |S_dmask| is P normalized by the kernels' lse (the sinks included).
  t = attention_logits(jq, jk, alibi_slopes=jslopes, **opts)
  probs = np.asarray(jnp.exp(t - accurate[1][..., None]))
  lowp_probs = numerics.as_f32(jnp.asarray(probs).astype(jq.dtype))
  numerics.assert_rule("|S_dmask|", np.abs(_np(s_dmask)), lowp_probs, probs,
                       factor=numerics.OUT_FACTOR, dtype=jq.dtype)


def _cu(lengths):
  return torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)


@pytest.mark.parametrize("form", ["plain", "kvpacked"])
def test_varlen_parity_with_the_kernels_keep_mask(form):
  lq, lk, h, hk, d = [7, 0, 13], [9, 3, 11], 2, 1, 16
  max_q, max_k = 16, 12
  g = torch.Generator().manual_seed(4)
  mk = lambda *s: torch.randn(*s, generator=g)
  q, k, v = (x.requires_grad_() for x in (mk(sum(lq), h, d), mk(sum(lk), hk, d), mk(sum(lk), hk, d)))
  do = mk(sum(lq), h, d)
  cq, ck = _cu(lq), _cu(lk)
  torch.manual_seed(1)
  if form == "plain":
    out, lse, s_dmask = torch_bridge.flash_attn_varlen_func(q, k, v, cq, ck, max_q, max_k, dropout_p=P,
                                                            causal=True, return_attn_probs=True)
  else:
    out, lse, s_dmask = torch_bridge.flash_attn_varlen_kvpacked_func(
        q, torch.stack([k, v], 1), cq, ck, max_q, max_k, dropout_p=P, causal=True,
        return_attn_probs=True)
  grads = _grads(out, lse, do, q, k, v)
  assert s_dmask.shape == (3, h, max_q, max_k)
  keep = _keep_of(s_dmask)
  ref, lowp, probs = varlen_references(_jnp(q), _jnp(k), _jnp(v), _jnp(do), lq, lk, jnp.asarray(keep),
                                       P, None, dict(causal=True))
  numerics.check_attention((_jnp(out), _jnp(lse), *(_jnp(x) for x in grads)), lowp, ref)
  numerics.assert_output("|S_dmask|", np.abs(_np(s_dmask)), probs, probs)
  assert np.all(_np(s_dmask)[1] == 0) and np.all(keep[1])  # the empty sequence: +0 throughout


def test_varlen_qkvpacked_reproduces_and_s_dmask_is_empty_without_dropout():
  cu = _cu([5, 12])
  qkv = torch.randn(17, 3, 2, 16, requires_grad=True)

  def run():
    torch.manual_seed(3)
    out = torch_bridge.flash_attn_varlen_qkvpacked_func(qkv, cu, 12, dropout_p=0.2)
    return out, torch.autograd.grad(out.square().sum(), qkv)[0]

  (a, ga), (b, gb) = run(), run()
  assert torch.equal(a, b) and torch.equal(ga, gb)
  _, _, s_dmask = torch_bridge.flash_attn_varlen_qkvpacked_func(qkv, cu, 12, return_attn_probs=True)
  assert s_dmask.shape == (0,)
  _, _, s_dmask = torch_bridge.flash_attn_func(qkv[None, :, 0], qkv[None, :, 1], qkv[None, :, 2],
                                               return_attn_probs=True)
  assert s_dmask.shape == (0,)


# ----------------------------------------------------------------------------------------------------
# The ops: seed operand, opcheck, torch.compile


def _op_args(q, k, v, seed, dropout_p=P):
  return (q, k, v, None, dropout_p, None, True, -1, -1, 0.0, seed)


def test_ops_check_the_seed():
  q, k, v, _ = _inputs(1, 8, 8, 2, 1, 16)
  fwd = torch.ops.pallas_attn.flash_attn_fwd
  with pytest.raises(ValueError, match=r"^seed: dropout_p > 0 needs an int32 seed tensor"):
    fwd(*_op_args(q, k, v, None))
  with pytest.raises(TypeError, match=r"^seed: expected an int32 tensor of shape \(1,\), got torch.int64"):
    fwd(*_op_args(q, k, v, torch.zeros(1, dtype=torch.int64)))
  with pytest.raises(TypeError, match=r"^seed: expected an int32 tensor of shape \(1,\), got torch.int32 of shape \(2,\)"):
    fwd(*_op_args(q, k, v, torch.zeros(2, dtype=torch.int32)))
  with pytest.raises(ValueError, match=r"^dropout_p: S_dmask exists only with dropout"):
    torch.ops.pallas_attn.flash_attn_s_dmask(torch.zeros(1, 2, 8), *_op_args(q, k, v, None, 0.0))


def test_opcheck_with_dropout():
  q, k, v, do = _inputs(1, 20, 24, 2, 1, 16, seed=3)
  seed = torch.tensor([123], dtype=torch.int32)
  args = _op_args(q, k, v, seed)
  torch.library.opcheck(torch.ops.pallas_attn.flash_attn_fwd.default, args)
  out, lse = torch.ops.pallas_attn.flash_attn_fwd(*args)
  detached = _op_args(q.detach(), k.detach(), v.detach(), seed)
  torch.library.opcheck(torch.ops.pallas_attn.flash_attn_bwd.default,
                        (do, None, *detached, out.detach(), lse.detach()))
  torch.library.opcheck(torch.ops.pallas_attn.flash_attn_s_dmask.default, (lse.detach(), *detached))


def test_torch_compile_fullgraph_with_dropout():
  torch._dynamo.reset()
  q, k, v, _ = _inputs(1, 20, 24, 2, 1, 16, seed=5)

  def fn(q, k, v):
    out, lse, s_dmask = torch_bridge.flash_attn_func(q, k, v, dropout_p=P, causal=True, softcap=4.0,
                                                     return_attn_probs=True)
    return (out * 2).sum() + lse.sum(), s_dmask

  # aot_eager keeps torch's own random ops, so the compiled call draws the eager call's seed.
  compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
  torch.manual_seed(2)
  got, got_mask = compiled(q, k, v)
  got_grads = torch.autograd.grad(got, (q, k, v))
  torch.manual_seed(2)
  want, want_mask = fn(q, k, v)
  want_grads = torch.autograd.grad(want, (q, k, v))
  assert torch.equal(got, want) and torch.equal(got_mask, want_mask)
  for a, b in zip(got_grads, want_grads):
    assert torch.equal(a, b)


@pytest.mark.gpu
def test_cuda_dropout_replays_and_matches_the_reference():
  b, sq, sk, h, hk, d = 2, 256, 320, 4, 2, 64
  q, k, v, do = (x.detach().cuda() for x in _inputs(b, sq, sk, h, hk, d, torch.bfloat16, seed=5))
  q, k, v = (x.requires_grad_() for x in (q, k, v))
  runs = []
  for _ in range(2):
    torch.manual_seed(1)
    out, lse, s_dmask = torch_bridge.flash_attn_func(q, k, v, dropout_p=P, causal=True,
                                                     return_attn_probs=True)
    runs.append((out, lse, s_dmask, *_grads(out, lse, do, q, k, v)))
  for a, b_ in zip(*runs):
    assert torch.equal(a, b_)
  out, lse, s_dmask, *grads = (x.cpu() for x in runs[0])
  keep = jnp.asarray(_keep_of(s_dmask))
  jq, jk, jv, jdo = (_jnp(x.cpu()) for x in (q, k, v, do))

  def ref(upcast):
    fn = lambda q, k, v: attention_reference(q, k, v, causal=True, upcast=upcast, dropout_p=P,
                                             dropout_keep=keep)
    (o, l), vjp = jax.vjp(fn, jq, jk, jv)
    return (o, l, *vjp((jdo.astype(o.dtype), jnp.zeros_like(l))))

  ours = (_jnp(out), _jnp(lse), *(_jnp(g) for g in grads))
  numerics.check_attention(ours, ref(False), ref(True))
