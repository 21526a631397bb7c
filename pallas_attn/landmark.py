"""Landmark attention (epfml landmark-attention's `fused_landmark_attention`) on the JAX face.

`fused_landmark_attention` validates and calls `landmark_attention`, whose custom VJP runs the Pallas
backward. `forward`/`backward` (and their `_into` twins) are the jitted steps for callers that drive
autodiff themselves (the torch bridge). Math: SPEC section 3; kernels: backends/triton_landmark.py.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_attn import _compat, checks, sharding
from pallas_attn.backends import triton_landmark
from pallas_attn.backends.triton_landmark import LandmarkSpec
from pallas_attn.backends.registry import by_platform
from pallas_attn.tiles import KernelConfigs

BLOCK_SIZES = (16, 32, 64, 128)


def _kernel(fn, q, spec, cfgs):
  d = q.shape[-1]
  cfgs = triton_landmark.configs(spec, _compat.next_power_of_2(max(d, 16)), q.dtype.itemsize, cfgs)
  return functools.partial(fn, spec=spec, head_dim=d, cfgs=cfgs)


@functools.partial(jax.jit, static_argnums=(3, 4))
def forward(q, k, v, spec: LandmarkSpec, cfgs: KernelConfigs | None = None):
  """q (B, H, Lq, d), k/v (B, H, Lk, d) -> out like q, lse (B, H, Lq) fp32."""
  kernel = _kernel(triton_landmark.forward, q, spec, cfgs)
  return sharding.local(
      lambda q, k, v: tuple(by_platform(
          lambda q, k, v, interpret: kernel(q, k, v, interpret=interpret), q, k, v)),
      [q, k, v], ["bhs."] * 3, ["bhs.", "bhs"], what="fused_landmark_attention")


@functools.partial(jax.jit, static_argnums=(7, 8))
def backward(q, k, v, out, lse, dout, dlse, spec: LandmarkSpec, cfgs: KernelConfigs | None = None):
  """dq, dk, dv for the cotangents dout of out and dlse of lse (None means zero)."""
  if dout is None:
    dout = jnp.zeros(q.shape, q.dtype)
  if dlse is None:
    dlse = jnp.zeros(lse.shape, jnp.float32)
  kernel = _kernel(triton_landmark.backward, q, spec, cfgs)
  run = lambda *a: tuple(by_platform(  # noqa: E731
      lambda q, k, v, out, lse, dout, dlse, interpret: kernel(q, k, v, out, lse, dout, dlse,
                                                              interpret=interpret), *a))
  return sharding.local(run, [q, k, v, out, lse, dout.astype(q.dtype), dlse.astype(jnp.float32)],
                        ["bhs."] * 4 + ["bhs", "bhs.", "bhs"], ["bhs."] * 3,
                        what="fused_landmark_attention")


@functools.partial(jax.jit, static_argnums=(5, 6), donate_argnums=(3, 4))
def forward_into(q, k, v, out, lse, spec: LandmarkSpec, cfgs: KernelConfigs | None = None):
  """forward() writing into the donated buffers out (like q) and lse (B, H, Lq) fp32."""
  kernel = _kernel(triton_landmark.forward, q, spec, cfgs)
  return tuple(by_platform(
      lambda q, k, v, out, lse, interpret: kernel(q, k, v, interpret=interpret, into=(out, lse)),
      q, k, v, out, lse))


@functools.partial(jax.jit, static_argnums=(10, 11), donate_argnums=(7, 8, 9))
def backward_into(q, k, v, out, lse, dout, dlse, dq, dk, dv, spec: LandmarkSpec,
                  cfgs: KernelConfigs | None = None):
  """backward() writing into the donated buffers dq, dk, dv (like q, k, v)."""
  if dout is None:
    dout = jnp.zeros(q.shape, q.dtype)
  if dlse is None:
    dlse = jnp.zeros(lse.shape, jnp.float32)
  kernel = _kernel(triton_landmark.backward, q, spec, cfgs)
  return tuple(by_platform(
      lambda q, k, v, out, lse, dout, dlse, dq, dk, dv, interpret: kernel(
          q, k, v, out, lse, dout, dlse, interpret=interpret, into=(dq, dk, dv)),
      q, k, v, out, lse, dout.astype(q.dtype), dlse.astype(jnp.float32), dq, dk, dv))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def landmark_attention(q, k, v, spec: LandmarkSpec, cfgs: KernelConfigs | None = None):
  """Differentiable out (gradients to q, k, v); lse stays a residual."""
  return forward(q, k, v, spec, cfgs)[0]


def _landmark_fwd(q, k, v, spec, cfgs):
  out, lse = forward(q, k, v, spec, cfgs)
  return out, (q, k, v, out, lse)


def _landmark_bwd(spec, cfgs, res, dout):
  q, k, v, out, lse = res
  return backward(q, k, v, out, lse, dout, None, spec, cfgs)


landmark_attention.defvjp(_landmark_fwd, _landmark_bwd)


# ----------------------------------------------------------------------------------------------------
# Validation


def required_is_mem(seqlen_k: int, block_size: int) -> np.ndarray:
  """The only accepted is_mem: True at the last token of every block of block_size keys."""
  return np.arange(seqlen_k) % block_size == block_size - 1


def check_is_mem(is_mem, seqlen_k: int, block_size: int) -> None:
  """is_mem (..., seqlen_k) must equal required_is_mem in every leading index.

  A traced is_mem (inside jit) has no values yet: only its shape is checked then.
  """
  pattern = (f"is_mem[..., j] = (j % block_size == block_size - 1) for j in range(seqlen_k), i.e. True "
             f"exactly at the last token of every block of {block_size} keys (the landmark tokens), "
             f"broadcast over leading dims")
  shape = tuple(getattr(is_mem, "shape", np.shape(is_mem)))
  if len(shape) == 0 or shape[-1] != seqlen_k:
    raise ValueError(f"is_mem: expected shape (..., {seqlen_k}) (one entry per key position) with "
                     f"{pattern}; got shape {shape}")
  if isinstance(is_mem, jax.core.Tracer):
    return
  got = np.asarray(is_mem).astype(bool).reshape(-1, seqlen_k)
  bad = got != required_is_mem(seqlen_k, block_size)[None, :]
  if bad.any():
    row, j = (int(x[0]) for x in np.nonzero(bad))
    raise ValueError(f"is_mem: expected {pattern}; got is_mem[..., {j}] = {bool(got[row, j])} "
                     f"({int(bad.sum())} mismatching entries)")


def prepare(q, k, v, is_mem, sm_scale=None, block_size=64) -> LandmarkSpec:
  """Validates fused_landmark_attention's arguments; returns the kernel spec."""
  checks.require_array("q", q, 4, "(batch, nheads, seqlen_q, headdim)")
  checks.require_array("k", k, 4, "(batch, nheads, seqlen_k, headdim)")
  checks.require_array("v", v, 4, "(batch, nheads, seqlen_k, headdim)")
  checks.require_same_dtype(q=q, k=k, v=v)
  b, h, sq, d = q.shape
  if tuple(k.shape[:2]) != (b, h) or k.shape[3] != d:
    raise ValueError(f"k: expected shape ({b}, {h}, seqlen_k, {d}) to match q {tuple(q.shape)}, "
                     f"got {tuple(k.shape)}")
  if tuple(v.shape) != tuple(k.shape):
    raise ValueError(f"v: expected shape {tuple(k.shape)} (the shape of k), got {tuple(v.shape)}")
  if not 0 < d <= checks.MAX_HEAD_DIM:
    raise ValueError(f"q: expected head dim in [1, {checks.MAX_HEAD_DIM}], got {d}")
  if sq == 0:
    raise ValueError("q: expected a non-empty sequence, got seqlen_q=0")
  if (isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer))
      or block_size not in BLOCK_SIZES):
    raise ValueError(f"block_size: expected one of {BLOCK_SIZES} (a key tile is one landmark block), "
                     f"got {block_size!r}")
  block_size = int(block_size)
  sk = k.shape[2]
  n_hist = sk - sq
  if n_hist < 0 or n_hist % block_size:
    raise ValueError(f"k: expected seqlen_k = seqlen_q + n_hist with n_hist >= 0 a multiple of block_size="
                     f"{block_size} (whole history blocks), got seqlen_q={sq}, seqlen_k={sk}")
  if sm_scale is not None and (isinstance(sm_scale, bool)
                               or not isinstance(sm_scale, (int, float, np.integer, np.floating))):
    raise TypeError(f"sm_scale: expected a float or None, got {type(sm_scale).__name__}")
  check_is_mem(is_mem, sk, block_size)
  scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
  return LandmarkSpec(sq=sq, sk=sk, block_size=block_size, scale=scale)


def fused_landmark_attention(q, k, v, is_mem, sm_scale=None, block_size=64, *, tiles=None):
  """Landmark attention: grouped softmax over earlier blocks' landmarks and the own block's tokens.

  Key positions j with j % block_size == block_size - 1 are landmarks. Query m sits at position
  p = m + seqlen_k - seqlen_q in block c = p // block_size and attends to
    - each earlier block c' < c as a whole: its landmark logit competes in the outer softmax, and the
      weight it wins is spread over the block's ordinary tokens by their own softmax (landmark value
      vectors never contribute);
    - its own block's ordinary tokens j <= p (j < p when p is itself a landmark); the own block's
      landmark is never visible.
  The rule at block_size=4 (the kernels take 16 to 128), no history: query 6 (block 1) sees landmark 3
  (standing for tokens 0-2) and tokens 4-6; query 7, a landmark itself, sees landmark 3 and tokens 4-6.

  Arguments:
    q: (batch, nheads, seqlen_q, headdim); k, v: (batch, nheads, seqlen_k, headdim) with
      seqlen_k = seqlen_q + n_hist, n_hist a multiple of block_size (history blocks before the
      queries). float16, bfloat16 or float32; headdim <= 256. Any seqlen_q.
    is_mem: bool (..., seqlen_k), True exactly at the landmark positions (checked; ValueError otherwise;
      under jit only its shape can be checked).
    sm_scale: logit scale, default 1 / sqrt(headdim).
    block_size: 16, 32, 64 or 128.
    tiles: KernelConfigs overriding the query-tile configs (keyword-only, for experiments); block_k
      is always block_size.
  Returns:
    out (batch, nheads, seqlen_q, headdim), differentiable in q, k, v.
  """
  spec = prepare(q, k, v, is_mem, sm_scale, block_size)
  return landmark_attention(q, k, v, spec, tiles)
