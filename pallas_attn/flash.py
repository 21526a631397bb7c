"""The differentiable core shared by every public attention function: (out, lse) = attention(q, k, v).

Public functions validate and reshape their arguments, build an AttentionSpec and call `attention`;
its custom VJP runs the Pallas backward. `forward` and `backward` are the same two jitted steps for
callers that drive autodiff themselves (the torch bridge). The kernel backend is chosen per lowering
platform: Triton on CUDA, Pallas interpret mode elsewhere (or everywhere with PALLAS_ATTN_INTERPRET=1).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from pallas_attn import _compat, tiles
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
  return tiles.resolve(_compat.next_power_of_2(max(q.shape[-1], 16)), spec.sq, spec.sk, cfgs)


@functools.partial(jax.jit, static_argnums=(4, 5))
def forward(q, k, v, alibi, spec: AttentionSpec, cfgs: tiles.KernelConfigs | None = None):
  """q (b, sq, H, d), k/v (b, sk, Hk, d), alibi (b, H, 1) fp32 or None -> out like q, lse (b, H, sq)."""
  kernel = functools.partial(triton_flash.forward, spec=spec, cfgs=_configs(q, spec, cfgs),
                             head_dim=q.shape[-1])
  return tuple(_dispatch(lambda q, k, v, alibi, interpret: kernel(q, k, v, alibi, interpret=interpret),
                         q, k, v, alibi))


@functools.partial(jax.jit, static_argnums=(8, 9))
def backward(q, k, v, alibi, out, lse, dout, dlse, spec: AttentionSpec,
             cfgs: tiles.KernelConfigs | None = None):
  """dq, dk, dv for the cotangents dout of out and dlse of lse (None means zero)."""
  if dlse is None:
    dlse = jnp.zeros(lse.shape, jnp.float32)
  kernel = functools.partial(triton_flash.backward, spec=spec, cfgs=_configs(q, spec, cfgs),
                             head_dim=q.shape[-1])
  return tuple(_dispatch(
      lambda q, k, v, out, lse, dout, dlse, alibi, interpret: kernel(
          q, k, v, out, lse, dout, dlse, alibi, interpret=interpret),
      q, k, v, out, lse, dout.astype(q.dtype), dlse.astype(jnp.float32), alibi))


@functools.partial(jax.jit, static_argnums=(6, 7), donate_argnums=(4, 5))
def forward_into(q, k, v, alibi, out, lse, spec: AttentionSpec, cfgs: tiles.KernelConfigs | None = None):
  """forward() writing into the donated buffers out (like q) and lse (b, H, sq) fp32."""
  kernel = functools.partial(triton_flash.forward, spec=spec, cfgs=_configs(q, spec, cfgs),
                             head_dim=q.shape[-1])
  return tuple(_dispatch(
      lambda q, k, v, alibi, out, lse, interpret: kernel(q, k, v, alibi, interpret=interpret,
                                                         into=(out, lse)),
      q, k, v, alibi, out, lse))


@functools.partial(jax.jit, static_argnums=(11, 12), donate_argnums=(8, 9, 10))
def backward_into(q, k, v, alibi, out, lse, dout, dlse, dq, dk, dv, spec: AttentionSpec,
                  cfgs: tiles.KernelConfigs | None = None):
  """backward() writing into the donated buffers dq, dk, dv (like q, k, v)."""
  if dlse is None:
    dlse = jnp.zeros(lse.shape, jnp.float32)
  kernel = functools.partial(triton_flash.backward, spec=spec, cfgs=_configs(q, spec, cfgs),
                             head_dim=q.shape[-1])
  return tuple(_dispatch(
      lambda q, k, v, out, lse, dout, dlse, alibi, dq, dk, dv, interpret: kernel(
          q, k, v, out, lse, dout, dlse, alibi, interpret=interpret, into=(dq, dk, dv)),
      q, k, v, out, lse, dout.astype(q.dtype), dlse.astype(jnp.float32), alibi, dq, dk, dv))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def attention(q, k, v, alibi, spec: AttentionSpec, cfgs: tiles.KernelConfigs | None = None):
  """Differentiable (out, lse); gradients flow to q, k, v (ALiBi slopes get none)."""
  return forward(q, k, v, alibi, spec, cfgs)


def _attention_fwd(q, k, v, alibi, spec, cfgs):
  out, lse = forward(q, k, v, alibi, spec, cfgs)
  return (out, lse), (q, k, v, alibi, out, lse)


def _attention_bwd(spec, cfgs, res, cts):
  q, k, v, alibi, out, lse = res
  dout, dlse = cts
  dq, dk, dv = backward(q, k, v, alibi, out, lse, dout, dlse, spec, cfgs)
  return dq, dk, dv, None if alibi is None else jnp.zeros_like(alibi)


attention.defvjp(_attention_fwd, _attention_bwd)
