"""Benchmark cases (one attention problem each) and the named sets that group them.

A case states the problem only: shapes, dtype, mask and score options. Providers decide from
`Case.features()` whether they can run it. To add a variant row, add one line to VARIANTS; an option
the Case cannot express yet needs a field here and a feature name in `features()` (providers that do
not list the feature then skip the row on their own).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

DIRECTIONS = ("fwd", "fwdbwd")
# Forward plus backward costs 2.5x the forward's matmul work (dQ, dK, dV, dP and the recomputed S).
FWDBWD_FACTOR = 3.5

HEADLINE_SHAPES = ((4, 16, 4096), (1, 16, 16384))  # (b, H, s) at d = 128, bf16

# Options layered on plain attention at the headline shape. Every row is also reported as a fraction of
# the same provider's "plain" TFLOP/s there; FLOPs count only the kept work, so that fraction compares
# the variant with plain attention at equal work.
VARIANTS = (
    ("plain", {}),
    ("window1024", {"window": (1024, 1024)}),  # with causal the right side becomes 0: a sliding window
    ("softcap30", {"softcap": 30.0}),
    ("alibi", {"alibi": True}),
    ("gqa4", {"group": 4}),
)
# Causal only: it is how these options are used in practice (sliding-window, softcapped, ALiBi and GQA
# models are all decoders), and every extra problem costs a compile per provider in the default budget.
VARIANT_CAUSAL = (True,)

# Decode rows run flash_attn_with_kvcache over a full contiguous cache (bench/decode.py adds paged caches
# and append steps). The first is SPEC section 6's FA2 yardstick (409 us).
DECODE = (
    ("kvcache", dict(b=8, h=32, sq=1, sk=8192, d=128)),
    ("kvcache-gqa8", dict(b=8, h=32, sq=1, sk=8192, d=128, group=8)),
)


@dataclasses.dataclass(frozen=True)
class Case:
  b: int
  h: int
  sq: int
  sk: int
  d: int
  dtype: str = "bfloat16"
  causal: bool = False
  window: tuple[int, int] = (-1, -1)
  softcap: float = 0.0
  alibi: bool = False
  group: int = 1  # query heads per kv head
  kind: str = "attn"  # "attn", or "decode" (kv-cache API, forward only)
  label: str = "plain"
  set: str = ""

  @property
  def hk(self) -> int:
    return self.h // self.group

  @property
  def scale(self) -> float:
    return 1.0 / math.sqrt(self.d)

  @property
  def window_eff(self) -> tuple[int, int]:
    """(left, right) as the mask sees it: causal forces right = 0; -1 is unbounded."""
    left, right = self.window
    if self.causal:
      right = 0
    return (left, right)

  @property
  def key(self) -> tuple:
    """The problem without its set and label: equal keys share inputs and measurements."""
    return (self.kind, self.b, self.h, self.group, self.sq, self.sk, self.d, self.dtype,
            self.window_eff, self.softcap, self.alibi)

  @property
  def directions(self) -> tuple[str, ...]:
    return ("fwd",) if self.kind == "decode" else DIRECTIONS

  def features(self) -> frozenset[str]:
    left, right = self.window_eff
    f = set()
    if self.causal:
      f.add("causal")
    if left >= 0 or (right >= 0 and not self.causal):
      f.add("window")
    if self.sq != self.sk and (left >= 0 or right >= 0):
      f.add("offset")  # bottom-right alignment matters; top-left-causal peers would disagree
    if self.softcap > 0:
      f.add("softcap")
    if self.alibi:
      f.add("alibi")
    if self.group > 1:
      f.add("gqa")
    if self.kind == "decode":
      f.add("decode")
    return frozenset(f)

  def plain(self) -> Case:
    """The same shape without any variant option: the baseline of the variants' x-plain column."""
    return dataclasses.replace(self, window=(-1, -1), softcap=0.0, alibi=False, group=1, label="plain")

  def kept_pairs(self) -> float:
    """(query, key) pairs whose product is counted.

    Plain causal with sq == sk counts half the square (the published convention, SPEC section 6);
    any other band counts its visible pairs exactly.
    """
    left, right = self.window_eff
    if left < 0 and right < 0:
      return float(self.sq * self.sk)
    if left < 0 and right == 0 and self.sq == self.sk:
      return self.sq * self.sk / 2.0
    i = np.arange(self.sq, dtype=np.int64) + (self.sk - self.sq)
    lo = np.maximum(i - left, 0) if left >= 0 else np.zeros_like(i)
    hi = np.minimum(i + right, self.sk - 1) if right >= 0 else np.full_like(i, self.sk - 1)
    return float(np.maximum(hi - lo + 1, 0).sum())

  def flops(self, direction: str) -> float:
    fwd = 4.0 * self.b * self.h * self.d * self.kept_pairs()
    return fwd * (FWDBWD_FACTOR if direction == "fwdbwd" else 1.0)

  def min_bytes(self) -> int:
    """HBM traffic lower bound of the forward: read q, k, v once and write out."""
    item = np.dtype(self.dtype).itemsize if self.dtype != "bfloat16" else 2
    return item * (2 * self.b * self.sq * self.h * self.d + 2 * self.b * self.sk * self.hk * self.d)

  def shape_str(self) -> str:
    heads = f"{self.h}" if self.group == 1 else f"{self.h}/{self.hk}"
    seq = f"{self.sq}" if self.sq == self.sk else f"{self.sq}x{self.sk}"
    return f"b{self.b} H{heads} s{seq} d{self.d}"


def _headline() -> list[Case]:
  return [Case(b=b, h=h, sq=s, sk=s, d=128, causal=causal, set="headline")
          for b, h, s in HEADLINE_SHAPES for causal in (False, True)]


def _variants() -> list[Case]:
  b, h, s = HEADLINE_SHAPES[0]
  return [dataclasses.replace(Case(b=b, h=h, sq=s, sk=s, d=128, causal=causal, set="variants", label=label),
                              **opts)
          for label, opts in VARIANTS for causal in VARIANT_CAUSAL]


def _headdims() -> list[Case]:
  # The headline's tokens and hidden size (4 x 4096, H * d = 2048) at the other head dims the targets name.
  b, h, s = HEADLINE_SHAPES[0]
  return [Case(b=b, h=h * 128 // d, sq=s, sk=s, d=d, causal=causal, set="headdims")
          for d in (64, 256) for causal in (False, True)]


def _standard() -> list[Case]:
  # FlashAttention's sweep: 16k tokens per batch and hidden size 2048 at every point.
  return [Case(b=16384 // s, h=2048 // d, sq=s, sk=s, d=d, dtype=dtype, causal=causal, set="standard")
          for dtype in ("bfloat16", "float16") for d in (64, 128, 256) for causal in (False, True)
          for s in (512, 1024, 2048, 4096, 8192, 16384)]


def _decode() -> list[Case]:
  return [Case(kind="decode", label=label, set="decode", **shape) for label, shape in DECODE]


def _smoke() -> list[Case]:
  # Few problems: each costs interpret-mode compiles, and the test must stay well under a minute.
  return [Case(b=1, h=2, sq=s, sk=s, d=64, causal=causal, set="smoke")
          for causal, s in ((False, 64), (False, 128), (True, 128))] + [
              Case(b=1, h=2, sq=128, sk=128, d=64, window=(32, 32), label="window32", set="smoke")]


CASE_SETS = {
    "headline": _headline,
    "variants": _variants,
    "headdims": _headdims,
    "standard": _standard,
    "decode": _decode,
    "smoke": _smoke,
}
# Sets that are not attention cases: bridge per-call overhead comes from bench/bridge_overhead.py.
OTHER_SETS = ("overhead",)
ALL_SETS = tuple(CASE_SETS) + OTHER_SETS
DEFAULT_SETS = ("headline", "variants", "headdims")


def cases_for(names) -> list[Case]:
  out = []
  for name in names:
    if name in CASE_SETS:
      out.extend(CASE_SETS[name]())
  return out
