"""Sequence-length buckets (pallas_attn/buckets.py, torch_bridge/_buckets.py): the ladder, the
auto rule, results equal to exact-length calls and to the reference, and compiled kernels reused
across lengths, counted in the jitted kernels' caches."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import pallas_attn as pa
import torch_bridge
from pallas_attn import flash
from pallas_attn.buckets import bucket
from torch_bridge import _buckets
from test_torch_bridge import _grads, _inputs, attention_ref, check_parity


@pytest.fixture
def mode():
  """Sets the bridge's bucket mode for one test and starts it with no lengths seen."""
  def set_mode(m):
    _buckets.set_mode(m)
    for module in (torch_bridge.flash_attn, torch_bridge.flash_attn_varlen):
      module.BUCKETS.clear()
  yield set_mode
  set_mode(None)


def test_ladder_bounds_padding_and_counts_buckets_logarithmically():
  lengths = range(1, 8193)
  for n in lengths:
    b = bucket(n)
    assert b >= n and (n <= 16 or b <= 1.25 * n), n
    assert bucket(b) == b, n
  assert len({bucket(n) for n in lengths}) == 1 + 4 * 9  # 16, then four per octave up to 8192


def test_auto_runs_two_exact_lengths_then_pads_new_ones():
  rule = _buckets.Buckets(exact=2, mode="auto")
  assert [rule.padded("cfg", n) for n in (5, 5, 7, 5, 9, 7, 11)] == [False, False, False, False,
                                                                       True, False, True]
  assert not rule.padded("other", 9), "each configuration has its own exact lengths"
  assert _buckets.Buckets(mode="always").padded("cfg", 5)
  assert not _buckets.Buckets(mode="never").padded("cfg", 9)
  with pytest.raises(ValueError, match="mode"):
    _buckets.set_mode("sometimes")


@pytest.mark.parametrize("opts", [dict(causal=True, softcap=4.0), dict(window_size=(5, 3),
                                  alibi_slopes=torch.tensor([0.2, 0.5, 0.1, 0.3]))],
                         ids=["causal-softcap", "window-alibi"])
def test_torch_padded_call_matches_reference_and_exact_call(mode, opts):
  b, sq, sk, h, hk, d = 2, 19, 27, 4, 2, 32
  q, k, v, do = _inputs(b, sq, sk, h, hk, d, torch.float32)
  dlse = torch.randn(b, h, sq)
  fn = lambda q, k, v: torch_bridge.flash_attn_func(q, k, v, return_attn_probs=True, **opts)[:2]
  mode("always")
  padded = _grads(fn, q, k, v, do, dlse)
  mode("never")
  exact = _grads(fn, q, k, v, do, dlse)
  ref = _grads(lambda q, k, v: attention_ref(q, k, v, **opts), q, k, v, do, dlse)
  lowp = _grads(lambda q, k, v: attention_ref(q, k, v, upcast=False, **opts), q, k, v, do, dlse)
  check_parity(padded, lowp, ref)
  for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), padded, exact):
    assert x.shape == y.shape, name
    torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def test_torch_varlen_and_sink_padded_calls_match_exact_calls(mode):
  g = torch.Generator().manual_seed(1)
  q, k, v = (torch.randn(2, n, 4, 16, generator=g) for n in (13, 21, 21))
  sink = torch.randn(3, 4, generator=g)
  cu_q, cu_k = torch.tensor([0, 5, 13], dtype=torch.int32), torch.tensor([0, 9, 21], dtype=torch.int32)
  results = []
  for m in ("always", "never"):
    mode(m)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, sink)]
    qq, kk, vv, ss = leaves
    o1, l1, _ = torch_bridge.fa2_func_with_sink(qq, kk, vv, ss, causal=True, return_attn_probs=True)
    o2, l2, _ = torch_bridge.flash_attn_varlen_func(qq[0], kk[0], vv[0], cu_q, cu_k, 8, 12,
                                                    causal=True, return_attn_probs=True)
    o3 = torch_bridge.fa2_varlen_func_with_sink(qq[1], kk[1], vv[1], cu_q, cu_k, 8, 12, sink=ss)
    (o1.square().sum() + l1.sum() + o2.sum() + l2.sum() + o3.square().sum()).backward()
    results.append([o1, l1, o2, l2, o3] + [x.grad for x in leaves])
  for x, y in zip(*results):
    assert x.shape == y.shape
    torch.testing.assert_close(x, y, rtol=0, atol=0)


def _compiled() -> int:
  """Compiled forwards so far, on either output path (CPU copies, CUDA writes in place)."""
  return flash.forward._cache_size() + flash.forward_into._cache_size()  # pylint: disable=protected-access


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_torch_decode_over_a_growing_cache_compiles_per_bucket_not_per_length(mode, device):
  # What transformers' generate() does with its default cache: one query row against a key set
  # that grows by one each step.
  mode("auto")
  g = torch.Generator().manual_seed(2)
  dtype = torch.float32 if device == "cpu" else torch.bfloat16
  q = torch.randn(1, 1, 2, 16, generator=g).to(device, dtype)
  before = _compiled()
  lengths = range(1, 49)
  for sk in lengths:
    k, v = torch.randn(2, 1, sk, 2, 16, generator=g).to(device, dtype)
    out = torch_bridge.flash_attn_func(q, k, v, causal=True)
    if sk in (1, 17, 48):
      ref = attention_ref(q, k, v, causal=True)[0]
      tol = 2e-5 if device == "cpu" else 2e-2
      torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
  compiled = _compiled() - before
  buckets = len({bucket(n) for n in lengths[2:]})
  assert compiled <= 2 + buckets < len(lengths), compiled


def test_jax_bucket_lengths_matches_exact_and_shares_kernels_across_lengths():
  ks = jax.random.split(jax.random.PRNGKey(3), 3)
  q = jax.random.normal(ks[0], (2, 13, 4, 32))
  k, v = (jax.random.normal(key, (2, 21, 2, 32)) for key in ks[1:])

  def grads(bucket_lengths):
    def loss(q, k, v):
      out, lse, _ = pa.flash_attn_func(q, k, v, causal=True, softcap=3.0, window_size=(9, 1),
                                       return_attn_probs=True, bucket_lengths=bucket_lengths)
      return (out ** 2).sum() + lse.sum(), (out, lse)
    return jax.grad(loss, (0, 1, 2), has_aux=True)(q, k, v)

  for x, y in zip(jax.tree.leaves(grads(True)), jax.tree.leaves(grads(False))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  before = flash.forward._cache_size()  # pylint: disable=protected-access
  for sq in (33, 35, 38, 40):  # one bucket (40) of tokens: one compiled forward
    pa.flash_attn_func(jnp.ones((1, sq, 2, 16)), jnp.ones((1, sq, 2, 16)), jnp.ones((1, sq, 2, 16)),
                       causal=True, bucket_lengths=True)
  assert flash.forward._cache_size() - before == 1  # pylint: disable=protected-access
