"""The torch ops' one mechanism (torch_bridge/_ops.py: OpDesc, Spec, build): a family declared in a
few lines gets a forward op, a backward op, autograd, opcheck-clean fakes and torch.compile; and
every family's declared output shapes are the JAX face's (eval_shape of its kernels)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
import torch

import torch_bridge  # noqa: F401  (builds every family)
from torch_bridge import _dlpack, _ops


# A toy family: y = a * x (a static float), differentiable in x. This is all a family needs.
@functools.partial(jax.jit, static_argnums=1)
def _scale(x, a):
  return (a * x,)


@functools.partial(jax.jit, static_argnums=3)
def _scale_grad(x, y, dy, a):
  del x, y
  return (a * dy,)


def _checked_scale(x, a):
  if len(x.shape) != 2:
    raise ValueError(f"x: expected a 2-D tensor, got shape {tuple(x.shape)}")
  return (float(a),)


_SCALE = _ops.build(_ops.OpDesc(
    "opdesc_test_scale_fwd", "Tensor x, float a", outputs=lambda x, a: [(x.shape, x.dtype)],
    output_names=("y",), static=_ops.Spec(_checked_scale), operands=("x",),
    forward=_dlpack.Kernel(into=lambda x, y, a: _scale(x, a), plain=_scale),
    backward=_dlpack.Kernel(into=lambda x, y, dy, dx, a: _scale_grad(x, y, dy, a), plain=_scale_grad),
    wrt=("x",)))


def test_a_family_from_a_description():
  x = torch.randn(3, 5, requires_grad=True)
  y = _SCALE.call(x, 2.5)
  torch.testing.assert_close(y, 2.5 * x.detach())
  (g,) = torch.autograd.grad(y.sum(), x)
  torch.testing.assert_close(g, torch.full_like(x, 2.5))
  assert "opdesc_test_scale_bwd(Tensor? dy, Tensor x, float a, Tensor y) -> Tensor" in str(
      torch.ops.pallas_attn.opdesc_test_scale_bwd.default._schema)  # pylint: disable=protected-access
  with torch.no_grad():
    assert _SCALE.call(x, 2.0).grad_fn is None
  with pytest.raises(ValueError, match=r"^x: expected a 2-D tensor"):
    _SCALE.call(torch.randn(4), 1.0)


def test_described_ops_pass_opcheck_and_compile():
  x = torch.randn(3, 5)
  torch.library.opcheck(torch.ops.pallas_attn.opdesc_test_scale_fwd.default, (x, 1.5))
  torch.library.opcheck(torch.ops.pallas_attn.opdesc_test_scale_bwd.default, (x, x, 1.5, x))
  torch._dynamo.reset()  # pylint: disable=protected-access
  f = torch.compile(lambda t: _SCALE.call(t, 3.0) + 1, fullgraph=True)
  xg = x.clone().requires_grad_()
  out = f(xg)
  torch.testing.assert_close(out, 3.0 * x + 1)
  (g,) = torch.autograd.grad(out.sum(), xg)
  torch.testing.assert_close(g, torch.full_like(x, 3.0))


def test_forward_only_description_raises_on_backward():
  ops = _ops.build(_ops.OpDesc(
      "opdesc_test_fwd_only", "Tensor x, float a", outputs=lambda x, a: [(x.shape, x.dtype)],
      output_names=("y",), static=lambda x, a: (float(a),), operands=("x",),
      forward=_dlpack.Kernel(into=lambda x, y, a: _scale(x, a), plain=_scale),
      forward_only="opdesc_test_fwd_only: no backward here"))
  x = torch.randn(2, 2, requires_grad=True)
  y = ops.call(x, 2.0)
  torch.testing.assert_close(y, 2.0 * x.detach())
  with pytest.raises(NotImplementedError, match="no backward here"):
    y.sum().backward()


# ----------------------------------------------------------------------------------------------------
# Every family: declared output shapes against the JAX face's


def _structs(tensors):
  return [None if t is None else jax.ShapeDtypeStruct(tuple(t.shape), _dlpack.jax_dtype("t", t.dtype))
          for t in tensors]


def _eval(kernel_fn, operands, static):
  return jax.eval_shape(lambda *ops: kernel_fn(*ops, *static), *_structs(operands))


def _same(declared, jax_outs):
  got = [(tuple(s), _dlpack.jax_dtype("out", d)) for s, d in declared]
  want = [(tuple(o.shape), jnp.dtype(o.dtype)) for o in jax_outs]
  assert got == want, (got, want)


def _args():
  q, k = torch.zeros(2, 8, 4, 16), torch.zeros(2, 12, 2, 16)
  qv, kv = torch.zeros(20, 4, 16), torch.zeros(24, 2, 16)
  cu_q, cu_k = torch.tensor([0, 8, 20], dtype=torch.int32), torch.tensor([0, 12, 24], dtype=torch.int32)
  alibi, seed = torch.full((4,), 0.5), torch.zeros(1, dtype=torch.int32)
  dense = (q, k, k, alibi, 0.1, None, True, -1, -1, 0.0, seed)
  varlen = (qv, kv, kv, cu_q, cu_k, 12, 12, alibi, 0.1, None, True, -1, -1, 0.0, seed)
  zoh = torch.zeros(2, 2, 8, 12)
  return {
      "flash_attn_fwd": dense,
      "flash_attn_s_dmask": (torch.zeros(2, 4, 8), *dense),
      "flash_attn_varlen_fwd": varlen,
      "flash_attn_varlen_s_dmask": (torch.zeros(4, 20), *varlen),
      "flash_attn_varlen_paged_fwd": (qv, torch.zeros(2, 16, 2, 16), torch.zeros(2, 16, 2, 16), cu_q,
                                      torch.tensor([0, 12, 28], dtype=torch.int32),
                                      torch.tensor([[0], [1]], dtype=torch.int32), 12, 16, alibi, None,
                                      True, -1, -1, 0.0),
      "flash_attn_sink_fwd": (*dense, torch.zeros(3, 4), "sh"),
      "flash_attn_varlen_sink_fwd": (*varlen, torch.zeros(20, 3, 4), "ssh"),
      "flash_dma_fwd": (q, k, k, zoh, torch.ones_like(zoh), seed, 0.1, None, True, 0.0),
      "landmark_fwd": (torch.zeros(1, 2, 16, 16), torch.zeros(1, 2, 32, 16), torch.zeros(1, 2, 32, 16),
                       1, None, 16),
      "kvcache_rotary": (torch.zeros(2, 1, 4, 16), torch.zeros(2, 1, 2, 16), torch.zeros(32, 8),
                         torch.zeros(32, 8), torch.tensor([3, 5], dtype=torch.int32), True, False),
      "kvcache_attend": (torch.zeros(2, 1, 4, 16), torch.zeros(2, 32, 2, 16), torch.zeros(2, 32, 2, 16),
                         torch.tensor([4, 6], dtype=torch.int32), torch.zeros(2, dtype=torch.int32),
                         torch.arange(2, dtype=torch.int32), None, None, True, -1, -1, 0.0, 1),
  }


@pytest.mark.parametrize("name", sorted(_args()))
def test_declared_outputs_are_the_jax_faces(name):
  desc, ops = _ops.FAMILIES[name]
  args = _args()[name]
  operands, static = ops.operands(*args), ops.static(*args)
  outs = desc.outputs(*args)
  _same(outs, _eval(desc.forward.plain, operands, static))
  if desc.backward is None:
    return
  # The backward kernel: the forward's operands, outputs and their gradients -> the gradients of
  # `wrt`, which the backward op allocates like those arguments.
  fwd_outs = [torch.zeros(tuple(s), dtype=d) for s, d in outs]
  names = _names(desc)
  declared = [(args[names.index(n)].shape, args[names.index(n)].dtype) for n in desc.wrt]
  _same(declared, _eval(desc.backward.plain, (*operands, *fwd_outs, *fwd_outs), static))


def _names(desc):
  schema = torch._C.parse_schema(f"x::y({desc.args}) -> Tensor")  # pylint: disable=protected-access
  return [a.name for a in schema.arguments]


def test_every_family_is_described():
  ops = {str(getattr(torch.ops.pallas_attn, n).default._schema).split("(")[0].split("::")[1]  # pylint: disable=protected-access
         for n in dir(torch.ops.pallas_attn) if not n.startswith("_") and not n.startswith("opdesc_test")
         and hasattr(getattr(torch.ops.pallas_attn, n), "default")}
  mine = {n: d for n, (d, _) in _ops.FAMILIES.items() if not n.startswith("opdesc_test")}
  backward = {n.replace("_fwd", "_bwd") for n, d in mine.items() if d.backward is not None}
  described = set(mine)
  assert ops == described | backward, ops ^ (described | backward)
