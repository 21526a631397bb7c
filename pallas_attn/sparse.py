"""OpenAI sparse-transformer attention (all / local / strided) on the shared flash kernel family.

Every mode is a mask of the one kernel, so its cost follows the tiles it keeps:
- all: causal; local: the causal band of width L, walked through its analytic tile bounds.
- strided (j <= i, (i - j) % L == 0): each residue class mod L is causal attention on its own.
  Positions are regrouped so a class is contiguous, which is free: (b, n, H, d) viewed as
  (b, n / L, L * H, d) puts class r of head h at "head" r * H + h with stride L between its rows.
  The alternative, tile tables over the original order (`strided_impl="tables"`), visits every
  tile that holds a diagonal; with L = 128 and 64-wide tiles that is half the causal tiles for
  1/64 of their entries, which bench/sparse.py measures against the regrouping.
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_attn import checks
from pallas_attn.flash import attention
from pallas_attn.masking import BandMask, StridedCausalMask
from pallas_attn.spec import AttentionSpec
from pallas_attn.tiles import KernelConfigs, TileConfig, resolve

MODES = ("all", "local", "strided")


def _check(q, k, v, heads, attn_mode, local_attn_ctx, blocksize):
  for name, x in (("q", q), ("k", k), ("v", v)):
    checks.require_array(name, x, 3, "(n_batch, n_ctx, n_embd)")
  checks.require_same_dtype(q=q, k=k, v=v)
  if tuple(k.shape) != tuple(q.shape) or tuple(v.shape) != tuple(q.shape):
    raise ValueError(f"k/v: expected the shape of q {tuple(q.shape)}, got k {tuple(k.shape)}, "
                     f"v {tuple(v.shape)}")
  if not isinstance(heads, int) or heads <= 0:
    raise ValueError(f"heads: expected a positive int, got {heads!r}")
  if q.shape[2] % heads:
    raise ValueError(f"heads: n_embd ({q.shape[2]}) must be divisible by heads, got heads={heads}")
  if q.shape[2] // heads > checks.MAX_HEAD_DIM:
    raise ValueError(f"heads: head dim n_embd / heads must be <= {checks.MAX_HEAD_DIM}, "
                     f"got {q.shape[2] // heads}")
  if attn_mode not in MODES:
    raise ValueError(f"attn_mode: expected one of {MODES}, got {attn_mode!r}")
  if attn_mode != "all" and (not isinstance(local_attn_ctx, int) or local_attn_ctx <= 0):
    raise ValueError(f"local_attn_ctx: attn_mode={attn_mode!r} needs a positive int, "
                     f"got {local_attn_ctx!r}")
  if not isinstance(blocksize, int) or blocksize < 16 or blocksize & (blocksize - 1):
    raise ValueError(f"blocksize: expected a power of two >= 16, got {blocksize!r}")


def _tiles(blocksize: int, d: int, n: int) -> KernelConfigs:
  """blocksize is a hint: key tiles are at least that wide (up to 128) where the tuned tile is smaller."""
  base = resolve(max(16, 1 << (d - 1).bit_length()), n, n)

  def widen(cfg: TileConfig) -> TileConfig:
    return TileConfig(cfg.block_q, max(cfg.block_k, min(blocksize, 128)), cfg.num_warps, cfg.num_stages)

  return KernelConfigs(widen(base.fwd), widen(base.bwd_dq), widen(base.bwd_dkv))


def sparse_attention(q, k, v, heads, attn_mode, local_attn_ctx=None, blocksize=32, *,
                     strided_impl="regroup"):
  """q, k, v (n_batch, n_ctx, n_embd) -> (n_batch, n_ctx, n_embd), heads split contiguously.

  Arguments:
    heads: head h owns features [h * d, (h + 1) * d) with d = n_embd / heads; scale d ** -0.5.
    attn_mode: 'all' (j <= i), 'local' (i - L < j <= i) or 'strided' (j <= i, (i - j) % L == 0),
      with L = local_attn_ctx (required for local and strided).
    blocksize: power of two >= 16; a tile-size hint that does not change the result.
    strided_impl: 'regroup' (default) or 'tables'; see the module docstring.
  """
  _check(q, k, v, heads, attn_mode, local_attn_ctx, blocksize)
  b, n, e = q.shape
  d = e // heads
  split = lambda x: x.reshape(b, n, heads, d)
  qh, kh, vh = split(q), split(k), split(v)
  scale = d ** -0.5

  if attn_mode == "strided" and strided_impl == "regroup":
    stride = local_attn_ctx
    rows = -(-n // stride)
    pad = rows * stride - n

    def regroup(x):
      # Padding sits after every real position of its class, so causality hides it.
      x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x
      return x.reshape(b, rows, stride * heads, d)

    mask = BandMask(sq=rows, sk=rows, left=None, right=0)
    spec = AttentionSpec(mask=mask, scale=scale)
    out, _ = attention(regroup(qh), regroup(kh), regroup(vh), None, spec,
                       _tiles(blocksize, d, rows))
    return out.reshape(b, rows * stride, e)[:, :n]

  if attn_mode == "all":
    mask = BandMask(sq=n, sk=n, left=None, right=0)
  elif attn_mode == "local":
    mask = BandMask(sq=n, sk=n, left=local_attn_ctx - 1, right=0)
  elif strided_impl == "tables":
    mask = StridedCausalMask(sq=n, sk=n, stride=local_attn_ctx)
  else:
    raise ValueError(f"strided_impl: expected 'regroup' or 'tables', got {strided_impl!r}")
  out, _ = attention(qh, kh, vh, None, AttentionSpec(mask=mask, scale=scale), _tiles(blocksize, d, n))
  return out.reshape(b, n, e)
