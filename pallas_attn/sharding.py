"""Sharded inputs: every kernel call computes each batch / head shard locally, with no communication.

A Pallas kernel cannot be partitioned by XLA: under an Explicit mesh it does not trace on sharded
operands at all, and under an Auto mesh XLA gathers its operands onto every device. `local` wraps one
kernel call, described by the role of each operand dimension:

  "b"  batch (sequence rows of a batch): may be sharded; every "b" dimension shares the batch axes;
  "h"  heads (query or kv heads, which shard alike: query head h reads kv head h // G, and H / n
       query heads of a shard read exactly its Hk / n kv heads): may be sharded;
  "s"  sequence: must not be sharded (that is context parallelism: pallas_attn.ring_attention);
  "."  anything else: must not be sharded.

Explicit mesh axes: the shardings are in the operands' types, so the call runs under jax.shard_map
with the operands' own batch and head axes (also unsharded operands under an Explicit context mesh:
Pallas interpret mode does not lower there otherwise). Auto axes (under jax.set_mesh): the shardings exist
only once XLA has propagated them, so the call is a custom_partitioning op whose partition rule
keeps the operands' batch and head shardings. Outputs come back sharded like the inputs. Without
sharded operands (one device, inside a user's shard_map, no mesh) the kernel is called as is.
"""
from __future__ import annotations

import jax
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

SHARDABLE = ("b", "h")


class SequenceShardedError(ValueError):
  """A sequence (or other non-batch, non-head) dimension is sharded."""


def _spec_of(x):
  try:
    sharding = jax.typeof(x).sharding
  except Exception:  # noqa: BLE001
    return None, None
  spec = getattr(sharding, "spec", None)
  return getattr(sharding, "mesh", None), spec


def _axes(entry):
  """A PartitionSpec entry as a tuple of axis names."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _entry(axes):
  return None if not axes else (axes[0] if len(axes) == 1 else tuple(axes))


def _choose_axes(specs, roles, shapes, what: str):
  """From the operands' specs: the batch and head axes (tuples), after checking the other dims."""
  chosen = {"b": (), "h": ()}
  for spec, role, shape, n in zip(specs, roles, shapes, range(len(roles))):
    if spec is None:
      continue
    for dim, r in enumerate(role):
      axes = _axes(spec[dim]) if dim < len(spec) else ()
      if not axes:
        continue
      if r in SHARDABLE:
        if not chosen[r]:
          chosen[r] = axes
        continue
      if r == "s":
        raise SequenceShardedError(
            f"{what}: operand {n} (shape {tuple(shape)}) has its sequence dimension {dim} sharded "
            f"over mesh axes {axes}; this function computes each shard locally and shards only over "
            "batch and heads. For a sequence split across devices (context parallelism) use "
            "pallas_attn.ring_attention (inside shard_map) or pallas_attn.ring_flash_attn_func")
      raise ValueError(f"{what}: operand {n} (shape {tuple(shape)}) is sharded on dimension {dim} "
                       f"over mesh axes {axes}; only batch and head dimensions may be sharded")
  return chosen


def _target(role, chosen):
  return P(*(_entry(chosen[r]) if r in SHARDABLE else None for r in role))


def _check_divisible(shapes, roles, chosen, mesh_shape, what: str):
  for shape, role in zip(shapes, roles):
    for dim, r in enumerate(role):
      if r in SHARDABLE and chosen[r]:
        ways = 1
        for a in chosen[r]:
          ways *= mesh_shape[a]
        if shape[dim] % ways:
          name = "batch" if r == "b" else "heads"
          raise ValueError(f"{what}: {name} dimension of size {shape[dim]} (an operand of shape "
                           f"{tuple(shape)}) does not split over mesh axes {chosen[r]} ({ways} ways)")


def _summed(outs, sums, chosen):
  """psum of the outputs listed in `sums` (gradients of operands shared by every batch row) over the
  batch axes: the one reduction a batch-sharded backward needs."""
  if not sums or not chosen["b"]:
    return outs
  return tuple(lax.psum(o, chosen["b"]) if i in sums else o for i, o in enumerate(outs))


def _explicit_mesh(args):
  for a in args:
    mesh, spec = _spec_of(a)
    if mesh is None or spec is None or getattr(mesh, "empty", True):
      continue
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    if any(types.get(ax) == AxisType.Explicit for e in spec for ax in _axes(e)):
      return mesh
  return None


def _explicit_context():
  """The context mesh (jax.set_mesh) when it has Explicit axes: Pallas interpret mode does not lower
  under it even for unsharded operands, so those run in a shard_map too (replicated)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.manual_axes:
    return None
  return mesh if any(t == AxisType.Explicit for t in mesh.axis_types) else None


def _auto_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.manual_axes:
    return None
  if any(t == AxisType.Auto and mesh.shape[a] > 1 for a, t in zip(mesh.axis_names, mesh.axis_types)):
    return mesh
  return None


def local(fn, args, roles, out_roles, *, what: str, sums=(), no_shard_reason=None,
          explicit_only: bool = False):
  """fn(*args) (a tuple of arrays), computed per batch / head shard of the operands.

  args: operands, None where absent (passed through as None); roles: one role string per operand
  (one letter per dimension, see the module docstring; None for absent operands); out_roles: one per
  output. sums: indices of outputs summed over the batch (psum'd over the batch axes). what: the
  function's name for errors. no_shard_reason: if set, sharded operands raise NotImplementedError
  with this reason. explicit_only: only the Explicit-axes shard_map (differentiable, so it can wrap a
  whole public function whose steps mix batch rows); otherwise fn is called as is, its kernel calls
  wrapped on their own.
  """
  present = [i for i, a in enumerate(args) if a is not None]
  operands = [args[i] for i in present]
  op_roles = [roles[i] for i in present]
  for a, r in zip(operands, op_roles):
    assert len(r) == a.ndim, (what, r, a.shape)

  def call(*xs):
    full = list(args)
    for i, x in zip(present, xs):
      full[i] = x
    return tuple(fn(*full))

  mesh = _explicit_mesh(operands) or _explicit_context()
  if mesh is not None:
    return _explicit(call, mesh, operands, op_roles, out_roles, what, sums, no_shard_reason)
  mesh = None if explicit_only else _auto_mesh()
  if mesh is not None:
    return _auto(call, operands, op_roles, out_roles, what, sums, no_shard_reason)
  return call(*operands)


def _explicit(call, mesh, operands, roles, out_roles, what, sums, no_shard_reason):
  shapes = [a.shape for a in operands]
  chosen = _choose_axes([_spec_of(a)[1] for a in operands], roles, shapes, what)
  if no_shard_reason and (chosen["b"] or chosen["h"]):
    raise NotImplementedError(f"{what}: {no_shard_reason} with inputs sharded over batch or heads")
  _check_divisible(shapes, roles, chosen, dict(zip(mesh.axis_names, mesh.axis_sizes)), what)
  in_specs = [_target(r, chosen) for r in roles]
  operands = [a if _spec_of(a)[1] == s else jax.sharding.reshard(a, s)
              for a, s in zip(operands, in_specs)]
  out_specs = tuple(_target(r, chosen) for r in out_roles)
  body = lambda *xs: _summed(call(*xs), sums, chosen)  # noqa: E731
  return jax.shard_map(body, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs,
                       check_vma=False)(*operands)


def _factor_rule(roles, out_roles, shapes, out_shapes):
  """Shardy's einsum-like rule: batch and head dims are factors shared by size; every other
  dimension is its own factor that must stay replicated."""
  names, need_rep = {}, []
  counter = iter(range(1 << 30))

  def dim_factor(r, size):
    if r in SHARDABLE:
      return names.setdefault((r, size), f"{r}{len(names)}")
    f = f"x{next(counter)}"
    need_rep.append(f)
    return f

  ins = [" ".join(dim_factor(r, s) for r, s in zip(role, shape)) for role, shape in zip(roles, shapes)]
  outs = [" ".join(dim_factor(r, s) for r, s in zip(role, shape))
          for role, shape in zip(out_roles, out_shapes)]
  return ", ".join(ins) + " -> " + ", ".join(outs), tuple(need_rep)


def _auto(call, operands, roles, out_roles, what, sums, no_shard_reason):
  out_avals = jax.eval_shape(call, *operands)
  rule, need_rep = _factor_rule(roles, out_roles, [a.shape for a in operands],
                                [o.shape for o in out_avals])

  def partition(mesh, arg_shapes, result_shape):
    specs = [getattr(s.sharding, "spec", None) for s in arg_shapes]
    shapes = [s.shape for s in arg_shapes]
    chosen = _choose_axes(specs, roles, shapes, what)
    if no_shard_reason and (chosen["b"] or chosen["h"]):
      raise NotImplementedError(f"{what}: {no_shard_reason} with inputs sharded over batch or heads")
    _check_divisible(shapes, roles, chosen, dict(mesh.shape), what)
    arg_shardings = tuple(NamedSharding(mesh, _target(r, chosen)) for r in roles)
    out_shardings = tuple(NamedSharding(mesh, _target(r, chosen)) for r in out_roles)
    lower = lambda *xs: _summed(call(*xs), sums, chosen)  # noqa: E731
    return mesh, lower, out_shardings, arg_shardings

  op = custom_partitioning(call)
  op.def_partition(partition, sharding_rule=rule, need_replication_factors=need_rep,
                   infer_sharding_from_operands=_infer(roles, out_roles, what))
  return op(*operands)


def _infer(roles, out_roles, what):
  # Used only without Shardy (the GSPMD partitioner).
  def infer(mesh, arg_shapes, result_shape):
    specs = [getattr(s.sharding, "spec", None) for s in arg_shapes]
    chosen = _choose_axes(specs, roles, [s.shape for s in arg_shapes], what)
    return tuple(NamedSharding(mesh, _target(r, chosen)) for r in out_roles)
  return infer


def gather_batch(x, cache, index: bool = False):
  """Under Explicit axes (a no-op otherwise), x made whole over the batch for writing into `cache`,
  a cache whose rows or pages batch rows share, so that every batch shard writes every row: new
  keys (b, s, Hk, d) keep the cache's head sharding, indices (index=True) become replicated."""
  if _explicit_mesh([cache, x]) is None:
    return x
  heads = _spec_of(cache)[1][-2]
  target = P() if index else P(*([None] * (x.ndim - 2) + [heads, None]))
  return x if _spec_of(x)[1] == target else jax.sharding.reshard(x, target)


__all__ = ["local", "gather_batch", "SequenceShardedError"]
