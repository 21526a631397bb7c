"""The differentiable core shared by every public attention function: (out, lse) = attention(q, k, v).

Public functions validate and reshape their arguments, build an AttentionSpec and call `attention`;
its custom VJP runs the Pallas backward. `forward` and `backward` are the same two jitted steps for
callers that drive autodiff themselves (the torch bridge); the `_into` forms write into donated
buffers. The kernel backend is chosen per lowering platform: Triton on CUDA, Pallas interpret mode
elsewhere (or everywhere with PALLAS_ATTN_INTERPRET=1). With inputs sharded over batch or heads,
each kernel call runs per shard (pallas_attn/sharding.py).

Optional inputs: alibi (b, H, 1) fp32 slopes; sink fp32 logits, (H, s_sink) for spec.sink == "sh" or
(b, H, sq, s_sink) for "ssh" ((H, total_q, s_sink) varlen; pallas_attn/sink.py has the public
layouts); seqlens (cu_seqlens_q, cu_seqlens_k) int32 for spec.varlen, where q is (total_q, H, d),
k/v (total_k, Hk, d) and lse (H, total_q), plus a third entry, the block table (b, max_blocks) int32,
for spec.page, where k/v are paged caches (num_blocks, page, Hk, d) (forward only: the backward
raises); seed int32 (1,) for spec.dropout_p > 0; bias (like q's
dtype) and keep, both (b, Hk, sq, sk), for spec.bias_mask (the bias gets a gradient, keep none).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from pallas_attn import _compat, sharding, tiles
from pallas_attn.backends import triton_flash
from pallas_attn.spec import AttentionSpec


def _force_interpret() -> bool:
  return os.environ.get("PALLAS_ATTN_INTERPRET", "0") not in ("", "0")


def _dispatch(kernel, *args):
  if _force_interpret():
    return kernel(*args, interpret=True)
  return _compat.on_platforms(*args, gpu=functools.partial(kernel, interpret=False),
                              cpu=functools.partial(kernel, interpret=True))


def _configs(q, spec, cfgs):
  return tiles.resolve(_compat.next_power_of_2(max(q.shape[-1], 16)), spec.sq, spec.sk, cfgs,
                       q.dtype.itemsize)


def _roles(spec: AttentionSpec, opt):
  """sharding.local's roles of (q, k, v, alibi, sink, *seqlens, seed, bias, keep) and of (out, lse)."""
  seqlens = opt[1]
  if spec.varlen:
    kv = "..h." if spec.page else "sh."
    roles = ["sh.", kv, kv, ".h.", {"sh": "h.", "ssh": "hs."}.get(spec.sink)]
    roles += ["." * x.ndim for x in seqlens]
    return roles + [".", None, None], ("sh.", "hs")
  roles = ["bsh.", "bsh.", "bsh.", "bh.", {"sh": "h.", "ssh": "bhs."}.get(spec.sink)]
  return roles + [".", "bhss", "bhss"], ("bsh.", "bhs")


def _flat(q, k, v, alibi, opt):
  sink, seqlens, seed, bias, keep = opt
  return [q, k, v, alibi, sink, *(seqlens or ()), seed, bias, keep], len(seqlens or ())


def _unflat(args, n_seqlens):
  q, k, v, alibi, sink = args[:5]
  seqlens = tuple(args[5:5 + n_seqlens]) or None
  seed, bias, keep = args[5 + n_seqlens:]
  return q, k, v, alibi, (sink, seqlens, seed, bias, keep)


def _local(kernel, args, roles, out_roles, what, seed, sums=()):
  """The kernel per batch / head shard (pallas_attn/sharding.py); dropout's keep mask hashes global
  (batch, head) coordinates, which a shard does not know, so dropout stays unsharded."""
  return sharding.local(kernel, args, roles, out_roles, what=what, sums=sums,
                        no_shard_reason=None if seed is None else "dropout (dropout_p > 0)")


def _run_forward(q, k, v, alibi, opt, spec, cfgs, into=None):
  """opt: the optional operands (sink, seqlens, seed, bias, keep), None where absent."""
  kernel = functools.partial(triton_flash.forward, spec=spec, cfgs=_configs(q, spec, cfgs),
                             head_dim=q.shape[-1])
  run = lambda q, k, v, alibi, opt, into: tuple(_dispatch(  # noqa: E731
      lambda q, k, v, alibi, opt, into, interpret: kernel(
          q, k, v, alibi, *opt, interpret=interpret, into=into),
      q, k, v, alibi, opt, into))
  if into is not None:  # the torch bridge's aliased buffers: one device
    return run(q, k, v, alibi, opt, into)
  args, n_seqlens = _flat(q, k, v, alibi, opt)
  roles, out_roles = _roles(spec, opt)
  return _local(lambda *a: run(*_unflat(a, n_seqlens), None), args, roles, out_roles,
                "pallas_attn attention forward", opt[2])


def _run_backward(q, k, v, alibi, opt, out, lse, dout, dlse, spec, cfgs, into=None):
  if spec.page:
    # As in flash-attn, paged keys are an inference path: there is no dK/dV into a page pool.
    raise NotImplementedError("block_table: paged keys/values are forward-only; gradients through "
                              "a paged attention call are not supported")
  if dlse is None:
    dlse = jnp.zeros(lse.shape, jnp.float32)
  kernel = functools.partial(triton_flash.backward, spec=spec, cfgs=_configs(q, spec, cfgs),
                             head_dim=q.shape[-1])
  run = lambda q, k, v, out, lse, dout, dlse, alibi, opt, into: tuple(_dispatch(  # noqa: E731
      lambda q, k, v, out, lse, dout, dlse, alibi, opt, into, interpret: kernel(
          q, k, v, out, lse, dout, dlse, alibi, *opt, interpret=interpret, into=into),
      q, k, v, out, lse, dout, dlse, alibi, opt, into))
  dout, dlse = dout.astype(q.dtype), dlse.astype(jnp.float32)
  if into is not None:
    return run(q, k, v, out, lse, dout, dlse, alibi, opt, into)
  args, n_seqlens = _flat(q, k, v, alibi, opt)
  roles, (o_role, lse_role) = _roles(spec, opt)
  grad_roles = [roles[0], roles[1], roles[2]]
  sums = ()
  if spec.sink:
    grad_roles.append(roles[4])
    sums = (3,) if spec.sink == "sh" and not spec.varlen else ()
  elif spec.bias_mask:
    grad_roles.append(roles[-2])

  def body(out, lse, dout, dlse, *a):
    q, k, v, alibi, opt = _unflat(a, n_seqlens)
    return run(q, k, v, out, lse, dout, dlse, alibi, opt, None)

  return _local(body, [out, lse, dout, dlse] + args, [o_role, lse_role, o_role, lse_role] + roles,
                grad_roles, "pallas_attn attention backward", opt[2], sums)


@functools.partial(jax.jit, static_argnums=(4, 5))
def forward(q, k, v, alibi, spec: AttentionSpec, cfgs: tiles.KernelConfigs | None = None, sink=None,
            seqlens=None, seed=None, bias=None, keep=None):
  """q (b, sq, H, d), k/v (b, sk, Hk, d) -> out like q, lse (b, H, sq) fp32 (+inf on empty rows)."""
  return _run_forward(q, k, v, alibi, (sink, seqlens, seed, bias, keep), spec, cfgs)


@functools.partial(jax.jit, static_argnums=(8, 9))
def backward(q, k, v, alibi, out, lse, dout, dlse, spec: AttentionSpec,
             cfgs: tiles.KernelConfigs | None = None, sink=None, seqlens=None, seed=None, bias=None,
             keep=None):
  """dq, dk, dv, then dsink with sinks or dbias with a dynamic mask, for the cotangents dout of out
  and dlse of lse (None = 0)."""
  return _run_backward(q, k, v, alibi, (sink, seqlens, seed, bias, keep), out, lse, dout, dlse, spec,
                       cfgs)


@functools.partial(jax.jit, static_argnums=(6, 7), donate_argnums=(4, 5))
def forward_into(q, k, v, alibi, out, lse, spec: AttentionSpec, cfgs: tiles.KernelConfigs | None = None,
                 sink=None, seqlens=None, seed=None, bias=None, keep=None):
  """forward() writing into the donated buffers out (like q) and lse fp32."""
  return _run_forward(q, k, v, alibi, (sink, seqlens, seed, bias, keep), spec, cfgs,
                      into=(out, lse))


@functools.partial(jax.jit, static_argnums=(11, 12), donate_argnums=(8, 9, 10))
def backward_into(q, k, v, alibi, out, lse, dout, dlse, dq, dk, dv, spec: AttentionSpec,
                  cfgs: tiles.KernelConfigs | None = None, sink=None, seqlens=None, seed=None,
                  bias=None, keep=None):
  """backward() writing dq, dk, dv into the donated buffers (like q, k, v)."""
  return _run_backward(q, k, v, alibi, (sink, seqlens, seed, bias, keep), out, lse, dout, dlse, spec,
                       cfgs, into=(dq, dk, dv))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def attention(q, k, v, alibi, spec: AttentionSpec, cfgs: tiles.KernelConfigs | None = None, sink=None,
              seqlens=None, seed=None, bias=None, keep=None):
  """Differentiable (out, lse); gradients flow to q, k, v, sink and bias (ALiBi slopes get none)."""
  return forward(q, k, v, alibi, spec, cfgs, sink, seqlens, seed, bias, keep)


def _attention_fwd(q, k, v, alibi, spec, cfgs, sink=None, seqlens=None, seed=None, bias=None,
                   keep=None):
  out, lse = forward(q, k, v, alibi, spec, cfgs, sink, seqlens, seed, bias, keep)
  return (out, lse), (q, k, v, alibi, sink, seqlens, seed, bias, keep, out, lse)


def _attention_bwd(spec, cfgs, res, cts):
  q, k, v, alibi, sink, seqlens, seed, bias, keep, out, lse = res
  dout, dlse = cts
  grads = backward(q, k, v, alibi, out, lse, dout, dlse, spec, cfgs, sink, seqlens, seed, bias, keep)
  dalibi = None if alibi is None else jnp.zeros_like(alibi)
  dsink = None if sink is None else grads[3]
  dbias = None if bias is None else grads[3]
  return grads[0], grads[1], grads[2], dalibi, dsink, None, None, dbias, None


attention.defvjp(_attention_fwd, _attention_bwd)
