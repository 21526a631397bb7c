"""The static description of one attention problem: which variant options the kernels compile in.

Every field is hashable, so a spec is a jit static argument and each distinct spec compiles once.
"""
from __future__ import annotations

import dataclasses
import math

from pallas_attn.masking import BandMask

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """Score pipeline of SPEC section 0: scale or softcap, then additive terms (ALiBi), then the mask."""
  mask: BandMask
  scale: float
  softcap: float = 0.0
  alibi: bool = False
  sink: str | None = None  # "sh": logits (s_sink, H) shared by all rows; "ssh": per query row
  # Packed sequences addressed by cu_seqlens; mask.sq / mask.sk are then the (bucketed) maximum
  # lengths that size the grid, and each sequence gets the same band with its own lengths.
  varlen: bool = False
  dropout_p: float = 0.0  # > 0: the kernels take an int32 (1,) seed (see pallas_attn/dropout.py)
  # Dynamic mask (SPEC section 5): an additive bias and an element mask (keep > 0), both
  # (b, Hk, sq, sk) and shared by a kv head's query heads, read tile by tile; the tiles each program
  # visits come from per-(batch, kv head) tables built from the mask (masking.dynamic_tables).
  bias_mask: bool = False
  # > 0 (varlen forward only): keys and values are paged caches (num_blocks, page, Hk, d), and key
  # position p of sequence s lives in page block_table[s, p // page], row p % page. Key tiles are
  # cut so that none straddles a page, and each is read from its page in place.
  page: int = 0
  # The kernel backend to use (backends/registry.py), None to let the dispatcher choose per call.
  # A static option like the others: it reaches every kernel call the spec does (the custom VJP's
  # backward, the torch bridge), and each backend compiles its own kernels.
  backend: str | None = None

  def __post_init__(self):
    if self.backend is not None and not isinstance(self.backend, str):
      raise TypeError(f"backend: expected a backend name (str) or None, got {self.backend!r}")
    if self.bias_mask and (self.mask.tabled or self.varlen or self.sink or self.alibi):
      raise ValueError("bias_mask combines only with band masks, softcap and dropout")
    # A key tile (a power of two >= 16, Triton's smallest dot) must divide the page.
    if self.page and not (self.varlen and not self.mask.tabled and self.page % 16 == 0):
      raise ValueError("page: paged keys need varlen, a band mask and a page size divisible by 16")

  @property
  def tabled(self) -> bool:
    """Whether kernels walk tile tables (static ones from the mask rule, or dynamic ones)."""
    return self.mask.tabled or self.bias_mask

  @property
  def sq(self) -> int:
    return self.mask.sq

  @property
  def sk(self) -> int:
    return self.mask.sk


def band_from_window(sq: int, sk: int, causal: bool, window_size) -> BandMask:
  """flash-attn's (causal, window_size) pair as a band; -1 is unbounded and causal forces right = 0."""
  left, right = window_size
  if causal:
    right = 0
  return BandMask(sq=sq, sk=sk, left=None if left < 0 else int(left),
                  right=None if right < 0 else int(right))
