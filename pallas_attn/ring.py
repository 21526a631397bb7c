"""Context parallelism: ring attention over a mesh axis, forward and backward, on JAX's own SPMD.

The sequence is split over the N devices of a mesh axis. Each device keeps its queries and passes
its key/value block around the ring (`lax.ppermute`, NCCL on GPUs); at every step it runs our flash
kernel against the block it holds while the next one is in flight, and merges the partial results by
their lse (`lse_merge.merge`, the helper the split-KV decode uses too). The backward walks the same
ring: dq stays local, dk/dv accumulate in fp32 buffers that travel with their key/value block and go
home at the end. Per device the residuals are q, k, v, out and lse of its own shard: O(seqlen / N),
and K/V are never gathered.

Layouts (of the 2N chunks of length c = seqlen / 2N for "zigzag", N chunks of seqlen / N for
"contiguous"): "zigzag" puts chunks i and 2N - 1 - i on device i, so with a causal mask every device
does the same work; "contiguous" puts chunk i on device i.

Masks across blocks: for a (query chunk, key chunk) pair at distance D = (first query position) -
(first key position), the global band (causal, window_size) either hides the whole pair (skipped),
shows all of it (a plain call), or cuts it: then the kernel runs with BandMask(shift=D), whose band
and ALiBi term are the global ones. Which pairs a device computes at a step depends on the device, so
a step is a list of kernel calls, each with per-device operands (which query and key chunk, picked by
a dynamic index on the axis index, no control flow) and a mask: where every device that works in the
call has the same mask the call is static (zigzag's causal steps: two full-block calls on every
device); devices with less work run the call too and drop its result (a ring step lasts as long as its
slowest device anyway); only masks that differ between devices (windows cutting blocks at different
offsets, ALiBi's offsets) go through a `lax.switch` on the axis index. Ring steps where every pair is
hidden on every device (sliding windows) are skipped, and K/V jump over them in one ppermute.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from pallas_attn import checks, flash, lse_merge
from pallas_attn.masking import BandMask
from pallas_attn.spec import AttentionSpec

LAYOUTS = ("zigzag", "contiguous")
_INF = float("inf")


@dataclasses.dataclass(frozen=True)
class Call:
  """One kernel call of a ring step, per device: query chunk a[i], key chunk b[i], mask masks[i]
  (None: device i has no work here, runs the call on chunks 0 and drops the result)."""
  a: tuple
  b: tuple
  masks: tuple

  def keep(self, i: int) -> bool:
    return self.masks[i] is not None


@dataclasses.dataclass(frozen=True)
class RingPlan:
  """Everything static about one ring: per step with work, its calls."""
  n: int
  layout: str
  chunk: int  # c: the length of one chunk
  scale: float
  softcap: float
  alibi: bool
  steps: tuple  # ((s, (Call, ...)), ...): s = how far K/V have travelled round the ring

  @property
  def chunks(self) -> int:
    return 2 if self.layout == "zigzag" else 1

  def spec(self, mask: BandMask) -> AttentionSpec:
    return AttentionSpec(mask=mask, scale=self.scale, softcap=self.softcap, alibi=self.alibi)


def chunk_position(layout: str, n: int, device: int, slot: int) -> int:
  """The global chunk index of local chunk `slot` of `device`."""
  if layout == "contiguous":
    return device
  return device if slot == 0 else 2 * n - 1 - device


def pair_mask(d: int, c: int, left, right, alibi: bool):
  """Mask of a c x c block whose first query sits d positions after its first key, under the global
  band (left, right) (None = unbounded): None if nothing is visible, else the kernel's BandMask."""
  lo, hi = d - (c - 1), d + (c - 1)  # the range of query position - key position in the block
  if (right is not None and hi < -right) or (left is not None and lo > left):
    return None
  shift = None if d == 0 else d
  if (right is None or lo >= -right) and (left is None or hi <= left):
    return BandMask(sq=c, sk=c, shift=shift if alibi else None)
  return BandMask(sq=c, sk=c, left=left, right=right, shift=shift)


@functools.lru_cache(maxsize=256)
def make_plan(n: int, layout: str, length: int, causal: bool, window_size: tuple, scale: float,
              softcap: float, alibi: bool) -> RingPlan:
  """length: the local sequence length of one device."""
  chunks = 2 if layout == "zigzag" else 1
  c = length // chunks
  left, right = (None if w < 0 else int(w) for w in window_size)
  if causal:
    right = 0
  steps = []
  for s in range(n):
    work = []  # per device: its visible (mask, a, b), in one canonical order
    for i in range(n):
      src = (i - s) % n
      pairs = [(pair_mask((chunk_position(layout, n, i, a) - chunk_position(layout, n, src, b)) * c,
                          c, left, right, alibi), a, b)
               for a in range(chunks) for b in range(chunks)]
      work.append(sorted(((m, a, b) for m, a, b in pairs if m is not None),
                         key=lambda t: (repr(t[0]), t[1], t[2])))
    calls = []
    for k in range(max(len(w) for w in work)):
      entries = [w[k] if k < len(w) else (None, 0, 0) for w in work]
      calls.append(Call(a=tuple(e[1] for e in entries), b=tuple(e[2] for e in entries),
                        masks=tuple(e[0] for e in entries)))
    if calls:
      steps.append((s, tuple(calls)))
  return RingPlan(n=n, layout=layout, chunk=c, scale=scale, softcap=softcap, alibi=alibi,
                  steps=tuple(steps))


def _shift(x, delta: int, axis_name, n: int):
  """Every device sends x to the device `delta` places further round the ring."""
  delta %= n
  if delta == 0:
    return x
  perm = [(j, (j + delta) % n) for j in range(n)]
  return jax.tree.map(lambda a: lax.ppermute(a, axis_name, perm), x)


def _chunks(x, m: int, axis: int):
  return jnp.split(x, m, axis=axis) if m > 1 else [x]


def _pick(chunks, which: tuple, index):
  """chunks[which[device]]: a Python choice when every device picks the same chunk, else a dynamic
  index on the axis index."""
  if len(set(which)) == 1:
    return chunks[which[0]]
  table = jnp.asarray(which, jnp.int32)
  return lax.dynamic_index_in_dim(jnp.stack(chunks), table[index], keepdims=False)


def _hits(call: Call, which: tuple, chunk: int, index):
  """Whether this device's result of `call` belongs to `chunk` (and is kept): a Python bool when
  it is the same on every device, else a traced one."""
  hit = tuple(w == chunk and call.keep(i) for i, w in enumerate(which))
  if len(set(hit)) == 1:
    return hit[0]
  return jnp.asarray(hit)[index]


def _by_device(masks, index, branch, *operands):
  """branch(mask, *operands) for this device's mask, devices without one taking any: decided in
  Python when the working devices agree, else a lax.switch on the axis index."""
  distinct = list(dict.fromkeys(m for m in masks if m is not None))
  if len(distinct) == 1:
    return branch(distinct[0], *operands)
  table = jnp.asarray([distinct.index(m) if m is not None else 0 for m in masks], jnp.int32)
  return lax.switch(table[index], [functools.partial(branch, m) for m in distinct], *operands)


def _pair_forward(plan: RingPlan, mask, q, k, v, alibi):
  """(out fp32 (b, c, H, d), lse (b, c, H)) of one block pair (+inf lse on rows it does not see)."""
  out, lse = flash.forward(q, k, v, alibi, plan.spec(mask))
  return out.astype(jnp.float32), jnp.swapaxes(lse, 1, 2)


def _pair_backward(plan: RingPlan, mask, q, k, v, alibi, out, lse, dout, dlse):
  """(dq, dk, dv) in fp32 of one block pair against the global out and lse."""
  grads = flash.backward(q, k, v, alibi, out, lse, dout, dlse, plan.spec(mask))
  return tuple(g.astype(jnp.float32) for g in grads[:3])


def _ring_forward(q, k, v, alibi, plan: RingPlan, axis_name):
  index = lax.axis_index(axis_name)
  m = plan.chunks
  qs = _chunks(q, m, 1)
  acc = [None] * m
  kv = (k, v)
  for t, (s, calls) in enumerate(plan.steps):
    # The next block travels while this one is computed: the ppermute is issued first.
    nxt = _shift(kv, plan.steps[t + 1][0] - s, axis_name, plan.n) if t + 1 < len(plan.steps) else None
    ks, vs = _chunks(kv[0], m, 1), _chunks(kv[1], m, 1)
    for call in calls:
      o, l = _by_device(call.masks, index, functools.partial(_pair_forward, plan),
                        _pick(qs, call.a, index), _pick(ks, call.b, index), _pick(vs, call.b, index),
                        alibi)
      for a in range(m):
        hit = _hits(call, call.a, a, index)
        if hit is False:
          continue
        o_a, l_a = o, l
        if hit is not True:  # +inf: an empty partial (out 0), which the merge ignores
          o_a, l_a = jnp.where(hit, o, 0.0), jnp.where(hit, l, _INF)
        acc[a] = (o_a, l_a) if acc[a] is None else lse_merge.merge_pair(*acc[a], o_a, l_a)
    kv = nxt
  out = jnp.concatenate([o for o, _ in acc], axis=1).astype(q.dtype)
  lse = jnp.concatenate([jnp.swapaxes(l, 1, 2) for _, l in acc], axis=2)
  return out, lse


def _add(total, part, hit):
  if hit is False:
    return total
  return total + (part if hit is True else jnp.where(hit, part, 0.0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ring(q, k, v, alibi, plan: RingPlan, axis_name):
  return _ring_forward(q, k, v, alibi, plan, axis_name)


def _ring_fwd(q, k, v, alibi, plan, axis_name):
  out, lse = _ring_forward(q, k, v, alibi, plan, axis_name)
  return (out, lse), (q, k, v, alibi, out, lse)


def _ring_bwd(plan, axis_name, res, cts):
  q, k, v, alibi, out, lse = res
  dout, dlse = cts
  index = lax.axis_index(axis_name)
  m = plan.chunks
  qs, outs, douts = _chunks(q, m, 1), _chunks(out, m, 1), _chunks(dout.astype(q.dtype), m, 1)
  lses, dlses = _chunks(lse, m, 2), _chunks(dlse.astype(jnp.float32), m, 2)
  dq = [jnp.zeros(x.shape, jnp.float32) for x in qs]
  kv = (k, v)
  # dK/dV of the block held, in fp32: they travel with it and are sent home after the last step.
  dkv = ([jnp.zeros(x.shape, jnp.float32) for x in _chunks(k, m, 1)],
         [jnp.zeros(x.shape, jnp.float32) for x in _chunks(v, m, 1)])
  for t, (s, calls) in enumerate(plan.steps):
    last = t + 1 == len(plan.steps)
    nxt = None if last else _shift(kv, plan.steps[t + 1][0] - s, axis_name, plan.n)
    ks, vs = _chunks(kv[0], m, 1), _chunks(kv[1], m, 1)
    for call in calls:
      pick_a = lambda xs: _pick(xs, call.a, index)  # noqa: E731  pylint: disable=cell-var-from-loop
      g = _by_device(call.masks, index, functools.partial(_pair_backward, plan), pick_a(qs),
                     _pick(ks, call.b, index), _pick(vs, call.b, index), alibi, pick_a(outs),
                     pick_a(lses), pick_a(douts), pick_a(dlses))
      for c in range(m):
        dq[c] = _add(dq[c], g[0], _hits(call, call.a, c, index))
        hit = _hits(call, call.b, c, index)
        dkv[0][c] = _add(dkv[0][c], g[1], hit)
        dkv[1][c] = _add(dkv[1][c], g[2], hit)
    dkv = _shift(dkv, -s if last else plan.steps[t + 1][0] - s, axis_name, plan.n)
    kv = nxt
  dq = jnp.concatenate(dq, axis=1).astype(q.dtype)
  dk = jnp.concatenate(dkv[0], axis=1).astype(k.dtype)
  dv = jnp.concatenate(dkv[1], axis=1).astype(v.dtype)
  return dq, dk, dv, None if alibi is None else jnp.zeros_like(alibi)


_ring.defvjp(_ring_fwd, _ring_bwd)


def _alibi_rows(alibi_slopes, batch: int, nheads: int):
  if alibi_slopes is None:
    return None
  return jnp.broadcast_to(jnp.asarray(alibi_slopes, jnp.float32), (batch, nheads))[:, :, None]


def _check_layout(layout):
  if layout not in LAYOUTS:
    raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


def ring_attention(q, k, v, *, axis_name, causal=False, window_size=(-1, -1), softcap=0.0,
                   softmax_scale=None, alibi_slopes=None, layout="zigzag", return_lse=False):
  """Attention over a sequence split across the devices of mesh axis `axis_name`; call it inside a
  shard_map (or any context where `axis_name` is bound) on each device's shard.

  The math is flash_attn_func's on the whole sequence (causal bottom-right aligned, which for the
  equal query and key lengths here is the usual causal), without ever gathering K or V.

  Arguments:
    q: this device's (batch, seqlen / N, nheads, headdim); k, v: (batch, seqlen / N, nheads_k,
      headdim), nheads a multiple of nheads_k.
    axis_name: the mesh axis the sequence is split over (N = its size). The shard_map needs
      check_vma=False (Pallas kernels do not declare varying manual axes).
    layout: which chunks a device holds. "zigzag": the sequence is cut into 2N chunks and device i
      holds chunks i and 2N - 1 - i, in that order (balanced causal work; seqlen / N must be even);
      "contiguous": device i holds chunk i of N.
    causal, window_size, softcap, softmax_scale, alibi_slopes: as in flash_attn_func, on global
      positions. alibi_slopes (nheads,) or (batch, nheads) fp32.
    return_lse: also return this device's lse (batch, nheads, seqlen / N) fp32, rows in the local
      order.
  Returns:
    out like q (rows in the local order), or (out, lse).
  """
  _check_layout(layout)
  checks.check_qkv(q, k, v)
  b, length, h, d = q.shape
  if k.shape[1] != length:
    raise ValueError(f"k: ring attention needs equal query and key shards, got seqlen_q={length}, "
                     f"seqlen_k={k.shape[1]} per device")
  checks.check_options(dropout_p=0.0, softmax_scale=softmax_scale, window_size=window_size,
                       softcap=softcap, alibi_slopes=alibi_slopes, batch=b, nheads=h)
  if layout == "zigzag" and length % 2:
    raise ValueError(f"q: layout='zigzag' holds two chunks per device, so the local seqlen must be "
                     f"even, got {length}")
  if _varying(q):
    raise ValueError("ring_attention: call it inside jax.shard_map(..., check_vma=False); our Pallas "
                     "kernels do not declare how their outputs vary over manual mesh axes")
  n = lax.axis_size(axis_name)
  scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)
  plan = make_plan(int(n), layout, length, bool(causal), tuple(int(w) for w in window_size), scale,
                   float(softcap), alibi_slopes is not None)
  out, lse = _ring(q, k, v, _alibi_rows(alibi_slopes, b, h), plan, axis_name)
  return (out, lse) if return_lse else out


def _varying(x) -> bool:
  """Whether x is traced in a shard_map with check_vma=True (jax 0.10 names it manual_axis_type,
  later versions vma)."""
  aval = jax.typeof(x)
  vma = getattr(aval, "vma", None)
  if vma is None:
    vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
  return bool(vma)


# -- natural token order <-> zigzag, inside the shard_map (ppermutes only, no gather).

def _zigzag_perms(n: int):
  """Chunk m of 2N lives naturally on device m // 2 and in zigzag on device m (m < N) or 2N - 1 - m.
  Each device holds one even and one odd chunk in either layout, so two permutations move them."""
  owner = lambda m: m if m < n else 2 * n - 1 - m  # noqa: E731
  even = [(i, owner(2 * i)) for i in range(n)]
  odd = [(i, owner(2 * i + 1)) for i in range(n)]
  return even, odd


def to_zigzag(x, axis_name, n: int, axis: int):
  """This device's natural shard (chunks 2i, 2i + 1 along `axis`) -> its zigzag shard (i, 2N-1-i)."""
  even, odd = _zigzag_perms(n)
  lo, hi = jnp.split(x, 2, axis=axis)
  e, o = lax.ppermute(lo, axis_name, even), lax.ppermute(hi, axis_name, odd)
  first_even = lax.axis_index(axis_name) % 2 == 0  # chunk i is even on even devices
  return jnp.concatenate([jnp.where(first_even, e, o), jnp.where(first_even, o, e)], axis=axis)


def from_zigzag(x, axis_name, n: int, axis: int):
  """Inverse of to_zigzag."""
  even, odd = _zigzag_perms(n)
  inv = lambda perm: [(j, i) for i, j in perm]  # noqa: E731
  first, second = jnp.split(x, 2, axis=axis)
  first_even = lax.axis_index(axis_name) % 2 == 0
  e = jnp.where(first_even, first, second)
  o = jnp.where(first_even, second, first)
  return jnp.concatenate([lax.ppermute(e, axis_name, inv(even)), lax.ppermute(o, axis_name, inv(odd))],
                         axis=axis)


def _dim_axes(x, dim: int):
  """The mesh axes dimension `dim` of x is sharded over, from its type (Explicit axes), else None."""
  try:
    spec = jax.typeof(x).sharding.spec
  except Exception:  # noqa: BLE001  (no sharding in the type)
    return None
  return spec[dim] if dim < len(spec) else None


def ring_flash_attn_func(q, k, v, *, mesh, seq_axis, dropout_p=0.0, softmax_scale=None, causal=False,
                         window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                         return_attn_probs=False, layout="zigzag"):
  """flash_attn_func on arrays in natural token order whose sequence is split over mesh axis
  `seq_axis`: runs ring_attention under shard_map (reordering to the layout and back by ppermutes).

  Arguments:
    q: (batch, seqlen, nheads, headdim); k, v: (batch, seqlen, nheads_k, headdim): global arrays,
      any sharding (they are laid out as P(batch axes, seq_axis, head axes, None), keeping batch and
      head axes of an Explicit sharding). seqlen must divide into 2N chunks (zigzag) or N.
    mesh: the jax.sharding.Mesh; seq_axis: the name of its axis the sequence is split over.
    dropout_p: must be 0 (no dropout in the ring yet).
    Others: as flash_attn_func (deterministic is accepted; the backward is deterministic).
  Returns:
    out (batch, seqlen, nheads, headdim), or with return_attn_probs (out, lse (batch, nheads,
    seqlen) fp32, an empty S_dmask), in natural order, sharded over seq_axis.
  """
  del deterministic
  _check_layout(layout)
  if dropout_p != 0:
    raise NotImplementedError("dropout_p: ring attention has no dropout; use dropout_p=0.0")
  checks.check_qkv(q, k, v)
  b, length, h, d = q.shape
  if k.shape[1] != length:
    raise ValueError(f"k: ring attention needs seqlen_k == seqlen_q, got {k.shape[1]} and {length}")
  checks.check_options(dropout_p=0.0, softmax_scale=softmax_scale, window_size=window_size,
                       softcap=softcap, alibi_slopes=alibi_slopes, batch=b, nheads=h)
  if seq_axis not in mesh.axis_names:
    raise ValueError(f"seq_axis: {seq_axis!r} is not an axis of the mesh {mesh.axis_names}")
  n = mesh.shape[seq_axis]
  parts = 2 * n if layout == "zigzag" else n
  if length % parts:
    raise ValueError(f"q: seqlen {length} must be a multiple of {parts} (layout={layout!r} over "
                     f"{n} devices)")
  bax, hax = _dim_axes(q, 0), _dim_axes(q, 2)
  qkv_spec = P(bax, seq_axis, hax, None)
  lse_spec = P(bax, hax, seq_axis)
  args, specs = [q, k, v], [qkv_spec] * 3
  if alibi_slopes is not None:
    args.append(alibi_slopes)
    specs.append(P(hax) if alibi_slopes.ndim == 1 else P(bax, hax))
  explicit = any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
  if explicit:
    args = [jax.sharding.reshard(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]

  def local(q, k, v, slopes=None):
    if layout == "zigzag":
      q, k, v = (to_zigzag(x, seq_axis, n, 1) for x in (q, k, v))
    out, lse = ring_attention(q, k, v, axis_name=seq_axis, causal=causal, window_size=window_size,
                              softcap=softcap, softmax_scale=softmax_scale, alibi_slopes=slopes,
                              layout=layout, return_lse=True)
    if layout == "zigzag":
      out, lse = from_zigzag(out, seq_axis, n, 1), from_zigzag(lse, seq_axis, n, 2)
    return out, lse

  out, lse = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=(qkv_spec, lse_spec),
                           check_vma=False)(*args)
  if return_attn_probs:
    return out, lse, jnp.zeros((0,), q.dtype)
  return out
