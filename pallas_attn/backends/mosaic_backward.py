"""The dense flash-attention backward as Pallas Mosaic GPU kernels (Hopper: TMA, wgmma).

Layouts and results are triton_flash.backward's for the calls `covers` accepts (mosaic_flash's
forward family, head dims 64 and 128): dq, dk, dv like q, k, v, and dsink (fp32, like the sinks).
Deterministic: no atomics; every gradient element is summed by one CTA in a fixed order.

- Preprocess (XLA, O(b H sq d)): delta = rowsum(dO * O) - dlse (an lse cotangent folds in, since
  d lse / d t = P) and lse in the log2 domain, side by side as `stats` (b, H, 2, rows) fp32, rows
  padded to whole tiles with lse = +inf and delta = 0, so that P is 0 on padded query rows.
- dQ: one CTA per (batch, head, 128-row query tile), the forward's warpgroups: a producer streams
  the key and value tiles of the band through a ring of `stages` slots; two consumers own 64 query
  rows each and per key tile compute S = Q K^T and dP = dO V^T (two wgmmas, one wait), the score
  pipeline, P = exp2(S - lse), dS = P (dP - delta), and dQ += dS K.
- dK/dV: one CTA per (batch, kv head, 128-key tile); consumers own 64 keys each. The producer
  streams, for each of the G query heads of the group and each query tile the band reaches, the
  Q and dO tiles and their `stats` rows. Per step the consumers compute S^T = K Q^T and
  dP^T = V dO^T, then dV += P^T dO and dK += dS^T Q (two wgmmas, one wait, each); or, with
  BwdConfig.split (the d=128 default), S^T alone, then dV += P^T dO beside dP^T, then dK: one
  more wait, but fewer fp32 tiles live at once. A GQA group's gradients are summed in registers.
- dsink (XLA, O(b H sq n_sink)): -sum over rows of exp(z - lse) * delta, with delta as the dQ
  pass sums it from its fp32 P and dP (rowsum(P dP), an extra output with sinks) minus dlse.

Both passes walk the CTA's whole band in each consumer (a tile outside a consumer's own band is a
skip step that only waits and arrives, so barrier phases stay in step), skip the element test on
tiles that are fully inside the band (BandMask.kv_tiles / q_tiles), and scale dQ and dK once at
the end. Rows past sq and keys past sk arrive as zeros (TMA's fill): their P is 0 (lse +inf) or
their gradient rows are never stored (TMA stores clip).

Head dim 256 stays on Triton: dK and dV of 64 keys at d=256 are 256 fp32 registers per thread.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_attn.backends import kernel_math as km
from pallas_attn.backends import mosaic_flash as mf
from pallas_attn.backends import mosaic_interpret
from pallas_attn.operands import Grads
from pallas_attn.spec import LOG2E, AttentionSpec

plgpu = mf.plgpu
_INF = float("inf")
_ROWS = mf._ROWS  # rows of a consumer's own tile (queries in dQ, keys in dK/dV)
_CONSUMERS = mf._CONSUMERS
_CTA_ROWS = _ROWS * _CONSUMERS
HEAD_DIMS = (64, 128)


@dataclasses.dataclass(frozen=True)
class BwdConfig:
  """The streamed axis's tile rows (keys in dQ, queries in dK/dV) and the ring's depth.

  split (dK/dV only): S^T alone first, then dV += P^T dO beside dP^T = V dO^T, then dK: three
  waits instead of two, but S^T and dP^T are never live together beside dK and dV. regs: each
  consumer thread's register budget; the producer gets what is left of the CTA's 3 x 168."""
  block: int
  stages: int
  split: bool = False
  regs: int = 232

  @property
  def producer_regs(self) -> int:
    # 384 threads launch with 168 registers each (65536 / 384, in steps of 8); setmaxnreg moves
    # them between warpgroups, so the producer keeps the rest (FA3 runs 240 / 240 / 24).
    return 3 * 168 - 2 * self.regs

  def smem_bytes(self, d: int, itemsize: int) -> int:
    own = 2 * _CTA_ROWS * d * itemsize  # q and dO (dQ), or k and v (dK/dV)
    ring = 2 * self.stages * self.block * d * itemsize
    stats = 2 * 4 * max(_CTA_ROWS, self.stages * self.block)
    return own + ring + stats


# Measured on the H200 (bf16 backward alone, bench/mosaic_backward_check.py --tune): at d=128 the
# tables within 2% of each other (64 or 128 streamed rows, 2 to 4 stages); at d=64, 128 streamed
# rows gain 7% in either pass. At d=128 a 128-row streamed tile in dK/dV would need S^T and dP^T
# (64 x 128 fp32 each) beside dK and dV in registers: more than 255. Streamed tiles must be
# multiples of 64 rows (wgmma's K group under the 128-byte swizzle: P^T dO contracts over them).
# ncu at (4, 16, 4096, 128) found the two-wait dK/dV pass spilling (2.7M local-memory requests);
# split lifts the whole backward from 407 to 422 TF/s there (348 -> 360 causal), and loses at d=64
# (368 -> 352); 240-register consumers gave 413-416.
DQ_CONFIGS = {64: BwdConfig(128, 2), 128: BwdConfig(64, 2)}
DKV_CONFIGS = {64: BwdConfig(128, 2), 128: BwdConfig(64, 2, split=True)}


def covers(spec: AttentionSpec, dtype, head_dim: int, *, has_alibi: bool, has_sink: bool,
           n_sink: int) -> str | None:
  """None when these kernels run the call's backward, else why not."""
  reason = mf.covers(spec, dtype, head_dim, has_alibi=has_alibi, has_sink=has_sink, n_sink=n_sink)
  if reason is None and head_dim not in HEAD_DIMS:
    reason = f"backward head dim {head_dim} (64 and 128 only)"
  return reason


# ------------------------------------------------------------------------------------------------
# Shared by both passes


def _stream(n_steps, sources, free, stages: int):
  """The producer: for step n in [0, n_steps), wait until the ring slot n % stages is free (from
  the second round on) and start the copies sources(n) -> [(gmem ref, smem ring, loaded)]."""
  @pl.loop(0, n_steps)
  def _load(n):
    slot = lax.rem(n, jnp.int32(stages))

    @pl.when(n >= stages)
    def _():
      plgpu.barrier_wait(free.at[slot])

    for src, ring, loaded in sources(n):
      plgpu.copy_gmem_to_smem(src, ring.at[slot], loaded.at[slot], **mf._ZERO_FILL)

  # Every thread observes every phase of the barriers it waits on (the interpreter checks it).
  @pl.loop(jnp.maximum(n_steps - stages, 0), n_steps)
  def _drain(n):
    plgpu.barrier_wait(free.at[lax.rem(n, jnp.int32(stages))])


def _load(ref, layout):
  """A shared-memory vector in a register layout. The layout_cast right after the read is the
  lowering's layout hint, so this is plgpu.load(ref, (), layout=layout), which jax 0.10.2's
  interpreter lacks."""
  return plgpu.layout_cast(ref[...], layout)


def _iota(shape, dim):
  return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _scores(spec: AttentionSpec, alibi_ref, batch, head, shape):
  slope = None
  if spec.alibi:
    slope = mf._splat(alibi_ref[batch, head, 0], shape, plgpu.Layout.WGMMA)
  return km.Scores(spec.scale, spec.softcap, spec.mask, slope)


def _alibi_splitter(spec: AttentionSpec, alibi_ref, batch, head, shape, *, query_rows: bool):
  """d0 -> the log2-domain ALiBi term of a tile whose distance i + off - j is d0 +- (r - c), in
  the forward's split form (mosaic_flash.alibi_split), where the band allows; else d0 -> None
  (logits_at computes it from index tiles). The head's slope is read once, outside the loop."""
  side = mf.alibi_side(spec.mask) if spec.alibi else None
  if side is None:
    return lambda d0: None
  slope2 = alibi_ref[batch, head, 0] * LOG2E
  return lambda d0: mf.alibi_split(slope2, d0, shape, side, query_rows=query_rows)


def _logit_grad(scores: km.Scores, p, dp, delta, th):
  """dS over the softmax scale (applied once to dQ and dK): P (dP - delta), times tanh's
  derivative with softcap."""
  ds = km.logit_grad(p, p, dp, delta)
  return ds * (1.0 - th * th) if scores.softcap > 0 else ds


def _two_products(shape_a, shape_b, issue):
  """Runs issue(acc_a, acc_b) (two wgmmas into fresh fp32 accumulators) and waits once."""
  def body(a_ref, b_ref):
    issue(a_ref, b_ref)
    return a_ref[...], b_ref[...]
  return pl.run_scoped(body, plgpu.ACC(shape_a, jnp.float32), plgpu.ACC(shape_b, jnp.float32))


def _accumulate(accs, issue):
  """accs (fp32 registers) += the wgmmas issue(*acc_refs) adds, with one wait."""
  def body(*refs):
    for ref, acc in zip(refs, accs):
      ref[...] = acc
    issue(*refs)
    return tuple(ref[...] for ref in refs)
  return pl.run_scoped(body, *(plgpu.ACC(a.shape, jnp.float32) for a in accs))


def _smem(shape, dtype):
  swizzle = 128
  transforms = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
                plgpu.SwizzleTransform(swizzle))
  return plgpu.SMEM(shape, dtype, transforms=transforms)


def _own_band(bounds, lo_cta, hi_cta, active):
  """A consumer's (lo, full_lo, full_hi, hi) inside the CTA's [lo_cta, hi_cta); all at hi_cta
  (every step a skip step) when it is not active."""
  return [jnp.where(active, jnp.clip(x, lo_cta, hi_cta), hi_cta) for x in bounds]


def _band_loops(bounds, skip, step, carry, mask, *, tail_masked: bool):
  """Walks [lo_cta, hi_cta): skip steps outside [lo, hi), masked steps on the band's edge tiles,
  full steps inside. bounds = (lo_cta, lo, full_lo, full_hi, hi, hi_cta)."""
  lo_cta, lo, full_lo, full_hi, hi, hi_cta = bounds
  masked = functools.partial(step, masked=True)
  full = functools.partial(step, masked=False)
  pl.loop(lo_cta, lo)(skip)
  carry = lax.fori_loop(lo, full_lo, masked, carry)
  carry = lax.fori_loop(full_lo, full_hi, full, carry)
  if tail_masked:
    carry = lax.fori_loop(full_hi, hi, masked, carry)
  pl.loop(hi, hi_cta)(skip)
  return carry


# ------------------------------------------------------------------------------------------------
# dQ


@dataclasses.dataclass(frozen=True)
class _DqScratch:
  q: object  # (2, 64, d): each consumer's queries, then its dQ
  do: object  # (2, 64, d)
  stats: object  # (2, 2, 64) fp32: lse (log2) and delta of each consumer's rows
  k: object  # (stages, bk, d)
  v: object
  q_loaded: object
  do_loaded: object
  stats_loaded: object
  k_loaded: object
  v_loaded: object
  free: object  # (stages,), one arrival from each consumer


def _dq_scratch(cfg: BwdConfig, d: int, dtype):
  return [
      _smem((_CONSUMERS, _ROWS, d), dtype),
      _smem((_CONSUMERS, _ROWS, d), dtype),
      plgpu.SMEM((_CONSUMERS, 2, _ROWS), jnp.float32),
      _smem((cfg.stages, cfg.block, d), dtype),
      _smem((cfg.stages, cfg.block, d), dtype),
      plgpu.Barrier(num_barriers=_CONSUMERS),
      plgpu.Barrier(num_barriers=_CONSUMERS),
      plgpu.Barrier(num_barriers=_CONSUMERS),
      plgpu.Barrier(num_barriers=cfg.stages),
      plgpu.Barrier(num_barriers=cfg.stages),
      plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=cfg.stages),
  ]


def _dq_kernel(*refs, spec: AttentionSpec, cfg: BwdConfig, group: int, n_q_tiles: int,
               reverse: bool, d: int, dtype):
  q_ref, k_ref, v_ref, do_ref, stats_ref = refs[:5]
  alibi_ref = refs[5] if spec.alibi else None
  pos = 6 if spec.alibi else 5
  dq_ref, pos = refs[pos], pos + 1
  pdp_ref = None
  if spec.sink:
    pdp_ref, pos = refs[pos], pos + 1
  sc = _DqScratch(*refs[pos:])
  mask = spec.mask
  bk, stages = cfg.block, cfg.stages
  wg = lax.axis_index("wg")
  head = lax.axis_index("heads")
  batch = lax.axis_index("batch")
  pid = lax.axis_index("tiles")
  q_tile = (n_q_tiles - 1 - pid) if reverse else pid
  lo_cta, _, _, hi_cta = mask.kv_tiles(q_tile, _CTA_ROWS, bk)
  hi_cta = jnp.maximum(hi_cta, lo_cta)

  @pl.when(wg < _CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(cfg.regs, action="increase")
    q0 = (q_tile * _CONSUMERS + wg) * _ROWS
    rows = (batch, pl.ds(q0, _ROWS), head)
    q_smem, do_smem = sc.q.at[wg], sc.do.at[wg]
    active = q0 < mask.sq  # else only skip steps (the second consumer of a short last tile)

    @pl.when(active)
    def _():
      plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, sc.q_loaded.at[wg], **mf._ZERO_FILL)
      plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, sc.do_loaded.at[wg], **mf._ZERO_FILL)
      plgpu.copy_gmem_to_smem(stats_ref.at[batch, head, :, pl.ds(q0, _ROWS)], sc.stats.at[wg],
                              sc.stats_loaded.at[wg])
      for barrier in (sc.q_loaded, sc.do_loaded, sc.stats_loaded):
        plgpu.barrier_wait(barrier.at[wg])

    own = _own_band(mask.kv_tiles(q_tile * _CONSUMERS + wg, _ROWS, bk), lo_cta, hi_cta, active)
    shape = (_ROWS, bk)
    scores = _scores(spec, alibi_ref, batch, head, shape)
    alibi_at = _alibi_splitter(spec, alibi_ref, batch, head, shape, query_rows=True)
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    lse2 = _load(sc.stats.at[wg, 0], row_layout)
    delta = _load(sc.stats.at[wg, 1], row_layout)

    def slot_of(i):
      return lax.rem(i - lo_cta, jnp.int32(stages))

    def skip(i):
      slot = slot_of(i)
      plgpu.barrier_wait(sc.k_loaded.at[slot])
      plgpu.barrier_wait(sc.v_loaded.at[slot])
      plgpu.barrier_arrive(sc.free.at[slot])

    def step(i, carry, *, masked: bool):
      acc, pdp = carry
      slot = slot_of(i)
      k_slot, v_slot = sc.k.at[slot], sc.v.at[slot]
      plgpu.barrier_wait(sc.k_loaded.at[slot])
      plgpu.barrier_wait(sc.v_loaded.at[slot])

      def issue(s_ref, dp_ref):
        plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_slot, (1, 0)))
        plgpu.wgmma(dp_ref, do_smem, plgpu.transpose_ref(v_slot, (1, 0)))

      s, dp = _two_products(shape, shape, issue)
      qi, kj = q0 + _iota(shape, 0), i * bk + _iota(shape, 1)
      t, th = scores.logits_at(s, qi, kj, alibi_at(q0 + mask.off - i * bk))
      if masked:
        t = jnp.where(mask.visible_at(qi, kj), t, -_INF)
      p = jnp.exp2(t - lax.broadcast_in_dim(lse2, shape, [0]))
      ds = _logit_grad(scores, p, dp, lax.broadcast_in_dim(delta, shape, [0]), th)
      if spec.sink:
        pdp = pdp + (p * dp).sum(axis=1)
      ds = ds.astype(dtype)
      (acc,) = _accumulate((acc,), lambda acc_ref: plgpu.wgmma(acc_ref, ds, k_slot))
      plgpu.barrier_arrive(sc.free.at[slot])
      return acc, pdp

    acc = plgpu.layout_cast(jnp.zeros((_ROWS, d), jnp.float32), plgpu.Layout.WGMMA)
    pdp = mf._splat(0.0, (_ROWS,), row_layout) if spec.sink else None  # rowsum(P dP) for dsink
    acc, pdp = _band_loops((lo_cta, *own, hi_cta), skip, step, (acc, pdp), mask,
                           tail_masked=not (mask.is_dense and mask.sk % bk == 0))

    @pl.when(active)
    def _():
      q_smem[...] = (acc * spec.scale).astype(dtype)  # this consumer's products have completed
      if spec.sink:
        sc.stats.at[wg, 1][...] = pdp  # delta was read into registers before the loop
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
      if spec.sink:
        plgpu.copy_smem_to_gmem(sc.stats.at[wg, 1], pdp_ref.at[batch, head, pl.ds(q0, _ROWS)])
      plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _CONSUMERS)
  def _producer():
    plgpu.set_max_registers(cfg.producer_regs, action="decrease")
    kv_head = lax.div(head, jnp.int32(group))

    def sources(n):
      keys = (batch, pl.ds((lo_cta + n) * bk, bk), kv_head)
      return [(k_ref.at[keys], sc.k, sc.k_loaded), (v_ref.at[keys], sc.v, sc.v_loaded)]

    _stream(hi_cta - lo_cta, sources, sc.free, stages)


# ------------------------------------------------------------------------------------------------
# dK / dV


@dataclasses.dataclass(frozen=True)
class _DkvScratch:
  k: object  # (2, 64, d): each consumer's keys, then its dK
  v: object  # (2, 64, d): values, then dV
  q: object  # (stages, bq, d)
  do: object
  stats: object  # (stages, 2, bq) fp32
  k_loaded: object
  v_loaded: object
  q_loaded: object
  do_loaded: object
  stats_loaded: object
  free: object


def _dkv_scratch(cfg: BwdConfig, d: int, dtype):
  return [
      _smem((_CONSUMERS, _ROWS, d), dtype),
      _smem((_CONSUMERS, _ROWS, d), dtype),
      _smem((cfg.stages, cfg.block, d), dtype),
      _smem((cfg.stages, cfg.block, d), dtype),
      plgpu.SMEM((cfg.stages, 2, cfg.block), jnp.float32),
      plgpu.Barrier(num_barriers=_CONSUMERS),
      plgpu.Barrier(num_barriers=_CONSUMERS),
      plgpu.Barrier(num_barriers=cfg.stages),
      plgpu.Barrier(num_barriers=cfg.stages),
      plgpu.Barrier(num_barriers=cfg.stages),
      plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=cfg.stages),
  ]


def _dkv_kernel(*refs, spec: AttentionSpec, cfg: BwdConfig, group: int, d: int, dtype):
  q_ref, k_ref, v_ref, do_ref, stats_ref = refs[:5]
  alibi_ref = refs[5] if spec.alibi else None
  pos = 6 if spec.alibi else 5
  dk_ref, dv_ref = refs[pos:pos + 2]
  sc = _DkvScratch(*refs[pos + 2:])
  mask = spec.mask
  bq, stages = cfg.block, cfg.stages
  wg = lax.axis_index("wg")
  kv_head = lax.axis_index("heads")
  batch = lax.axis_index("batch")
  k_tile = lax.axis_index("tiles")  # causal: the first key tiles see the most queries
  lo_cta, _, _, hi_cta = mask.q_tiles(k_tile, bq, _CTA_ROWS)
  hi_cta = jnp.maximum(hi_cta, lo_cta)
  per_head = hi_cta - lo_cta  # steps per query head of the group

  @pl.when(wg < _CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(cfg.regs, action="increase")
    k0 = (k_tile * _CONSUMERS + wg) * _ROWS
    rows = (batch, pl.ds(k0, _ROWS), kv_head)
    k_smem, v_smem = sc.k.at[wg], sc.v.at[wg]
    # A consumer whose keys all lie past sk (the second one of a short last tile) only keeps the
    # ring's barriers in step: every step is a skip step, and it loads and stores nothing.
    active = k0 < mask.sk

    @pl.when(active)
    def _():
      plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem, sc.k_loaded.at[wg], **mf._ZERO_FILL)
      plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem, sc.v_loaded.at[wg], **mf._ZERO_FILL)
      plgpu.barrier_wait(sc.k_loaded.at[wg])
      plgpu.barrier_wait(sc.v_loaded.at[wg])

    own = _own_band(mask.q_tiles(k_tile * _CONSUMERS + wg, bq, _ROWS), lo_cta, hi_cta, active)
    shape = (_ROWS, bq)  # keys by queries
    col_layout = plgpu.Layout.WGMMA.reduce(0)

    def head_steps(g, carry):
      head = kv_head * group + g
      scores = _scores(spec, alibi_ref, batch, head, shape)
      alibi_at = _alibi_splitter(spec, alibi_ref, batch, head, shape, query_rows=False)
      base = g * per_head - lo_cta  # step number of query tile i: base + i

      def slot_of(i):
        return lax.rem(base + i, jnp.int32(stages))

      def wait(slot):
        for barrier in (sc.q_loaded, sc.do_loaded, sc.stats_loaded):
          plgpu.barrier_wait(barrier.at[slot])

      def skip(i):
        slot = slot_of(i)
        wait(slot)
        plgpu.barrier_arrive(sc.free.at[slot])

      def step(i, carry, *, masked: bool):
        dk, dv = carry
        slot = slot_of(i)
        q_slot, do_slot = sc.q.at[slot], sc.do.at[slot]
        wait(slot)

        def issue(st_ref, dpt_ref):
          plgpu.wgmma(st_ref, k_smem, plgpu.transpose_ref(q_slot, (1, 0)))
          plgpu.wgmma(dpt_ref, v_smem, plgpu.transpose_ref(do_slot, (1, 0)))

        def probs(st):
          lse2 = _load(sc.stats.at[slot, 0], col_layout)
          kj, qi = k0 + _iota(shape, 0), i * bq + _iota(shape, 1)
          t, th = scores.logits_at(st, qi, kj, alibi_at(i * bq + mask.off - k0))
          if masked:
            t = jnp.where(mask.visible_at(qi, kj), t, -_INF)
          return jnp.exp2(t - lax.broadcast_in_dim(lse2, shape, [1])), th

        def logit_grad(pt, dpt, th):
          delta = _load(sc.stats.at[slot, 1], col_layout)
          return _logit_grad(scores, pt, dpt, lax.broadcast_in_dim(delta, shape, [1]), th)

        if cfg.split:
          def s_product(st_ref):
            plgpu.wgmma(st_ref, k_smem, plgpu.transpose_ref(q_slot, (1, 0)))
            return st_ref[...]

          pt, th = probs(pl.run_scoped(s_product, plgpu.ACC(shape, jnp.float32)))
          pt16 = pt.astype(dtype)

          def dv_and_dp(dv_ref, dpt_ref):
            dv_ref[...] = dv
            plgpu.wgmma(dv_ref, pt16, do_slot)
            plgpu.wgmma(dpt_ref, v_smem, plgpu.transpose_ref(do_slot, (1, 0)))
            return dv_ref[...], dpt_ref[...]

          dv, dpt = pl.run_scoped(dv_and_dp, plgpu.ACC(dv.shape, jnp.float32),
                                  plgpu.ACC(shape, jnp.float32))
          dst = logit_grad(pt, dpt, th).astype(dtype)
          (dk,) = _accumulate((dk,), lambda dk_ref: plgpu.wgmma(dk_ref, dst, q_slot))
        else:
          st, dpt = _two_products(shape, shape, issue)
          pt, th = probs(st)
          dst = logit_grad(pt, dpt, th)
          pt, dst = pt.astype(dtype), dst.astype(dtype)

          def grads(dk_ref, dv_ref):
            plgpu.wgmma(dv_ref, pt, do_slot)
            plgpu.wgmma(dk_ref, dst, q_slot)

          dk, dv = _accumulate((dk, dv), grads)
        plgpu.barrier_arrive(sc.free.at[slot])
        return dk, dv

      # Query tiles past sq are never full (their rows are padding): the tail is always masked
      # unless sq fills whole tiles and the band is dense.
      return _band_loops((lo_cta, *own, hi_cta), skip, step, carry, mask,
                         tail_masked=not (mask.is_dense and mask.sq % bq == 0))

    zeros = plgpu.layout_cast(jnp.zeros((_ROWS, d), jnp.float32), plgpu.Layout.WGMMA)
    dk, dv = lax.fori_loop(0, group, head_steps, (zeros, zeros))

    @pl.when(active)
    def _():
      k_smem[...] = (dk * spec.scale).astype(dtype)  # the last products have completed
      v_smem[...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[rows])
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[rows])
      plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _CONSUMERS)
  def _producer():
    plgpu.set_max_registers(cfg.producer_regs, action="decrease")

    def sources(n):
      g = lax.div(n, jnp.maximum(per_head, 1))
      i = lo_cta + n - g * per_head
      head = kv_head * group + g
      rows = (batch, pl.ds(i * bq, bq), head)
      return [(q_ref.at[rows], sc.q, sc.q_loaded), (do_ref.at[rows], sc.do, sc.do_loaded),
              (stats_ref.at[batch, head, :, pl.ds(i * bq, bq)], sc.stats, sc.stats_loaded)]

    _stream(group * per_head, sources, sc.free, stages)


# ------------------------------------------------------------------------------------------------
# Entry


def _stats(out, dout, lse, dlse, n_rows: int):
  """(b, H, 2, n_rows) fp32: lse in the log2 domain (+inf past sq) and delta (0 past sq)."""
  sq = out.shape[1]
  delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), dout.astype(jnp.float32))
  delta = delta - dlse.astype(jnp.float32)
  pad = [(0, 0), (0, 0), (0, n_rows - sq)]
  lse2 = jnp.pad(lse.astype(jnp.float32) * LOG2E, pad, constant_values=_INF)
  return jnp.stack([lse2, jnp.pad(delta, pad)], axis=2), delta


def _dsink(sink, lse, delta):
  """-sum over batch and rows of exp(z - lse) * delta, per head and sink logit (fp32)."""
  z = jnp.asarray(sink, jnp.float32)
  h = lse.shape[1]
  zz = z.reshape(h, -1)
  contrib = jnp.exp(zz[None, :, None, :] - lse[..., None]) * delta[..., None]
  return (-jnp.sum(contrib, axis=(0, 2))).reshape(z.shape)


def backward(q, k, v, out, lse, dout, dlse, ops, *, spec: AttentionSpec, cfgs, head_dim: int,
             interpret: bool, into: Grads | None = None, dq_config: BwdConfig | None = None,
             dkv_config: BwdConfig | None = None) -> Grads:
  """Grads (dq, dk, dv, and dsink with sinks) as triton_flash.backward for the calls `covers`
  accepts. cfgs and into are accepted for the common signature and unused (the gradients are new
  arrays); dq_config / dkv_config override the tile tables here."""
  del cfgs, into
  sink = ops.sink
  mf.check_call("mosaic_backward.backward", covers, q, k, spec, head_dim, alibi=ops.alibi,
                sink=sink, others=(ops.seqlens, ops.seed, ops.bias, ops.keep))
  b, sq, h, d = q.shape
  sk, hk = k.shape[1], k.shape[2]
  if dlse is None:
    dlse = jnp.zeros(lse.shape, jnp.float32)
  if sq == 0 or sk == 0 or b == 0:
    grads = Grads(jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v))
    if spec.sink:
      _, delta = _stats(out, dout, lse, dlse, sq)
      grads = dataclasses.replace(grads, dsink=_dsink(sink, lse, delta))
    return grads
  cfg_q = dq_config or DQ_CONFIGS[d]
  cfg_kv = dkv_config or DKV_CONFIGS[d]
  for cfg in (cfg_q, cfg_kv):
    if cfg.block % 16 or not 16 <= cfg.block <= 256 or cfg.stages < 1:
      raise ValueError(f"{cfg}: block must be a multiple of 16 in [16, 256], stages at least 1")
    if cfg.regs % 8 or cfg.regs > 256 or cfg.producer_regs < 24:
      raise ValueError(f"{cfg}: regs must be a multiple of 8, at most 256, leaving the producer "
                       f"at least 24 (it would get {cfg.producer_regs})")
    if cfg.smem_bytes(d, q.dtype.itemsize) > mf._SMEM_BYTES:
      raise ValueError(f"{cfg} needs {cfg.smem_bytes(d, q.dtype.itemsize)} bytes of shared memory")
  n_q = pl.cdiv(sq, _CTA_ROWS)
  n_k = pl.cdiv(sk, _CTA_ROWS)
  n_rows = max(n_q * _CTA_ROWS, pl.cdiv(sq, cfg_kv.block) * cfg_kv.block)
  stats, _ = _stats(out, dout, lse, dlse, n_rows)
  qp, kp, vp, dop = (mf._pad_rows(x) for x in (q, k, v, dout.astype(q.dtype)))
  args = [qp, kp, vp, dop, stats]
  if spec.alibi:
    args.append(jnp.asarray(ops.alibi, jnp.float32).reshape(b, h, 1))
  extra = {"interpret": mosaic_interpret.params()} if interpret else {}
  common = dict(grid_names=("batch", "heads", "tiles"), num_threads=_CONSUMERS + 1,
                thread_name="wg", compiler_params=mf._compiler_params(), **extra)
  dq_type = jax.ShapeDtypeStruct(qp.shape, q.dtype)
  if spec.sink:  # and rowsum(P dP) per query row, for dsink
    dq_type = (dq_type, jax.ShapeDtypeStruct((b, h, n_q * _CTA_ROWS), jnp.float32))
  dq = plgpu.kernel(
      functools.partial(_dq_kernel, spec=spec, cfg=cfg_q, group=h // hk, n_q_tiles=n_q,
                        reverse=mf._causal_like(spec.mask), d=d, dtype=q.dtype),
      out_type=dq_type,
      scratch_types=_dq_scratch(cfg_q, d, q.dtype),
      grid=(b, h, n_q),  # a head's query tiles side by side share its keys in L2
      kernel_name="pallas_attn_mosaic_bwd_dq",
      **common,
  )(*args)
  dk, dv = plgpu.kernel(
      functools.partial(_dkv_kernel, spec=spec, cfg=cfg_kv, group=h // hk, d=d, dtype=q.dtype),
      out_type=(jax.ShapeDtypeStruct(kp.shape, k.dtype), jax.ShapeDtypeStruct(vp.shape, v.dtype)),
      scratch_types=_dkv_scratch(cfg_kv, d, q.dtype),
      grid=(b, hk, n_k),
      kernel_name="pallas_attn_mosaic_bwd_dkv",
      **common,
  )(*args)
  if spec.sink:
    dq, pdp = dq
  grads = Grads(dq[:, :sq], dk[:, :sk], dv[:, :sk])
  if spec.sink:
    # delta from the kernel's fp32 P and dP rather than from the rounded output: dsink sums it
    # over every row, where O's rounding (not cancelled as in dS) would dominate its error.
    exact = pdp[..., :sq] - dlse.astype(jnp.float32)
    grads = dataclasses.replace(grads, dsink=_dsink(sink, lse, exact))
  return grads
