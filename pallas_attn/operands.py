"""The flash family's optional inputs and its backward's results as named pytrees.

`Operands` holds every optional input of one attention call, None where absent; each field's
metadata names the AttentionSpec flag that enables it, so the spec and the operands are checked
against each other in one place (`Operands.check`) and every consumer (flash.py, the sharding roles,
the kernel launchers) addresses an operand by name instead of by its place in a tuple. `Grads` is
the backward's result: dq, dk, dv, and the gradient of whichever differentiable optional input the
spec has (dsink with sinks, dbias with the dynamic mask).

Both are registered with jax.tree_util (every field a child; absent ones are None, an empty
pytree), so they pass through jit, shard_map and lax.platform_dependent as they are.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax

Array = Any


def _enabled_by(flag: str, what: str):
  return dataclasses.field(default=None, metadata={"flag": flag, "what": what})


@dataclasses.dataclass(frozen=True)
class Operands:
  """Optional inputs of one flash call (layouts: pallas_attn/flash.py). Field order is the order
  the Triton kernels take them in (backends/triton_flash.py reads its refs in this order)."""
  seqlens: tuple | None = _enabled_by("varlen", "(cu_seqlens_q, cu_seqlens_k) int32 (b + 1,)")
  block_table: Array | None = _enabled_by("page", "int32 (b, max_blocks) pages of each sequence")
  alibi: Array | None = _enabled_by("alibi", "fp32 (b, H, 1) slopes")
  sink: Array | None = _enabled_by("sink", "fp32 sink logits in the kernels' layout")
  seed: Array | None = _enabled_by("dropout_p", "int32 (1,) dropout seed")
  bias: Array | None = _enabled_by("bias_mask", "(b, Hk, sq, sk) additive bias, q's dtype")
  keep: Array | None = _enabled_by("bias_mask", "(b, Hk, sq, sk) element mask (> 0 keeps)")

  @classmethod
  def of(cls, alibi=None, sink=None, seqlens=None, seed=None, bias=None, keep=None) -> Operands:
    """From flash.forward's positional form, where seqlens carries the block table as a third
    entry when keys are paged."""
    seqlens = tuple(seqlens) if seqlens is not None else None
    table = seqlens[2] if seqlens is not None and len(seqlens) > 2 else None
    return cls(seqlens=None if seqlens is None else seqlens[:2], block_table=table, alibi=alibi,
               sink=sink, seed=seed, bias=bias, keep=keep)

  @staticmethod
  def flag(name: str) -> str:
    """The AttentionSpec attribute that enables operand `name`."""
    return _FIELDS[name].metadata["flag"]

  @staticmethod
  def enabled(name: str, spec) -> bool:
    return bool(getattr(spec, Operands.flag(name)))

  def check(self, spec) -> None:
    """Raises ValueError unless exactly the operands that spec's flags enable are present."""
    for name, field in _FIELDS.items():
      given, wanted = getattr(self, name) is not None, self.enabled(name, spec)
      if given != wanted:
        flag = field.metadata["flag"]
        raise ValueError(
            f"{name}: spec.{flag}={getattr(spec, flag)!r} "
            + (f"needs it ({field.metadata['what']}), got None" if wanted
               else "takes none, got an array"))


@dataclasses.dataclass(frozen=True)
class Grads:
  """The backward's results in the input dtypes; dsink (fp32, the layout of the kernels' sink)
  with spec.sink, dbias (like bias, zero where masked) with spec.bias_mask, else None."""
  dq: Array
  dk: Array
  dv: Array
  dsink: Array | None = None
  dbias: Array | None = None

  def astuple(self) -> tuple:
    """(dq, dk, dv), then dsink or dbias where present: flash.backward's positional return."""
    extra = tuple(g for g in (self.dsink, self.dbias) if g is not None)
    return (self.dq, self.dk, self.dv) + extra


_FIELDS = {f.name: f for f in dataclasses.fields(Operands)}

for _cls in (Operands, Grads):
  jax.tree_util.register_dataclass(_cls, data_fields=[f.name for f in dataclasses.fields(_cls)],
                                   meta_fields=[])
