"""jax's Mosaic GPU interpreter (jax 0.10.2's InterpretGPUParams, private API), completed for
backends/mosaic_flash.py's kernel so that tests/test_mosaic.py runs it on the CPU.

That interpreter has no wgmma with A in registers or through transpose_ref, no stores into an
accumulator ref, no CPU rule for layout_cast, and drops a TMA store that is partly out of bounds
instead of clipping it. `params()` patches those in once (only when interpret mode is asked for)
and returns the interpreter's parameters. On jax versions whose interpreter internals differ it
raises NotImplementedError, and the interpret tests skip.
"""
from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp




@functools.lru_cache(maxsize=1)
def params():
  """InterpretGPUParams for this kernel, with the interpreter extended (see above).

  Out-of-bounds reads return zeros, as TMA's fill does on the GPU (and fresh buffers are zeros, so
  an unwritten output reads 0, which the parity tests would flag).
  """
  # pylint: disable=import-outside-toplevel
  from jax._src.pallas.mosaic_gpu.interpret import params as interpret_params
  _extend()
  return interpret_params.InterpretGPUParams(out_of_bounds_reads="uninitialized",
                                             uninitialized_memory="zero")


def _extend():
  """Teaches jax's Mosaic GPU interpreter (jax/_src/pallas/mosaic_gpu/interpret, private API) what
  this kernel needs: wgmma with A in registers or through transpose_ref, stores into an accumulator
  ref, layout_cast, and TMA stores that clip. Raises NotImplementedError when the interpreter's
  internals are not the ones this was written against (jax 0.10.2)."""
  # pylint: disable=import-outside-toplevel,protected-access
  try:
    import numpy as np
    from jax._src import callback
    from jax._src.pallas.mosaic.interpret import utils as interpret_utils
    from jax._src.pallas.mosaic_gpu import primitives as gpu_primitives
    from jax._src.pallas.mosaic_gpu.core import layout_cast_p
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    from jax._src.pallas.mosaic_gpu.interpret import jaxpr_interpret
    from jax._src.state import indexing
    from jax._src.state import types as state_types
    interp = jaxpr_interpret.JaxprInterpreter
    arith = interp._interpret_arithmetic_primitive
    key_of = gpu_callbacks.HostAllocationKey.from_array
    noop = gpu_callbacks.NOOP_TRANSFORMS
    shared = gpu_callbacks._get_shared_memory
    token_type = gpu_callbacks.TOKEN_SHAPE_DTYPE
    copy_orig = gpu_callbacks.copy_smem_to_gmem
    expected = {"device_id", "grid_point_coords", "thread_id"}  # later jax: mesh_location, thread
    for fn in (copy_orig, gpu_callbacks.wgmma):
      if not expected <= set(inspect.signature(fn).parameters):
        raise AttributeError(f"{fn.__name__} takes {sorted(inspect.signature(fn).parameters)}")
  except (ImportError, AttributeError) as e:
    raise NotImplementedError(
        f"Mosaic GPU interpret mode: this jax ({jax.__version__}) lacks the interpreter internals "
        f"mosaic_flash extends ({e})") from e
  if getattr(interp, "_pallas_attn_extended", False):
    return

  def split(transforms):
    """Indexers -> a numpy range, then an optional trailing transpose."""
    indexers, perm = [], None
    for t in transforms:
      if isinstance(t, noop):
        continue
      if isinstance(t, indexing.NDIndexer) and perm is None:
        indexers.append(t)
      elif isinstance(t, state_types.TransposeTransform) and perm is None:
        perm = tuple(t.permutation)
      else:
        raise NotImplementedError(f"mosaic_flash interpret: wgmma operand transform {t}")
    return interpret_utils.to_range(jax.tree.map(int, indexers)), perm

  def context(device_id, grid_point_coords, thread_id):
    mem = shared()
    device_id, thread_id = int(device_id), int(thread_id)
    info = interpret_utils.GPULoggingInfo(
        device_id=device_id, grid_point_coords=tuple(int(x) for x in grid_point_coords),
        thread_id=thread_id, source_info=None)
    return mem, mem.get_global_thread_id(device_id, thread_id), info

  def wgmma_callback(*, token, device_id, grid_point_coords, thread_id, acc, acc_t, a, a_t, b,
                     b_t, a_is_ref, acc_dtype):
    mem, tid, info = context(device_id, grid_point_coords, thread_id)

    def read(key, transforms):
      rng, perm = split(transforms)
      x, _, _ = mem.get_buffer_content(key_of(key), rng, tid, logging_info=info)
      return x if perm is None else np.transpose(x, perm)

    lhs = read(a, a_t) if a_is_ref else np.asarray(a)
    rhs = read(b, b_t)
    rng, perm = split(acc_t)
    assert perm is None
    old, _, _ = mem.get_buffer_content(key_of(acc), rng, tid, logging_info=info)
    new = old + np.matmul(lhs.astype(np.float32), rhs.astype(np.float32)).astype(acc_dtype)
    mem.store_buffer_content(key_of(acc), rng, new, tid, logging_info=info)
    return token

  def store_callback(*, token, device_id, grid_point_coords, thread_id, acc, value):
    mem, tid, info = context(device_id, grid_point_coords, thread_id)
    mem.store_buffer_content(key_of(acc), (), np.asarray(value), tid, logging_info=info)
    return token

  def copy_smem_to_gmem(*, token, device_id, grid_point_coords, thread_id,
                        src_allocation_key_as_array, src_transforms, dst_allocation_key_as_array,
                        dst_transforms, predicate, source_info, commit_group, reduction_op):
    # TMA stores only the in-bounds part of a box; the interpreter drops a partly outside store.
    if predicate is not None or reduction_op is not None:
      return copy_orig(
          token=token, device_id=device_id, grid_point_coords=grid_point_coords,
          thread_id=thread_id, src_allocation_key_as_array=src_allocation_key_as_array,
          src_transforms=src_transforms, dst_allocation_key_as_array=dst_allocation_key_as_array,
          dst_transforms=dst_transforms, predicate=predicate, source_info=source_info,
          commit_group=commit_group, reduction_op=reduction_op)
    mem, tid, info = context(device_id, grid_point_coords, thread_id)
    src_rng, perm = split(jax.tree.map(int, src_transforms))
    assert perm is None
    value, _, _ = mem.get_buffer_content(key_of(src_allocation_key_as_array), src_rng, tid,
                                         logging_info=info)
    rng, perm = split(jax.tree.map(int, dst_transforms))
    assert perm is None
    dst = key_of(dst_allocation_key_as_array)
    rng = tuple(slice(0, n) if r == slice(None) else r
                for r, n in zip(rng + (slice(None),) * (len(mem.mem[dst].logical_shape) - len(rng)),
                                mem.mem[dst].logical_shape))
    clipped = interpret_utils.clip_range_to_shape(rng, mem.mem[dst].logical_shape)
    if clipped is not None:
      part = tuple(slice(0, c.stop - c.start) for r, c in zip(rng, clipped)
                   if isinstance(r, slice))
      mem.store_buffer_content(dst, clipped, np.ascontiguousarray(value[part]), tid,
                               logging_info=info)
    return token

  def interpret_wgmma(self, eqn, token, get_invals):
    acc, a, b, *leaves = get_invals()
    empty = jax.tree.structure([])
    trees = [eqn.params[n] or empty for n in
             ("acc_transforms_tree", "a_transforms_tree", "b_transforms_tree")]
    acc_t, a_t, b_t = jax.tree.unflatten(jax.tree_util.treedef_tuple(trees), leaves)
    token = callback.io_callback(
        functools.partial(wgmma_callback, acc_dtype=eqn.invars[0].aval.dtype,
                          a_is_ref=isinstance(eqn.invars[1].aval, state_types.AbstractRef)),
        token_type, token=token, device_id=self.device_info.device_id,
        grid_point_coords=self.grid_point_coords, thread_id=self.thread_id, acc=acc, acc_t=acc_t,
        a=a, a_t=a_t, b=b, b_t=b_t, ordered=True)
    return token, []

  def interpret_arithmetic(self, eqn, get_invals):
    if eqn.primitive is layout_cast_p:  # a register layout: nothing to do on the CPU
      return get_invals()[0]
    if eqn.primitive is not gpu_primitives.wgmma_accumulator_store_p:
      return arith(self, eqn, get_invals)
    acc, value = get_invals()
    # Ordered callbacks run in program order, so the interpreter's token need not pass through.
    callback.io_callback(
        store_callback, token_type, token=jnp.int32(0), device_id=self.device_info.device_id,
        grid_point_coords=self.grid_point_coords, thread_id=self.thread_id, acc=acc, value=value,
        ordered=True)
    return value

  interp._interpret_wgmma_ref_p = interpret_wgmma
  interp._interpret_arithmetic_primitive = interpret_arithmetic
  gpu_callbacks.copy_smem_to_gmem = copy_smem_to_gmem
  interp._pallas_attn_extended = True
