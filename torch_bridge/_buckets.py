"""Sequence-length buckets: new lengths reuse compiled kernels instead of compiling their own.

Every compiled kernel is keyed by its operands' shapes, so a call at a sequence length not seen
before compiles a new kernel set (1-2 s on an H200 in bf16). Where lengths keep changing (a decode
loop over a growing cache, varlen batches), a call instead runs on operands padded to a bucket
length, with the real lengths as run-time offsets (the varlen kernels read them from cu_seqlens):
lengths 1..L then compile O(log L) kernel sets.

The rule (`Buckets.padded`): a static configuration (everything but the lengths) runs at its exact
lengths for the first `exact` distinct lengths it meets, so a training loop at one fixed length
never pads; from then on, a length it has not run at exactly goes to its bucket. `mode`:
  "auto" (default): that rule; "always": every call pads to its bucket; "never": exact lengths only.
Set with `set_mode` or the environment variable TORCH_BRIDGE_LENGTH_BUCKETS.

The bucket lengths are pallas_attn.buckets.bucket's (four per octave), shared with the JAX face's
`bucket_lengths=True`.
"""
from __future__ import annotations

import os
import threading
from typing import Hashable

from pallas_attn.buckets import bucket  # noqa: F401  (the lengths themselves)

MODES = ("auto", "always", "never")


class Buckets:
  """Which calls pad to their bucket (see the module docstring); one instance per family."""

  def __init__(self, exact: int = 2, mode: str | None = None):
    self.exact = exact
    self._mode = mode
    self._seen: dict[Hashable, set] = {}
    self._lock = threading.Lock()

  @property
  def mode(self) -> str:
    mode = self._mode or _MODE[0] or os.environ.get("TORCH_BRIDGE_LENGTH_BUCKETS", "auto")
    if mode not in MODES:
      raise ValueError(f"TORCH_BRIDGE_LENGTH_BUCKETS: expected one of {MODES}, got {mode!r}")
    return mode

  def padded(self, config: Hashable, lengths: tuple) -> bool:
    """Whether a call of static configuration `config` at `lengths` runs padded to its bucket."""
    mode = self.mode
    if mode != "auto":
      return mode == "always"
    seen = self._seen.get(config)
    if seen is not None and lengths in seen:
      return False
    with self._lock:
      seen = self._seen.setdefault(config, set())
      if len(seen) < self.exact:
        seen.add(lengths)
        return False
    return True

  def clear(self) -> None:
    with self._lock:
      self._seen.clear()


_MODE: list = [None]  # set_mode's value; None: the environment's


def set_mode(mode: str | None) -> None:
  """"auto", "always" or "never" for every family (None: back to TORCH_BRIDGE_LENGTH_BUCKETS)."""
  if mode is not None and mode not in MODES:
    raise ValueError(f"mode: expected one of {MODES} or None, got {mode!r}")
  _MODE[0] = mode
