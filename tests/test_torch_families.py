"""torch face of the varlen, sink and sparse families (torch_bridge/flash_attn_varlen.py, sink.py,
sparse.py): parity of outputs, lse and every gradient (dsink included) against a float64 torch
reference, the seed documents' examples run through `compat.install()` imports, signatures, errors.

CPU tensors run the kernels in Pallas interpret mode, so shapes stay small. The CUDA tests at the end
(marker `gpu`) skip without CUDA: pytest tests/test_torch_families.py -m gpu.

Tolerance rule (tests/numerics.py): our error against the float64 reference is at most 2x (outputs) /
3x (gradients) the error of the same reference computed in the input dtype, plus a rounding floor.
"""
from __future__ import annotations

import inspect
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import numerics
import torch_bridge
from pallas_attn import flash
from pallas_attn import flash_attn_varlen as jax_varlen
from pallas_attn import sink as jax_sink
from pallas_attn import sparse as jax_sparse
from torch_bridge import _dlpack, compat
from torch_bridge import flash_attn as bridge_fa
from torch_bridge import sink as bridge_sink

# pylint: disable=protected-access,import-error,redefined-outer-name,unused-argument

# ----------------------------------------------------------------------------------------------------
# References (SPEC sections 0-2, 4), in torch


def attention_ref(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                  alibi_slopes=None, sink=None, sink_layout="sh", upcast=True):
  """Dense q (b, sq, H, d), k/v (b, sk, Hk, d) -> out like q, lse (b, H, sq) float32.

  Sinks are appended logit columns (raw, never masked) whose probabilities are dropped before P @ V.
  upcast=True computes in float64; False keeps the input dtype through the matmuls (the yardstick).
  """
  dtype = q.dtype
  b, sq, h, d = q.shape
  sk, hk = k.shape[1], k.shape[2]
  scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
  acc = torch.float64 if upcast else torch.float32
  if upcast:
    q, k, v = q.double(), k.double(), v.double()
  k = k.repeat_interleave(h // hk, dim=2)
  v = v.repeat_interleave(h // hk, dim=2)
  t = torch.einsum("bqhd,bkhd->bhqk", q, k).to(acc)
  t = scale * t if softcap <= 0 else softcap * torch.tanh(scale * t / softcap)
  i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
  j = torch.arange(sk, device=q.device)[None, :]
  if alibi_slopes is not None:
    t = t - alibi_slopes.to(acc).expand(b, h)[:, :, None, None] * (i - j).abs().to(acc)
  left, right = window_size
  if causal:
    right = 0
  visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
  if right >= 0:
    visible &= j <= i + right
  if left >= 0:
    visible &= j >= i - left
  t = t.masked_fill(~visible, -math.inf)
  if sink is not None:
    z = sink.to(acc)
    z = z.t()[None, :, None, :].expand(b, h, sq, -1) if sink_layout == "sh" else z.permute(0, 3, 1, 2)
    t = torch.cat([t, z], dim=-1)
  lse = torch.logsumexp(t, dim=-1)
  empty = torch.isneginf(lse)
  p = torch.exp(t - torch.where(empty, 0.0, lse)[..., None]).masked_fill(empty[..., None], 0.0)
  out = torch.einsum("bhqk,bkhd->bqhd", p[..., :sk].to(v.dtype), v)
  return out.to(dtype), torch.where(empty, math.inf, lse).float()


def varlen_ref(q, k, v, cu_q, cu_k, *, alibi_slopes=None, sink=None, sink_layout="sh", **opts):
  """attention_ref run sequence by sequence: out (total_q, H, d), lse (H, total_q)."""
  outs, lses = [], []
  for s in range(len(cu_q) - 1):
    a, e, c, f = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
    if a == e:
      continue
    slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[s]
    z = sink if sink is None or sink_layout == "sh" else sink[a:e][None]
    out, lse = attention_ref(q[a:e][None], k[c:f][None], v[c:f][None], alibi_slopes=slopes, sink=z,
                             sink_layout=sink_layout, **opts)
    outs.append(out[0])
    lses.append(lse[0])
  return torch.cat(outs), torch.cat(lses, dim=1)


def sparse_ref(q, k, v, heads, attn_mode, local_attn_ctx=None, upcast=True):
  """OpenAI's sparse patterns as a dense mask; q, k, v (b, n, e). upcast as in attention_ref."""
  b, n, e = q.shape
  d = e // heads
  qh, kh, vh = (x.reshape(b, n, heads, d).to(torch.float64 if upcast else x.dtype) for x in (q, k, v))
  t = torch.einsum("bqhd,bkhd->bhqk", qh, kh).to(torch.float64 if upcast else torch.float32)
  i = torch.arange(n, device=q.device)[:, None]
  j = torch.arange(n, device=q.device)[None, :]
  visible = j <= i
  if attn_mode == "local":
    visible &= i - j < local_attn_ctx
  elif attn_mode == "strided":
    visible &= (i - j) % local_attn_ctx == 0
  p = torch.softmax((t * d ** -0.5).masked_fill(~visible, -math.inf), dim=-1)
  return torch.einsum("bhqk,bkhd->bqhd", p.to(vh.dtype), vh).reshape(b, n, e).to(q.dtype)


def test_reference_matches_the_jax_reference():
  # The torch reference against pallas_attn.reference (itself tested against appended columns).
  from pallas_attn.reference import attention_reference
  g = torch.Generator().manual_seed(0)
  q, k, v = (torch.randn(2, 9, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
  k, v = k[:, :6, :2], v[:, :6, :2]
  for layout, z in (("sh", torch.randn(3, 4, generator=g, dtype=torch.float64)),
                    ("ssh", torch.randn(2, 9, 3, 4, generator=g, dtype=torch.float64))):
    out, lse = attention_ref(q, k, v, causal=True, softcap=2.0, sink=z, sink_layout=layout)
    with jax.enable_x64(True):
      want = attention_reference(*(jnp.asarray(x.numpy()) for x in (q, k, v)), causal=True,
                                 softcap=2.0, sink=jnp.asarray(z.numpy()), sink_layout=layout)
    np.testing.assert_allclose(out.numpy(), np.asarray(want[0]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(lse.numpy(), np.asarray(want[1]), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Helpers


def _host(t):
  return t.detach().float().cpu().numpy()


def _check_parity(names, ours, lowp, ref):
  """Named tensors through the tolerance rule; "lse" allows +inf (empty rows), "dsink" is float32."""
  for name, o, lo, r in zip(names, ours, lowp, ref):
    assert o.shape == r.shape, f"{name}: shape {tuple(o.shape)} != {tuple(r.shape)}"
    if name == "lse":
      assert o.dtype == torch.float32
      numerics.assert_lse(_host(o), _host(lo), _host(r))
      continue
    got = jnp.asarray(_host(o)).astype({torch.float32: "float32", torch.bfloat16: "bfloat16",
                                        torch.float16: "float16"}[o.dtype])
    factor = numerics.OUT_FACTOR if name == "out" else numerics.GRAD_FACTOR
    numerics.assert_rule(name, got, _host(lo), _host(r), factor=factor)


def _run(fn, inputs, dout, dlse=None):
  """(out, lse, *grads of inputs) for loss = <out, dout> + <lse, dlse> (finite lse entries)."""
  out, lse = fn(*inputs)
  loss = (out.float() * dout.float()).sum()
  if dlse is not None:
    loss = loss + (torch.where(torch.isfinite(lse), lse, 0.0) * dlse).sum()
  return (out, lse, *torch.autograd.grad(loss, inputs))


def _randn(g, *shape, dtype=torch.float32, device="cpu", grad=True):
  x = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
  return x.requires_grad_() if grad else x


def _cu(lengths, device="cpu"):
  return torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=device)


def _compare_jax_signature(ours, theirs):
  want = [p for p in inspect.signature(theirs).parameters.values() if p.name != "dropout_key"]
  got = list(inspect.signature(ours).parameters.values())
  assert [(p.name, p.default) for p in got] == [(p.name, p.default) for p in want], ours.__name__


# ----------------------------------------------------------------------------------------------------
# Varlen

# Sequence 1 is empty, 2 has length 1, 3 has more queries than keys (causal: empty rows), 4 no keys.
LQ, LK = [5, 0, 1, 12, 3], [7, 3, 1, 4, 0]


@pytest.mark.parametrize("opts", [dict(causal=True),
                                  dict(window_size=(3, 1), softcap=4.0, softmax_scale=0.2, alibi="bh")],
                         ids=["causal", "window-softcap-alibi"])
def test_varlen_parity(opts):
  opts = dict(opts)
  g = torch.Generator().manual_seed(1)
  h, hk, d = 4, 2, 32
  cu_q, cu_k = _cu(LQ), _cu(LK)
  q, k, v = _randn(g, sum(LQ), h, d), _randn(g, sum(LK), hk, d), _randn(g, sum(LK), hk, d)
  dout, dlse = _randn(g, sum(LQ), h, d, grad=False), _randn(g, h, sum(LQ), grad=False)
  if opts.pop("alibi", None):
    opts["alibi_slopes"] = torch.rand(len(LQ), h, generator=g) * 0.3
  fn = lambda q, k, v: torch_bridge.flash_attn_varlen_func(
      q, k, v, cu_q, cu_k, max(LQ), max(LK), return_attn_probs=True, **opts)[:2]
  ours = _run(fn, (q, k, v), dout, dlse)
  ref = _run(lambda q, k, v: varlen_ref(q, k, v, cu_q, cu_k, **opts), (q, k, v), dout, dlse)
  lowp = _run(lambda q, k, v: varlen_ref(q, k, v, cu_q, cu_k, upcast=False, **opts), (q, k, v),
              dout, dlse)
  _check_parity(("out", "lse", "dq", "dk", "dv"), ours, lowp, ref)
  out, lse = ours[:2]
  assert out.shape == q.shape and lse.shape == (h, sum(LQ)) and ours[2].shape == q.shape
  if opts.get("causal"):
    rows = slice(int(cu_q[3]), int(cu_q[3]) + LQ[3] - LK[3])  # sequence 3's rows that see no key
    assert torch.all(out[rows] == 0) and torch.all(torch.isposinf(lse[:, rows]))
    assert torch.all(out[int(cu_q[4]):] == 0), "a sequence without keys gives zeros"


def test_varlen_packed_forms_and_returns():
  g = torch.Generator().manual_seed(2)
  cu = _cu([9, 1, 14])
  qkv, dout = _randn(g, 24, 3, 2, 16), _randn(g, 24, 2, 16, grad=False)
  out = torch_bridge.flash_attn_varlen_qkvpacked_func(qkv, cu, 14, causal=True)
  (dqkv,) = torch.autograd.grad(out, qkv, dout)
  q, k, v = (qkv[:, i].detach().clone().requires_grad_() for i in range(3))
  ref, lse, s_dmask = torch_bridge.flash_attn_varlen_func(q, k, v, cu, cu, 14, 14, causal=True,
                                                          return_attn_probs=True)
  grads = torch.autograd.grad(ref, (q, k, v), dout)
  assert isinstance(out, torch.Tensor) and torch.equal(out, ref)
  assert torch.equal(dqkv, torch.stack(grads, dim=1))
  assert lse.shape == (2, 24) and lse.dtype == torch.float32
  assert s_dmask.numel() == 0 and s_dmask.dtype == q.dtype
  kv = torch.stack((k, v), dim=1).detach().requires_grad_()
  out2 = torch_bridge.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 14, 14, causal=True)
  dq, dkv = torch.autograd.grad(out2, (q, kv), dout)
  assert torch.equal(out2, ref) and torch.equal(dq, grads[0])
  assert torch.equal(dkv, torch.stack(grads[1:], dim=1))
  # A different max_seqlen bound in the same power-of-two bucket reuses the kernel: same result.
  compiled = flash.forward._cache_size()
  assert torch.equal(torch_bridge.flash_attn_varlen_func(q, k, v, cu, cu, 16, 15, causal=True), ref)
  assert flash.forward._cache_size() == compiled


def test_varlen_signatures_follow_flash_attn():
  params = inspect.signature(torch_bridge.flash_attn_varlen_func).parameters
  assert [(n, p.default) for n, p in params.items()][5:] == [
      ("max_seqlen_q", inspect.Parameter.empty), ("max_seqlen_k", inspect.Parameter.empty),
      ("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
      ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False),
      ("return_attn_probs", False), ("block_table", None)]
  for ours, theirs in ((torch_bridge.flash_attn_varlen_func, jax_varlen.flash_attn_varlen_func),
                       (torch_bridge.flash_attn_varlen_qkvpacked_func,
                        jax_varlen.flash_attn_varlen_qkvpacked_func),
                       (torch_bridge.flash_attn_varlen_kvpacked_func,
                        jax_varlen.flash_attn_varlen_kvpacked_func)):
    want = [p for p in inspect.signature(theirs).parameters.values()
            if p.kind != inspect.Parameter.KEYWORD_ONLY]
    got = list(inspect.signature(ours).parameters.values())
    assert [(p.name, p.default) for p in got] == [(p.name, p.default) for p in want]


def _varlen_raises(exc, match, fn=None, **changes):
  q = torch.randn(19, 2, 16)
  args = dict(q=q, k=q, v=q, cu_seqlens_q=_cu([9, 10]), cu_seqlens_k=_cu([9, 10]), max_seqlen_q=10,
              max_seqlen_k=10)
  args.update(changes)
  with pytest.raises(exc, match=match):
    (fn or torch_bridge.flash_attn_varlen_func)(**args)


def test_varlen_errors_name_the_argument():
  cu64 = _cu([9, 10]).long()
  for name in ("cu_seqlens_q", "cu_seqlens_k"):
    _varlen_raises(TypeError, rf"^{name}: expected dtype torch.int32, got torch.int64", **{name: cu64})
  _varlen_raises(TypeError, r"^cu_seqlens_q: expected an int32 torch.Tensor", cu_seqlens_q=[0, 9, 19])
  _varlen_raises(ValueError, r"^cu_seqlens_k: expected shape \(3,\) to match", cu_seqlens_k=_cu([19]))
  _varlen_raises(ValueError, r"^cu_seqlens_q: expected non-decreasing offsets",
                 cu_seqlens_q=torch.tensor([0, 9, 8], dtype=torch.int32))
  # Offsets past the packed rows: checked on the host for CPU tensors, before any kernel reads them.
  _varlen_raises(ValueError, r"^cu_seqlens_k: expected non-decreasing offsets from 0 to at most 19 "
                 r"\(the rows of k\), got \[0, 9, 40\]",
                 cu_seqlens_k=torch.tensor([0, 9, 40], dtype=torch.int32), max_seqlen_k=31)
  _varlen_raises(ValueError, r"^cu_seqlens_q: expected .* at most 19 \(the rows of q\), got \[0, 20, 19\]",
                 cu_seqlens_q=torch.tensor([0, 20, 19], dtype=torch.int32), max_seqlen_q=20)
  _varlen_raises(ValueError, r"^max_seqlen_q: expected at least the longest sequence \(10\), got 8",
                 max_seqlen_q=8)
  _varlen_raises(ValueError, r"^max_seqlen_k: expected a positive Python int", max_seqlen_k=9.0)
  _varlen_raises(ValueError, r"^max_seqlen_k: expected a positive Python int",
                 max_seqlen_k=torch.tensor(10))
  _varlen_raises(ValueError, r"^q: expected a 3-D array", q=torch.randn(1, 19, 2, 16))
  # block_table makes k/v paged caches (num_blocks, page_block_size, nheads_k, headdim).
  _varlen_raises(ValueError, r"^k: expected a 4-D array", block_table=torch.zeros(2, 1, dtype=torch.int32))
  qkv = torch.randn(19, 3, 2, 16)
  with pytest.raises(TypeError, match=r"^cu_seqlens: expected dtype torch.int32, got torch.int64"):
    torch_bridge.flash_attn_varlen_qkvpacked_func(qkv, cu64, 10)
  with pytest.raises(ValueError, match=r"^qkv: expected shape \(total, 3, nheads, headdim\)"):
    torch_bridge.flash_attn_varlen_qkvpacked_func(qkv[:, :2], _cu([9, 10]), 10)


def test_compat_install_resolves_varlen_next_to_dense():
  saved = {n: sys.modules.get(n) for n in ("flash_attn", "flash_attn.flash_attn_interface")}
  try:
    compat.install()
    from flash_attn import flash_attn_func, flash_attn_varlen_func
    from flash_attn.flash_attn_interface import flash_attn_varlen_qkvpacked_func as packed
    import flash_attn
    assert flash_attn_varlen_func is torch_bridge.flash_attn_varlen_func
    assert flash_attn_func is torch_bridge.flash_attn_func
    assert packed is torch_bridge.flash_attn_varlen_qkvpacked_func
    assert flash_attn.flash_attn_varlen_kvpacked_func is torch_bridge.flash_attn_varlen_kvpacked_func
    assert flash_attn.__version__ == "2.8.0"
    from ltriton.flash_landmark_attention import fused_landmark_attention
    assert fused_landmark_attention is torch_bridge.landmark.fused_landmark_attention
  finally:
    compat.uninstall()
  for n, m in saved.items():
    assert sys.modules.get(n) is m


def test_new_ops_pass_opcheck():
  # Schemas, fake implementations (what torch.compile traces) and the ops' registered autograd.
  g = torch.Generator().manual_seed(9)
  cu = _cu([6, 10])
  varlen = (_randn(g, 16, 2, 16), _randn(g, 16, 1, 16), _randn(g, 16, 1, 16), cu, cu, 10, 10, None,
            0.0, None, True, -1, -1, 0.0, None)
  torch.library.opcheck(torch.ops.pallas_attn.flash_attn_varlen_fwd.default, varlen)
  torch.library.opcheck(torch.ops.pallas_attn.flash_attn_varlen_sink_fwd.default,
                        (*varlen, _randn(g, 16, 3, 2), "ssh"))
  dense = (_randn(g, 1, 16, 2, 16), _randn(g, 1, 16, 1, 16), _randn(g, 1, 16, 1, 16),
           torch.tensor([0.25, 0.5]), 0.0, None, True, -1, -1, 0.0, None, _randn(g, 3, 2), "sh")
  torch.library.opcheck(torch.ops.pallas_attn.flash_attn_sink_fwd.default, dense)


# ----------------------------------------------------------------------------------------------------
# Sinks


def _sink(g, layout, rows, n_sink, h):
  return _randn(g, *((n_sink, h) if layout == "sh" else (*rows, n_sink, h)))


@pytest.mark.parametrize("layout,opts", [("sh", dict(causal=True)),
                                         ("ssh", dict(window_size=(6, 2), softcap=3.0))])
def test_fa2_func_with_sink_parity(layout, opts):
  # sq > sk with causal gives rows without keys: their lse is the logsumexp of the sinks (finite).
  g = torch.Generator().manual_seed(3)
  b, sq, sk, h, hk, d, n_sink = 2, 24, 17, 4, 2, 32, 3
  q, k, v = _randn(g, b, sq, h, d), _randn(g, b, sk, hk, d), _randn(g, b, sk, hk, d)
  z = _sink(g, layout, (b, sq), n_sink, h)
  dout, dlse = _randn(g, b, sq, h, d, grad=False), _randn(g, b, h, sq, grad=False)
  fn = lambda q, k, v, z: torch_bridge.fa2_func_with_sink(q, k, v, z, layout, return_attn_probs=True,
                                                          **opts)[:2]
  ours = _run(fn, (q, k, v, z), dout, dlse)
  ref = _run(lambda q, k, v, z: attention_ref(q, k, v, sink=z, sink_layout=layout, **opts),
             (q, k, v, z), dout, dlse)
  lowp = _run(lambda q, k, v, z: attention_ref(q, k, v, sink=z, sink_layout=layout, upcast=False,
                                               **opts), (q, k, v, z), dout, dlse)
  _check_parity(("out", "lse", "dq", "dk", "dv", "dsink"), ours, lowp, ref)
  assert ours[5].dtype == torch.float32 and ours[5].shape == z.shape
  assert torch.isfinite(ours[1]).all()
  if opts.get("causal"):
    assert torch.all(ours[0][:, :sq - sk] == 0)


@pytest.mark.parametrize("layout", ["sh", "ssh"])
def test_varlen_with_sink_parity(layout):
  g = torch.Generator().manual_seed(4)
  h, hk, d, n_sink = 4, 2, 32, 2
  cu_q, cu_k = _cu(LQ), _cu(LK)
  q, k, v = _randn(g, sum(LQ), h, d), _randn(g, sum(LK), hk, d), _randn(g, sum(LK), hk, d)
  z = _sink(g, layout, (sum(LQ),), n_sink, h)
  dout, dlse = _randn(g, sum(LQ), h, d, grad=False), _randn(g, h, sum(LQ), grad=False)
  if layout == "sh":
    fn = lambda q, k, v, z: torch_bridge.fa3_varlen_func_with_sink(
        q, k, v, cu_q, cu_k, max(LQ), max(LK), z, layout, causal=True, return_attn_probs=True)
  else:
    fn = lambda q, k, v, z: torch_bridge.fa2_varlen_func_with_sink(
        q, k, v, cu_q, cu_k, max(LQ), max(LK), z, layout, causal=True, return_attn_probs=True)[:2]
  ours = _run(fn, (q, k, v, z), dout, dlse)
  ref = _run(lambda q, k, v, z: varlen_ref(q, k, v, cu_q, cu_k, sink=z, sink_layout=layout,
                                           causal=True), (q, k, v, z), dout, dlse)
  lowp = _run(lambda q, k, v, z: varlen_ref(q, k, v, cu_q, cu_k, sink=z, sink_layout=layout,
                                            causal=True, upcast=False), (q, k, v, z), dout, dlse)
  _check_parity(("out", "lse", "dq", "dk", "dv", "dsink"), ours, lowp, ref)
  assert torch.isfinite(ours[1]).all(), "with sinks every row has a finite lse"


def test_sink_matches_the_jax_face():
  # Same kernels, same sink plumbing: the torch face must reproduce the JAX face's numbers.
  g = torch.Generator().manual_seed(5)
  cu = _cu([6, 1, 9])
  q, k, v = _randn(g, 16, 2, 16), _randn(g, 16, 1, 16), _randn(g, 16, 1, 16)
  z = _randn(g, 16, 2, 2)
  dout = _randn(g, 16, 2, 16, grad=False)
  ours = _run(lambda q, k, v, z: torch_bridge.fa3_varlen_func_with_sink(
      q, k, v, cu, cu, 9, 9, z, "ssh", window_size=(2, 0), return_attn_probs=True), (q, k, v, z), dout)
  arrays = [jnp.asarray(x.detach().numpy()) for x in (q, k, v, z)]
  jcu = jnp.asarray(cu.numpy())
  (out, lse), vjp = jax.vjp(lambda q, k, v, z: jax_sink.fa3_varlen_func_with_sink(
      q, k, v, jcu, jcu, 9, 9, z, "ssh", window_size=(2, 0), return_attn_probs=True), *arrays)
  theirs = (out, lse, *vjp((jnp.asarray(dout.numpy()), jnp.zeros_like(lse))))
  for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dsink"), ours, theirs):
    np.testing.assert_allclose(_host(a), np.asarray(b), rtol=1e-6, atol=1e-6, err_msg=name)


def test_sink_packed_forms_equal_the_plain_ones():
  g = torch.Generator().manual_seed(6)
  b, s, h, d = 1, 20, 2, 16
  qkv, z = _randn(g, b, s, 3, h, d), _randn(g, 2, h)
  dout = _randn(g, b, s, h, d, grad=False)

  def grads(out, *inputs):
    return (out, *torch.autograd.grad(out, inputs, dout))

  q, k, v = (qkv[:, :, i].detach().clone().requires_grad_() for i in range(3))
  base = grads(torch_bridge.fa2_func_with_sink(q, k, v, z, causal=True), q, k, v, z)
  packed = grads(torch_bridge.fa2_qkvpacked_func_with_sink(qkv, z, causal=True), qkv, z)
  assert torch.equal(packed[0], base[0]) and torch.equal(packed[2], base[4])
  assert torch.equal(packed[1], torch.stack(base[1:4], dim=2))
  kv = qkv[:, :, 1:].detach().clone().requires_grad_()
  kvp = grads(torch_bridge.fa2_kvpacked_func_with_sink(q, kv, z, causal=True), q, kv, z)
  assert torch.equal(kvp[0], base[0]) and torch.equal(kvp[1], base[1]) and torch.equal(kvp[3], base[4])
  assert torch.equal(kvp[2], torch.stack(base[2:4], dim=2))
  out3, lse3 = torch_bridge.fa3_qkvpacked_func_with_sink(qkv, z, causal=True, return_attn_probs=True)
  _, lse, s_dmask = torch_bridge.fa2_func_with_sink(q, k, v, z, causal=True, return_attn_probs=True)
  assert torch.equal(out3, base[0]) and torch.equal(lse3, lse) and s_dmask.numel() == 0
  # FA3's head-packed layout [H | Hk | Hk]: the gradient comes back in the same layout.
  heads = torch.cat([q, k, v], dim=2).detach().requires_grad_()
  hp = grads(torch_bridge.fa3_qkvpacked_func_with_sink(heads, z, causal=True, num_heads_q=h), heads, z)
  assert torch.equal(hp[0], base[0]) and torch.equal(hp[1], torch.cat(base[1:4], dim=2))
  assert torch.equal(hp[2], base[4])
  assert torch.equal(torch_bridge.fa3_func_with_sink(q, k, v, z, causal=True), base[0])

  cu = _cu([8, 12])
  vq = qkv[0].detach().clone().requires_grad_()  # (total, 3, H, d)
  vdout = dout[0]
  qv, kv_, vv = (vq[:, i].detach().clone().requires_grad_() for i in range(3))
  vbase = torch_bridge.fa2_varlen_func_with_sink(qv, kv_, vv, cu, cu, 12, 12, z, causal=True)
  vgrads = torch.autograd.grad(vbase, (qv, kv_, vv, z), vdout)
  vpacked = torch_bridge.fa2_varlen_qkvpacked_func_with_sink(vq, cu, 12, z, causal=True)
  dvq, dz = torch.autograd.grad(vpacked, (vq, z), vdout)
  assert torch.equal(vpacked, vbase) and torch.equal(dvq, torch.stack(vgrads[:3], dim=1))
  assert torch.equal(dz, vgrads[3])
  vkv = vq[:, 1:].detach().clone().requires_grad_()
  vkvp = torch_bridge.fa2_varlen_kvpacked_func_with_sink(qv, vkv, cu, cu, 12, 12, z, causal=True)
  assert torch.equal(vkvp, vbase)
  assert torch.equal(torch.autograd.grad(vkvp, vkv, vdout)[0], torch.stack(vgrads[1:3], dim=1))


def test_no_sink_is_plain_attention():
  g = torch.Generator().manual_seed(7)
  q = _randn(g, 1, 16, 2, 16, grad=False)
  assert torch.equal(torch_bridge.fa2_func_with_sink(q, q, q, None, causal=True),
                     torch_bridge.flash_attn_func(q, q, q, causal=True))
  cu = _cu([16])
  out, lse = torch_bridge.fa3_varlen_func_with_sink(q[0], q[0], q[0], cu, cu, 16, 16,
                                                    return_attn_probs=True)
  want, want_lse, _ = torch_bridge.flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 16, 16,
                                                          return_attn_probs=True)
  assert torch.equal(out, want) and torch.equal(lse, want_lse)


def test_sink_kernels_write_every_output_in_place():
  # The bridge's aliased path (CUDA) checks that each result is its donated buffer and otherwise falls
  # back to copying for every later call: dsink, which pallas_attn's backward does not write in place,
  # must be aliased by the sink kernel's own donation. XLA's CPU client honours donation of JAX-owned
  # buffers, so this is checked here.
  spec, cfgs = bridge_sink._DENSE.static(
      torch.zeros(1, 16, 2, 16), torch.zeros(1, 16, 1, 16), torch.zeros(1, 16, 1, 16), None, 0.0,
      None, True, -1, -1, 0.0, None, torch.zeros(1, 16, 2, 2), "ssh")
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(ks[0], (1, 16, 2, 16))
  k, v = (jax.random.normal(kk, (1, 16, 1, 16)) for kk in ks[1:3])
  z = jax.random.normal(ks[3], (1, 16, 2, 2))
  outs = [jnp.zeros_like(q), jnp.zeros((1, 2, 16))]
  ptrs = [x.unsafe_buffer_pointer() for x in outs]
  out, lse = bridge_sink._forward_into(q, k, v, None, None, None, z, None, *outs, spec, cfgs)
  assert [x.unsafe_buffer_pointer() for x in (out, lse)] == ptrs
  grads = [jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v), jnp.zeros_like(z)]
  ptrs = [x.unsafe_buffer_pointer() for x in grads]
  got = bridge_sink._backward_into(q, k, v, None, None, None, z, None, out, lse, q, None, *grads,
                                   spec, cfgs)
  assert [x.unsafe_buffer_pointer() for x in got] == ptrs
  want = bridge_sink._backward(q, k, v, None, None, None, z, None, out, lse, q, None, spec, cfgs)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sink_signatures_are_the_jax_faces():
  for name in ("fa2_func_with_sink", "fa2_kvpacked_func_with_sink", "fa2_qkvpacked_func_with_sink",
               "fa2_varlen_func_with_sink", "fa2_varlen_qkvpacked_func_with_sink",
               "fa2_varlen_kvpacked_func_with_sink", "fa3_func_with_sink", "fa3_varlen_func_with_sink",
               "fa3_qkvpacked_func_with_sink"):
    _compare_jax_signature(getattr(torch_bridge, name), getattr(jax_sink, name))


def test_sink_errors_name_the_argument():
  q = torch.randn(1, 16, 2, 16)
  fa2, fa3 = torch_bridge.fa2_func_with_sink, torch_bridge.fa3_func_with_sink
  cases = [
      (fa2, dict(sink=torch.zeros(2, 3)), ValueError, r"^sink: expected shape \(s_sink, 2\)"),
      (fa2, dict(sink=torch.zeros(2, 2, dtype=torch.float64)), TypeError,
       r"^sink: expected a float32 tensor, got torch.float64"),
      (fa2, dict(sink=torch.zeros(2, 2), sink_layout="hs"), ValueError, r"^sink_layout: expected one of"),
      (fa2, dict(sink=torch.zeros(1, 8, 2, 2), sink_layout="ssh"), ValueError,
       r"^sink: expected shape \(1, 16, s_sink, 2\)"),
      (fa2, dict(sink=np.zeros((2, 2), np.float32)), TypeError, r"^sink: expected a torch.Tensor"),
      (fa2, dict(sink=torch.zeros(2, 2), dropout_p=1.0), ValueError, r"^dropout_p: expected a float"),
      (fa3, dict(sink=torch.zeros(1, 2), qv=torch.ones(1)), NotImplementedError, r"^qv"),
      (fa3, dict(sink=torch.zeros(1, 2), attention_chunk=64), NotImplementedError, r"^attention_chunk"),
  ]
  for fn, kwargs, exc, match in cases:
    with pytest.raises(exc, match=match):
      fn(q, q, q, **kwargs)
  with pytest.raises(ValueError, match=r"^num_heads_q: a 4-D qkv needs"):
    torch_bridge.fa3_qkvpacked_func_with_sink(torch.ones(1, 8, 6, 16), torch.zeros(1, 2))
  cu = _cu([16])
  with pytest.raises(NotImplementedError, match=r"^seqused_k"):
    torch_bridge.fa3_varlen_func_with_sink(q[0], q[0], q[0], cu, cu, 16, 16, torch.zeros(1, 2),
                                           seqused_k=cu)
  with pytest.raises(TypeError, match=r"^cu_seqlens_k: expected dtype torch.int32, got torch.int64"):
    torch_bridge.fa2_varlen_func_with_sink(q[0], q[0], q[0], cu, cu.long(), 16, 16, torch.zeros(1, 2))
  with pytest.raises(ValueError, match=r"^sink: expected shape \(16, s_sink, 2\)"):
    torch_bridge.fa2_varlen_func_with_sink(q[0], q[0], q[0], cu, cu, 16, 16, torch.zeros(15, 1, 2),
                                           "ssh")


# ----------------------------------------------------------------------------------------------------
# Sparse


@pytest.mark.parametrize("mode,ctx", [("all", None), ("local", 7), ("strided", 6)])
def test_sparse_parity(mode, ctx):
  # n = 45 is no multiple of the stride: the strided regrouping pads.
  g = torch.Generator().manual_seed(8)
  b, n, heads, e = 2, 45, 2, 64
  q, k, v = (_randn(g, b, n, e) for _ in range(3))
  dout = _randn(g, b, n, e, grad=False)

  def run(fn):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))

  model = torch_bridge.SparseAttention(heads, mode, ctx, blocksize=16)
  assert isinstance(model, torch.nn.Module)
  ours = run(model)
  ref = run(lambda q, k, v: sparse_ref(q, k, v, heads, mode, ctx))
  lowp = run(lambda q, k, v: sparse_ref(q, k, v, heads, mode, ctx, upcast=False))
  _check_parity(("out", "dq", "dk", "dv"), ours, lowp, ref)
  assert torch.equal(torch_bridge.sparse_attention(q, k, v, heads, mode, ctx), ours[0])


@pytest.mark.parametrize("kwargs", [
    dict(attn_mode="local", local_attn_ctx=None),
    dict(attn_mode="strided", local_attn_ctx=0),
    dict(attn_mode="dilated", local_attn_ctx=4),
    dict(attn_mode="all", heads=3),
    dict(attn_mode="all", heads=0),
    dict(attn_mode="all", blocksize=24),
    dict(attn_mode="all", blocksize=8),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_sparse_errors_match_the_jax_face(kwargs):
  args = dict(heads=2, local_attn_ctx=None, blocksize=32)
  args.update(kwargs)
  with pytest.raises(ValueError) as theirs:
    x = jnp.ones((1, 16, 64), jnp.float32)
    jax_sparse.sparse_attention(x, x, x, **args)
  x = torch.ones(1, 16, 64)
  with pytest.raises(ValueError) as ours:
    torch_bridge.sparse_attention(x, x, x, **args)
  assert str(ours.value) == str(theirs.value)
  heads = args.pop("heads")
  with pytest.raises(ValueError) as module:
    torch_bridge.SparseAttention(heads, **args)(x, x, x)
  assert str(module.value) == str(theirs.value)


def test_sparse_bad_tensors():
  x = torch.ones(1, 16, 64)
  with pytest.raises(ValueError, match=r"^k/v: expected the shape of q"):
    torch_bridge.sparse_attention(x, x[:, :8], x, 2, "all")
  with pytest.raises(TypeError, match=r"^k: expected dtype float32 \(the dtype of q\), got bfloat16"):
    torch_bridge.sparse_attention(x, x.bfloat16(), x, 2, "all")
  with pytest.raises(TypeError, match=r"^v: expected a torch.Tensor"):
    torch_bridge.sparse_attention(x, x, x.numpy(), 2, "all")
  with pytest.raises(ValueError, match=r"^q: expected a 3-D array"):
    torch_bridge.sparse_attention(x[0], x[0], x[0], 2, "all")


# ----------------------------------------------------------------------------------------------------
# The seed documents' examples, through the original import paths (seeds/001 sinks, seeds/002 sparse).
# Verbatim but for the sizes and `device` (CPU interpret mode needs small problems).

_SMALL = """
import torch
device = "cpu"
"""

SEED_EXAMPLES = {
    "fa3_func": """
from extensions.fa3_interface_with_sink import fa3_func_with_sink

b = 2
sq, sk, s_sink = 64, 64, 2
nhq, nhk, hd = 4, 2, 32
dtype = torch.bfloat16
causal = True

q = torch.randn((b, sq, nhq, hd), dtype=dtype, device=device, requires_grad=True)
k = torch.randn((b, sk, nhk, hd), dtype=dtype, device=device, requires_grad=True)
v = torch.randn((b, sk, nhk, hd), dtype=dtype, device=device, requires_grad=True)
sink = torch.randn((s_sink, nhq), dtype=torch.float32, device=device, requires_grad=True)
do = torch.randn_like(q)

out, lse = fa3_func_with_sink(
    q=q,
    k=k,
    v=v,
    sink=sink,
    causal=causal,
    return_attn_probs=True,
)
out.backward(do)

dq, dk, dv, dsink = q.grad, k.grad, v.grad, sink.grad
""",
    "fa3_varlen": """
from extensions.fa3_interface_with_sink import fa3_varlen_func_with_sink

sq, sk, s_sink = 64, 64, 2
nhq, nhk, hd = 4, 2, 32
dtype = torch.bfloat16
causal = True

q = torch.randn((sq, nhq, hd), dtype=dtype, device=device, requires_grad=True)
k = torch.randn((sk, nhk, hd), dtype=dtype, device=device, requires_grad=True)
v = torch.randn((sk, nhk, hd), dtype=dtype, device=device, requires_grad=True)
sink = torch.randn((s_sink, nhq), dtype=torch.float32, device=device, requires_grad=True)
do = torch.randn_like(q)

cu_seqlens_q = torch.tensor([0, sq // 2, sq], dtype=torch.int32, device=device)
cu_seqlens_k = torch.tensor([0, sk // 2, sk], dtype=torch.int32, device=device)
max_seqlen_q = sq // 2
max_seqlen_k = sk // 2

out, lse = fa3_varlen_func_with_sink(
    q=q,
    k=k,
    v=v,
    cu_seqlens_q=cu_seqlens_q,
    cu_seqlens_k=cu_seqlens_k,
    max_seqlen_q=max_seqlen_q,
    max_seqlen_k=max_seqlen_k,
    sink=sink,
    causal=causal,
    return_attn_probs=True,
)

out.backward(do)

dq, dk, dv, dsink = q.grad, k.grad, v.grad, sink.grad
""",
    "fa3_qkvpacked": """
from extensions.fa3_interface_with_sink import fa3_qkvpacked_func_with_sink

b = 2
s, s_sink = 64, 2
nhq, nhk, hd = 4, 2, 32
dtype = torch.bfloat16
causal = True

qkv = torch.randn((b, s, (nhq + nhk*2), hd), dtype=dtype, device=device, requires_grad=True)
sink = torch.randn((s_sink, nhq), dtype=torch.float32, device=device, requires_grad=True)
do = torch.randn((b, s, nhq, hd), dtype=dtype, device=device, requires_grad=True)

out, lse = fa3_qkvpacked_func_with_sink(
    qkv=qkv,
    sink=sink,
    causal=causal,
    num_heads_q=nhq,
    return_attn_probs=True,
)
out.backward(do)

dqkv, dsink = qkv.grad, sink.grad
""",
    "fa2_func": """
from extensions.fa2_interface_with_sink import fa2_func_with_sink

b = 2
sq, sk, s_sink = 64, 64, 2
nhq, nhk, hd = 4, 2, 32
dtype = torch.bfloat16
causal = True

q = torch.randn((b, sq, nhq, hd), dtype=dtype, device=device, requires_grad=True)
k = torch.randn((b, sk, nhk, hd), dtype=dtype, device=device, requires_grad=True)
v = torch.randn((b, sk, nhk, hd), dtype=dtype, device=device, requires_grad=True)
sink = torch.randn((s_sink, nhq), dtype=torch.float32, device=device, requires_grad=True)
do = torch.randn_like(q)

out = fa2_func_with_sink(
    q=q,
    k=k,
    v=v,
    sink=sink,
    causal=causal,
    return_attn_probs=False,
)
out.backward(do)

dq, dk, dv, dsink = q.grad, k.grad, v.grad, sink.grad
""",
    "fa2_varlen": """
from extensions.fa2_interface_with_sink import fa2_varlen_func_with_sink

sq, sk, s_sink = 64, 64, 2
nhq, nhk, hd = 4, 2, 32
dtype = torch.bfloat16
causal = True

q = torch.randn((sq, nhq, hd), dtype=dtype, device=device, requires_grad=True)
k = torch.randn((sk, nhk, hd), dtype=dtype, device=device, requires_grad=True)
v = torch.randn((sk, nhk, hd), dtype=dtype, device=device, requires_grad=True)
sink = torch.randn((s_sink, nhq), dtype=torch.float32, device=device, requires_grad=True)
do = torch.randn_like(q)

cu_seqlens_q = torch.tensor([0, sq // 2, sq], dtype=torch.int32, device=device)
cu_seqlens_k = torch.tensor([0, sk // 2, sk], dtype=torch.int32, device=device)
max_seqlen_q = sq // 2
max_seqlen_k = sk // 2

out = fa2_varlen_func_with_sink(
    q=q,
    k=k,
    v=v,
    cu_seqlens_q=cu_seqlens_q,
    cu_seqlens_k=cu_seqlens_k,
    max_seqlen_q=max_seqlen_q,
    max_seqlen_k=max_seqlen_k,
    sink=sink,
    causal=causal,
    return_attn_probs=False,
)

out.backward(do)

dq, dk, dv, dsink = q.grad, k.grad, v.grad, sink.grad
""",
    "fa2_qkvpacked": """
from extensions.fa2_interface_with_sink import fa2_qkvpacked_func_with_sink

b = 2
s, s_sink = 64, 2
nh, hd = 4, 32
dtype = torch.bfloat16
causal = True

qkv = torch.randn((b, s, 3, nh, hd), dtype=dtype, device=device, requires_grad=True)
sink = torch.randn((s_sink, nh), dtype=torch.float32, device=device, requires_grad=True)
do = torch.randn((b, s, nh, hd), dtype=dtype, device=device, requires_grad=True)

out = fa2_qkvpacked_func_with_sink(
    qkv=qkv,
    sink=sink,
    causal=causal,
    return_attn_probs=False,
)
out.backward(do)

dqkv, dsink = qkv.grad, sink.grad
""",
    "fa2_kvpacked": """
from extensions.fa2_interface_with_sink import fa2_kvpacked_func_with_sink

b = 2
sq, sk, s_sink = 64, 64, 2
nhq, nhk, hd = 4, 2, 32
dtype = torch.bfloat16
causal = True

q = torch.randn((b, sq, nhq, hd), dtype=dtype, device=device, requires_grad=True)
kv = torch.randn((b, sk, 2, nhk, hd), dtype=dtype, device=device, requires_grad=True)
sink = torch.randn((s_sink, nhq), dtype=torch.float32, device=device, requires_grad=True)
do = torch.randn_like(q)

out = fa2_kvpacked_func_with_sink(
    q=q,
    kv=kv,
    sink=sink,
    causal=causal,
    return_attn_probs=False,
)
out.backward(do)

dq, dkv, dsink = q.grad, kv.grad, sink.grad
""",
    "fa2_varlen_qkvpacked": """
from extensions.fa2_interface_with_sink import fa2_varlen_qkvpacked_func_with_sink

s, s_sink = 64, 2
nh, hd = 4, 32
dtype = torch.bfloat16
causal = True

qkv = torch.randn((s, 3, nh, hd), dtype=dtype, device=device, requires_grad=True)
sink = torch.randn((s_sink, nh), dtype=torch.float32, device=device, requires_grad=True)
do = torch.randn((s, nh, hd), dtype=dtype, device=device, requires_grad=True)

cu_seqlens = torch.tensor([0, s // 2, s], dtype=torch.int32, device=device)
max_seqlen = s // 2

out = fa2_varlen_qkvpacked_func_with_sink(
    qkv=qkv,
    cu_seqlens=cu_seqlens,
    max_seqlen=max_seqlen,
    sink=sink,
    causal=causal,
    return_attn_probs=False,
)

out.backward(do)

dqkv, dsink = qkv.grad, sink.grad
""",
    "fa2_varlen_kvpacked": """
from extensions.fa2_interface_with_sink import fa2_varlen_kvpacked_func_with_sink

sq, sk, s_sink = 64, 64, 2
nhq, nhk, hd = 4, 2, 32
dtype = torch.bfloat16
causal = True

q = torch.randn((sq, nhq, hd), dtype=dtype, device=device, requires_grad=True)
kv = torch.randn((sk, 2, nhk, hd), dtype=dtype, device=device, requires_grad=True)
sink = torch.randn((s_sink, nhq), dtype=torch.float32, device=device, requires_grad=True)
do = torch.randn_like(q)

cu_seqlens_q = torch.tensor([0, sq // 2, sq], dtype=torch.int32, device=device)
cu_seqlens_k = torch.tensor([0, sk // 2, sk], dtype=torch.int32, device=device)
max_seqlen_q = sq // 2
max_seqlen_k = sk // 2


out = fa2_varlen_kvpacked_func_with_sink(
    q=q,
    kv=kv,
    cu_seqlens_q=cu_seqlens_q,
    cu_seqlens_k=cu_seqlens_k,
    max_seqlen_q=max_seqlen_q,
    max_seqlen_k=max_seqlen_k,
    sink=sink,
    causal=causal,
    return_attn_probs=False,
)

out.backward(do)

dq, dkv, dsink = q.grad, kv.grad, sink.grad
""",
    "sparse": """
from zeta.nn.attention import SparseAttention

# Define parameters
n_batch = 2
n_ctx = 64
n_embd = 128
heads = 4
attn_mode = "all"
local_attn_ctx = 32
blocksize = 32

# Create input tensors
q = torch.randn(n_batch, n_ctx, n_embd)
k = torch.randn(n_batch, n_ctx, n_embd)
v = torch.randn(n_batch, n_ctx, n_embd)

# Create SparseAttention model
model = SparseAttention(heads, attn_mode, local_attn_ctx, blocksize)

# Forward pass
output = model(q, k, v)

# Print output
print(output[0])
""",
}

# The gradients each example reads at its end.
_SEED_GRADS = {
    "fa3_func": ("dq", "dk", "dv", "dsink"), "fa3_varlen": ("dq", "dk", "dv", "dsink"),
    "fa3_qkvpacked": ("dqkv", "dsink"), "fa2_func": ("dq", "dk", "dv", "dsink"),
    "fa2_varlen": ("dq", "dk", "dv", "dsink"), "fa2_qkvpacked": ("dqkv", "dsink"),
    "fa2_kvpacked": ("dq", "dkv", "dsink"), "fa2_varlen_qkvpacked": ("dqkv", "dsink"),
    "fa2_varlen_kvpacked": ("dq", "dkv", "dsink"), "sparse": (),
}


@pytest.fixture
def installed():
  names = ("extensions", "extensions.fa2_interface_with_sink", "extensions.fa3_interface_with_sink",
           "zeta", "zeta.nn", "zeta.nn.attention")
  saved = {n: sys.modules.get(n) for n in names}
  compat.install()
  yield
  compat.uninstall()
  for n, m in saved.items():
    assert sys.modules.get(n) is m


def _unbind(x, dim):
  return x.unbind(dim)


# Per example: the leaves its gradients are read from, and what it computes from them, as
# (q, k, v, sink) plus the varlen offsets' names (None: dense). The qkv splits are the layouts the
# seed documents describe: FA2 (b, s, 3, H, d), FA3 (b, s, H + 2 Hk, d) as [H | Hk | Hk].
_SEED_FORMS = {
    "fa3_func": (("q", "k", "v", "sink"), lambda q, k, v, z: (q, k, v, z), None),
    "fa2_func": (("q", "k", "v", "sink"), lambda q, k, v, z: (q, k, v, z), None),
    "fa3_varlen": (("q", "k", "v", "sink"), lambda q, k, v, z: (q, k, v, z),
                   ("cu_seqlens_q", "cu_seqlens_k")),
    "fa2_varlen": (("q", "k", "v", "sink"), lambda q, k, v, z: (q, k, v, z),
                   ("cu_seqlens_q", "cu_seqlens_k")),
    "fa3_qkvpacked": (("qkv", "sink"), lambda qkv, z: (*qkv.split([4, 2, 2], dim=2), z), None),
    "fa2_qkvpacked": (("qkv", "sink"), lambda qkv, z: (*_unbind(qkv, 2), z), None),
    "fa2_kvpacked": (("q", "kv", "sink"), lambda q, kv, z: (q, *_unbind(kv, 2), z), None),
    "fa2_varlen_qkvpacked": (("qkv", "sink"), lambda qkv, z: (*_unbind(qkv, 1), z),
                             ("cu_seqlens", "cu_seqlens")),
    "fa2_varlen_kvpacked": (("q", "kv", "sink"), lambda q, kv, z: (q, *_unbind(kv, 1), z),
                            ("cu_seqlens_q", "cu_seqlens_k")),
}


def _seed_reference(example, scope, upcast):
  """(out, lse, *grads) of the torch reference on the example's own values, for its `do`."""
  if example == "sparse":
    return (sparse_ref(scope["q"], scope["k"], scope["v"], scope["heads"], scope["attn_mode"],
                       scope["local_attn_ctx"], upcast=upcast), None)
  names, split, offsets = _SEED_FORMS[example]
  leaves = [scope[n].detach().clone().requires_grad_() for n in names]
  q, k, v, z = split(*leaves)
  if offsets is None:
    out, lse = attention_ref(q, k, v, sink=z, causal=True, upcast=upcast)
  else:
    cu_q, cu_k = (scope[n] for n in offsets)
    out, lse = varlen_ref(q, k, v, cu_q, cu_k, sink=z, causal=True, upcast=upcast)
  return (out, lse, *torch.autograd.grad(out, leaves, scope["do"].detach()))


def _dsink_from_stored_output(out, lse, sink, dout):
  """dsink = -sum_rows exp(z - L) * D with D = rowsum(dO * O) taken from `out` as stored (rounded
  to the input dtype), the way FlashAttention's backward (ours included) forms delta. For bf16 this
  rounding, summed over every row of a head, is what separates a correct kernel's dsink from the
  exact one; the input-dtype reference keeps O unrounded inside autograd and so does not show it."""
  d = (dout.double() * out.double()).sum(-1)  # (b, sq, H) or varlen (total, H)
  d, lse = (d.permute(0, 2, 1), lse.double()) if d.dim() == 3 else (d.t()[None], lse.double()[None])
  z = sink.detach().double()
  return -(torch.exp(z[None, :, :, None] - lse[:, None]) * d[:, None]).sum(dim=(0, 3)).float()


@pytest.mark.parametrize("example", list(SEED_EXAMPLES))
def test_seed_example_runs(example, installed):
  """Each seed example, run as written, computes what the reference computes on its values:
  outputs, lse where it returns one, and every gradient it reads (dsink included)."""
  torch.manual_seed(0)
  scope = {}
  code = compile(_SMALL + SEED_EXAMPLES[example], f"<seed {example}>", "exec")
  exec(code, scope)  # pylint: disable=exec-used
  out = scope["output" if example == "sparse" else "out"]
  names = ("out",) + (("lse",) if "lse" in scope else ()) + _SEED_GRADS[example]
  ours = [out] + [scope[n] for n in names[1:]]
  assert all(t is not None for t in ours), names
  ref = _seed_reference(example, scope, upcast=True)
  lowp = _seed_reference(example, scope, upcast=False)
  if example != "sparse":
    # dsink's yardstick: the accurate reference with delta from its output rounded to bf16.
    lowp = (*lowp[:-1], _dsink_from_stored_output(ref[0], ref[1], scope["sink"], scope["do"]))
  if "lse" not in scope:
    ref, lowp = (ref[0], *ref[2:]), (lowp[0], *lowp[2:])
  _check_parity(names, ours, lowp, ref)
  if example != "sparse":
    assert out.dtype == torch.bfloat16 and scope["dsink"].dtype == torch.float32


def test_compat_import_paths_are_ours(installed):
  from extensions.fa2_interface_with_sink import fa2_func_with_sink
  from extensions.fa3_interface_with_sink import fa3_varlen_func_with_sink
  from zeta.nn.attention import SparseAttention
  from zeta.nn.attention.sparse_attention import SparseAttention as same
  import extensions
  assert fa2_func_with_sink is torch_bridge.fa2_func_with_sink
  assert fa3_varlen_func_with_sink is torch_bridge.fa3_varlen_func_with_sink
  assert SparseAttention is torch_bridge.SparseAttention and same is SparseAttention
  assert extensions.fa3_interface_with_sink.fa3_qkvpacked_func_with_sink is \
      torch_bridge.fa3_qkvpacked_func_with_sink


# ----------------------------------------------------------------------------------------------------
# CUDA (run on the GPU machine: pytest tests/test_torch_families.py -m gpu)


def cuda_test(fn):
  return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(fn))


@cuda_test
def test_cuda_varlen_parity():
  g = torch.Generator().manual_seed(10)
  lq, lk = [300, 1, 0, 513, 77], [280, 1, 5, 513, 0]
  h, hk, d, dtype = 8, 2, 64, torch.bfloat16
  cu_q, cu_k = _cu(lq, "cuda"), _cu(lk, "cuda")
  mk = lambda *s, grad=True: _randn(g, *s, dtype=dtype, device="cuda", grad=grad)
  q, k, v = mk(sum(lq), h, d), mk(sum(lk), hk, d), mk(sum(lk), hk, d)
  dout = mk(sum(lq), h, d, grad=False)
  dlse = _randn(g, h, sum(lq), device="cuda", grad=False)
  fn = lambda q, k, v: torch_bridge.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk),
                                                           causal=True, return_attn_probs=True)[:2]
  ours = _run(fn, (q, k, v), dout, dlse)
  ref = _run(lambda q, k, v: varlen_ref(q, k, v, cu_q, cu_k, causal=True), (q, k, v), dout, dlse)
  lowp = _run(lambda q, k, v: varlen_ref(q, k, v, cu_q, cu_k, causal=True, upcast=False), (q, k, v),
              dout, dlse)
  assert all(t.device.type == "cuda" for t in ours)
  _check_parity(("out", "lse", "dq", "dk", "dv"), ours, lowp, ref)


@cuda_test
@pytest.mark.parametrize("layout", ["sh", "ssh"])
def test_cuda_sink_parity(layout):
  path = _dlpack.output_path("cuda")
  print(f"\nCUDA output path: {path}")
  g = torch.Generator().manual_seed(11)
  b, sq, sk, h, hk, d, n_sink, dtype = 2, 300, 257, 8, 2, 128, 2, torch.bfloat16
  mk = lambda *s, grad=True: _randn(g, *s, dtype=dtype, device="cuda", grad=grad)
  q, k, v = mk(b, sq, h, d), mk(b, sk, hk, d), mk(b, sk, hk, d)
  z = _randn(g, *((n_sink, h) if layout == "sh" else (b, sq, n_sink, h)), device="cuda")
  dout = mk(b, sq, h, d, grad=False)
  dlse = _randn(g, b, h, sq, device="cuda", grad=False)
  fn = lambda q, k, v, z: torch_bridge.fa3_func_with_sink(q, k, v, z, layout, causal=True,
                                                          return_attn_probs=True)
  ours = _run(fn, (q, k, v, z), dout, dlse)
  ref = _run(lambda q, k, v, z: attention_ref(q, k, v, sink=z, sink_layout=layout, causal=True),
             (q, k, v, z), dout, dlse)
  lowp = _run(lambda q, k, v, z: attention_ref(q, k, v, sink=z, sink_layout=layout, causal=True,
                                               upcast=False), (q, k, v, z), dout, dlse)
  _check_parity(("out", "lse", "dq", "dk", "dv", "dsink"), ours, lowp, ref)
  # Every sink output, dsink included, is written in place: a result that was not would have made the
  # bridge fall back to copying for good.
  assert _dlpack._PATHS["gpu"] == path, "the sink kernels declined a donation"


@cuda_test
@pytest.mark.parametrize("mode,ctx", [("local", 64), ("strided", 24)])
def test_cuda_sparse_parity(mode, ctx):
  g = torch.Generator().manual_seed(12)
  b, n, heads, e, dtype = 2, 500, 4, 256, torch.bfloat16
  q, k, v = (_randn(g, b, n, e, dtype=dtype, device="cuda") for _ in range(3))
  dout = _randn(g, b, n, e, dtype=dtype, device="cuda", grad=False)

  def run(fn):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))

  ours = run(torch_bridge.SparseAttention(heads, mode, ctx))
  ref = run(lambda q, k, v: sparse_ref(q, k, v, heads, mode, ctx))
  lowp = run(lambda q, k, v: sparse_ref(q, k, v, heads, mode, ctx, upcast=False))
  _check_parity(("out", "dq", "dk", "dv"), ours, lowp, ref)
