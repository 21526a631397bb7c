"""Every torch family through the bridge's aliased output path, on the CPU.

On CUDA the bridge hands torch's output tensors to the kernels as donated buffers (each family's
`*_into` jit); on the CPU it takes the copy path, so without this file the `*_into` functions would
first be traced on a GPU. Here `_dlpack._PATHS` answers "aliased" for the CPU every time: run()
traces and runs the `into` kernel, sees that the CPU runtime did not alias, and copies.

Each family's results must equal the copy path's bit for bit (NaN never counts as equal), and the
copy path's results must match pallas_attn's plain-jnp references (pallas_attn/reference.py,
kvcache_reference.py) on the same values under the tolerance rule of tests/numerics.py (fp32
inputs: the 32-ulp floor), so two paths that agreed on a wrong answer would still fail.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import numerics
import torch_bridge
from pallas_attn import reference
from pallas_attn.kvcache_reference import kvcache_reference
from torch_bridge import _dlpack, flash_dma
from torch_bridge import landmark as bridge_landmark


class _AlwaysAliased(dict):
  """_PATHS stand-in: every lookup says "aliased" and the fallback's "copy" is not remembered."""

  def get(self, key, default=None):
    return "aliased"

  def __setitem__(self, key, value):
    pass


def _randn(g, *shape, grad=True):
  return torch.randn(*shape, generator=g).requires_grad_(grad)


def _j(t):
  return jnp.asarray(t.detach().numpy())


def _grads(out, leaves, g):
  """(dout, grads of leaves) for loss <out, dout>, dout drawn from g."""
  dout = torch.randn(out.shape, generator=g)
  return dout, list(torch.autograd.grad(out, leaves, dout))


def _vjp(fn, leaves, dout, n_out=1):
  """fn's outputs and the gradients of <first output, dout> w.r.t. leaves (torch tensors), in JAX."""
  outs, vjp = jax.vjp(lambda *xs: fn(*xs), *[_j(x) for x in leaves])
  outs = outs if isinstance(outs, tuple) else (outs,)
  cot = (_j(dout),) + tuple(jnp.zeros_like(o) for o in outs[1:])
  grads = vjp(cot if len(outs) > 1 else cot[0])
  return list(outs[:n_out]) + list(grads)


# Each family returns (results, reference): the torch results, and a function giving the
# references in the same order, with "lse" marking the entries that may hold +inf.


def _dense(g):
  q, k, v = _randn(g, 1, 40, 4, 32), _randn(g, 1, 56, 2, 32), _randn(g, 1, 56, 2, 32)
  out, lse, _ = torch_bridge.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
  dout, grads = _grads(out, (q, k, v), g)
  ref = lambda: _vjp(lambda q, k, v: reference.attention_reference(q, k, v, causal=True),
                     (q, k, v), dout, n_out=2)
  return [out, lse, *grads], ref


def _dense_dropout(g):
  q, k, v = (_randn(g, 1, 24, 2, 32) for _ in range(3))
  torch.manual_seed(3)
  out, _, s_dmask = torch_bridge.flash_attn_func(q, k, v, dropout_p=0.2, return_attn_probs=True)
  dout, grads = _grads(out, (q, k, v), g)
  # The kernels' keep mask, read back from S_dmask's signs (dropped entries are negated).
  keep = jnp.asarray(~np.signbit(s_dmask.detach().numpy()))
  ref = lambda: _vjp(lambda q, k, v: reference.attention_reference(
      q, k, v, dropout_p=0.2, dropout_keep=keep)[0], (q, k, v), dout)
  return [out, *grads], ref


def _varlen_ref(q, k, v, cu_q, cu_k, **opts):
  """attention_reference per sequence, packed: out (total_q, H, d)."""
  outs = []
  for s in range(len(cu_q) - 1):
    a, e, c, f = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
    outs.append(reference.attention_reference(q[a:e][None], k[c:f][None], v[c:f][None], **opts)[0][0])
  return jnp.concatenate(outs)


def _varlen(g):
  cu = torch.tensor([0, 17, 40], dtype=torch.int32)
  q, k, v = (_randn(g, 40, 2, 32) for _ in range(3))
  out = torch_bridge.flash_attn_varlen_func(q, k, v, cu, cu, 23, 23, causal=True)
  dout, grads = _grads(out, (q, k, v), g)
  ref = lambda: _vjp(lambda q, k, v: _varlen_ref(q, k, v, cu, cu, causal=True), (q, k, v), dout)
  return [out, *grads], ref


def _varlen_paged(g):
  cu_q = torch.tensor([0, 5, 12], dtype=torch.int32)
  cu_k = torch.tensor([0, 20, 45], dtype=torch.int32)
  q = _randn(g, 12, 2, 32, grad=False)
  k_cache, v_cache = (_randn(g, 4, 16, 2, 32, grad=False) for _ in range(2))
  table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
  out = torch_bridge.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 7, 25, causal=True,
                                            block_table=table)

  def ref():
    # The keys each sequence sees, gathered out of its pages and packed.
    gather = lambda cache: jnp.concatenate(
        [_j(cache)[_j(table[s])].reshape(-1, 2, 32)[:int(cu_k[s + 1] - cu_k[s])] for s in range(2)])
    return [_varlen_ref(_j(q), gather(k_cache), gather(v_cache), cu_q, cu_k, causal=True)]

  return [out], ref


def _sink(g):
  q, k, v = _randn(g, 1, 24, 4, 32), _randn(g, 1, 24, 2, 32), _randn(g, 1, 24, 2, 32)
  sink = _randn(g, 2, 4)
  out = torch_bridge.fa2_func_with_sink(q, k, v, sink=sink, causal=True)
  dout, grads = _grads(out, (q, k, v, sink), g)
  ref = lambda: _vjp(lambda q, k, v, z: reference.attention_reference(
      q, k, v, causal=True, sink=z)[0], (q, k, v, sink), dout)
  return [out, *grads], ref


def _kvcache(g):
  q = _randn(g, 2, 1, 4, 32, grad=False)
  k_cache, v_cache = (_randn(g, 2, 48, 2, 32, grad=False) for _ in range(2))
  k_new, v_new = (_randn(g, 2, 1, 2, 32, grad=False) for _ in range(2))
  seqlens = torch.tensor([10, 30], dtype=torch.int32)
  before = [_j(x) for x in (q, k_cache, v_cache, k_new, v_new)]  # the caches are written in place
  out, lse = torch_bridge.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new,
                                                  cache_seqlens=seqlens, causal=True,
                                                  return_softmax_lse=True)

  def ref():
    (r_out, r_lse), r_k, r_v = kvcache_reference(*before, cache_seqlens=_j(seqlens), causal=True)
    return [r_out, r_lse, r_k, r_v]

  return [out, lse, k_cache, v_cache], ref


def _landmark(g):
  q, k, v = (_randn(g, 1, 2, 48, 32) for _ in range(3))
  is_mem = torch.arange(48) % 16 == 15
  out = bridge_landmark.fused_landmark_attention(q, k, v, is_mem, block_size=16)
  dout, grads = _grads(out, (q, k, v), g)
  ref = lambda: _vjp(lambda q, k, v: reference.landmark_attention_reference(
      q, k, v, None, 1.0 / math.sqrt(32), 16), (q, k, v), dout)
  return [out, *grads], ref


def _dynamic_mask(g):
  q, k, v = _randn(g, 1, 24, 4, 32), _randn(g, 1, 40, 2, 32), _randn(g, 1, 40, 2, 32)
  zoh = _randn(g, 1, 2, 24, 40)
  active = (torch.rand(1, 2, 24, 40, generator=g) < 0.5).float()
  out, lse, _, _ = flash_dma.fwd(q, k, v, zoh, active, is_causal=True)
  dout, grads = _grads(out, (q, k, v, zoh), g)
  ref = lambda: _vjp(lambda q, k, v, z: reference.dynamic_mask_reference(
      q, k, v, z, _j(active), is_causal=True), (q, k, v, zoh), dout, n_out=2)
  return [out, lse, *grads], ref


def _sparse(g):
  attn = torch_bridge.SparseAttention(heads=2, attn_mode="local", local_attn_ctx=16, blocksize=16)
  q, k, v = (_randn(g, 1, 48, 64) for _ in range(3))
  out = attn(q, k, v)
  dout, grads = _grads(out, (q, k, v), g)
  ref = lambda: _vjp(lambda q, k, v: reference.sparse_attention_reference(q, k, v, 2, "local", 16),
                     (q, k, v), dout)
  return [out, *grads], ref


FAMILIES = [_dense, _dense_dropout, _varlen, _varlen_paged, _sink, _kvcache, _landmark, _dynamic_mask,
            _sparse]
# Which results are lse (may hold +inf on empty rows); the rest are outputs or gradients.
_LSE_AT = {_dense: {1}, _kvcache: {1}, _dynamic_mask: {1}}


def _check_reference(family, results, refs):
  assert len(results) == len(refs)
  for n, (ours, ref) in enumerate(zip(results, refs)):
    name = f"{family.__name__} result {n}"
    ours = jnp.asarray(ours.detach().numpy())
    if n in _LSE_AT.get(family, ()):
      numerics.assert_lse(ours, ref, ref, name=name)
    else:
      numerics.assert_rule(name, ours, ref, ref, factor=numerics.GRAD_FACTOR)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__.lstrip("_"))
def test_aliased_path_equals_the_copy_path_and_the_reference(family, monkeypatch):
  want, ref = family(torch.Generator().manual_seed(0))
  monkeypatch.setattr(_dlpack, "_PATHS", _AlwaysAliased())
  got, _ = family(torch.Generator().manual_seed(0))
  assert len(got) == len(want)
  for n, (a, b) in enumerate(zip(got, want)):
    torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{family.__name__} result {n}")
  _check_reference(family, want, ref())
