"""The dense flash-attention forward as a Pallas Mosaic GPU kernel (Hopper: TMA, wgmma).

Layouts and results are triton_flash.forward's for the subset `covers` accepts: q (b, sq, H, d),
k/v (b, sk, Hk, d) in bf16 or fp16 with d in {64, 128, 256}, out like q, lse (b, H, sq) fp32
(natural log, +inf on empty rows); band masks (causal, windows, any sq and sk), softcap, ALiBi and
"sh" sinks. ALiBi on a band that lies on one side of its diagonal (causal, for one) is added in
a split row + column form (alibi_split), which the backward passes share.

Schedule (FlashAttention-3's; jax's attention_mgpu example and tokamax's sm90 kernel run it too):
one CTA per (batch, head, 128-row query tile), three warpgroups.
- Warpgroup 2, the producer, gives up most of its registers and streams the key and value tiles
  the CTA needs with TMA into a ring of `stages` shared-memory slots; each slot has a "loaded"
  barrier (completed by the copy) and a "free" one (one arrival from each consumer).
- Warpgroups 0 and 1, the consumers, own 64 query rows each (one wgmma M tile), loaded once by
  TMA. Per key tile: S = Q K^T by wgmma from shared memory, the score pipeline and the online
  softmax in registers (exp2 domain), then O += P V by wgmma with P from registers.
- The consumers meet twice per key tile at a two-arrival barrier, one meeting apart, so that one's
  matrix products overlap the other's softmax (ping-pong).
- Both consumers walk every key tile the CTA loads, so barrier phases (tracked per thread) stay in
  step: a tile outside a consumer's own band is a skip step that only waits and arrives. Inside
  its band, tiles all of whose 64 x block_k pairs are visible skip the element test
  (BandMask.kv_tiles).
- The result is normalized in registers, staged in the consumer's Q slot and stored by TMA, which
  clips rows past sq; lse goes out the same way, into a copy padded to whole CTA tiles.

Rows past sq and keys past sk arrive as zeros (TMA's out-of-bounds fill); keys past sk always lie
in a masked tile, since full tiles end at floor(sk / block_k).

`interpret=True` runs the kernel on the CPU in jax's Mosaic GPU interpret mode (jax 0.10.2's
InterpretGPUParams), which backends/mosaic_interpret.py completes for this kernel: that interpreter has
no wgmma with A in registers or through transpose_ref, no accumulator stores, no CPU rule for
layout_cast, and drops a TMA store that is partly out of bounds instead of clipping it.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # jax 0.10.2 needs absl-py to import it
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError as _e:  # pragma: no cover
  plgpu = None
  _UNAVAILABLE = f"jax.experimental.pallas.mosaic_gpu does not import ({_e})"
else:
  _UNAVAILABLE = None

from pallas_attn.backends import mosaic_interpret
from pallas_attn.masking import BandMask
from pallas_attn.spec import LN2, LOG2E, AttentionSpec

_INF = float("inf")
_ROWS = 64  # query rows per consumer warpgroup: one wgmma M tile
_CONSUMERS = 2
_HEAD_DIMS = (64, 128, 256)
_DTYPES = ("bfloat16", "float16")
_MAX_SINKS = 16  # sink logits are read as unrolled scalars
# Mosaic GPU's TMA copies of a tiled (8-row) shared-memory tile need the array's row count to be a
# multiple of 8 (or below 8): q, k and v are padded to it when not (an XLA copy; out is sliced back).
_ROW_MULTIPLE = 8
_SMEM_BYTES = 227 * 1024


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """Key tile rows and the depth of the key/value ring."""
  block_k: int
  stages: int

  def smem_bytes(self, d: int, itemsize: int) -> int:
    q = _CONSUMERS * _ROWS * d * itemsize
    kv = 2 * self.stages * self.block_k * d * itemsize
    return q + kv + _CONSUMERS * _ROWS * 4


# tokamax's sm90 heuristic (64-row consumers, 128-row key tiles, two stages, 64-row key tiles
# where 128 does not fit), with a third stage at d=64 where it fits. Tried on the H200 and not
# kept: FA3's intra-warpgroup overlap on top of the ping-pong (S of tile i issued beside P V of
# tile i - 1, softmax under P V): 548 vs 575 TF/s at (4, 16, 4096, 128), 457 vs 519 causal.
CONFIGS = {64: MosaicConfig(128, 3), 128: MosaicConfig(128, 2), 256: MosaicConfig(64, 2)}

# Lowering semantics, passed explicitly: jax 0.10.2 defaults to Lane, jax >= 0.11 to Warpgroup
# (jax commit 32915de, 2026-07-16). Lane is the lowering this kernel is written and lowered for.
_SEMANTICS_ENV = "PALLAS_ATTN_MGPU_SEMANTICS"


def _semantics():
  name = os.environ.get(_SEMANTICS_ENV, "lane").strip().lower()
  table = {"lane": plgpu.LoweringSemantics.Lane, "warpgroup": plgpu.LoweringSemantics.Warpgroup}
  if name not in table:
    raise ValueError(f"{_SEMANTICS_ENV}: expected 'lane' or 'warpgroup', got {name!r}")
  return table[name]


# Rows past the end must read as zeros (V's above all: P is 0 there, but 0 * NaN is not). ZEROS is
# the default for TMA copies in jax 0.10.2 and 0.11; said explicitly where the enum exists.
_ZERO_FILL = ({"oob_mode": plgpu.OOBFillMode.ZEROS}
              if plgpu is not None and hasattr(plgpu, "OOBFillMode") else {})


def _compiler_params():
  return plgpu.CompilerParams(approx_math=True, lowering_semantics=_semantics())


def covers(spec: AttentionSpec, dtype, head_dim: int, *, has_alibi: bool, has_sink: bool,
           n_sink: int) -> str | None:
  """None when this backend runs the call, else why not (a short reason)."""
  if _UNAVAILABLE:
    return _UNAVAILABLE
  if spec.page:
    return "paged keys"
  if spec.varlen:
    return "varlen (packed sequences)"
  if spec.dropout_p > 0:
    return "dropout"
  if spec.bias_mask:
    return "bias_mask (dynamic mask)"
  if not isinstance(spec.mask, BandMask) or spec.mask.tabled:
    return "tabled mask"
  name = jnp.dtype(dtype).name
  if name not in _DTYPES:
    return f"dtype {name} (bf16 and fp16 only)"
  if head_dim not in _HEAD_DIMS:
    return f"head dim {head_dim} (64, 128 and 256 only)"
  if spec.sink not in (None, "sh") or (has_sink and spec.sink != "sh"):
    return f"sink layout {spec.sink!r} ('sh' only)"
  if has_sink and n_sink > _MAX_SINKS:
    return f"{n_sink} sink logits (at most {_MAX_SINKS})"
  if has_alibi != spec.alibi:
    return "ALiBi slopes and spec.alibi disagree"
  if not spec.scale > 0:
    return f"softmax scale {spec.scale} (must be > 0: the mask is applied before the scale)"
  return None


# ------------------------------------------------------------------------------------------------
# Kernel


def _kernel(*refs, spec: AttentionSpec, cfg: MosaicConfig, group: int, n_q_tiles: int,
            reverse: bool, n_sink: int, d: int, dtype):
  q_ref, k_ref, v_ref = refs[:3]
  pos = 3
  alibi_ref = sink_ref = None
  if spec.alibi:
    alibi_ref, pos = refs[pos], pos + 1
  if spec.sink:
    sink_ref, pos = refs[pos], pos + 1
  o_ref, lse_ref = refs[pos:pos + 2]
  scratch = _Scratch(*refs[pos + 2:])

  mask = spec.mask
  bk, stages = cfg.block_k, cfg.stages
  wg = lax.axis_index("wg")
  head = lax.axis_index("heads")
  batch = lax.axis_index("batch")
  pid = lax.axis_index("q_tiles")
  q_tile = (n_q_tiles - 1 - pid) if reverse else pid  # the heaviest causal tiles first
  lo_cta, _, _, hi_cta = mask.kv_tiles(q_tile, _CONSUMERS * _ROWS, bk)
  hi_cta = jnp.maximum(hi_cta, lo_cta)

  @pl.when(wg < _CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    _consume(q_ref, k_ref, v_ref, alibi_ref, sink_ref, o_ref, lse_ref, scratch, spec=spec, cfg=cfg,
             wg=wg, head=head, batch=batch, q_tile=q_tile, lo_cta=lo_cta, hi_cta=hi_cta,
             n_sink=n_sink, d=d, dtype=dtype)

  @pl.when(wg == _CONSUMERS)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")
    kv_head = lax.div(head, jnp.int32(group))

    @pl.loop(lo_cta, hi_cta)
    def _load(i):
      n = i - lo_cta
      slot = lax.rem(n, jnp.int32(stages))
      rows = (batch, pl.ds(i * bk, bk), kv_head)
      for src, dst, loaded, free in ((k_ref, scratch.k, scratch.k_loaded, scratch.k_free),
                                     (v_ref, scratch.v, scratch.v_loaded, scratch.v_free)):
        @pl.when(n >= stages)  # the slot's previous tile must have been used by both consumers
        def _():
          plgpu.barrier_wait(free.at[slot])
        plgpu.copy_gmem_to_smem(src.at[rows], dst.at[slot], loaded.at[slot], **_ZERO_FILL)

    # Observe the last uses of each slot too. Nothing is loaded after them, so the GPU would not
    # need it, but every thread must see every phase of a barrier it waits on for the interpreter
    # (whose barrier check otherwise fails), and the waits cost an idle warpgroup nothing.
    @pl.loop(jnp.maximum(lo_cta, hi_cta - stages), hi_cta)
    def _drain(i):
      slot = lax.rem(i - lo_cta, jnp.int32(stages))
      plgpu.barrier_wait(scratch.k_free.at[slot])
      plgpu.barrier_wait(scratch.v_free.at[slot])


@dataclasses.dataclass(frozen=True)
class _Scratch:
  q: object  # (2, 64, d): each consumer's queries, then its output
  k: object  # (stages, bk, d)
  v: object
  lse: object  # (2, 64) fp32
  q_loaded: object
  k_loaded: object
  v_loaded: object
  k_free: object
  v_free: object
  turn: object  # the consumers' meeting point (two arrivals)


def _scratch_types(cfg: MosaicConfig, d: int, dtype):
  swizzle = 128
  transforms = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
                plgpu.SwizzleTransform(swizzle))
  smem = lambda *shape: plgpu.SMEM(shape, dtype, transforms=transforms)  # noqa: E731
  return [
      smem(_CONSUMERS, _ROWS, d),
      smem(cfg.stages, cfg.block_k, d),
      smem(cfg.stages, cfg.block_k, d),
      plgpu.SMEM((_CONSUMERS, _ROWS), jnp.float32),
      plgpu.Barrier(num_barriers=_CONSUMERS),
      plgpu.Barrier(num_barriers=cfg.stages),
      plgpu.Barrier(num_barriers=cfg.stages),
      plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=cfg.stages),
      plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=cfg.stages),
      plgpu.Barrier(num_arrivals=_CONSUMERS),
  ]


def _consume(q_ref, k_ref, v_ref, alibi_ref, sink_ref, o_ref, lse_ref, sc: _Scratch, *, spec, cfg,
             wg, head, batch, q_tile, lo_cta, hi_cta, n_sink, d, dtype):
  mask = spec.mask
  bk, stages = cfg.block_k, cfg.stages
  wgmma_layout = plgpu.Layout.WGMMA
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  q0 = (q_tile * _CONSUMERS + wg) * _ROWS
  q_smem = sc.q.at[wg]
  plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q0, _ROWS), head], q_smem, sc.q_loaded.at[wg],
                          **_ZERO_FILL)

  # This consumer's own band, inside the CTA's range [lo_cta, hi_cta) that both consumers walk.
  lo, full_lo, full_hi, hi = (jnp.clip(x, lo_cta, hi_cta) for x in
                              mask.kv_tiles(q_tile * _CONSUMERS + wg, _ROWS, bk))

  def meet():
    plgpu.barrier_arrive(sc.turn)
    plgpu.barrier_wait(sc.turn)

  def slot_of(i):
    return lax.rem(i - lo_cta, jnp.int32(stages))

  def wait_next_k(i):
    @pl.when(i + 1 < hi_cta)
    def _():
      plgpu.barrier_wait(sc.k_loaded.at[slot_of(i + 1)])

  if spec.softcap > 0:
    c = spec.softcap * LOG2E  # log2-domain logit = c * tanh(raw * scale / softcap)
  else:
    c = spec.scale * LOG2E  # log2-domain logit = c * raw
  slope = slope_s = None
  side = alibi_side(mask) if spec.alibi else None  # not None: the split form (alibi_split)
  if spec.alibi:
    # ALiBi's -slope * |i + off - j| in units of the logit before the factor c.
    slope_s = alibi_ref[batch, head, 0] * (LOG2E / c)
    slope = _splat(slope_s, (_ROWS, bk), wgmma_layout)

  def iota(dim):
    return plgpu.broadcasted_iota(jnp.int32, (_ROWS, bk), dim, layout=wgmma_layout)

  def skip_step(i):
    # A key tile outside this consumer's band: keep the barrier phases and the meeting order of
    # a computing step without touching the data.
    slot = slot_of(i)
    plgpu.barrier_arrive(sc.k_free.at[slot])
    meet()
    plgpu.barrier_wait(sc.v_loaded.at[slot])
    plgpu.barrier_arrive(sc.v_free.at[slot])
    meet()
    wait_next_k(i)

  def step(i, carry, *, masked: bool):
    acc, m_i, l_i = carry
    slot = slot_of(i)

    def qk(s_ref):
      plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(sc.k.at[slot], (1, 0)))
      meet()  # while the product runs, the other consumer finishes its softmax
      return s_ref[...]

    s = pl.run_scoped(qk, plgpu.ACC((_ROWS, bk), jnp.float32))
    plgpu.barrier_arrive(sc.k_free.at[slot])
    if spec.softcap > 0:
      s = jnp.tanh(s * (spec.scale / spec.softcap))
    if (spec.alibi and side is None) or masked:
      rows = q0 + iota(0)
      cols = i * bk + iota(1)
    if side is not None:
      s = s - alibi_split(slope_s, q0 + mask.off - i * bk, s.shape, side, query_rows=True)
    elif spec.alibi:
      s = s - slope * jnp.abs(rows + mask.off - cols).astype(jnp.float32)
    if masked:
      s = jnp.where(mask.visible_at(rows, cols), s, -_INF)
    m_new = jnp.maximum(m_i, s.max(axis=1) * c)
    # A row that has seen nothing yet (only in masked tiles, without sinks) keeps m = -inf; shift
    # it by 0 so that exp2 never sees inf - inf.
    m_use = jnp.where(m_new == -_INF, 0.0, m_new) if masked and not spec.sink else m_new
    alpha = jnp.exp2(m_i - m_use)
    p = jnp.exp2(s * c - lax.broadcast_in_dim(m_use, s.shape, [0]))
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    l_i = l_i * alpha
    p16 = p.astype(dtype)
    # As in jax's example kernel: summing P before the meeting point, behind an optimization
    # barrier, schedules better for d <= 128 (measured there, not here).
    if d <= 128:
      l_i = l_i + p.sum(axis=1)
      acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
    plgpu.barrier_arrive(sc.turn)
    plgpu.barrier_wait(sc.v_loaded.at[slot])
    plgpu.barrier_wait(sc.turn)  # the tensor cores are ours until the other consumer's QK
    if d > 128:
      l_i = l_i + p.sum(axis=1)

    def pv(acc_ref):
      acc_ref[...] = acc
      plgpu.wgmma(acc_ref, p16, sc.v.at[slot])
      wait_next_k(i)  # overlaps the product
      return acc_ref[...]

    acc = pl.run_scoped(pv, plgpu.ACC((_ROWS, d), jnp.float32))
    plgpu.barrier_arrive(sc.v_free.at[slot])
    return acc, m_new, l_i

  m0 = jnp.full((_ROWS,), -_INF, jnp.float32)
  l0 = jnp.zeros((_ROWS,), jnp.float32)
  if spec.sink:
    m0, l0 = _sink_seed(sink_ref, head, n_sink)
  carry = (plgpu.layout_cast(jnp.zeros((_ROWS, d), jnp.float32), wgmma_layout),
           _splat(m0, (_ROWS,), row_layout), _splat(l0, (_ROWS,), row_layout))

  plgpu.barrier_wait(sc.q_loaded.at[wg])

  @pl.when(lo_cta < hi_cta)
  def _():
    plgpu.barrier_wait(sc.k_loaded.at[0])

  pl.when(wg == 1)(meet)  # consumer 1 runs one meeting behind consumer 0

  masked_step = functools.partial(step, masked=True)
  full_step = functools.partial(step, masked=False)
  if mask.left is not None:
    pl.loop(lo_cta, lo)(skip_step)
    carry = lax.fori_loop(lo, full_lo, masked_step, carry)
  carry = lax.fori_loop(full_lo, full_hi, full_step, carry)
  if not (mask.is_dense and mask.sk % bk == 0):
    carry = lax.fori_loop(full_hi, hi, masked_step, carry)
  if mask.right is not None:
    pl.loop(hi, hi_cta)(skip_step)

  pl.when(wg == 0)(meet)
  acc, m_i, l_i = carry

  empty = l_i == 0.0
  l_safe = jnp.where(empty, 1.0, l_i)
  out = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
  lse = jnp.where(empty, _INF, m_i * LN2 + jnp.log(l_safe))
  q_smem[...] = out.astype(dtype)  # this consumer's last QK product has completed
  sc.lse.at[wg][...] = lse
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem, o_ref.at[batch, pl.ds(q0, _ROWS), head])
  plgpu.copy_smem_to_gmem(sc.lse.at[wg], lse_ref.at[batch, head, pl.ds(q0, _ROWS)])
  plgpu.wait_smem_to_gmem(0)


def alibi_split(slope, d0, shape, side: int, *, query_rows: bool):
  """slope * |i + off - j| on a WGMMA-layout tile whose distance i + off - j is d0 + r - c (rows r
  are queries, columns c keys) or d0 - r + c (rows are keys), for a band whose visible pairs all
  lie on one side of the diagonal (side: the distance's sign there, from alibi_side). It is a row
  vector plus a column vector: an add per element where |i + off - j| from index tiles takes
  two iotas, integer add, subtract, abs and a conversion."""
  rows, cols = shape
  r_coef = side if query_rows else -side  # |distance| = side * d0 + r_coef * r - r_coef * c
  layout = plgpu.Layout.WGMMA
  r = plgpu.broadcasted_iota(jnp.int32, (rows,), 0, layout=layout.reduce(1))
  c = plgpu.broadcasted_iota(jnp.int32, (cols,), 0, layout=layout.reduce(0))
  row = _splat(slope, (rows,), layout.reduce(1)) * (side * d0 + r_coef * r).astype(jnp.float32)
  col = _splat(slope, (cols,), layout.reduce(0)) * (-r_coef * c).astype(jnp.float32)
  return lax.broadcast_in_dim(row, shape, [0]) + lax.broadcast_in_dim(col, shape, [1])


def alibi_side(mask: BandMask) -> int | None:
  """+1 when every visible key j of row i has j <= i + off (right bound <= 0: causal), -1 when
  every one has j >= i + off (left bound <= 0), else None (the band holds both sides)."""
  if mask.right is not None and mask.right <= 0:
    return 1
  if mask.left is not None and mask.left <= 0:
    return -1
  return None


def _splat(x, shape, layout):
  """A scalar (or an array of `shape`) as an array of `shape` in `layout`."""
  x = jnp.asarray(x, jnp.float32)
  if x.shape != tuple(shape):
    x = lax.broadcast_in_dim(x, shape, ())
  return plgpu.layout_cast(x, layout)


def _sink_seed(sink_ref, head, n_sink: int):
  """Running max and sum (log2 domain) that start from the head's sink logits, as if they were
  already-seen keys (triton_flash._sink_seed's rule): scalars."""
  z = [sink_ref[head, s] * LOG2E for s in range(n_sink)]
  m0 = functools.reduce(jnp.maximum, z)
  m0 = jnp.where(m0 == -_INF, 0.0, m0)  # all sinks at -inf: no mass, and m stays finite
  l0 = functools.reduce(lambda a, b: a + b, [jnp.exp2(x - m0) for x in z])
  return m0, l0


# ------------------------------------------------------------------------------------------------
# Entry


def _causal_like(mask: BandMask) -> bool:
  return mask.right is not None


def forward(q, k, v, alibi, sink=None, seqlens=None, seed=None, bias=None, keep=None, *,
            spec: AttentionSpec, cfgs, head_dim: int, interpret: bool, into=None,
            config: MosaicConfig | None = None):
  """out like q and lse (b, H, sq) fp32, as triton_flash.forward for the calls `covers` accepts.

  cfgs (the Triton tile table) is accepted for the common signature and unused; `config` overrides
  the tile table here. into: accepted for the common signature; the results are returned as new
  arrays (XLA may reuse donated buffers for them, but nothing forces it).
  """
  del cfgs, into
  check_call("mosaic_flash.forward", covers, q, k, spec, head_dim, alibi=alibi, sink=sink,
             others=(seqlens, seed, bias, keep))
  b, sq, h, d = q.shape
  sk, hk = k.shape[1], k.shape[2]
  n_sink = 0 if sink is None else sink.shape[-1]
  if sq == 0 or sk == 0 or b == 0:
    return _no_keys(q, sink, spec, b, h, sq)
  cfg = config or CONFIGS[d]
  if cfg.block_k % 16 or not 16 <= cfg.block_k <= 256 or cfg.stages < 1:
    raise ValueError(f"{cfg}: block_k must be a multiple of 16 in [16, 256] (a wgmma operand), "
                     "stages at least 1")
  if cfg.smem_bytes(d, q.dtype.itemsize) > _SMEM_BYTES:
    raise ValueError(f"{cfg} needs {cfg.smem_bytes(d, q.dtype.itemsize)} bytes of shared memory")
  q, k, v = (_pad_rows(x) for x in (q, k, v))
  n_q = pl.cdiv(sq, _CONSUMERS * _ROWS)
  args = [q, k, v]
  if spec.alibi:
    args.append(jnp.asarray(alibi, jnp.float32).reshape(b, h, 1))
  if spec.sink:
    args.append(jnp.asarray(sink, jnp.float32).reshape(h, n_sink))
  kernel = functools.partial(_kernel, spec=spec, cfg=cfg, group=h // hk, n_q_tiles=n_q,
                             reverse=_causal_like(spec.mask), n_sink=n_sink, d=d, dtype=q.dtype)
  out_type = (jax.ShapeDtypeStruct(q.shape, q.dtype),  # q's rows, maybe padded
              jax.ShapeDtypeStruct((b, h, n_q * _CONSUMERS * _ROWS), jnp.float32))
  extra = {}
  if interpret:
    extra["interpret"] = mosaic_interpret.params()
  out, lse = plgpu.kernel(
      kernel,
      out_type=out_type,
      scratch_types=_scratch_types(cfg, d, q.dtype),
      # The last axis varies fastest in launch order (Mosaic GPU maps it to blockIdx.x): a head's
      # query tiles run side by side and share its keys and values in L2 (also a GQA group's,
      # whose heads are neighbours).
      grid=(b, h, n_q),
      grid_names=("batch", "heads", "q_tiles"),
      num_threads=_CONSUMERS + 1,
      thread_name="wg",
      compiler_params=_compiler_params(),
      kernel_name="pallas_attn_mosaic_fwd",
      **extra,
  )(*args)
  return out[:, :sq], lse[..., :sq]


def _pad_rows(x):
  n = x.shape[1]
  if n < _ROW_MULTIPLE or n % _ROW_MULTIPLE == 0:
    return x
  return jnp.pad(x, [(0, 0), (0, -n % _ROW_MULTIPLE), (0, 0), (0, 0)])


def check_call(what: str, covers_fn, q, k, spec: AttentionSpec, head_dim: int, *, alibi, sink,
               others) -> None:
  """The checks both Mosaic entry points (forward, mosaic_backward.backward) make: covers_fn's
  answer (NotImplementedError), no varlen/dropout/dynamic-mask operand (`others`), unpadded heads,
  whole GQA groups, and arrays of the spec's lengths (ValueError)."""
  n_sink = 0 if sink is None else sink.shape[-1]
  reason = covers_fn(spec, q.dtype, head_dim, has_alibi=alibi is not None,
                     has_sink=sink is not None, n_sink=n_sink)
  if reason is None and any(x is not None for x in others):
    reason = "varlen, dropout or dynamic-mask operands given"
  if reason is not None:
    raise NotImplementedError(f"{what}: {reason}")
  _, sq, h, d = q.shape
  sk, hk = k.shape[1], k.shape[2]
  if d != head_dim:
    raise ValueError(f"head_dim: the Mosaic kernels take unpadded heads, got {head_dim} for {d}")
  if h % hk:
    raise ValueError(f"q heads ({h}) must be a multiple of k/v heads ({hk})")
  if (sq, sk) != (spec.sq, spec.sk):
    raise ValueError(f"spec is for (sq, sk) = {(spec.sq, spec.sk)}, arrays give {(sq, sk)}")


def _no_keys(q, sink, spec, b, h, sq):
  """sq, sk or b is 0: every row is empty (lse from the sinks alone, if any)."""
  out = jnp.zeros(q.shape, q.dtype)
  if spec.sink:
    z = jax.nn.logsumexp(jnp.asarray(sink, jnp.float32), axis=-1)  # (H,)
    lse = jnp.broadcast_to(z[None, :, None], (b, h, sq))
  else:
    lse = jnp.full((b, h, sq), _INF, jnp.float32)
  return out, lse
