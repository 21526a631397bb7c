"""Every torch family through the bridge's aliased output path, on the CPU.

On CUDA the bridge hands torch's output tensors to the kernels as donated buffers (each family's
`*_into` jit); on the CPU it takes the copy path, so without this file the `*_into` functions would
first be traced on a GPU. Here `_dlpack._PATHS` answers "aliased" for the CPU every time: run()
traces and runs the `into` kernel, sees that the CPU runtime did not alias, and copies. Results must
equal the copy path's bit for bit.
"""
from __future__ import annotations

import pytest
import torch

import torch_bridge
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


def _grads(out, leaves, g):
  dout = torch.randn(out.shape, generator=g)
  return list(torch.autograd.grad(out, leaves, dout))


def _dense(g):
  q, k, v = _randn(g, 1, 40, 4, 32), _randn(g, 1, 56, 2, 32), _randn(g, 1, 56, 2, 32)
  out, lse, _ = torch_bridge.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
  return [out, lse, *_grads(out, (q, k, v), g)]


def _dense_dropout(g):
  q, k, v = (_randn(g, 1, 24, 2, 32) for _ in range(3))
  torch.manual_seed(3)
  out = torch_bridge.flash_attn_func(q, k, v, dropout_p=0.2)
  return [out, *_grads(out, (q, k, v), g)]


def _varlen(g):
  cu = torch.tensor([0, 17, 40], dtype=torch.int32)
  q, k, v = (_randn(g, 40, 2, 32) for _ in range(3))
  out = torch_bridge.flash_attn_varlen_func(q, k, v, cu, cu, 23, 23, causal=True)
  return [out, *_grads(out, (q, k, v), g)]


def _varlen_paged(g):
  cu_q = torch.tensor([0, 5, 12], dtype=torch.int32)
  cu_k = torch.tensor([0, 20, 45], dtype=torch.int32)
  q = _randn(g, 12, 2, 32, grad=False)
  k_cache, v_cache = (_randn(g, 4, 16, 2, 32, grad=False) for _ in range(2))
  table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
  return [torch_bridge.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 7, 25, causal=True,
                                              block_table=table)]


def _sink(g):
  q, k, v = _randn(g, 1, 24, 4, 32), _randn(g, 1, 24, 2, 32), _randn(g, 1, 24, 2, 32)
  sink = _randn(g, 2, 4)
  out = torch_bridge.fa2_func_with_sink(q, k, v, sink=sink, causal=True)
  return [out, *_grads(out, (q, k, v, sink), g)]


def _kvcache(g):
  q = _randn(g, 2, 1, 4, 32, grad=False)
  k_cache, v_cache = (_randn(g, 2, 48, 2, 32, grad=False) for _ in range(2))
  k_new, v_new = (_randn(g, 2, 1, 2, 32, grad=False) for _ in range(2))
  seqlens = torch.tensor([10, 30], dtype=torch.int32)
  out, lse = torch_bridge.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new,
                                                  cache_seqlens=seqlens, causal=True,
                                                  return_softmax_lse=True)
  return [out, lse, k_cache, v_cache]


def _landmark(g):
  q, k, v = (_randn(g, 1, 2, 48, 32) for _ in range(3))
  is_mem = torch.arange(48) % 16 == 15
  out = bridge_landmark.fused_landmark_attention(q, k, v, is_mem, block_size=16)
  return [out, *_grads(out, (q, k, v), g)]


def _dynamic_mask(g):
  q, k, v = _randn(g, 1, 24, 4, 32), _randn(g, 1, 40, 2, 32), _randn(g, 1, 40, 2, 32)
  zoh = _randn(g, 1, 2, 24, 40)
  active = (torch.rand(1, 2, 24, 40, generator=g) < 0.5).float()
  out, lse, _, _ = flash_dma.fwd(q, k, v, zoh, active, is_causal=True)
  return [out, lse, *_grads(out, (q, k, v, zoh), g)]


def _sparse(g):
  attn = torch_bridge.SparseAttention(heads=2, attn_mode="local", local_attn_ctx=16, blocksize=16)
  q, k, v = (_randn(g, 1, 48, 64) for _ in range(3))
  out = attn(q, k, v)
  return [out, *_grads(out, (q, k, v), g)]


FAMILIES = [_dense, _dense_dropout, _varlen, _varlen_paged, _sink, _kvcache, _landmark, _dynamic_mask,
            _sparse]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__.lstrip("_"))
def test_aliased_path_equals_the_copy_path(family, monkeypatch):
  want = family(torch.Generator().manual_seed(0))
  monkeypatch.setattr(_dlpack, "_PATHS", _AlwaysAliased())
  got = family(torch.Generator().manual_seed(0))
  assert len(got) == len(want)
  for n, (a, b) in enumerate(zip(got, want)):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"{family.__name__} result {n}")
