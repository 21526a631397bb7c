"""torch_bridge.flash_attn_with_kvcache: flash-attn 2.8's signature, caches appended in place, out and
lse against the JAX reference under the tolerance rule, errors raised before any write, compat."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import numerics
import torch_bridge
from test_kvcache import Case, make_inputs, reference
from torch_bridge import compat

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _to_torch(x):
  if isinstance(x, int) or x is None or isinstance(x, (bool, float, tuple)):
    return x
  t = torch.from_numpy(np.array(jnp.asarray(x, jnp.float32) if x.dtype == jnp.bfloat16 else x))
  return t.to(torch.bfloat16) if x.dtype == jnp.bfloat16 else t


def _to_jax(t):
  return jnp.asarray(t.float().numpy()).astype(jnp.bfloat16) if t.dtype == torch.bfloat16 else \
      jnp.asarray(t.numpy())


CASES = [
    Case(b=2, b_cache=3, leftpad=True, rotary=0.5, sq=2, s_new=2, causal=True, splits=3),
    Case(page=16, capacity=64, sq=3, s_new=1, rotary=1.0, interleaved=False, alibi="h", splits=1),
    Case(seqlens="int", sq=1, s_new=1, h=4, hk=1, window=(6, -1), softcap=5.0, splits=0),
    Case(s_new=0, sq=2, alibi="bh", causal=True, splits=3),
    Case(dtype="bfloat16", page=32, capacity=64, sq=2, s_new=2, causal=True, rotary=0.5),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_torch_kvcache_parity(case):
  kw = make_inputs(case)
  tkw = {n: _to_torch(x) for n, x in kw.items()}
  k_cache, v_cache = tkw["k_cache"], tkw["v_cache"]
  out, lse = torch_bridge.flash_attn_with_kvcache(**tkw, return_softmax_lse=True)
  assert out.dtype == _TORCH_DTYPES[case.dtype] and lse.dtype == torch.float32
  (r_out, r_lse), r_k, r_v = reference(kw)
  (l_out, l_lse), _, _ = reference(kw, upcast=False)
  numerics.assert_output("out", _to_jax(out), l_out, r_out)
  numerics.assert_lse(_to_jax(lse), l_lse, r_lse)
  # In place: the caller's tensors hold the appended rows (and q is left as it was).
  assert tkw["k_cache"] is k_cache
  np.testing.assert_array_equal(numerics.as_f32(_to_jax(v_cache)), numerics.as_f32(r_v))
  k_err = numerics.max_err(_to_jax(k_cache), r_k)
  assert k_err <= 2 * numerics.eps(case.dtype) * max(numerics.as_f32(r_k).max(), 1.0)
  np.testing.assert_array_equal(numerics.as_f32(_to_jax(tkw["q"])), numerics.as_f32(kw["q"]))
  only_out = torch_bridge.flash_attn_with_kvcache(**{**tkw, "k": None, "v": None, "rotary_cos": None,
                                                    "rotary_sin": None})
  assert isinstance(only_out, torch.Tensor) and only_out.shape == out.shape


def test_torch_kvcache_errors_before_writing():
  kw = {n: _to_torch(x) for n, x in make_inputs(Case(page=16, capacity=64, rotary=0.5)).items()}
  before = kw["k_cache"].clone()
  with pytest.raises(ValueError, match="cache_batch_idx"):
    torch_bridge.flash_attn_with_kvcache(**kw, cache_batch_idx=torch.zeros(2, dtype=torch.int32))
  with pytest.raises(TypeError, match="cache_seqlens"):
    torch_bridge.flash_attn_with_kvcache(**{**kw, "cache_seqlens": kw["cache_seqlens"].long()})
  with pytest.raises(ValueError, match="rotary_dim"):
    torch_bridge.flash_attn_with_kvcache(**{**kw, "rotary_cos": torch.zeros(80, 20),
                                            "rotary_sin": torch.zeros(80, 20)})
  with pytest.raises(ValueError, match="v: k and v"):
    torch_bridge.flash_attn_with_kvcache(**{**kw, "v": None})
  assert torch.equal(kw["k_cache"], before)


def test_compat_exposes_kvcache():
  assert "flash_attn_with_kvcache" in compat.registered()["flash_attn"]
  compat.install()
  try:
    from flash_attn import flash_attn_with_kvcache  # pylint: disable=import-outside-toplevel
    from flash_attn.flash_attn_interface import flash_attn_with_kvcache as nested  # noqa: F401
    assert flash_attn_with_kvcache is torch_bridge.flash_attn_with_kvcache is nested
  finally:
    compat.uninstall()


@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    Case(b=4, h=16, hk=4, d=128, capacity=2048, page=256, sq=1, s_new=1, rotary=0.5, causal=True,
         dtype="bfloat16", splits=0),
    Case(b=2, b_cache=3, h=8, hk=8, d=64, capacity=1024, sq=4, s_new=4, leftpad=True,
         interleaved=False, rotary=1.0, causal=True, dtype="float16", splits=3),
], ids=str)
def test_torch_kvcache_cuda(case):
  kw = make_inputs(case)
  tkw = {n: (x.cuda() if isinstance(x, torch.Tensor) else x)
         for n, x in ((n, _to_torch(x)) for n, x in kw.items())}
  k_cache, v_cache = tkw["k_cache"], tkw["v_cache"]
  out, lse = torch_bridge.flash_attn_with_kvcache(**tkw, return_softmax_lse=True)
  assert out.is_cuda and tkw["k_cache"] is k_cache
  (r_out, r_lse), _, r_v = reference(kw)
  (l_out, l_lse), _, _ = reference(kw, upcast=False)
  numerics.assert_output("out", _to_jax(out.cpu()), l_out, r_out)
  numerics.assert_lse(_to_jax(lse.cpu()), l_lse, r_lse)
  np.testing.assert_array_equal(numerics.as_f32(_to_jax(v_cache.cpu())), numerics.as_f32(r_v))


def test_torch_kvcache_bounds_checked_before_writing():
  """Host-visible lengths (CPU tensors, ints) past the cache raise before the in-place append
  indexes with them: a RuntimeError past the block table (as flash-attn), a ValueError naming
  cache_seqlens, the cache length and the new tokens for an append past the end."""
  paged = {n: _to_torch(x) for n, x in make_inputs(Case(page=16, capacity=32, s_new=2)).items()}
  flat = {n: _to_torch(x) for n, x in make_inputs(Case(capacity=32, s_new=2)).items()}
  before = paged["k_cache"].clone(), flat["k_cache"].clone()
  with pytest.raises(RuntimeError, match=r"^cache_seqlens: expected at most 32 \(block_table"):
    torch_bridge.flash_attn_with_kvcache(
        **{**paged, "k": None, "v": None, "cache_seqlens": torch.tensor([40, 1], dtype=torch.int32)})
  for kw, lens in ((paged, torch.tensor([31, 0], dtype=torch.int32)), (flat, 31)):
    with pytest.raises(ValueError, match=r"^cache_seqlens: appending 2 new tokens at cache_seqlens "
                                         r".*31.* runs past the end of the cache \(32 positions"):
      torch_bridge.flash_attn_with_kvcache(**{**kw, "cache_seqlens": lens})
  assert torch.equal(paged["k_cache"], before[0]) and torch.equal(flat["k_cache"], before[1])


def test_torch_kvcache_backward_says_forward_only():
  kw = {n: _to_torch(x) for n, x in make_inputs(Case(rotary=0.5, s_new=1)).items()}
  plain = torch_bridge.flash_attn_with_kvcache(**{**kw, "k_cache": kw["k_cache"].clone(),
                                                  "v_cache": kw["v_cache"].clone()})
  kw["q"] = kw["q"].clone().requires_grad_()
  out = torch_bridge.flash_attn_with_kvcache(**kw)
  torch.testing.assert_close(out.detach(), plain, rtol=0, atol=0)  # the forward still runs
  with pytest.raises(NotImplementedError, match="^flash_attn_with_kvcache: forward-only"):
    out.sum().backward()
