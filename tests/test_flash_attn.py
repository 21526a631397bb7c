"""flash_attn_func against the reference: out, lse, dq, dk, dv under the tolerance rule (numerics.py).

One parametrized sweep serves both machines: the sampled cases run wherever jax runs (interpret mode on
the CPU, Triton on a GPU), and the `gpu`-marked cases add the large shapes that only make sense there.
Sampling: every (seqlens, mask variant) pair appears once, score-only variants take two seqlens each;
heads, head dim, dtype, batch and tile override are drawn from a seeded generator so each of their
values appears many times (the ids stay stable). On the CPU compiling is nearly all of a case's cost.
"""
from __future__ import annotations

import dataclasses
import itertools
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numerics
from pallas_attn import KernelConfigs, TileConfig, flash_attn_func
from pallas_attn.spec import band_from_window

_SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


@dataclasses.dataclass(frozen=True)
class Case:
  b: int
  sq: int
  sk: int
  h: int
  hk: int
  d: int
  dtype: str = "float32"
  causal: bool = False
  window: tuple = (-1, -1)
  softcap: float = 0.0
  alibi: str | None = None  # None, "h" (slopes (H,)) or "bh" (slopes (b, H))
  scale: float | None = None
  tiles: tuple | None = None  # (block_q, block_k) for all three kernels; None: the tuned table
  q_gain: float = 1.0  # multiplies q: large gains make the softmax sharp and stress the online rescaling

  def __str__(self):
    parts = [f"b{self.b}", f"{self.sq}x{self.sk}", f"h{self.h}k{self.hk}", f"d{self.d}", _SHORT[self.dtype]]
    if self.causal:
      parts.append("causal")
    if self.window != (-1, -1):
      parts.append("w{},{}".format(*self.window))
    if self.softcap:
      parts.append(f"cap{self.softcap:g}")
    if self.alibi:
      parts.append(f"alibi{self.alibi}")
    if self.scale is not None:
      parts.append(f"scale{self.scale:g}")
    if self.tiles:
      parts.append("t{}x{}".format(*self.tiles))
    if self.q_gain != 1.0:
      parts.append(f"qx{self.q_gain:g}")
    return "-".join(parts)

  def options(self) -> dict:
    """Keyword arguments shared by flash_attn_func and attention_reference (ALiBi slopes aside)."""
    return dict(causal=self.causal, window_size=self.window, softcap=self.softcap, softmax_scale=self.scale)

  def kernel_configs(self):
    if self.tiles is None:
      return None
    return KernelConfigs(*(TileConfig(*self.tiles),) * 3)

  def inputs(self, seed: int = 0):
    q, *rest = numerics.random_inputs(seed, self.b, self.sq, self.sk, self.h, self.hk, self.d, self.dtype,
                                      self.alibi)
    return (q * jnp.asarray(self.q_gain, q.dtype), *rest)

  def visible(self):
    """(sq, sk) bool: the mask this case asks for."""
    return band_from_window(self.sq, self.sk, self.causal, self.window).visible(np.arange(self.sq),
                                                                                np.arange(self.sk))


def run_ours(case: Case, q, k, v, alibi, dout, dlse):
  """(out, lse, dq, dk, dv) through the public function and jax.vjp."""
  def fn(q, k, v):
    out, lse, _ = flash_attn_func(q, k, v, alibi_slopes=alibi, return_attn_probs=True,
                                  tiles=case.kernel_configs(), **case.options())
    return out, lse

  (out, lse), vjp = jax.vjp(fn, q, k, v)
  return (out, lse, *vjp((dout, dlse)))


def check_case(case: Case, seed: int = 0, lse_cotangent: bool = False):
  q, k, v, alibi, dout, dlse = case.inputs(seed)
  if not lse_cotangent:
    dlse = jnp.zeros_like(dlse)
  ours = run_ours(case, q, k, v, alibi, dout, dlse)
  ref, lowp = numerics.references(q, k, v, alibi, dout, dlse, **case.options())
  numerics.check_attention(ours, lowp, ref)
  return ours


SEQLENS = [(113, 203), (203, 113), (1, 64), (7, 8), (128, 128), (255, 257)]
# Variants that move tile bounds meet every seqlens pair; the others only change the score function.
MASK_VARIANTS = [
    dict(causal=True),
    dict(window=(0, 0)),
    dict(window=(-1, 0)),  # exactly causal
    dict(window=(16, -1)),  # left only
    dict(window=(-1, 16)),  # right only
    dict(window=(32, 8)),
    dict(causal=True, window=(24, 5)),  # causal overrides the right side
    dict(causal=True, softcap=30.0),
    dict(causal=True, alibi="bh"),
    dict(window=(20, 3), softcap=5.0, alibi="bh"),
]
SCORE_VARIANTS = [dict(), dict(softcap=2.0), dict(alibi="h"), dict(scale=0.3)]
HEADS = [(2, 2), (6, 2), (4, 1)]  # MHA, GQA with a group of 3, MQA
HEAD_DIMS = [32, 64, 96, 128, 256]
DTYPES = ["float32"] * 8 + ["bfloat16"] * 9 + ["float16"] * 3
TILES = [None, None, (16, 16), (32, 16), (16, 32)]


def _sampled_cases():
  rng = random.Random(20240611)
  pairs = list(itertools.product(SEQLENS, MASK_VARIANTS))
  rotated = itertools.cycle(SEQLENS)
  pairs += [(next(rotated), variant) for variant in SCORE_VARIANTS for _ in range(2)]
  cases = []
  for (sq, sk), variant in pairs:
    h, hk = rng.choice(HEADS)
    d = rng.choice(HEAD_DIMS)
    # Large problems keep b = 1 so interpret mode stays quick.
    b = 1 if sq * sk * h * d > 2 ** 21 else 2
    cases.append(Case(b, sq, sk, h, hk, d, dtype=rng.choice(DTYPES), tiles=rng.choice(TILES), **variant))
  return cases


SAMPLED_CASES = _sampled_cases()

# Odd corners the sampling may miss: tiny and non-power-of-two head dims, one key, one-tile shapes.
EXTRA_CASES = [
    Case(2, 37, 45, 2, 1, 8, causal=True),
    Case(1, 64, 48, 3, 3, 200, dtype="bfloat16", window=(10, 10)),
    Case(2, 40, 1, 2, 2, 64, causal=True),
    Case(2, 1, 1, 2, 2, 32),
    Case(1, 130, 130, 2, 2, 64, dtype="float16", causal=True, tiles=(16, 16)),
    Case(1, 100, 30, 3, 3, 64, dtype="float16", window=(0, 0), tiles=(32, 16)),
    # Band edges on the residues where an off-by-one in the full-tile range would change the result
    # (off + right + 2 and off - left - 2 divisible by the key tile); test_flash_tiles.py checks all.
    Case(1, 203, 113, 2, 2, 32, window=(32, 8), tiles=(16, 16)),
    Case(1, 113, 203, 2, 1, 64, dtype="bfloat16", window=(88, -1), tiles=(16, 16)),
    # Logits of std ~16: the running max changes by large steps from one key tile to the next.
    Case(2, 113, 203, 4, 2, 64, causal=True, tiles=(16, 16), q_gain=16.0),
    Case(1, 203, 113, 2, 1, 128, dtype="bfloat16", window=(40, 8), alibi="h", q_gain=16.0),
]

# Large shapes for the GPU (Triton): the production tile table, full-length tiles and tails.
GPU_CASES = [
    Case(2, 1024, 1024, 8, 8, 128, dtype="bfloat16"),
    Case(2, 1024, 1024, 8, 8, 128, dtype="bfloat16", causal=True),
    Case(2, 1024, 1024, 8, 2, 128, dtype="bfloat16", causal=True, window=(256, 0), softcap=30.0),
    Case(2, 1024, 1024, 8, 2, 128, dtype="bfloat16", alibi="bh"),
    Case(2, 1023, 1024, 8, 8, 64, dtype="float16", causal=True),
    Case(2, 1024, 1023, 8, 1, 96, dtype="bfloat16", causal=True, alibi="h"),
    Case(1, 1024, 1024, 8, 4, 256, dtype="bfloat16", causal=True),
    Case(1, 2048, 2048, 4, 4, 128, dtype="bfloat16", window=(128, 128)),
    Case(1, 1024, 1024, 4, 2, 64, dtype="float32", causal=True),
    Case(1, 2000, 1000, 8, 8, 128, dtype="bfloat16", causal=True),
    Case(1, 600, 700, 4, 4, 256, dtype="float32"),
    Case(1, 1000, 1000, 4, 2, 256, dtype="float16", causal=True),
]


def _params(cases, gpu_cases=()):
  return ([pytest.param(c, id=str(c)) for c in cases]
          + [pytest.param(c, id=str(c), marks=pytest.mark.gpu) for c in gpu_cases])


def _has_empty_rows(case):
  return not case.visible().any(axis=1).all()


@pytest.mark.parametrize("case", _params(SAMPLED_CASES + EXTRA_CASES, GPU_CASES))
def test_flash_attn_func(case):
  check_case(case)


# The tests below reuse shapes and options of the sweep, so in a full run their kernels are compiled
# already (on the CPU compiling is nearly all of a case's cost); only the inputs differ.


def _pick(predicate):
  return next(c for c in SAMPLED_CASES + EXTRA_CASES if predicate(c))


LSE_COTANGENT_CASES = [
    _pick(lambda c: c.dtype == "bfloat16" and c.hk < c.h and not _has_empty_rows(c)),
    _pick(lambda c: c.dtype == "float16" and c.tiles is not None),
    _pick(lambda c: c.alibi and c.softcap and c.window != (-1, -1) and c.sq > 100),
    _pick(lambda c: c.causal and c.sq > c.sk and c.dtype == "float32"),  # empty rows get dlse too
]


# Softcap's derivative (1 - tanh^2) matters only where the scores bend: a small cap over logits of
# std ~4 (at cap 30 unit-normal scores barely bend, and a backward without it still passes).
SMALL_CAP_CASES = [Case(1, 40, 56, 4, 2, 32, causal=True, softcap=2.0, q_gain=4.0)]
SMALL_CAP_GPU_CASES = [
    Case(2, 1024, 1024, 8, 2, 128, dtype="bfloat16", causal=True, softcap=3.0, q_gain=4.0),
    Case(1, 500, 700, 4, 1, 64, dtype="float16", softcap=2.0, q_gain=4.0),
    Case(1, 256, 300, 4, 2, 96, dtype="float32", window=(64, 0), softcap=5.0, q_gain=4.0),
]


@pytest.mark.parametrize("case", _params(SMALL_CAP_CASES, SMALL_CAP_GPU_CASES))
def test_small_softcap_gradients(case):
  check_case(case, seed=4, lse_cotangent=True)


@pytest.mark.parametrize("case", _params(LSE_COTANGENT_CASES, GPU_CASES[2:3]))
def test_lse_cotangent(case):
  check_case(case, seed=1, lse_cotangent=True)


EMPTY_ROW_CASES = [c for c in SAMPLED_CASES + EXTRA_CASES if _has_empty_rows(c)]


@pytest.mark.parametrize("case", _params(EMPTY_ROW_CASES, GPU_CASES[9:10]))
def test_empty_rows(case):
  visible = case.visible()
  empty_rows = ~visible.any(axis=1)
  unseen_cols = ~visible.any(axis=0)
  out, lse, dq, dk, dv = (numerics.as_f32(x) for x in check_case(case, seed=2, lse_cotangent=True))
  for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
    assert np.isfinite(x).all(), f"{name}: non-finite entries"
  assert np.all(out[:, empty_rows] == 0.0), "out: empty rows must be exactly 0"
  assert np.all(np.isposinf(lse[:, :, empty_rows])), "lse: empty rows must be +inf"
  assert np.all(dq[:, empty_rows] == 0.0), "dq: empty rows must be exactly 0"
  # Keys that no query sees get no gradient at all.
  assert np.all(dk[:, unseen_cols] == 0.0), "dk: keys seen by no query must be 0"
  assert np.all(dv[:, unseen_cols] == 0.0), "dv: keys seen by no query must be 0"


RERUN_CASES = [
    _pick(lambda c: c.dtype == "bfloat16" and c.causal and c.hk < c.h),
    _pick(lambda c: c.alibi and c.softcap and c.tiles == (16, 16)),
]


@pytest.mark.parametrize("case", _params(RERUN_CASES, GPU_CASES[2:3]))
def test_reruns_are_bitwise_identical(case):
  inputs = case.inputs(seed=3)
  first = [np.asarray(x) for x in run_ours(case, *inputs)]
  second = [np.asarray(x) for x in run_ours(case, *inputs)]
  for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), first, second):
    assert a.tobytes() == b.tobytes(), f"{name}: rerun differs bitwise"
