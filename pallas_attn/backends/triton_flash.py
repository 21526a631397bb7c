"""The flash-attention kernel family as Triton-lowered Pallas calls (interpret mode off the GPU).

Layouts are flash-attn's. Batched: q (b, sq, H, d), k/v (b, sk, Hk, d), lse (b, H, sq). Varlen
(spec.varlen): q (total_q, H, d), k/v (total_k, Hk, d), lse (H, total_q), with int32 cu_seqlens_q/k
(b + 1,) giving each sequence's rows; with spec.page (forward only) k/v are paged caches
(num_blocks, page, Hk, d) and an int32 block table (b, max_blocks) says which page holds each run
of `page` keys of a sequence. Every kernel sees whole sequences through its refs and addresses
tiles by offset, so both layouts run the same code; the head dim is padded to a power of two on load
(masked, never materialized). Three kernels:

- forward: one program per (query tile, sequence, head); online softmax in the exp2 domain over the
  key tiles the mask lets it see, boundary tiles with the element test, interior tiles without it.
- dQ: one program per (query tile, sequence, head); also computes delta = rowsum(dO * O) - dlse for its
  rows and writes it, with lse in the log2 domain, for the dK/dV pass (no separate preprocess
  launch; per sequence, padded to whole tiles, in every layout), and dsink with sinks.
- dK/dV: one program per (key tile, sequence, kv head); loops over the G query heads of its group and
  the query tiles that can see it, so GQA gradients are summed in registers without atomics.

The variant options (AttentionSpec) are static: each kernel compiles only the score terms it uses.
The tile math itself (score modifiers, element test, online softmax, logit gradient, sink terms) is
backends/kernel_math.py's, shared with the decode and landmark kernels and other backends.
"""
from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_attn import _compat, dropout, masking, tiles
from pallas_attn.backends import kernel_math as km, registry
from pallas_attn.operands import Grads, Operands
from pallas_attn.spec import LOG2E, AttentionSpec
from pallas_attn.tiles import KernelConfigs, TileConfig

_INF = float("inf")


# fp32 operands: six bf16 tensor-core products of the operands' bf16 splits (hi + two error terms),
# accurate to fp32 rounding (the terms left out are ~2^-24 relative). Triton would otherwise use tf32;
# Precision.HIGHEST lowers to its "ieee" dot, an unrolled FMA loop without tensor cores: at d=64 the
# forward's PTX was 7.4x the bf16 kernel's (11576 lines), spilled 19.7 KB, and forward + backward
# took 14.7 s of Triton + ptxas against 1.8 s for bf16 (bench/regs.py, sm_90a, Triton 3.6, on a
# 2-core CPU); with this preset 4.2 s and at most 428 bytes of spills. The CPU (interpret mode)
# computes the same dot in plain fp32.
_FP32_DOT = lax.DotAlgorithmPreset.BF16_BF16_F32_X6


def _dot(a, b, *, trans_a=False, trans_b=False):
  precision = _FP32_DOT if a.dtype == jnp.float32 else None
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _tile_loops(bounds, body, carry):
  """Runs body over [lo, full_lo) masked, [full_lo, full_hi) unmasked, [full_hi, hi) masked."""
  lo, full_lo, full_hi, hi = bounds
  carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
  return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


def _table_loops(tables, tile, body, carry):
  """Runs body over the tile's listed partial tiles (masked), then its full ones (unmasked)."""
  partial_num, partial_idx, full_num, full_idx = tables
  carry = lax.fori_loop(0, partial_num[tile],
                        lambda n, c: body(partial_idx[tile, n], c, masked=True), carry)
  return lax.fori_loop(0, full_num[tile], lambda n, c: body(full_idx[tile, n], c, masked=False),
                       carry)


def _visit(mask, tables, tile, block_q, block_k, body, carry, *, transposed=False):
  """Walks the tiles of the other axis that `tile` can see: band bounds, or tile tables."""
  if tables is not None:
    return _table_loops(tables, tile, body, carry)
  bounds = (mask.q_tiles if transposed else mask.kv_tiles)(tile, block_q, block_k)
  return _tile_loops(bounds, body, carry)


def _and(*masks):
  """Conjunction of optional masks; None (everything in bounds) lets Triton emit unmasked loads."""
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  out = masks[0]
  for m in masks[1:]:
    out = out & m
  return out


def _head_mask(dp: int, head_dim: int):
  return None if dp == head_dim else (jnp.arange(dp) < head_dim)[None, :]


def _load(ref, mask, other):
  return _compat.load(ref) if mask is None else _compat.load(ref, mask=mask, other=other)


def _store(ref, value, mask):
  _compat.store(ref, value, mask=mask)


def _load_slope(alibi_ref, idx=None):
  if alibi_ref is None:
    return None
  vec = alibi_ref[...] if idx is None else alibi_ref[idx]
  return jnp.sum(vec)


def _split_refs(refs, spec: AttentionSpec, n_out: int, skip: tuple[str, ...] = ()):
  """(operands, tables, outputs): the kernel's optional input refs as an Operands (None where
  unused), then the four tile tables (None without), then its n_out output refs.

  The launchers pass the optional inputs in Operands' field order (_operand_inputs), skipping
  those a pass does not read (`skip`); aliased output buffers sit between the tables and the
  outputs and are never read."""
  pos, fields = 0, {}
  for field in dataclasses.fields(Operands):
    if field.name in skip or not Operands.enabled(field.name, spec):
      continue
    n = 2 if field.name == "seqlens" else 1
    fields[field.name] = tuple(refs[pos:pos + n]) if n > 1 else refs[pos]
    pos += n
  tables = tuple(refs[pos:pos + 4]) if spec.tabled else None
  return Operands(**fields), tables, tuple(refs[-n_out:])


def _operand_inputs(ops: Operands, blocks: dict, skip: tuple[str, ...] = ()):
  """(in_specs, args) of the present operands in Operands' field order (the order _split_refs
  reads them in), leaving out the fields in `skip`; blocks maps a field to the BlockSpec of one of
  its arrays (_Blocks.operands)."""
  in_specs, args = [], []
  for field in dataclasses.fields(ops):
    x = getattr(ops, field.name)
    if x is None or field.name in skip:
      continue
    for a in (x if isinstance(x, tuple) else (x,)):
      in_specs.append(blocks[field.name](a))
      args.append(a)
  return in_specs, args


class _Dropout:
  """The keep mask of one (batch, head) program; inactive when p == 0.

  Kept entries are never multiplied by 1 / (1 - p) inside a loop: the forward scales its output
  once, and the backward writes dS / scale = P * (keep * dP - delta * (1 - p)) (`delta` returns
  the shifted delta) and scales dQ, dK and dV once, before storing.
  """

  def __init__(self, spec: AttentionSpec, seed_ref, batch, head, nheads: int, asm: bool = False):
    self.p = spec.dropout_p
    self.asm = asm and _compat.inline_asm is not None
    self.state = None if seed_ref is None else dropout.stream(seed_ref[0], batch, head, nheads)
    self.scale = self.scale_of(spec)

  @staticmethod
  def scale_of(spec: AttentionSpec) -> float:
    return 1.0 / (1.0 - spec.dropout_p)

  def mask(self, row0, n_rows: int, col0, n_cols: int, transposed=False):
    """The draws (see dropout.kept) of rows row0 + [0, n_rows) and keys col0 + [0, n_cols) (None
    when inactive); drawn once per tile and shared by its uses."""
    if self.state is None:
      return None
    return dropout.draws(self.state, row0, n_rows, col0, n_cols, transposed)

  def apply(self, x, draws):
    """x with dropped entries zeroed (unscaled)."""
    if draws is None:
      return x
    if self.asm and x.dtype == jnp.float32:
      # Compare and select in one asm block: as a jnp select, LLVM would move the select below
      # the forward's bf16 conversion and then unpack, select and repack 16-bit halves (about
      # 2.3 instructions per element instead of 1).
      [out] = _compat.inline_asm(
          "{ .reg .pred k; setp.ge.u32 k, $2, %d; selp.f32 $0, $1, 0f00000000, k; }"
          % (dropout.threshold(self.p) << 16),
          args=[x, draws], constraints="=f,f,r", pack=1,
          result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])
      return out
    return jnp.where(dropout.kept(draws, self.p), x, 0.0)

  def delta(self, delta):
    return delta if self.p == 0 else delta * (1.0 - self.p)


class _BiasMask:
  """Tiles of the dynamic mask's bias (exp2 domain) and keep test for one (batch, kv head)."""

  def __init__(self, bias_ref, keep_ref):
    self.bias_ref, self.keep_ref = bias_ref, keep_ref

  def tile(self, r0, c0, row_ok, col_ok, masked: bool, transposed: bool = False):
    """(bias, keep) of rows r0 + [0, bq) and columns c0 + [0, bk), as [bq, bk] or transposed.

    keep is None on tiles the tables list as full: their mask slice is not even read.
    """
    at = (pl.ds(r0, row_ok.shape[0]), pl.ds(c0, col_ok.shape[0]))
    bounds = (row_ok[:, None] & col_ok[None, :]) if masked else None
    bias = _load(self.bias_ref.at[at], bounds, 0.0).astype(jnp.float32) * LOG2E
    keep = _load(self.keep_ref.at[at], bounds, 0) > 0 if masked else None  # any dtype: > 0 keeps
    if transposed:
      bias = bias.T
      keep = None if keep is None else keep.T
    return bias, keep


def _bias_mask(ops: Operands):
  return None if ops.bias is None else _BiasMask(ops.bias, ops.keep)


@dataclasses.dataclass(frozen=True)
class _Seq:
  """Where one sequence's rows live (q0, k0) and its mask with its own lengths."""
  q0: object
  k0: object
  mask: object


def _span(cu_ref, index, total: int):
  """Rows [start, start + length) of sequence `index`, clamped into [0, total]: offsets that are
  out of range or decreasing (traced, so unchecked) give a shorter or empty span, never rows
  outside the array."""
  start = jnp.clip(cu_ref[index], 0, total)
  return start, jnp.clip(cu_ref[index + 1], start, total) - start


def _sequence(spec: AttentionSpec, ops: Operands, index, total_q: int, total_k: int) -> _Seq:
  """Sequence `index`'s offsets and mask; total_q / total_k: the rows of q and of packed k/v.

  Every length is clamped so that no tile reads or writes outside its arrays, whatever cu_seqlens
  holds: offsets into [0, total], the query length to the grid's bound (spec.sq, the bucketed
  max_seqlen_q, which also sizes the dK/dV pass's per-sequence lse and delta), and paged key counts
  to the block table's capacity.
  """
  if ops.seqlens is None:
    return _Seq(0, 0, spec.mask)
  seqlens = ops.seqlens
  q0, sq = _span(seqlens[0], index, total_q)
  sq = jnp.minimum(sq, spec.sq)
  if spec.page:
    # Paged keys: cu_seqlens_k gives only lengths; a length past what the block table holds is
    # clamped to its capacity, so no tile looks up a page beyond the sequence's row of the table.
    k0 = seqlens[1][index]
    sk = jnp.clip(seqlens[1][index + 1] - k0, 0, ops.block_table.shape[1] * spec.page)
  else:
    k0, sk = _span(seqlens[1], index, total_k)
  return _Seq(q0, k0, dataclasses.replace(spec.mask, sq=sq, sk=sk))


def _key_rows(spec: AttentionSpec, seq: _Seq, ops: Operands, index, start, bk: int,
              n_pages: int = 0):
  """Where keys [start, start + bk) of sequence `index` live in k/v: rows of the packed layout, or
  rows of the one page that holds them (the tile never straddles a page); n_pages: k's num_blocks,
  which bounds a page index read from the (unchecked when traced) block table."""
  if not spec.page:
    return pl.ds(seq.k0 + start, bk), slice(None)
  page = jnp.clip(ops.block_table[index, lax.div(start, spec.page)], 0, n_pages - 1)
  return page, pl.ds(lax.rem(start, spec.page), bk), slice(None)


def _store_rows(spec: AttentionSpec, ops: Operands, index, start, size: int, at, ok, totals):
  """(at, ok): where a query tile's results go after its loop, and which of its rows exist.

  Varlen reads the sequence's offset and length from cu_seqlens again instead of reusing what the
  tile's loads used. Derived from values loaded from memory (not program ids), those per-row
  offsets and tests cannot be recomputed by ptxas, so it kept them through the loop; at 255
  registers the forward then spilled some 26 times per key tile inside its loop. A second load is
  not merged with the first, so no per-row value crosses the loop.
  """
  if not spec.varlen:
    return at, ok
  seq = _sequence(spec, ops, index, *totals)
  return pl.ds(seq.q0 + start, size), start + jnp.arange(size) < seq.mask.sq


def _when_active(active, run, idle=None):
  """Runs `run` only for programs whose tile lies inside their sequence (varlen grids are sized
  for the longest sequence); `idle` writes what an inactive program still owes (zeros)."""
  if isinstance(active, bool):
    run()
    return
  pl.when(active)(run)
  if idle is not None:
    pl.when(jnp.logical_not(active))(idle)


def _sink_logits2(sink_ref, rows_at, row_ok, n_sink: int, per_row: bool):
  """Sink logits in the exp2 domain: [s_pad] ("sh") or [bq, s_pad] ("ssh"), padding at -inf.

  The ref's last dim is already the padded block (s_pad); n_sink is the true count.
  """
  s_pad = sink_ref.shape[-1]
  col_ok = jnp.arange(s_pad) < n_sink
  if not per_row:
    return _compat.load(sink_ref.at[pl.ds(0, s_pad)], mask=col_ok, other=-_INF) * LOG2E
  return _compat.load(sink_ref.at[rows_at, pl.ds(0, s_pad)], mask=row_ok[:, None] & col_ok[None, :],
                      other=-_INF) * LOG2E


def _table_inputs(spec: AttentionSpec, cfg: TileConfig, transposed: bool = False, counts=None,
                  kv_head_of=None):
  """Tile tables as kernel inputs with whole-array blocks (indexed by tile inside the kernel).

  Dynamic tables (spec.bias_mask) are built from `counts` = (visible-element counts, grain_q,
  grain_k) (see masking.dynamic_counts) and blocked per (batch, kv head), the kv head of grid index
  hh being kv_head_of(hh).
  """
  if spec.bias_mask:
    arrays = list(masking.tables_from_counts(*counts, cfg.block_q, cfg.block_k, transposed))
    specs = [pl.BlockSpec((None, None, *a.shape[2:]),
                          lambda i, j, hh, n=a.ndim: (j, kv_head_of(hh)) + (0,) * (n - 2))
             for a in arrays]
    return specs, arrays
  if not spec.mask.tabled:
    return [], []
  arrays = [jnp.asarray(a) for a in
            masking.tile_tables(spec.mask, cfg.block_q, cfg.block_k, transposed).arrays()]
  return [_whole(a) for a in arrays], arrays


def _whole(a):
  return pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)


def _causal_like(mask) -> bool:
  """Whether later query tiles see more keys (then they are launched first)."""
  return mask.tabled or mask.right is not None


def _alias_into(in_specs, args, out_specs, into):
  """Appends the caller's output buffers as inputs aliased to the outputs (the kernel never reads them)."""
  if into is None:
    return in_specs, args, {}
  aliases = {len(args) + n: n for n in range(len(into))}
  return in_specs + list(out_specs), args + list(into), aliases


class _Blocks:
  """BlockSpecs that hand each program whole sequences of one (sequence, head), for either layout.

  Grid axes are (tile, sequence, head); `head` is a query head for the forward and dQ passes and a
  kv head for dK/dV, where `group` query heads come as one block.
  """

  def __init__(self, spec: AttentionSpec, dp: int, group: int):
    self.varlen, self.dp, self.group = spec.varlen, dp, group

  def pages(self, x, head_of):
    """A paged cache (num_blocks, page, Hk, d): every page of kv head head_of(hh)."""
    return pl.BlockSpec((x.shape[0], x.shape[1], None, self.dp),
                        lambda i, j, hh: (0, 0, head_of(hh), 0))

  def heads(self, x, head_of=lambda hh: hh, width=None):
    """q-, k- or v-shaped array: (seq rows, [width heads,] dp) for head head_of(hh)."""
    if self.varlen:
      return pl.BlockSpec((x.shape[0], width, self.dp), lambda i, j, hh: (0, head_of(hh), 0))
    return pl.BlockSpec((None, x.shape[1], width, self.dp), lambda i, j, hh: (j, 0, head_of(hh), 0))

  def rows(self, x, width=None):
    """lse-shaped array ((b, H, sq) or (H, total_q)): the rows of one head (or `width` heads)."""
    if self.varlen:
      return pl.BlockSpec((width, x.shape[-1]), lambda i, j, hh: (hh, 0))
    return pl.BlockSpec((None, width, x.shape[-1]), lambda i, j, hh: (j, hh, 0))

  def sink(self, spec: AttentionSpec, sink):
    """"sh": (H, s_sink); "ssh": (b, H, sq, s_sink) or varlen (H, total_q, s_sink)."""
    s_pad = _compat.next_power_of_2(sink.shape[-1])
    if spec.sink == "sh":
      return pl.BlockSpec((None, s_pad), lambda i, j, hh: (hh, 0))
    if self.varlen:
      return pl.BlockSpec((None, sink.shape[1], s_pad), lambda i, j, hh: (hh, 0, 0))
    return pl.BlockSpec((None, None, sink.shape[2], s_pad), lambda i, j, hh: (j, hh, 0, 0))

  def alibi(self, width=None):
    return pl.BlockSpec((None, width, 1), lambda i, j, hh: (j, hh, 0))

  def pairs(self, x, kv_head_of):
    """(b, Hk, sq, sk) dynamic-mask arrays: the whole (sq, sk) matrix of one (batch, kv head)."""
    return pl.BlockSpec((None, None, x.shape[2], x.shape[3]),
                        lambda i, j, hh: (j, kv_head_of(hh), 0, 0))

  def operands(self, spec: AttentionSpec, kv_head_of, alibi_width=None) -> dict:
    """BlockSpec makers by Operands field (for _operand_inputs): ALiBi slopes of alibi_width heads
    (None: one), bias and keep of kv head kv_head_of(hh)."""
    pairs = lambda a: self.pairs(a, kv_head_of)  # noqa: E731
    return {"seqlens": _whole, "block_table": _whole, "alibi": lambda a: self.alibi(alibi_width),
            "sink": lambda a: self.sink(spec, a), "seed": _whole, "bias": pairs, "keep": pairs}


def _resolve(q, spec: AttentionSpec, cfgs: KernelConfigs | None) -> KernelConfigs:
  """The tuned tiles for this problem, or the caller's override fitted to it."""
  return tiles.resolve(_compat.next_power_of_2(max(q.shape[-1], 16)), spec.sq, spec.sk, cfgs,
                       q.dtype.itemsize)


def _fit_device(cfgs: KernelConfigs, dp: int, q, bias, keep, interpret: bool) -> KernelConfigs:
  """cfgs shrunk to the GPU's shared memory per block (read from the device); interpret mode has
  no such limit and runs the tiles as given."""
  if interpret:
    return cfgs
  cfgs = cfgs.on_gpu or cfgs
  pair = 0 if bias is None else bias.dtype.itemsize + keep.dtype.itemsize
  return tiles.fit_configs(cfgs, dp, q.dtype.itemsize, pair, tiles.shared_memory_limit())


def _n_sequences(spec: AttentionSpec, q, ops: Operands) -> int:
  """The grid's sequence axis: the batch, or the number of packed sequences."""
  if spec.varlen:
    return ops.seqlens[0].shape[0] - 1
  return q.shape[0]


# ----------------------------------------------------------------------------------------------------
# Forward


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, spec: AttentionSpec, cfg: TileConfig, head_dim: int,
                n_q_tiles: int, reverse: bool, nheads: int, n_sink: int = 0, asm: bool = False):
  ops, tables, (o_ref, lse_ref) = _split_refs(refs, spec, 2)
  bq, bk = cfg.block_q, cfg.block_k
  dp = q_ref.shape[-1]
  # Program ids are read here, outside any loop or branch (interpret mode substitutes them only at
  # the kernel's top level).
  pid, batch, head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  totals = (q_ref.shape[0], k_ref.shape[0])  # varlen: rows of q and k (paged: k's pages)
  seq = _sequence(spec, ops, batch, *totals)
  mask = seq.mask
  # Causal tiles near the bottom do the most work; launching them first evens out the tail.
  q_tile = (n_q_tiles - 1 - pid) if reverse else pid

  def run():
    rows = q_tile * bq + jnp.arange(bq)
    rows_at = pl.ds(seq.q0 + q_tile * bq, bq)
    row_ok = rows < mask.sq
    head_ok = _head_mask(dp, head_dim)
    tile_mask = _and(row_ok[:, None], head_ok)
    q = _load(q_ref.at[rows_at, :], tile_mask, 0.0)
    scores = km.Scores(spec.scale, spec.softcap, mask, _load_slope(ops.alibi))
    drop = _Dropout(spec, ops.seed, batch, head, nheads, asm)
    dyn = _bias_mask(ops)

    def body(kv_tile, carry, masked):
      acc, m_i, l_i = carry
      start = kv_tile * bk
      cols = start + jnp.arange(bk)
      kv_mask = _and((cols < mask.sk)[:, None], head_ok) if masked else head_ok
      kv_at = _key_rows(spec, seq, ops, batch, start, bk, k_ref.shape[0])
      k = _load(k_ref.at[kv_at], kv_mask, 0.0)
      s, _ = scores.logits(_dot(q, k, trans_b=True), rows, cols)  # [bq, bk]
      keep = None
      if dyn is not None:
        bias, keep = dyn.tile(q_tile * bq, start, row_ok, cols < mask.sk, masked)
        s = s + bias
      if masked:
        s = jnp.where(km.visible(mask, rows, cols, keep), s, -_INF)
      m_new, alpha, p, l_i = km.softmax_step(m_i, l_i, s, masked)
      v = _load(v_ref.at[kv_at], kv_mask, 0.0)
      # lse and the normalizer count every probability; only P @ V sees the dropped ones
      # (their 1 / (1 - p) scale is applied once, at the end).
      p = drop.apply(p, drop.mask(q_tile * bq, bq, start, bk))
      acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
      return acc, m_new, l_i

    if ops.sink is None:
      m0, l0 = jnp.full((bq,), -_INF, jnp.float32), jnp.zeros((bq,), jnp.float32)
    else:
      m0, l0 = km.sink_seed(_sink_logits2(ops.sink, rows_at, row_ok, n_sink, spec.sink == "ssh"), bq)
    carry = (jnp.zeros((bq, dp), jnp.float32), m0, l0)
    acc, m_i, l_i = _visit(mask, tables, q_tile, bq, bk, body, carry)

    out, lse = km.finish(acc, m_i, l_i, drop.scale)
    rows_out, ok_out = _store_rows(spec, ops, batch, q_tile * bq, bq, rows_at, row_ok,
                                   totals)
    _store(o_ref.at[rows_out, :], out.astype(o_ref.dtype), _and(ok_out[:, None], head_ok))
    _store(lse_ref.at[rows_out], lse, ok_out)

  _when_active(True if not spec.varlen else q_tile * bq < mask.sq, run)


def forward(q, k, v, ops: Operands, *, spec: AttentionSpec, cfgs: KernelConfigs | None,
            head_dim: int, interpret: bool, into=None):
  """out like q and lse fp32 (natural log; +inf on empty rows), batched or varlen layout.

  ops: the optional operands (pallas_attn/operands.py; layouts in pallas_attn/flash.py). cfgs: a
  tile override (None: the tuned table, pallas_attn/tiles.py). into: optional (out, lse) buffers
  the results are written into (aliased, so a caller that donates them gets its own memory back).
  """
  d = q.shape[-1]
  dp = _compat.next_power_of_2(max(d, 16))
  h, hk = q.shape[-2], k.shape[-2]
  group = h // hk
  cfg = _fit_device(_resolve(q, spec, cfgs), dp, q, ops.bias, ops.keep, interpret).fwd
  if spec.page:
    cfg = dataclasses.replace(cfg, block_k=min(cfg.block_k, spec.page & -spec.page))
  n_q = pl.cdiv(spec.sq, cfg.block_q)
  reverse = _causal_like(spec.mask)
  blocks = _Blocks(spec, dp, group)
  lse_shape = (h, q.shape[0]) if spec.varlen else (q.shape[0], h, q.shape[1])
  kernel = functools.partial(_fwd_kernel, spec=spec, cfg=cfg, head_dim=head_dim, n_q_tiles=n_q,
                             reverse=reverse, nheads=h,
                             n_sink=0 if ops.sink is None else ops.sink.shape[-1],
                             asm=not interpret)
  kv_blocks = blocks.pages if spec.page else blocks.heads
  kv_of_head = lambda hh: hh // group
  op_specs, op_args = _operand_inputs(ops, blocks.operands(spec, kv_of_head))
  in_specs = [blocks.heads(q), kv_blocks(k, kv_of_head), kv_blocks(v, kv_of_head)] + op_specs
  args = [q, k, v] + op_args
  counts = None
  if spec.bias_mask:
    counts = (masking.dynamic_counts(ops.keep, spec.mask, cfg.block_q, cfg.block_k),
              cfg.block_q, cfg.block_k)
  table_specs, tables = _table_inputs(spec, cfg, counts=counts, kv_head_of=kv_of_head)
  in_specs, args = in_specs + table_specs, args + tables
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(lse_shape, jnp.float32)]
  out_specs = [blocks.heads(q), blocks.rows(out_shape[1])]
  in_specs, args, aliases = _alias_into(in_specs, args, out_specs, into)
  return pl.pallas_call(
      kernel,
      grid=(n_q, _n_sequences(spec, q, ops), h),
      in_specs=in_specs,
      out_specs=out_specs,
      input_output_aliases=aliases,
      out_shape=out_shape,
      compiler_params=_compat.triton_params(cfg.num_warps, cfg.num_stages),
      interpret=interpret,
      name="pallas_attn_fwd",
  )(*args)


# ----------------------------------------------------------------------------------------------------
# Backward


def _dq_kernel(q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, dlse_ref, *refs, spec: AttentionSpec,
               cfg: TileConfig, head_dim: int, n_q_tiles: int, reverse: bool, nheads: int,
               n_sink: int = 0, asm: bool = False):
  ops, tables, outs = _split_refs(refs, spec, 4 if spec.sink else 3)
  dq_ref, delta_ref, lse2_ref = outs[:3]
  dsink_ref = outs[3] if spec.sink else None
  bq, bk = cfg.block_q, cfg.block_k
  dp = q_ref.shape[-1]
  pid, batch, head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  totals = (q_ref.shape[0], k_ref.shape[0])  # varlen: rows of q and k (paged: k's pages)
  seq = _sequence(spec, ops, batch, *totals)
  mask = seq.mask
  q_tile = (n_q_tiles - 1 - pid) if reverse else pid
  per_row_sink = spec.sink == "ssh"

  def run():
    rows = q_tile * bq + jnp.arange(bq)
    rows_at = pl.ds(seq.q0 + q_tile * bq, bq)
    row_ok = rows < mask.sq
    head_ok = _head_mask(dp, head_dim)
    tile_mask = _and(row_ok[:, None], head_ok)
    q = _load(q_ref.at[rows_at, :], tile_mask, 0.0)
    do = _load(do_ref.at[rows_at, :], tile_mask, 0.0)
    o = _load(o_ref.at[rows_at, :], tile_mask, 0.0)
    # d lse / d t = P, so an incoming lse cotangent folds into delta.
    delta = km.o_dot_do(o, do) - _compat.load(dlse_ref.at[rows_at], mask=row_ok, other=0.0)
    lse2 = _compat.load(lse_ref.at[rows_at], mask=row_ok, other=_INF) * LOG2E
    scores = km.Scores(spec.scale, spec.softcap, mask, _load_slope(ops.alibi))
    drop = _Dropout(spec, ops.seed, batch, head, nheads, asm)
    delta_d = drop.delta(delta)
    dyn = _bias_mask(ops)

    def body(kv_tile, dq, masked):
      start = kv_tile * bk
      cols = start + jnp.arange(bk)
      kv_mask = _and((cols < mask.sk)[:, None], head_ok) if masked else head_ok
      k = _load(k_ref.at[pl.ds(seq.k0 + start, bk), :], kv_mask, 0.0)
      v = _load(v_ref.at[pl.ds(seq.k0 + start, bk), :], kv_mask, 0.0)
      s, th = scores.logits(_dot(q, k, trans_b=True), rows, cols)
      keep = None
      if dyn is not None:
        bias, keep = dyn.tile(q_tile * bq, start, row_ok, cols < mask.sk, masked)
        s = s + bias
      p = jnp.exp2(s - lse2[:, None])
      if masked:
        p = jnp.where(km.visible(mask, rows, cols, keep), p, 0.0)
      dpv = drop.apply(_dot(do, v, trans_b=True), drop.mask(q_tile * bq, bq, start, bk))
      ds = scores.raw_grad(km.logit_grad(p, p, dpv, delta_d[:, None]), th)
      return dq + _dot(ds.astype(k.dtype), k)

    dq = _visit(mask, tables, q_tile, bq, bk, body, jnp.zeros((bq, dp), jnp.float32))
    rows_out, ok_out = _store_rows(spec, ops, batch, q_tile * bq, bq, rows_at, row_ok,
                                   totals)
    _store(dq_ref.at[rows_out, :], (dq * drop.scale).astype(dq_ref.dtype),
           _and(ok_out[:, None], head_ok))
    # The dK/dV pass's inputs, per sequence at tile-aligned offsets (see backward()); rows past the
    # sequence are never read unmasked, so the stores need no row test.
    _store(delta_ref.at[pl.ds(q_tile * bq, bq)], delta_d, None)  # shifted for dropout
    _store(lse2_ref.at[pl.ds(q_tile * bq, bq)], lse2, None)
    if ops.sink is not None:
      z2 = _sink_logits2(ops.sink, rows_at, row_ok, n_sink, per_row_sink)
      z2 = z2 if per_row_sink else z2[None, :]
      contrib = km.sink_grad(z2, lse2, delta)  # [bq, s_pad]
      col_ok = jnp.arange(z2.shape[-1]) < n_sink
      if per_row_sink:
        _compat.store(dsink_ref.at[rows_at, pl.ds(0, z2.shape[-1])], contrib,
                      mask=row_ok[:, None] & col_ok[None, :])
      else:
        _compat.store(dsink_ref.at[pl.ds(0, z2.shape[-1])], jnp.sum(contrib, axis=0), mask=col_ok)

  def idle():
    # A skipped program still owns its slot of the per-tile dsink partial sums.
    if ops.sink is not None and not per_row_sink:
      s_pad = dsink_ref.shape[-1]
      _compat.store(dsink_ref.at[pl.ds(0, s_pad)], jnp.zeros((s_pad,), jnp.float32),
                    mask=jnp.arange(s_pad) < n_sink)

  _when_active(True if not spec.varlen else q_tile * bq < mask.sq, run, idle)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, *refs, spec: AttentionSpec,
                cfg: TileConfig, head_dim: int, group: int, nheads: int, asm: bool = False):
  # The sink gradient comes from the dQ pass; the dynamic mask's bias gradient from this one.
  ops, tables, outs = _split_refs(refs, spec, 3 if spec.bias_mask else 2, skip=("sink",))
  dk_ref, dv_ref = outs[:2]
  bq, bk = cfg.block_q, cfg.block_k
  dp = k_ref.shape[-1]
  kv_tile, batch, kv_head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  seq = _sequence(spec, ops, batch, q_ref.shape[0], k_ref.shape[0])
  mask = seq.mask
  drop_scale = _Dropout.scale_of(spec)

  def run():
    cols = kv_tile * bk + jnp.arange(bk)
    cols_at = pl.ds(seq.k0 + kv_tile * bk, bk)
    col_ok = cols < mask.sk
    head_ok = _head_mask(dp, head_dim)
    tile_mask = _and(col_ok[:, None], head_ok)
    k = _load(k_ref.at[cols_at, :], tile_mask, 0.0)
    v = _load(v_ref.at[cols_at, :], tile_mask, 0.0)

    # Scores are formed transposed, [bk, bq], so every product takes its register operand as is
    # (p^T and dS^T would otherwise need a layout shuffle through shared memory).
    def head(g, carry):
      scores = km.Scores(spec.scale, spec.softcap, mask, _load_slope(ops.alibi, g))
      drop = _Dropout(spec, ops.seed, batch, kv_head * group + g, nheads, asm)

      def body(q_tile, carry, masked):
        dk, dv = carry
        start = q_tile * bq
        rows = start + jnp.arange(bq)
        rows_at = pl.ds(seq.q0 + start, bq)
        row_ok = rows < mask.sq
        q_mask = _and(row_ok[:, None], head_ok) if masked else head_ok
        q = _load(q_ref.at[rows_at, g, :], q_mask, 0.0)
        do = _load(do_ref.at[rows_at, g, :], q_mask, 0.0)
        # Interior tiles lie inside the sequence: no row test. With a varlen length (a runtime
        # value) Triton could not see that the test is uniform over the tile and copied lse and
        # delta element by element, with a predicate each.
        row_mask = row_ok if masked else None
        lse2 = _load(lse2_ref.at[g, pl.ds(start, bq)], row_mask, _INF)
        delta = _load(delta_ref.at[g, pl.ds(start, bq)], row_mask, 0.0)
        s_t, th = scores.logits(_dot(k, q, trans_b=True), rows, cols, transposed=True)  # [bk, bq]
        p_t = jnp.exp2(s_t - lse2[None, :])
        if masked:
          p_t = jnp.where(mask.visible(rows, cols, transposed=True), p_t, 0.0)
        pd_t = drop.apply(p_t, drop.mask(start, bq, kv_tile * bk, bk, transposed=True))
        dv = dv + _dot(pd_t.astype(do.dtype), do)
        dp_t = _dot(v, do, trans_b=True)
        ds_t = scores.raw_grad(km.logit_grad(p_t, pd_t, dp_t, delta[None, :]), th)
        dk = dk + _dot(ds_t.astype(q.dtype), q)
        return dk, dv

      return _visit(mask, tables, kv_tile, bq, bk, body, carry, transposed=True)

    def biased_tile(q_tile, carry, masked):
      # With a dynamic mask the query heads of the group go innermost: d bias sums over them, and
      # the tile's bias and keep slices are read once for all of them.
      start = q_tile * bq
      rows = start + jnp.arange(bq)
      rows_at = pl.ds(seq.q0 + start, bq)
      row_ok = rows < mask.sq
      q_mask = _and(row_ok[:, None], head_ok) if masked else head_ok
      bias_t, keep_t = dyn.tile(start, kv_tile * bk, row_ok, col_ok, masked, transposed=True)
      scores = km.Scores(spec.scale, spec.softcap, mask)

      def head(g, carry):
        dk, dv, dbias_t = carry
        drop = _Dropout(spec, ops.seed, batch, kv_head * group + g, nheads, asm)
        q = _load(q_ref.at[rows_at, g, :], q_mask, 0.0)
        do = _load(do_ref.at[rows_at, g, :], q_mask, 0.0)
        row_mask = row_ok if masked else None  # see head()
        lse2 = _load(lse2_ref.at[g, pl.ds(start, bq)], row_mask, _INF)
        delta = _load(delta_ref.at[g, pl.ds(start, bq)], row_mask, 0.0)
        s_t, th = scores.logits(_dot(k, q, trans_b=True), rows, cols, transposed=True)
        p_t = jnp.exp2(s_t + bias_t - lse2[None, :])
        if masked:
          p_t = jnp.where(km.visible(mask, rows, cols, keep_t, transposed=True), p_t, 0.0)
        pd_t = drop.apply(p_t, drop.mask(start, bq, kv_tile * bk, bk, transposed=True))
        dv = dv + _dot(pd_t.astype(do.dtype), do)
        dp_t = _dot(v, do, trans_b=True)
        dt_t = km.logit_grad(p_t, pd_t, dp_t, delta[None, :])  # also the bias gradient (/ scale)
        dk = dk + _dot(scores.raw_grad(dt_t, th).astype(q.dtype), q)
        return dk, dv, dbias_t + dt_t

      dk, dv = carry
      carry = (dk, dv, jnp.zeros((bk, bq), jnp.float32))
      if group == 1:
        dk, dv, dbias_t = head(jnp.int32(0), carry)
      else:
        dk, dv, dbias_t = lax.fori_loop(0, group, head, carry)
      dbias_ref = outs[2]
      _store(dbias_ref.at[pl.ds(start, bq), pl.ds(kv_tile * bk, bk)],
             (dbias_t.T * drop_scale).astype(dbias_ref.dtype),
             (row_ok[:, None] & col_ok[None, :]) if masked else None)
      return dk, dv

    zeros = jnp.zeros((bk, dp), jnp.float32)
    dyn = _bias_mask(ops)
    if dyn is not None:
      dk, dv = _visit(mask, tables, kv_tile, bq, bk, biased_tile, (zeros, zeros),
                      transposed=True)
    elif group == 1:
      dk, dv = head(jnp.int32(0), (zeros, zeros))
    else:
      dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
    # (Re-reading the key offset here, as the other passes do for their rows, scheduled the main
    # loop worse: bench/regs, 409 -> 420 instructions per tile.)
    _store(dk_ref.at[cols_at, :], (dk * drop_scale).astype(dk_ref.dtype), tile_mask)
    _store(dv_ref.at[cols_at, :], (dv * drop_scale).astype(dv_ref.dtype), tile_mask)

  _when_active(True if not spec.varlen else kv_tile * bk < mask.sk, run)


def backward(q, k, v, out, lse, dout, dlse, ops: Operands, *, spec: AttentionSpec,
             cfgs: KernelConfigs | None, head_dim: int, interpret: bool, into: Grads | None = None):
  """Grads: dq, dk, dv in the input dtypes, dsink (fp32, the layout of ops.sink) with sinks, dbias
  (like bias, zero where masked) with the dynamic mask.

  into: optional buffers to write the gradients into, dq, dk and dv, and with the dynamic mask
  optionally a zero-filled dbias (the kernel writes only the tiles it visits).
  """
  d = q.shape[-1]
  dp = _compat.next_power_of_2(max(d, 16))
  h, hk = q.shape[-2], k.shape[-2]
  group = h // hk
  cfgs = _fit_device(_resolve(q, spec, cfgs), dp, q, ops.bias, ops.keep, interpret)
  reverse = _causal_like(spec.mask)
  n_seq = _n_sequences(spec, q, ops)
  sink = ops.sink

  cfg = cfgs.bwd_dq
  n_q = pl.cdiv(spec.sq, cfg.block_q)
  blocks = _Blocks(spec, dp, group)
  kv_of_head = lambda hh: hh // group
  op_specs, op_args = _operand_inputs(ops, blocks.operands(spec, kv_of_head))
  in_specs = [blocks.heads(q), blocks.heads(k, kv_of_head), blocks.heads(v, kv_of_head),
              blocks.heads(out), blocks.heads(dout), blocks.rows(lse), blocks.rows(dlse)] + op_specs
  args = [q, k, v, out, dout, lse, dlse] + op_args
  # delta and lse (log2 domain) go to the dK/dV pass in the batched layout whatever the input's,
  # (sequences, heads, rows), each sequence's rows from 0 and padded to whole tiles of both passes:
  # its tiles then load them as aligned vectors. At varlen offsets (arbitrary rows of (H, total_q))
  # Triton copies them one 4-byte element at a time.
  n_rows = max(n_q * cfg.block_q, pl.cdiv(spec.sq, cfgs.bwd_dkv.block_q) * cfgs.bwd_dkv.block_q)
  per_seq = jax.ShapeDtypeStruct((n_seq, h, n_rows), jnp.float32)
  out_specs = [blocks.heads(q)] + [pl.BlockSpec((None, None, n_rows), lambda i, j, hh: (j, hh, 0))] * 2
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), per_seq, per_seq]
  if spec.sink == "sh":
    # One partial sum per (query tile, sequence, head); summed below, in a fixed order.
    s_pad = _compat.next_power_of_2(sink.shape[-1])
    out_specs.append(pl.BlockSpec((None, None, None, s_pad), lambda i, j, hh: (i, j, hh, 0)))
    out_shape.append(jax.ShapeDtypeStruct((n_q, n_seq, h, sink.shape[-1]), jnp.float32))
  elif spec.sink:
    out_specs.append(blocks.sink(spec, sink))
    out_shape.append(jax.ShapeDtypeStruct(sink.shape, jnp.float32))
  counts = None
  if spec.bias_mask:
    # One pass over the mask serves both passes' tables: counted at the finer of their tilings.
    grain_q = min(cfgs.bwd_dq.block_q, cfgs.bwd_dkv.block_q)
    grain_k = min(cfgs.bwd_dq.block_k, cfgs.bwd_dkv.block_k)
    counts = (masking.dynamic_counts(ops.keep, spec.mask, grain_q, grain_k), grain_q, grain_k)
  table_specs, tables = _table_inputs(spec, cfg, counts=counts, kv_head_of=kv_of_head)
  in_specs, args = in_specs + table_specs, args + tables
  dq_into = None
  if into is not None:
    dq_into = (into.dq, jnp.empty(per_seq.shape, jnp.float32))
  in_specs, args, aliases = _alias_into(in_specs, args, out_specs[:2], dq_into)
  dq, delta, lse2, *dsink = pl.pallas_call(
      functools.partial(_dq_kernel, spec=spec, cfg=cfg, head_dim=head_dim, n_q_tiles=n_q,
                        reverse=reverse, nheads=h, n_sink=0 if sink is None else sink.shape[-1],
                        asm=not interpret),
      grid=(n_q, n_seq, h),
      in_specs=in_specs,
      out_specs=out_specs,
      input_output_aliases=aliases,
      out_shape=out_shape,
      compiler_params=_compat.triton_params(cfg.num_warps, cfg.num_stages),
      interpret=interpret,
      name="pallas_attn_bwd_dq",
  )(*args)

  # The sink gradient came from the dQ pass: this one does not read the sinks.
  cfg = cfgs.bwd_dkv
  n_k = pl.cdiv(spec.sk, cfg.block_k)
  per_seq_block = pl.BlockSpec((None, group, n_rows), lambda i, j, hh: (j, hh, 0))
  own_head = lambda hh: hh
  op_specs, op_args = _operand_inputs(ops, blocks.operands(spec, own_head, alibi_width=group),
                                      skip=("sink",))
  in_specs = [blocks.heads(q, width=group), blocks.heads(k), blocks.heads(v),
              blocks.heads(dout, width=group), per_seq_block, per_seq_block] + op_specs
  args = [q, k, v, dout, lse2, delta] + op_args
  table_specs, tables = _table_inputs(spec, cfg, transposed=True, counts=counts,
                                      kv_head_of=own_head)
  in_specs, args = in_specs + table_specs, args + tables
  out_specs = [blocks.heads(k), blocks.heads(v)]
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  in_specs, args, aliases = _alias_into(in_specs, args, out_specs,
                                        None if into is None else (into.dk, into.dv))
  if spec.bias_mask:
    # Tiles the tables skip are never written: the gradient starts as zeros the kernel writes into.
    bias = ops.bias
    aliases[len(args)] = len(out_specs)
    in_specs.append(blocks.pairs(bias, own_head))
    args.append(into.dbias if into is not None and into.dbias is not None
                else jnp.zeros(bias.shape, bias.dtype))
    out_specs.append(blocks.pairs(bias, own_head))
    out_shape.append(jax.ShapeDtypeStruct(bias.shape, bias.dtype))
  dk, dv, *dbias = pl.pallas_call(
      functools.partial(_dkv_kernel, spec=spec, cfg=cfg, head_dim=head_dim, group=group, nheads=h,
                        asm=not interpret),
      grid=(n_k, n_seq, hk),
      in_specs=in_specs,
      out_specs=out_specs,
      input_output_aliases=aliases,
      out_shape=out_shape,
      compiler_params=_compat.triton_params(cfg.num_warps, cfg.num_stages),
      interpret=interpret,
      name="pallas_attn_bwd_dkv",
  )(*args)
  if spec.bias_mask:
    return Grads(dq, dk, dv, dbias=dbias[0])
  if not spec.sink:
    return Grads(dq, dk, dv)
  dsink = dsink[0]
  return Grads(dq, dk, dv, dsink=jnp.sum(dsink, axis=(0, 1)) if spec.sink == "sh" else dsink)


def covers(call) -> str | None:
  """Every option of the family, fp16 / bf16 / fp32 and head dims up to 256 (padded to a power
  of two), compiled for CUDA or in interpret mode (backends/registry.py)."""
  if jnp.dtype(call.dtype) not in (jnp.float16, jnp.bfloat16, jnp.float32):
    return f"dtypes float16, bfloat16 and float32, got {jnp.dtype(call.dtype).name}"
  if call.head_dim > 256:
    return f"head dims up to 256, got {call.head_dim}"
  return None


registry.register("triton", sys.modules[__name__])
