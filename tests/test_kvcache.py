"""flash_attn_with_kvcache (JAX face) against kvcache_reference: out and lse under the tolerance rule
(numerics.py), the appended caches (v exactly, rotated k within one rounding), empty rows, poisoned
cache rows, jit with donated caches, CUDA lowering and argument errors.

Shapes stay tiny (d 32, caches of 64-128 positions, pages of 16): in interpret mode each distinct
static configuration compiles its own kernel, and that is nearly all of a case's cost.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numerics
from pallas_attn import flash_attn_with_kvcache
from pallas_attn.kvcache_reference import kvcache_reference
from pallas_attn.reference import attention_reference

_SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


@dataclasses.dataclass(frozen=True)
class Case:
  b: int = 2
  sq: int = 1
  h: int = 4
  hk: int = 2
  d: int = 32
  s_new: int = 1
  capacity: int = 64  # positions per batch row (contiguous: seqlen_cache; paged: pages * page)
  b_cache: int | None = None  # > b: rows picked by cache_batch_idx
  page: int | None = None  # paged cache with pages of this size
  leftpad: bool = False
  rotary: float = 0.0  # rotary_dim / d
  interleaved: bool = True
  causal: bool = False
  window: tuple = (-1, -1)
  softcap: float = 0.0
  alibi: str | None = None
  splits: int = 1
  dtype: str = "float32"
  seqlens: str = "array"  # "array", "int" or "none" (the whole cache, no new keys)

  def __str__(self):
    parts = [f"b{self.b}", f"q{self.sq}", f"new{self.s_new}", f"h{self.h}k{self.hk}", f"d{self.d}",
             f"cap{self.capacity}", _SHORT[self.dtype], f"split{self.splits}"]
    if self.b_cache:
      parts.append(f"bidx{self.b_cache}")
    if self.page:
      parts.append(f"page{self.page}")
    if self.leftpad:
      parts.append("leftpad")
    if self.rotary:
      parts.append(f"rot{self.rotary:g}{'i' if self.interleaved else 'n'}")
    if self.causal:
      parts.append("causal")
    if self.window != (-1, -1):
      parts.append("w{},{}".format(*self.window))
    if self.softcap:
      parts.append(f"cap{self.softcap:g}")
    if self.alibi:
      parts.append(f"alibi{self.alibi}")
    if self.seqlens != "array":
      parts.append(f"seqlens-{self.seqlens}")
    return "-".join(parts)


def make_inputs(c: Case, seed: int = 0):
  """Keyword arguments of flash_attn_with_kvcache for case c (caches filled with random values
  everywhere, so stale rows past the lengths are real numbers the kernel must ignore)."""
  rng = np.random.default_rng(seed)
  dtype = jnp.dtype(c.dtype)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
  q = normal(c.b, c.sq, c.h, c.d)
  kw = dict(q=q, causal=c.causal, window_size=c.window, softcap=c.softcap, num_splits=c.splits)
  if c.page:
    n_pages = c.capacity // c.page
    total = c.b * n_pages + 3  # spare pages that no row uses
    kw["k_cache"], kw["v_cache"] = normal(total, c.page, c.hk, c.d), normal(total, c.page, c.hk, c.d)
    kw["block_table"] = jnp.asarray(rng.permutation(total)[:c.b * n_pages].reshape(c.b, n_pages),
                                    jnp.int32)
  else:
    rows = c.b_cache or c.b
    kw["k_cache"], kw["v_cache"] = normal(rows, c.capacity, c.hk, c.d), normal(rows, c.capacity, c.hk, c.d)
    if c.b_cache:
      kw["cache_batch_idx"] = jnp.asarray(rng.permutation(c.b_cache)[:c.b], jnp.int32)
  if c.seqlens == "none":
    seqlens = np.full((c.b,), c.capacity)
  else:
    seqlens = rng.integers(0, c.capacity - c.s_new + 1, c.b)
    seqlens[0] = c.capacity - c.s_new  # one row filled to the brim
    if c.seqlens == "int":
      seqlens[:] = seqlens[0] // 2
    kw["cache_seqlens"] = int(seqlens[0]) if c.seqlens == "int" else jnp.asarray(seqlens, jnp.int32)
  if c.leftpad:
    kw["cache_leftpad"] = jnp.asarray(rng.integers(0, seqlens + 1), jnp.int32)
  if c.s_new:
    kw["k"], kw["v"] = normal(c.b, c.s_new, c.hk, c.d), normal(c.b, c.s_new, c.hk, c.d)
  if c.rotary:
    half = int(c.rotary * c.d) // 2
    angles = np.arange(c.capacity + 16)[:, None] * (10000.0 ** (-np.arange(half) / half))[None, :]
    kw["rotary_cos"] = jnp.asarray(np.cos(angles), jnp.float32).astype(dtype)
    kw["rotary_sin"] = jnp.asarray(np.sin(angles), jnp.float32).astype(dtype)
    kw["rotary_interleaved"] = c.interleaved
  if c.alibi:
    shape = {"h": (c.h,), "bh": (c.b, c.h)}[c.alibi]
    kw["alibi_slopes"] = jnp.asarray(rng.uniform(0.01, 0.3, shape), jnp.float32)
  return kw


def reference(kw, upcast=True):
  ref_kw = {n: x for n, x in kw.items() if n not in ("num_splits",)}
  seqlens = ref_kw.get("cache_seqlens")
  if isinstance(seqlens, int):
    ref_kw["cache_seqlens"] = jnp.full((kw["q"].shape[0],), seqlens, jnp.int32)
  return kvcache_reference(**ref_kw, upcast=upcast)


def check_case(c: Case, seed: int = 0):
  kw = make_inputs(c, seed)
  (out, lse), k_cache, v_cache = flash_attn_with_kvcache(**kw, return_softmax_lse=True)
  (r_out, r_lse), r_k, r_v = reference(kw)
  (l_out, l_lse), _, _ = reference(kw, upcast=False)
  numerics.assert_output("out", out, l_out, r_out)
  numerics.assert_lse(lse, l_lse, r_lse)
  np.testing.assert_array_equal(numerics.as_f32(v_cache), numerics.as_f32(r_v), err_msg="v_cache")
  # The rotated keys may differ from the reference's by the final rounding (fused multiply-adds).
  k_err = numerics.max_err(k_cache, r_k)
  assert k_err <= 2 * numerics.eps(c.dtype) * max(numerics.as_f32(r_k).max(), 1.0), f"k_cache err {k_err}"
  return out, lse


CASES = [
    # contiguous caches
    Case(),
    Case(sq=3, s_new=3, causal=True, splits=3),
    Case(b=2, b_cache=3, leftpad=True, splits=3, rotary=0.5),
    Case(sq=2, s_new=0, h=4, hk=1, capacity=100, splits=0),
    Case(seqlens="none", s_new=0, sq=2, h=2, hk=2, splits=3, capacity=80),
    Case(seqlens="int", sq=2, s_new=2, causal=True, rotary=1.0, interleaved=False),
    Case(sq=4, s_new=1, window=(8, 0), alibi="h", splits=3),
    Case(sq=3, s_new=3, window=(5, 2), softcap=5.0, rotary=0.5, interleaved=False),
    Case(sq=2, s_new=2, alibi="bh", causal=True, b_cache=4, leftpad=True, splits=2, capacity=128),
    Case(sq=16, s_new=16, h=8, hk=2, causal=True, splits=3, capacity=128),  # 128 query rows: 2 row tiles
    Case(d=40, h=6, hk=3, sq=2, s_new=1, rotary=0.5, causal=True),  # odd head dim and group
    Case(dtype="bfloat16", sq=2, s_new=2, causal=True, rotary=1.0, splits=3),
    Case(dtype="float16", b_cache=3, leftpad=True, alibi="h", softcap=10.0),
    # paged caches
    Case(page=16, capacity=64),
    Case(page=16, capacity=96, sq=3, s_new=3, causal=True, splits=3, rotary=0.5, interleaved=False),
    Case(page=16, capacity=64, leftpad=True, window=(10, -1), splits=3, rotary=1.0),
    Case(page=16, capacity=64, s_new=0, sq=2, alibi="h", h=4, hk=1, splits=0),
    Case(page=32, capacity=128, seqlens="int", sq=2, s_new=1, softcap=5.0, dtype="bfloat16"),
    Case(page=256, capacity=512, sq=2, s_new=2, causal=True, splits=3, rotary=0.5),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kvcache_parity(case):
  check_case(case)


def test_reference_matches_dense_attention():
  """The reference against attention_reference on each row's valid keys (an independent route)."""
  c = Case(b=3, sq=3, s_new=2, b_cache=4, leftpad=True, causal=True, alibi="bh", softcap=4.0)
  kw = make_inputs(c, seed=5)
  (out, lse), k_cache, v_cache = reference(kw)
  seqlens = np.asarray(kw["cache_seqlens"]) + c.s_new
  pad, idx = np.asarray(kw["cache_leftpad"]), np.asarray(kw["cache_batch_idx"])
  for b in range(c.b):
    rows = slice(pad[b], seqlens[b])
    r_out, r_lse = attention_reference(
        kw["q"][b:b + 1], k_cache[idx[b]][None, rows], v_cache[idx[b]][None, rows], causal=True,
        softcap=c.softcap, alibi_slopes=kw["alibi_slopes"][b:b + 1])
    np.testing.assert_allclose(out[b], r_out[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lse[b], r_lse[0], atol=1e-5, rtol=1e-5)


def test_splits_agree():
  """num_splits changes only rounding."""
  c = Case(sq=2, s_new=1, capacity=128, causal=True)
  kw = make_inputs(c)
  outs = [flash_attn_with_kvcache(**{**kw, "num_splits": n}, return_softmax_lse=True)[0]
          for n in (1, 3, 7)]
  for out, lse in outs[1:]:
    np.testing.assert_allclose(out, outs[0][0], atol=2e-6)
    np.testing.assert_allclose(lse, outs[0][1], atol=2e-6)


def test_empty_rows():
  """No visible key (leftpad == length, or causal rows above the keys): out 0, lse +inf, no NaN."""
  c = Case(sq=3, s_new=0, causal=True, leftpad=True, splits=3, capacity=64)
  kw = make_inputs(c)
  kw["cache_seqlens"] = jnp.asarray([5, 9], jnp.int32)
  kw["cache_leftpad"] = jnp.asarray([5, 8], jnp.int32)  # 0 keys, and 1 key for 3 causal rows
  (out, lse), _, _ = flash_attn_with_kvcache(**kw, return_softmax_lse=True)
  numerics.assert_no_nan("out", out)
  assert np.all(np.asarray(out[0]) == 0) and np.all(np.isposinf(np.asarray(lse[0])))
  assert np.all(np.isposinf(np.asarray(lse[1, :, :2]))) and np.all(np.isfinite(np.asarray(lse[1, :, 2])))
  check_case(c)  # and the random-length version of it


@pytest.mark.parametrize("page", [None, 16])
def test_stale_rows_never_read(page):
  """Cache rows outside [leftpad, length) may hold NaN: results equal those of a clean cache."""
  c = Case(sq=2, s_new=1, leftpad=True, page=page, splits=3, causal=True)
  kw = make_inputs(c)
  (clean, _), _, _ = flash_attn_with_kvcache(**kw, return_softmax_lse=True)
  pad, end = np.asarray(kw["cache_leftpad"]), np.asarray(kw["cache_seqlens"])
  k_cache, v_cache = np.array(kw["k_cache"]), np.array(kw["v_cache"])
  for b in range(c.b):
    for p in [*range(0, pad[b]), *range(end[b] + c.s_new, c.capacity)]:
      if page:
        at = (int(kw["block_table"][b, p // page]), p % page)
      else:
        at = (b, p)
      k_cache[at], v_cache[at] = np.nan, np.nan
  (dirty, _), _, _ = flash_attn_with_kvcache(**{**kw, "k_cache": jnp.asarray(k_cache),
                                                "v_cache": jnp.asarray(v_cache)},
                                             return_softmax_lse=True)
  np.testing.assert_array_equal(np.asarray(dirty), np.asarray(clean))


def test_jit_with_donated_caches():
  """A decode step under jit with the caches donated, run twice: lengths are traced (one compile)."""
  c = Case(sq=1, s_new=1, rotary=0.5, causal=True, page=16)
  kw = make_inputs(c)

  @jax.jit
  def step(q, k_cache, v_cache, k, v, seqlens):
    out, k_cache, v_cache = flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, kw["rotary_cos"], kw["rotary_sin"], seqlens,
        block_table=kw["block_table"], causal=True, num_splits=1)
    return out, k_cache, v_cache

  step = jax.jit(step, donate_argnums=(1, 2))
  seqlens = jnp.asarray([3, 10], jnp.int32)
  kw2 = {**kw, "cache_seqlens": seqlens}
  (r_out, _), r_k, r_v = reference(kw2)
  out, k_cache, v_cache = step(kw["q"], jnp.array(kw["k_cache"]), jnp.array(kw["v_cache"]), kw["k"],
                               kw["v"], seqlens)
  np.testing.assert_allclose(out, r_out, atol=1e-5)
  np.testing.assert_array_equal(v_cache, r_v)
  # Second step on the returned caches, one position further.
  (r_out2, _), _, _ = reference({**kw2, "k_cache": r_k, "v_cache": r_v, "cache_seqlens": seqlens + 1})
  out2, _, _ = step(kw["q"], k_cache, v_cache, kw["k"], kw["v"], seqlens + 1)
  np.testing.assert_allclose(out2, r_out2, atol=1e-5)


@pytest.mark.parametrize("paged,splits", [(False, 1), (False, 4), (True, 1), (True, 4)])
def test_kvcache_lowers_for_cuda(paged, splits):
  """The decode kernel lowers to Triton (checked on the CPU, as in test_lowering.py)."""
  b, h, hk, d = 2, 32, 8, 128
  q = jnp.zeros((b, 1, h, d), jnp.bfloat16)
  if paged:
    cache, table = jnp.zeros((40, 256, hk, d), jnp.bfloat16), jnp.zeros((b, 16), jnp.int32)
  else:
    cache, table = jnp.zeros((b, 1000, hk, d), jnp.bfloat16), None
  new = jnp.zeros((b, 1, hk, d), jnp.bfloat16)
  cos = jnp.zeros((4096, 32), jnp.bfloat16)

  def f(q, k_cache, v_cache, k, v, seqlens, leftpad):
    return flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cos, cos, seqlens, None, leftpad,
                                   table, causal=True, window_size=(300, -1), softcap=20.0,
                                   alibi_slopes=jnp.ones((h,), jnp.float32), num_splits=splits,
                                   return_softmax_lse=True)

  lens = jnp.zeros((b,), jnp.int32)
  text = jax.jit(f).trace(q, cache, cache, new, new, lens, lens).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 1


def _bad(**changes):
  kw = make_inputs(Case(page=None, rotary=0.5, leftpad=True))
  kw.update(changes)
  return kw


@pytest.mark.parametrize("changes,error,match", [
    (dict(q=jnp.zeros((2, 1, 4), jnp.float32)), ValueError, "q:"),
    (dict(k_cache=jnp.zeros((2, 64, 2, 32), jnp.bfloat16)), TypeError, "k_cache"),
    (dict(v_cache=jnp.zeros((2, 64, 2, 16), jnp.float32)), ValueError, "v_cache"),
    (dict(k_cache=jnp.zeros((2, 64, 3, 32)), v_cache=jnp.zeros((2, 64, 3, 32))), ValueError, "nheads_k"),
    (dict(v=None), ValueError, "v: k and v"),
    (dict(k=jnp.zeros((2, 1, 2, 16))), ValueError, "k:"),
    (dict(cache_seqlens=None), ValueError, "cache_seqlens: required"),
    (dict(cache_seqlens=jnp.asarray([1, 2], jnp.int64 if jax.config.x64_enabled else jnp.uint32)),
     TypeError, "cache_seqlens"),
    (dict(cache_seqlens=jnp.asarray([1, 2, 3], jnp.int32)), ValueError, "cache_seqlens"),
    (dict(cache_seqlens=jnp.asarray([64, 2], jnp.int32)), ValueError, "cache_seqlens"),
    (dict(cache_leftpad=jnp.asarray([1.0, 2.0])), TypeError, "cache_leftpad"),
    (dict(cache_batch_idx=jnp.asarray([0, 1], jnp.int32), block_table=jnp.zeros((2, 4), jnp.int32)),
     ValueError, "cache_batch_idx"),
    (dict(cache_batch_idx=jnp.asarray([0, 5], jnp.int32)), ValueError, "cache_batch_idx"),
    (dict(block_table=jnp.zeros((2, 4), jnp.float32)), TypeError, "block_table"),
    (dict(k_cache=jnp.zeros((8, 24, 2, 32)), v_cache=jnp.zeros((8, 24, 2, 32)),
          block_table=jnp.zeros((2, 4), jnp.int32), cache_leftpad=None), ValueError, "page_block_size"),
    (dict(rotary_sin=None), ValueError, "rotary_sin"),
    (dict(k=None, v=None), ValueError, "rotary_cos: rotary embedding needs"),
    (dict(rotary_cos=jnp.zeros((64, 20)), rotary_sin=jnp.zeros((64, 20))), ValueError, "rotary_dim"),
    (dict(rotary_cos=jnp.zeros((8, 8)), rotary_sin=jnp.zeros((8, 8))), ValueError, "rotary_cos"),
    (dict(window_size=(-2, 0)), ValueError, "window_size"),
    (dict(alibi_slopes=jnp.zeros((3,), jnp.float32)), ValueError, "alibi_slopes"),
    (dict(num_splits=-1), ValueError, "num_splits"),
])
def test_bad_arguments(changes, error, match):
  with pytest.raises(error, match=match):
    flash_attn_with_kvcache(**_bad(**changes))


@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    Case(b=4, sq=1, h=32, hk=8, d=128, capacity=4096, dtype="bfloat16", splits=0, causal=True),
    Case(b=4, sq=4, h=32, hk=8, d=128, capacity=4096, page=256, dtype="bfloat16", splits=0,
         causal=True, rotary=1.0, leftpad=True),
    Case(b=2, sq=8, h=16, hk=16, d=96, capacity=2048, page=16, dtype="float16", splits=5,
         window=(300, 0), alibi="h"),
], ids=str)
def test_kvcache_parity_gpu(case):
  check_case(case)


# ----------------------------------------------------------------------------------------------------
# Bounds: lengths past the cache are rejected when known, clamped in the kernel when traced.

@pytest.mark.parametrize("s_new", [0, 1])
def test_seqlens_past_block_table_raise_runtime_error(s_new):
  """As flash-attn: a RuntimeError (ours is also a ValueError, like every other bad value)."""
  kw = make_inputs(Case(page=16, capacity=64, s_new=s_new))
  kw["cache_seqlens"] = jnp.asarray([65, 3], jnp.int32)
  with pytest.raises(RuntimeError, match=r"^cache_seqlens: expected at most 64 \(block_table holds "
                                         r"4 pages of 16"):
    flash_attn_with_kvcache(**kw)


@pytest.mark.parametrize("page,seqlens", [(None, [63, 3]), (16, [2, 63]), (None, 63)],
                         ids=["contiguous", "paged", "int"])
def test_append_past_cache_end_raises(page, seqlens):
  kw = make_inputs(Case(page=page, capacity=64, s_new=2, sq=2))
  kw["cache_seqlens"] = seqlens if isinstance(seqlens, int) else jnp.asarray(seqlens, jnp.int32)
  with pytest.raises(ValueError, match=r"^cache_seqlens: appending 2 new tokens at cache_seqlens "
                                       r".* runs past the end of the cache \(64 positions"):
    flash_attn_with_kvcache(**kw)


@pytest.mark.parametrize("page", [None, 16])
def test_traced_seqlens_past_capacity_are_clamped(page):
  """Under jit nobody can check the lengths: the kernel clamps them to the cache's capacity, so row
  0's keys past it (which would be the next row's table entries, or cache row) are never read."""
  kw = make_inputs(Case(page=page, capacity=64, s_new=0, sq=2, splits=1))
  f = jax.jit(lambda lens: flash_attn_with_kvcache(**{**kw, "cache_seqlens": lens},
                                                   return_softmax_lse=True)[0])
  out, lse = f(jnp.asarray([64 + 40, 64], jnp.int32))
  (r_out, r_lse), _, _ = reference({**kw, "cache_seqlens": jnp.asarray([64, 64], jnp.int32)})
  (l_out, l_lse), _, _ = reference({**kw, "cache_seqlens": jnp.asarray([64, 64], jnp.int32)},
                                   upcast=False)
  numerics.assert_output("out", out, l_out, r_out)
  numerics.assert_lse(lse, l_lse, r_lse)
