"""The differentiable core shared by every public attention function: (out, lse) = attention(q, k, v).

Public functions validate and reshape their arguments, build an AttentionSpec and call `attention`;
its custom VJP runs the Pallas backward. `forward` and `backward` are the same two jitted steps for
callers that drive autodiff themselves (the torch bridge); the `_into` forms write into donated
buffers. The kernel backend is chosen per call and lowering platform (backends/registry.py): on
CUDA the preferred backend that covers the call, or the one spec.backend / PALLAS_ATTN_BACKEND
names; Triton's kernels in Pallas interpret mode elsewhere (or everywhere with
PALLAS_ATTN_INTERPRET=1). With inputs sharded over batch or heads, each kernel call runs per shard
(pallas_attn/sharding.py).

Optional inputs (pallas_attn/operands.py's Operands inside; positional here, in this order, for the
torch bridge): alibi (b, H, 1) fp32 slopes; sink fp32 logits, (H, s_sink) for spec.sink == "sh" or
(b, H, sq, s_sink) for "ssh" ((H, total_q, s_sink) varlen; pallas_attn/sink.py has the public
layouts); seqlens (cu_seqlens_q, cu_seqlens_k) int32 for spec.varlen, where q is (total_q, H, d),
k/v (total_k, Hk, d) and lse (H, total_q), plus a third entry, the block table (b, max_blocks) int32,
for spec.page, where k/v are paged caches (num_blocks, page, Hk, d) (forward only: the backward
raises); seed int32 (1,) for spec.dropout_p > 0; bias (like q's
dtype) and keep, both (b, Hk, sq, sk), for spec.bias_mask (the bias gets a gradient, keep none).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_attn import sharding
from pallas_attn.backends import registry
from pallas_attn.operands import Grads, Operands
from pallas_attn.spec import AttentionSpec
from pallas_attn.tiles import KernelConfigs


def _roles(spec: AttentionSpec):
  """sharding.local's roles of (q, k, v), of the operands (an Operands of role strings; roles of
  absent operands are never read) and of (out, lse)."""
  if spec.varlen:
    kv = "..h." if spec.page else "sh."
    ops = Operands(seqlens=(".", "."), block_table="..", alibi=".h.",
                   sink={"sh": "h.", "ssh": "hs."}.get(spec.sink), seed=".")
    return ("sh.", kv, kv), ops, ("sh.", "hs")
  ops = Operands(alibi="bh.", sink={"sh": "h.", "ssh": "bhs."}.get(spec.sink), seed=".",
                 bias="bhss", keep="bhss")
  return ("bsh.", "bsh.", "bsh."), ops, ("bsh.", "bhs")


def _local(kernel, args, roles, out_roles, what, seed, sums=()):
  """kernel(*args) per batch / head shard (pallas_attn/sharding.py); args and roles are pytrees of
  one structure (absent operands None). Dropout's keep mask hashes global (batch, head)
  coordinates, which a shard does not know, so dropout stays unsharded."""
  leaves, tree = jax.tree.flatten(args, is_leaf=lambda x: x is None)
  return sharding.local(lambda *xs: kernel(*tree.unflatten(xs)), leaves, tree.flatten_up_to(roles),
                        out_roles, what=what, sums=sums,
                        no_shard_reason=None if seed is None else "dropout (dropout_p > 0)")


def _n_sink(ops: Operands) -> int:
  """Sink logits per head (the last axis in every sink layout), which a backend may bound."""
  return 0 if ops.sink is None else ops.sink.shape[-1]


def _run_forward(q, k, v, ops: Operands, spec, cfgs, into=None):
  ops.check(spec)

  def run(backend, interpret, q, k, v, ops, into):
    return tuple(backend.forward(q, k, v, ops, spec=spec, cfgs=cfgs, head_dim=q.shape[-1],
                                 interpret=interpret, into=into))

  kernel = lambda q, k, v, ops, into: registry.dispatch(  # noqa: E731
      "forward", spec, q, run, q, k, v, ops, into, n_sink=_n_sink(ops))
  if into is not None:  # the torch bridge's aliased buffers: one device
    return kernel(q, k, v, ops, into)
  qkv_roles, op_roles, out_roles = _roles(spec)
  return _local(lambda q, k, v, ops: kernel(q, k, v, ops, None), (q, k, v, ops),
                (*qkv_roles, op_roles), out_roles, "pallas_attn attention forward", ops.seed)


def _run_backward(q, k, v, ops: Operands, out, lse, dout, dlse, spec, cfgs, into=None) -> Grads:
  """into: optional Grads of buffers to write into (dbias's, if given, zero-filled)."""
  if spec.page:
    # As in flash-attn, paged keys are an inference path: there is no dK/dV into a page pool.
    raise NotImplementedError("block_table: paged keys/values are forward-only; gradients through "
                              "a paged attention call are not supported")
  ops.check(spec)
  if dlse is None:
    dlse = jnp.zeros(lse.shape, jnp.float32)
  dout, dlse = dout.astype(q.dtype), dlse.astype(jnp.float32)

  def run(backend, interpret, q, k, v, out, lse, dout, dlse, ops, into):
    return backend.backward(q, k, v, out, lse, dout, dlse, ops, spec=spec, cfgs=cfgs,
                            head_dim=q.shape[-1], interpret=interpret, into=into)

  kernel = lambda *a: registry.dispatch(  # noqa: E731
      "backward", spec, a[0], run, *a, n_sink=_n_sink(ops))
  if into is not None:
    return kernel(q, k, v, out, lse, dout, dlse, ops, into)
  (q_role, k_role, v_role), op_roles, (o_role, lse_role) = _roles(spec)
  # The gradients present, by name, and their roles: those of the operands they belong to.
  grad_roles = {"dq": q_role, "dk": k_role, "dv": v_role}
  if spec.sink:
    grad_roles["dsink"] = op_roles.sink
  elif spec.bias_mask:
    grad_roles["dbias"] = op_roles.bias
  names = list(grad_roles)
  # An "sh" sink is shared by every batch row: its gradient sums over the batch shards.
  sums = (names.index("dsink"),) if spec.sink == "sh" and not spec.varlen else ()

  def body(q, k, v, out, lse, dout, dlse, ops):
    grads = kernel(q, k, v, out, lse, dout, dlse, ops, None)
    return tuple(getattr(grads, n) for n in names)

  flat = _local(body, (q, k, v, out, lse, dout, dlse, ops),
                (q_role, k_role, v_role, o_role, lse_role, o_role, lse_role, op_roles),
                list(grad_roles.values()), "pallas_attn attention backward", ops.seed, sums)
  return Grads(**dict(zip(names, flat)))


@functools.partial(jax.jit, static_argnums=(4, 5))
def forward(q, k, v, alibi, spec: AttentionSpec, cfgs: KernelConfigs | None = None, sink=None,
            seqlens=None, seed=None, bias=None, keep=None):
  """q (b, sq, H, d), k/v (b, sk, Hk, d) -> out like q, lse (b, H, sq) fp32 (+inf on empty rows)."""
  return _run_forward(q, k, v, Operands.of(alibi, sink, seqlens, seed, bias, keep), spec, cfgs)


@functools.partial(jax.jit, static_argnums=(8, 9))
def backward(q, k, v, alibi, out, lse, dout, dlse, spec: AttentionSpec,
             cfgs: KernelConfigs | None = None, sink=None, seqlens=None, seed=None, bias=None,
             keep=None):
  """dq, dk, dv, then dsink with sinks or dbias with a dynamic mask (Grads.astuple), for the
  cotangents dout of out and dlse of lse (None = 0)."""
  ops = Operands.of(alibi, sink, seqlens, seed, bias, keep)
  return _run_backward(q, k, v, ops, out, lse, dout, dlse, spec, cfgs).astuple()


@functools.partial(jax.jit, static_argnums=(6, 7), donate_argnums=(4, 5))
def forward_into(q, k, v, alibi, out, lse, spec: AttentionSpec, cfgs: KernelConfigs | None = None,
                 sink=None, seqlens=None, seed=None, bias=None, keep=None):
  """forward() writing into the donated buffers out (like q) and lse fp32."""
  return _run_forward(q, k, v, Operands.of(alibi, sink, seqlens, seed, bias, keep), spec, cfgs,
                      into=(out, lse))


@functools.partial(jax.jit, static_argnums=(11, 12), donate_argnums=(8, 9, 10, 18))
def backward_into(q, k, v, alibi, out, lse, dout, dlse, dq, dk, dv, spec: AttentionSpec,
                  cfgs: KernelConfigs | None = None, sink=None, seqlens=None, seed=None,
                  bias=None, keep=None, dbias=None):
  """backward() writing dq, dk, dv (and dbias, a zero-filled buffer like bias, if given: the
  kernels write only the tiles the mask keeps) into the donated buffers."""
  ops = Operands.of(alibi, sink, seqlens, seed, bias, keep)
  return _run_backward(q, k, v, ops, out, lse, dout, dlse, spec, cfgs,
                       into=Grads(dq, dk, dv, dbias=dbias)).astuple()


@functools.partial(jax.jit, static_argnums=(8, 9))
def _backward(q, k, v, ops, out, lse, dout, dlse, spec, cfgs) -> Grads:
  return _run_backward(q, k, v, ops, out, lse, dout, dlse, spec, cfgs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def attention(q, k, v, alibi, spec: AttentionSpec, cfgs: KernelConfigs | None = None, sink=None,
              seqlens=None, seed=None, bias=None, keep=None):
  """Differentiable (out, lse); gradients flow to q, k, v, sink and bias (ALiBi slopes get none)."""
  return forward(q, k, v, alibi, spec, cfgs, sink, seqlens, seed, bias, keep)


def _attention_fwd(q, k, v, alibi, spec, cfgs, sink=None, seqlens=None, seed=None, bias=None,
                   keep=None):
  out, lse = forward(q, k, v, alibi, spec, cfgs, sink, seqlens, seed, bias, keep)
  return (out, lse), (q, k, v, Operands.of(alibi, sink, seqlens, seed, bias, keep), out, lse)


def _attention_bwd(spec, cfgs, res, cts):
  q, k, v, ops, out, lse = res
  dout, dlse = cts
  grads = _backward(q, k, v, ops, out, lse, dout, dlse, spec, cfgs)
  dalibi = None if ops.alibi is None else jnp.zeros_like(ops.alibi)
  # Cotangents of (q, k, v, alibi, sink, seqlens, seed, bias, keep).
  return grads.dq, grads.dk, grads.dv, dalibi, grads.dsink, None, None, grads.dbias, None


attention.defvjp(_attention_fwd, _attention_bwd)
