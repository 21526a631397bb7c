"""flash_attn_with_kvcache on the JAX face (SPEC section 1, KV cache): decoding against a cache.

Three steps, each usable on its own (the torch face appends into its own tensors in place and runs
the other two): `rotate` (rotary on q and the new keys, fp32 math rounded to the input dtype),
`append` (a functional scatter of the new keys/values into the caches; under jit with the caches
donated, XLA updates them in place) and `attend` (the split-KV decode kernel of
backends/triton_decode.py over the updated cache, paged or not, plus the lse merge of its splits).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_attn import _compat, checks, lse_merge, sharding
from pallas_attn.backends import triton_decode
from pallas_attn.backends.registry import by_platform


@dataclasses.dataclass(frozen=True)
class CachePlan:
  """Everything static about one call (hashable: a jit static argument)."""
  batch: int
  sq: int
  nheads: int
  kv_heads: int
  head_dim: int
  s_new: int
  paged: bool
  capacity: int  # positions a batch row can address
  rotary: bool
  rotary_interleaved: bool
  rotate_q_per_row: bool  # causal or windowed: query i sits at cache_seqlens + i
  decode: triton_decode.DecodeSpec


def _int32_vector(name: str, x, batch: int):
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name}: expected an int32 array of shape ({batch},), got {type(x).__name__}")
  if jnp.dtype(x.dtype) != jnp.int32:
    raise TypeError(f"{name}: expected dtype int32, got {np.dtype(x.dtype)}")
  if tuple(x.shape) != (batch,):
    raise ValueError(f"{name}: expected shape ({batch},), got {tuple(x.shape)}")


def _concrete(x):
  """x's values as numpy when they are known now (an int, or an array that is not traced), else
  None."""
  if isinstance(x, (int, np.integer)):
    return np.asarray(x)
  if not isinstance(x, (jax.Array, np.ndarray)):  # None, or a shape-only stand-in
    return None
  try:
    return np.asarray(x)
  except Exception:  # noqa: BLE001  (a tracer)
    return None


def check_values(plan: CachePlan, num_cache_rows: int, seqlens=None, leftpad=None, batch_idx=None,
                 block_table=None, rotary_rows: int | None = None):
  """The checks that need values: each argument as numpy (None where unknown without a device sync;
  the kernel clamps those, so they cannot address memory outside the caches, see triton_decode).

  num_cache_rows: k_cache.shape[0] (cache rows, or pages with a block table); rotary_rows:
  rotary_cos.shape[0] when rotary is on.
  """
  if seqlens is not None:
    seqlens = np.broadcast_to(np.asarray(seqlens), (plan.batch,))
    if rotary_rows is not None:
      need = int(np.max(seqlens)) + max(plan.s_new, plan.sq)
      if rotary_rows < need:
        raise ValueError(f"rotary_cos: expected at least {need} rows (cache_seqlens + the new "
                         f"tokens), got {rotary_rows}")
    if np.any(seqlens < 0):
      raise ValueError(f"cache_seqlens: expected values >= 0, got {seqlens.tolist()}")
    if plan.paged and np.any(seqlens > plan.capacity):
      pages = plan.decode.max_pages
      raise checks.CapacityError(
          f"cache_seqlens: expected at most {plan.capacity} (block_table holds {pages} pages of "
          f"{plan.decode.page_size} positions per sequence), got {seqlens.tolist()}")
    if np.any(seqlens + plan.s_new > plan.capacity):
      raise ValueError(
          f"cache_seqlens: appending {plan.s_new} new tokens at cache_seqlens {seqlens.tolist()} "
          f"runs past the end of the cache ({plan.capacity} positions per sequence); expected "
          f"cache_seqlens <= {plan.capacity - plan.s_new}")
    if leftpad is not None and np.any((leftpad < 0) | (leftpad > seqlens)):
      raise ValueError(f"cache_leftpad: expected values in [0, cache_seqlens], got {leftpad.tolist()} "
                       f"with cache_seqlens {seqlens.tolist()}")
  if batch_idx is not None and np.any((batch_idx < 0) | (batch_idx >= num_cache_rows)):
    raise ValueError(f"cache_batch_idx: expected values in [0, {num_cache_rows}), got "
                     f"{batch_idx.tolist()}")
  if block_table is not None and np.any((block_table < 0) | (block_table >= num_cache_rows)):
    raise ValueError(f"block_table: expected page indices in [0, {num_cache_rows}) (k_cache's "
                     "num_blocks)")


def _check_values(cache_seqlens, cache_leftpad, cache_batch_idx, block_table, k_cache, rotary_cos,
                  plan):
  check_values(plan, k_cache.shape[0], _concrete(cache_seqlens), _concrete(cache_leftpad),
               _concrete(cache_batch_idx), _concrete(block_table),
               None if rotary_cos is None else rotary_cos.shape[0])


def prepare(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
            cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None,
            causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
            alibi_slopes=None, num_splits=0) -> CachePlan:
  """Validates every argument (errors name it) and returns the call's static plan."""
  checks.require_array("q", q, 4, "(batch, seqlen_q, nheads, headdim)")
  paged = block_table is not None
  cache_layout = ("(num_blocks, page_block_size, nheads_k, headdim)" if paged
                  else "(batch_size_cache, seqlen_cache, nheads_k, headdim)")
  checks.require_array("k_cache", k_cache, 4, cache_layout)
  checks.require_array("v_cache", v_cache, 4, cache_layout)
  checks.require_same_dtype(q=q, k_cache=k_cache, v_cache=v_cache)
  b, sq, h, d = q.shape
  hk = k_cache.shape[2]
  if sq == 0:
    raise ValueError(f"q: expected seqlen_q >= 1, got shape {tuple(q.shape)}")
  if not 0 < d <= checks.MAX_HEAD_DIM:
    raise ValueError(f"q: expected head dim in [1, {checks.MAX_HEAD_DIM}], got {d}")
  if k_cache.shape[3] != d:
    raise ValueError(f"k_cache: expected head dim {d} (q's), got shape {tuple(k_cache.shape)}")
  if tuple(v_cache.shape) != tuple(k_cache.shape):
    raise ValueError(f"v_cache: expected shape {tuple(k_cache.shape)} (k_cache's), got {tuple(v_cache.shape)}")
  if hk == 0 or h % hk != 0:
    raise ValueError(f"k_cache: nheads ({h}) must be a multiple of nheads_k, got nheads_k={hk}")

  if paged:
    if cache_batch_idx is not None:
      raise ValueError("cache_batch_idx: not supported with a paged cache (block_table maps batch rows "
                       "to pages)")
    checks.check_block_table(block_table, b)
    page = checks.check_page_size("k_cache: page_block_size", k_cache.shape[1])
    capacity = block_table.shape[1] * page
  else:
    page = capacity = k_cache.shape[1]
    if capacity == 0:
      raise ValueError(f"k_cache: expected seqlen_cache >= 1, got shape {tuple(k_cache.shape)}")
    if cache_batch_idx is not None:
      _int32_vector("cache_batch_idx", cache_batch_idx, b)
    elif k_cache.shape[0] < b:
      raise ValueError(f"k_cache: expected batch_size_cache >= batch ({b}) without cache_batch_idx, "
                       f"got shape {tuple(k_cache.shape)}")

  if (k is None) != (v is None):
    raise ValueError(f"{'v' if k is not None else 'k'}: k and v must be given together")
  s_new = 0
  if k is not None:
    checks.require_array("k", k, 4, "(batch, seqlen_new, nheads_k, headdim)")
    checks.require_array("v", v, 4, "(batch, seqlen_new, nheads_k, headdim)")
    checks.require_same_dtype(q=q, k=k, v=v)
    if k.shape[0] != b or k.shape[2:] != (hk, d):
      raise ValueError(f"k: expected shape ({b}, seqlen_new, {hk}, {d}), got {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
      raise ValueError(f"v: expected shape {tuple(k.shape)} (k's), got {tuple(v.shape)}")
    if cache_seqlens is None:
      raise ValueError("cache_seqlens: required when k and v are given (where to append them)")
    s_new = k.shape[1]

  if cache_seqlens is not None and not isinstance(cache_seqlens, (int, np.integer)):
    _int32_vector("cache_seqlens", cache_seqlens, b)
  if cache_leftpad is not None:
    _int32_vector("cache_leftpad", cache_leftpad, b)

  rotary = rotary_cos is not None or rotary_sin is not None
  if rotary:
    if rotary_cos is None or rotary_sin is None:
      raise ValueError(f"{'rotary_sin' if rotary_cos is not None else 'rotary_cos'}: rotary_cos and "
                       "rotary_sin must be given together")
    if k is None:
      raise ValueError("rotary_cos: rotary embedding needs the new keys k and v (it rotates them)")
    for name, x in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
      if not hasattr(x, "shape") or x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (seqlen_ro, rotary_dim / 2), got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
      if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating dtype, got {np.dtype(x.dtype)}")
    if tuple(rotary_sin.shape) != tuple(rotary_cos.shape):
      raise ValueError(f"rotary_sin: expected shape {tuple(rotary_cos.shape)} (rotary_cos'), got "
                       f"{tuple(rotary_sin.shape)}")
    if not 0 < 2 * rotary_cos.shape[1] <= d:
      raise ValueError(f"rotary_cos: rotary_dim = 2 * rotary_cos.shape[1] must be in [2, headdim={d}], "
                       f"got {2 * rotary_cos.shape[1]}")

  checks.check_options(dropout_p=0.0, softmax_scale=softmax_scale, window_size=window_size,
                       softcap=softcap, alibi_slopes=alibi_slopes, batch=b, nheads=h)
  if not isinstance(num_splits, (int, np.integer)) or num_splits < 0:
    raise ValueError(f"num_splits: expected an int >= 0 (0 = heuristic), got {num_splits!r}")

  left, right = (int(w) for w in window_size)
  if causal:
    right = 0
  dp = _compat.next_power_of_2(max(d, 16))
  block_m, block_k = triton_decode.choose_blocks(sq * (h // hk), dp, page, paged, capacity)
  n_m = -(-(sq * (h // hk)) // block_m)
  splits = int(num_splits) or triton_decode.heuristic_splits(b, hk, n_m, capacity, block_k)
  decode = triton_decode.DecodeSpec(
      sq=sq, group=h // hk, head_dim=d,
      scale=float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d),
      softcap=float(softcap), alibi=alibi_slopes is not None,
      left=None if left < 0 else left, right=None if right < 0 else right,
      page_size=page, max_pages=block_table.shape[1] if paged else 1, num_splits=splits,
      block_m=block_m, block_k=block_k)
  plan = CachePlan(batch=b, sq=sq, nheads=h, kv_heads=hk, head_dim=d, s_new=s_new, paged=paged,
                   capacity=capacity, rotary=rotary, rotary_interleaved=bool(rotary_interleaved),
                   rotate_q_per_row=causal or tuple(window_size) != (-1, -1), decode=decode)
  _check_values(cache_seqlens, cache_leftpad, cache_batch_idx, block_table, k_cache, rotary_cos, plan)
  return plan


def _rotary(x, cos, sin, positions, interleaved: bool):
  """x (b, s, h, d) with its first rotary_dim features rotated at positions (b, s)."""
  half = cos.shape[1]
  # Out-of-range rows are rejected up front when the lengths are concrete; traced ones clamp.
  c = jnp.take(cos.astype(jnp.float32), positions, axis=0, mode="clip")[:, :, None, :]  # (b, s, 1, half)
  s = jnp.take(sin.astype(jnp.float32), positions, axis=0, mode="clip")[:, :, None, :]
  xf = x.astype(jnp.float32)
  rot, rest = xf[..., :2 * half], xf[..., 2 * half:]
  if interleaved:
    pairs = rot.reshape(*rot.shape[:-1], half, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    rot = jnp.stack([a * c - b * s, a * s + b * c], axis=-1).reshape(rot.shape)
  else:
    a, b = rot[..., :half], rot[..., half:]
    rot = jnp.concatenate([a * c - b * s, a * s + b * c], axis=-1)
  return jnp.concatenate([rot, rest], axis=-1).astype(x.dtype)


def _positions(seqlens, n: int):
  return seqlens[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]


def rotate(q, k, rotary_cos, rotary_sin, seqlens, *, interleaved: bool, per_row: bool):
  """(q, k) with rotary applied: new key j at row seqlens + j; queries at seqlens + i when per_row
  (causal or windowed), else all at seqlens."""
  k = _rotary(k, rotary_cos, rotary_sin, _positions(seqlens, k.shape[1]), interleaved)
  pos_q = _positions(seqlens, q.shape[1])
  if not per_row:
    pos_q = jnp.broadcast_to(seqlens[:, None], pos_q.shape)
  return _rotary(q, rotary_cos, rotary_sin, pos_q, interleaved), k


def slots(seqlens, cache_batch_idx, block_table, plan: CachePlan):
  """(cache row or page, row within it), each (b, s_new): where the new keys of each batch row go."""
  pos = _positions(seqlens, plan.s_new)
  if plan.paged:
    page = plan.decode.page_size
    return jnp.take_along_axis(block_table, pos // page, axis=1), pos % page
  rows = jnp.arange(seqlens.shape[0], dtype=jnp.int32) if cache_batch_idx is None else cache_batch_idx
  return jnp.broadcast_to(rows[:, None], pos.shape), pos


def append(k_cache, v_cache, k, v, seqlens, cache_batch_idx, block_table, plan: CachePlan):
  """The caches with k, v written at absolute positions seqlens + j (functional)."""
  if plan.s_new == 0:
    return k_cache, v_cache
  rows, at = slots(seqlens, cache_batch_idx, block_table, plan)
  # With batch-sharded inputs and a cache shared by batch rows, every shard writes every row.
  k, v = sharding.gather_batch(k, k_cache), sharding.gather_batch(v, v_cache)
  rows, at = sharding.gather_batch(rows, k_cache, True), sharding.gather_batch(at, k_cache, True)
  return k_cache.at[rows, at].set(k, mode="drop"), v_cache.at[rows, at].set(v, mode="drop")


def page_table(cache_batch_idx, block_table, plan: CachePlan):
  """The kernel's page table per batch row: (b, max_pages) pages, or (b,) cache rows (a contiguous
  cache row is a single page)."""
  if plan.paged:
    return block_table
  if cache_batch_idx is None:
    return jnp.arange(plan.batch, dtype=jnp.int32)
  return cache_batch_idx


def attend(q, k_cache, v_cache, end, leftpad, table, alibi_slopes, plan: CachePlan,
           rows_are_batch: bool = False):
  """out (b, sq, H, d) and lse (b, H, sq) of q over cache positions [leftpad, end) of each row.

  table: page_table()'s (b,) or (b, max_pages). Computed per batch / head shard of sharded inputs
  (pallas_attn/sharding.py): caches shard over heads, and over the batch too when rows_are_batch
  (cache row r is batch row r: table is 0..b-1 and the cache has b rows); otherwise they stay whole
  on every shard and the table holds global rows.
  """
  cache_role = "..h." if plan.paged else ("bsh." if rows_are_batch else ".sh.")
  slopes_role = None if alibi_slopes is None else ("h" if jnp.ndim(alibi_slopes) == 1 else "bh")

  def run(q, k_cache, v_cache, end, leftpad, table, alibi_slopes):
    if rows_are_batch:  # this shard's own cache rows
      table = jnp.arange(q.shape[0], dtype=jnp.int32)
    return _attend_local(q, k_cache, v_cache, end, leftpad, table.reshape(-1), alibi_slopes, plan)

  return sharding.local(run, [q, k_cache, v_cache, end, leftpad, table, alibi_slopes],
                        ["bsh.", cache_role, cache_role, "b", "b", "b" + "." * (table.ndim - 1), slopes_role],
                        ["bsh.", "bhs"], what="flash_attn_with_kvcache")


def _attend_local(q, k_cache, v_cache, end, leftpad, table, alibi_slopes, plan: CachePlan):
  b, sq, h, d = q.shape
  hk = k_cache.shape[2]
  g = h // hk
  spec = plan.decode
  # Rows r = i * G + g of each kv head's group form the kernel's query tile.
  qg = q.reshape(b, sq, hk, g, d).transpose(0, 2, 1, 3, 4).reshape(b, hk, sq * g, d)
  alibi = None
  if alibi_slopes is not None:
    slopes = jnp.broadcast_to(jnp.asarray(alibi_slopes, jnp.float32), (b, h)).reshape(b, hk, 1, g)
    alibi = jnp.broadcast_to(slopes, (b, hk, sq, g)).reshape(b, hk, sq * g)
  kernel = functools.partial(triton_decode.decode, spec=spec)
  out, lse = by_platform(
      lambda q, kc, vc, end, pad, table, alibi, interpret: kernel(
          q, kc, vc, end, pad, table, alibi, interpret=interpret),
      qg, k_cache, v_cache, end, leftpad, table, alibi)
  if spec.num_splits > 1:
    out, lse = lse_merge.merge(out, lse, q.dtype)
  out = out.reshape(b, hk, sq, g, d).transpose(0, 2, 1, 3, 4).reshape(b, sq, h, d)
  lse = lse.reshape(b, hk, sq, g).transpose(0, 1, 3, 2).reshape(b, h, sq)
  return out, lse


def lengths(cache_seqlens, cache_leftpad, plan: CachePlan):
  """(seqlens before the append, leftpad) as (b,) int32."""
  b = plan.batch
  if cache_seqlens is None:
    seqlens = jnp.full((b,), plan.capacity, jnp.int32)
  elif isinstance(cache_seqlens, (int, np.integer)):
    seqlens = jnp.full((b,), int(cache_seqlens), jnp.int32)
  else:
    seqlens = cache_seqlens
  leftpad = jnp.zeros((b,), jnp.int32) if cache_leftpad is None else cache_leftpad
  return seqlens, leftpad


@functools.partial(jax.jit, static_argnames=("plan",))
def _run(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, seqlens, cache_batch_idx, leftpad,
         block_table, alibi_slopes, plan: CachePlan):
  if plan.rotary:
    q, k = rotate(q, k, rotary_cos, rotary_sin, seqlens, interleaved=plan.rotary_interleaved,
                  per_row=plan.rotate_q_per_row)
  rows_are_batch = not plan.paged and cache_batch_idx is None and k_cache.shape[0] == plan.batch
  if rows_are_batch and plan.s_new:
    # Each batch / head shard writes its own cache rows (other layouts share cache rows or pages
    # between batch rows, so their scatter is left to XLA).
    k_cache, v_cache = sharding.local(
        lambda kc, vc, k, v, sl: append(kc, vc, k, v, sl, None, None, plan),
        [k_cache, v_cache, k, v, seqlens], ["bsh.", "bsh.", "bsh.", "bsh.", "b"],
        ["bsh.", "bsh."], what="flash_attn_with_kvcache")
  else:
    k_cache, v_cache = append(k_cache, v_cache, k, v, seqlens, cache_batch_idx, block_table, plan)
  out, lse = attend(q, k_cache, v_cache, seqlens + plan.s_new, leftpad,
                    page_table(cache_batch_idx, block_table, plan), alibi_slopes, plan,
                    rows_are_batch)
  return out, lse, k_cache, v_cache


# The torch face's two steps around its in-place append, plain and writing into donated outputs
# (see torch_bridge/_dlpack.py's Kernel).
@functools.partial(jax.jit, static_argnums=(5, 6))
def rotate_plain(q, k, rotary_cos, rotary_sin, seqlens, interleaved: bool, per_row: bool):
  return rotate(q, k, rotary_cos, rotary_sin, seqlens, interleaved=interleaved, per_row=per_row)


@functools.partial(jax.jit, static_argnums=(7, 8), donate_argnums=(5, 6))
def rotate_into(q, k, rotary_cos, rotary_sin, seqlens, q_out, k_out, interleaved: bool,
                per_row: bool):
  del q_out, k_out  # donated: XLA writes the results into them
  return rotate(q, k, rotary_cos, rotary_sin, seqlens, interleaved=interleaved, per_row=per_row)


@functools.partial(jax.jit, static_argnums=(7,))
def attend_plain(q, k_cache, v_cache, end, leftpad, table, alibi_slopes, plan: CachePlan):
  """attend() with table the contiguous cache rows (b,) or the block table (b, max_pages)."""
  return attend(q, k_cache, v_cache, end, leftpad, table, alibi_slopes, plan)


@functools.partial(jax.jit, static_argnums=(9,), donate_argnums=(7, 8))
def attend_into(q, k_cache, v_cache, end, leftpad, table, alibi_slopes, out, lse, plan: CachePlan):
  del out, lse  # donated: XLA writes the results into them
  return attend(q, k_cache, v_cache, end, leftpad, table, alibi_slopes, plan)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None,
                            block_table=None, softmax_scale=None, causal=False, window_size=(-1, -1),
                            softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                            return_softmax_lse=False):
  """Attention of q over a KV cache, after appending the new keys/values k, v to it. Forward only.

  The new keys (rotated first, with rotary) and values are written at absolute positions
  cache_seqlens[b] + j; then row b attends to cache positions [cache_leftpad[b], cache_seqlens[b] +
  seqlen_new), i.e. logical keys 0 .. sk_b - 1 with sk_b = cache_seqlens[b] - cache_leftpad[b] +
  seqlen_new. causal / window_size / ALiBi act on those logical indices, bottom-right aligned as in
  flash_attn_func (seqlen_q=2, sk=5 causal: 1 1 1 1 0 / 1 1 1 1 1; rows with nothing visible give
  out 0 and lse +inf). MQA/GQA: query head h reads kv head h // (nheads / nheads_k).

  Arguments:
    q: (batch, seqlen_q, nheads, headdim).
    k_cache, v_cache: (batch_size_cache, seqlen_cache, nheads_k, headdim), or with block_table
      (num_blocks, page_block_size, nheads_k, headdim); page_block_size a power of two >= 16 or a
      multiple of 256. Same dtype as q.
    k, v: optional (batch, seqlen_new, nheads_k, headdim) new keys/values to append.
    rotary_cos, rotary_sin: optional (seqlen_ro, rotary_dim / 2); rotary_dim <= headdim. Rotate the
      new keys at rows cache_seqlens + j, and q at rows cache_seqlens + i when causal or windowed,
      else all at cache_seqlens; computed in fp32, rounded to q's dtype. Needs k and v.
    cache_seqlens: int or (batch,) int32, the cache length before the append (leftpad included);
      None means the whole cache is valid (then k and v must be None).
    cache_batch_idx: optional (batch,) int32 cache row of each batch row (not with block_table).
    cache_leftpad: optional (batch,) int32 first valid position of each row.
    block_table: optional (batch, max_num_blocks_per_seq) int32; position p of row b lives in page
      block_table[b, p // page_block_size], row p % page_block_size.
    softmax_scale, causal, window_size, softcap, alibi_slopes: as in flash_attn_func.
    rotary_interleaved: True: GPT-J pairs (2r, 2r + 1); False: GPT-NeoX pairs (r, r + rotary_dim / 2).
    num_splits: 0 = heuristic, 1 = no split, n = split each row's keys n ways (merged by lse).
    return_softmax_lse: also return lse (batch, nheads, seqlen_q) fp32.
  Returns:
    (result, k_cache, v_cache): result is out (batch, seqlen_q, nheads, headdim), or (out, lse) with
    return_softmax_lse; the caches come back updated (JAX arrays are immutable: donate them under
    jit, e.g. jax.jit(f, donate_argnums=...), to update them in place).
  """
  plan = prepare(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                 cache_leftpad, block_table, softmax_scale, causal, window_size, softcap,
                 rotary_interleaved, alibi_slopes, num_splits)
  seqlens, leftpad = lengths(cache_seqlens, cache_leftpad, plan)
  out, lse, k_cache, v_cache = _run(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, seqlens,
                                    cache_batch_idx, leftpad, block_table, alibi_slopes, plan=plan)
  return ((out, lse) if return_softmax_lse else out), k_cache, v_cache
