"""torch_bridge.flash_dma: flash-dmattn's fwd on torch tensors, its gradients (q, k, v, zoh), the explicit
bwd, out=, the top-k mask, dropout seeded from torch, return_softmax, errors, torch.compile and the
seed's usage example under compat.install(). CPU tensors run the kernels in interpret mode."""
from __future__ import annotations

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import numerics
import torch_bridge  # noqa: F401  (registers the ops and the compat modules)
from pallas_attn import flash_dma as jax_dma
from pallas_attn.reference import dynamic_mask_reference
from torch_bridge import compat
from torch_bridge import flash_dma


def _inputs(b=1, sq=24, sk=40, h=4, hk=2, d=32, density=0.5, dtype=torch.float32, seed=0):
  g = torch.Generator().manual_seed(seed)
  q = torch.randn(b, sq, h, d, generator=g).to(dtype)
  k = torch.randn(b, sk, hk, d, generator=g).to(dtype)
  v = torch.randn(b, sk, hk, d, generator=g).to(dtype)
  zoh = torch.randn(b, hk, sq, sk, generator=g).to(dtype)
  active = (torch.rand(b, hk, sq, sk, generator=g) < density).to(dtype)
  dout = torch.randn(b, sq, h, d, generator=g).to(dtype)
  return q, k, v, zoh, active, dout


def _j(t):
  return jnp.asarray(t.detach().float().numpy()).astype(
      {torch.float32: jnp.float32, torch.bfloat16: jnp.bfloat16}[t.dtype])


def _np(t):
  return t.detach().float().numpy()


@pytest.mark.parametrize("causal,softcap,dtype", [(False, 0.0, torch.float32),
                                                  (True, 5.0, torch.float32),
                                                  (True, 0.0, torch.bfloat16)])
def test_matches_the_jax_face(causal, softcap, dtype):
  q, k, v, zoh, active, dout = _inputs(dtype=dtype, seed=1)
  leaves = [t.clone().requires_grad_() for t in (q, k, v, zoh)]
  out, lse, p, rng_state = flash_dma.fwd(*leaves, active, is_causal=causal, softcap=softcap)
  assert p.numel() == 0 and rng_state.numel() == 0
  out.backward(dout)
  fn = lambda q, k, v, z: tuple(jax_dma.fwd(q, k, v, z, _j(active), is_causal=causal,
                                            softcap=softcap)[:2])
  (jout, jlse), vjp = jax.vjp(fn, *(_j(t) for t in (q, k, v, zoh)))
  grads = vjp((_j(dout), jnp.zeros_like(jlse)))
  np.testing.assert_array_equal(_np(out), np.asarray(jout, np.float32))
  np.testing.assert_array_equal(_np(lse), np.asarray(jlse))
  for name, t, g in zip(("dq", "dk", "dv", "dzoh"), leaves, grads):
    assert t.grad.dtype == dtype, name
    np.testing.assert_array_equal(_np(t.grad), np.asarray(g, np.float32), err_msg=name)


def test_against_the_reference():
  q, k, v, zoh, active, dout = _inputs(sq=33, sk=50, h=2, hk=1, seed=2)
  out, lse, _, _ = flash_dma.fwd(q, k, v, zoh, active, is_causal=True)
  want_out, want_lse = dynamic_mask_reference(*(_j(t) for t in (q, k, v, zoh, active)),
                                              is_causal=True)
  numerics.assert_output("out", _np(out), want_out, want_out)
  numerics.assert_lse(_np(lse), want_lse, want_lse)


def test_bwd_equals_autograd_and_lse_gradient_flows():
  q, k, v, zoh, active, dout = _inputs(seed=3)
  leaves = [t.clone().requires_grad_() for t in (q, k, v, zoh)]
  out, lse, _, _ = flash_dma.fwd(*leaves, active, softcap=2.0)
  out.backward(dout)
  got = flash_dma.bwd(dout, q, k, v, zoh, active, out.detach(), lse.detach(), softcap=2.0)
  for name, a, t in zip(("dq", "dk", "dv", "dzoh"), got, leaves):
    torch.testing.assert_close(a, t.grad, rtol=0, atol=0, msg=name)
  # lse alone downstream: its gradient reaches q and zoh too.
  qq, zz = q.clone().requires_grad_(), zoh.clone().requires_grad_()
  flash_dma.fwd(qq, k, v, zz, active)[1].sum().backward()
  assert torch.isfinite(qq.grad).all() and qq.grad.abs().sum() > 0 and zz.grad.abs().sum() > 0


def test_out_is_written_in_place():
  q, k, v, zoh, active, _ = _inputs(seed=4)
  buf = torch.full_like(q, float("nan"))
  out = flash_dma.fwd(q, k, v, zoh, active, out=buf)[0]
  assert out is buf
  torch.testing.assert_close(buf, flash_dma.fwd(q, k, v, zoh, active)[0], rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_topk_mask_and_active_mask_none(causal):
  q, k, v, zoh, _, _ = _inputs(sq=16, sk=48, h=2, hk=1, seed=5)
  mask = flash_dma.topk_mask(zoh, 12, causal)
  np.testing.assert_array_equal(_np(mask), np.asarray(jax_dma.topk_mask(_j(zoh), 12, causal)))
  got = flash_dma.fwd(q, k, v, zoh, None, is_causal=causal, keep_window_size=12)[0]
  want = flash_dma.fwd(q, k, v, zoh, mask, is_causal=causal)[0]
  torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_dropout_follows_torch_seed_and_replays_in_bwd():
  q, k, v, zoh, active, dout = _inputs(seed=6)
  torch.manual_seed(123)
  out1, lse1, p1, rng1 = flash_dma.fwd(q, k, v, zoh, active, p_dropout=0.3, return_softmax=True)
  torch.manual_seed(123)
  out2, _, _, rng2 = flash_dma.fwd(q, k, v, zoh, active, p_dropout=0.3)
  torch.manual_seed(124)
  out3 = flash_dma.fwd(q, k, v, zoh, active, p_dropout=0.3)[0]
  torch.testing.assert_close(out1, out2, rtol=0, atol=0)
  assert torch.equal(rng1, rng2) and rng1.shape == (2,) and rng1.dtype == torch.int64
  assert not torch.equal(out1, out3)
  gen = torch.Generator().manual_seed(7)
  out4 = flash_dma.fwd(q, k, v, zoh, active, p_dropout=0.3, gen=gen)[0]
  assert torch.equal(out4, flash_dma.fwd(q, k, v, zoh, active, p_dropout=0.3,
                                         gen=torch.Generator().manual_seed(7))[0])
  # p: the weights with dropped entries negated; kept ones rescaled reproduce the output.
  probs = p1.float()
  kept = torch.where(probs > 0, probs, torch.zeros_like(probs)) / 0.7
  vv = v.repeat_interleave(2, dim=2)
  torch.testing.assert_close(torch.einsum("bhqk,bkhd->bqhd", kept, vv), out1, rtol=1e-4, atol=1e-4)
  # The explicit backward replays the forward's mask from rng_state.
  leaves = [t.clone().requires_grad_() for t in (q, k, v, zoh)]
  torch.manual_seed(123)
  out5, lse5, _, rng5 = flash_dma.fwd(*leaves, active, p_dropout=0.3)
  out5.backward(dout)
  got = flash_dma.bwd(dout, q, k, v, zoh, active, out5.detach(), lse5.detach(), p_dropout=0.3,
                      rng_state=rng5)
  for name, a, t in zip(("dq", "dk", "dv", "dzoh"), got, leaves):
    torch.testing.assert_close(a, t.grad, rtol=0, atol=0, msg=name)


def test_return_softmax_without_dropout():
  q, k, v, zoh, active, _ = _inputs(seed=8)
  out, _, p, _ = flash_dma.fwd(q, k, v, zoh, active, is_causal=True, return_softmax=True)
  assert p.shape == (1, 4, 24, 40) and p.dtype == q.dtype
  rows = p.float().sum(-1)
  torch.testing.assert_close(rows, torch.ones_like(rows), rtol=0, atol=1e-5)
  assert (p[active.repeat_interleave(2, dim=1) <= 0] == 0).all()


@pytest.mark.parametrize("change,err,match", [
    (dict(zoh=torch.zeros(1, 1, 8, 9)), ValueError, r"zoh: expected shape"),
    (dict(zoh=torch.zeros(1, 1, 8, 16, dtype=torch.bfloat16)), TypeError, "zoh: expected dtype"),
    (dict(active_mask=torch.zeros(1, 1, 16, 8)), ValueError, "active_mask: expected shape"),
    (dict(k=torch.ones(1, 16, 3, 16), v=torch.ones(1, 16, 3, 16)), ValueError, "nheads_k"),
    (dict(out=torch.zeros(1, 8, 2, 8)), ValueError, "out: expected"),
    (dict(p_dropout=1.5), ValueError, "p_dropout"),
    (dict(keep_window_size=0), ValueError, "keep_window_size"),
    (dict(zoh=np.zeros((1, 1, 8, 16))), TypeError, "zoh: expected a torch.Tensor"),
])
def test_errors_name_the_argument(change, err, match):
  args = dict(q=torch.ones(1, 8, 2, 16), k=torch.ones(1, 16, 1, 16), v=torch.ones(1, 16, 1, 16),
              zoh=torch.zeros(1, 1, 8, 16), active_mask=torch.ones(1, 1, 8, 16))
  args.update(change)
  with pytest.raises(err, match=match):
    flash_dma.fwd(**args)


def test_torch_compile_fullgraph():
  q, k, v, zoh, active, _ = _inputs(seed=9)
  fn = lambda q, k, v, z, m: flash_dma.fwd(q, k, v, z, m, is_causal=True)[0]
  got = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, zoh, active)
  torch.testing.assert_close(got, fn(q, k, v, zoh, active), rtol=0, atol=0)


_SEED_EXAMPLE = """
import torch
import flash_dma
import math

# Setup (the seed's sizes shrunk for the CPU)
batch_size, seq_len, num_heads, head_dim = 1, 96, 2, 32
device = torch.device('cpu')
dtype = torch.bfloat16

query = torch.randn(batch_size, seq_len, num_heads, head_dim, device=device, dtype=dtype)
key = torch.randn(batch_size, seq_len, num_heads, head_dim, device=device, dtype=dtype)
value = torch.randn(batch_size, seq_len, num_heads, head_dim, device=device, dtype=dtype)

zoh_states = torch.randn(batch_size, num_heads, seq_len, seq_len, device=device, dtype=dtype)
active_mask = torch.zeros(batch_size, num_heads, seq_len, seq_len, device=device, dtype=dtype)

keep_window_size = 32
if seq_len > keep_window_size:
    topk_indices = torch.topk(zoh_states, keep_window_size, dim=-1,
                             largest=True, sorted=False).indices
    # The seed's `active_mask.scatter(...)` discards its result; scatter_ writes in place.
    active_mask.scatter_(-1, topk_indices, 1.0)

output = flash_dma.fwd(
    q=query,
    k=key,
    v=value,
    zoh=zoh_states,
    active_mask=active_mask,
    softmax_scale=1.0/math.sqrt(head_dim),
    keep_window_size=keep_window_size
)[0]

output, softmax_lse, attn_weights, _ = flash_dma.fwd(
    query, key, value, zoh_states, active_mask,
    return_softmax=True
)
"""


def test_seed_example_runs():
  saved = sys.modules.get("flash_dma")
  compat.install()
  try:
    scope = {}
    exec(compile(_SEED_EXAMPLE, "<seed flash_dma>", "exec"), scope)  # pylint: disable=exec-used
  finally:
    compat.uninstall()
  assert sys.modules.get("flash_dma") is saved
  assert scope["flash_dma"].fwd is flash_dma.fwd
  out, weights = scope["output"], scope["attn_weights"]
  assert out.shape == (1, 96, 2, 32) and torch.isfinite(out.float()).all()
  assert weights.shape == (1, 2, 96, 96)
  kept = (weights.float() > 0).sum(-1)
  assert (kept <= 32).all() and (kept > 0).all()
  assert math.isfinite(float(scope["softmax_lse"].max()))


@pytest.mark.gpu
def test_cuda_matches_cpu():
  q, k, v, zoh, active, dout = _inputs(sq=300, sk=500, h=4, hk=2, d=64, density=0.3,
                                       dtype=torch.bfloat16, seed=10)
  cuda = [t.cuda().requires_grad_() for t in (q, k, v, zoh)]
  out, lse, _, _ = flash_dma.fwd(*cuda, active.cuda(), is_causal=True)
  out.backward(dout.cuda())
  want_out, want_lse = dynamic_mask_reference(*(_j(t) for t in (q, k, v, zoh, active)),
                                              is_causal=True)
  lowp = dynamic_mask_reference(*(_j(t) for t in (q, k, v, zoh, active)), is_causal=True,
                                upcast=False)
  numerics.assert_output("out", _np(out.cpu()), lowp[0], want_out)
  numerics.assert_lse(_np(lse.cpu()), lowp[1], want_lse)
  assert all(torch.isfinite(t.grad).all() for t in cuda)
