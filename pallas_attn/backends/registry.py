"""The flash family's kernel backends, and the choice of one per call.

A backend is registered under a name (`register`) as an object (a module will do) with

  covers(call: Call) -> str | None    None when it can run the call, else a short reason;
  forward(q, k, v, ops: Operands, *, spec, cfgs, head_dim, interpret, into=None) -> (out, lse);
  backward(q, k, v, out, lse, dout, dlse, ops: Operands, *, spec, cfgs, head_dim, interpret,
           into=None) -> Grads

(backends/triton_flash.py documents the arguments). The modules listed in _MODULES are imported
on the first choice and register themselves (backends/mosaic.py registers the Mosaic GPU kernels of
mosaic_flash.py and mosaic_backward.py with `registry.register("mosaic", ...)`).

The choice, per call and per platform (`select`): an explicit name (spec.backend, else the
environment variable PALLAS_ATTN_BACKEND) must cover the call, or the call raises ValueError with
the backend's reason; without one, the first registered backend of `preference` that covers it.
A backend that declares `forward_only` (True, or a function of the backward's Call) names the
forward only, for those calls: their backward is chosen as if unnamed. One that declares `automatic = False` runs only when named.
Nothing ever falls back to dense XLA. The choice is made when a call is traced, so a jitted
function keeps the one it was traced with (as with PALLAS_ATTN_INTERPRET).

Platforms: `dispatch` builds one branch per platform the computation may be lowered for, and
lax.platform_dependent keeps the one it is compiled for (so a CPU array on a GPU host still runs in
interpret mode): "cuda" (compiled kernels, for the compute capability of this process's first GPU,
None without one, e.g. when lowering for CUDA on a CPU host) and "interpret" (Pallas interpret
mode: every other platform, or every platform with PALLAS_ATTN_INTERPRET=1). Both branches are
traced whatever the target, so a branch the chosen backend does not cover raises its ValueError
only when it is lowered (`_fails_when_lowered`): an explicit Mosaic choice works on a GPU host
whose CPU branch it does not cover. When neither branch is covered the call raises at once.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from pallas_attn import _compat
from pallas_attn.spec import AttentionSpec

PLATFORMS = ("cuda", "interpret")
PHASES = ("forward", "backward")

# Imported (if present) before the first choice; each registers its backend.
_MODULES = ("pallas_attn.backends.triton_flash", "pallas_attn.backends.mosaic")

_BACKENDS: dict[str, Any] = {}


@dataclasses.dataclass(frozen=True)
class Call:
  """What a backend is asked to run: the static description of one kernel call."""
  spec: AttentionSpec
  phase: str  # "forward" or "backward"
  dtype: np.dtype  # q's
  head_dim: int  # unpadded
  platform: str  # "cuda" or "interpret"
  compute_capability: tuple[int, int] | None = None  # of the GPU, for "cuda"
  n_sink: int = 0  # sink logits per head (spec.sink), a shape a backend may bound

  def __str__(self):
    where = self.platform
    if self.platform == "cuda":
      cc = self.compute_capability
      where += f" (compute capability {'unknown' if cc is None else '.'.join(map(str, cc))})"
    return f"{self.phase} of {np.dtype(self.dtype).name} d={self.head_dim} on {where}, {self.spec}"


def register(name: str, backend) -> Any:
  """Makes `backend` available as `name`; returns the backend it replaces (None if none), so a
  test can put it back."""
  for attr in ("covers", "forward", "backward"):
    if not callable(getattr(backend, attr, None)):
      raise TypeError(f"backend {name!r}: expected an object with covers, forward and backward, "
                      f"got {type(backend).__name__} without a callable {attr!r}")
  previous = _BACKENDS.get(name)
  _BACKENDS[name] = backend
  return previous


def unregister(name: str) -> None:
  _BACKENDS.pop(name, None)


@functools.lru_cache(maxsize=None)
def _import_backends() -> None:
  for module in _MODULES:
    if importlib.util.find_spec(module) is not None:
      importlib.import_module(module)


def names() -> tuple[str, ...]:
  """The registered backends' names."""
  _import_backends()
  return tuple(sorted(_BACKENDS))


def get(name: str):
  _import_backends()
  return _BACKENDS[name]


def preference(call: Call) -> tuple[str, ...]:
  """Backends to try, in order, for a call without an explicit choice (unregistered names are
  skipped). Mosaic GPU's warpgroup kernels are Hopper's (9.x); Triton runs everywhere, in
  interpret mode included."""
  cc = call.compute_capability
  if call.platform == "cuda" and cc is not None and cc[0] == 9:
    return ("mosaic", "triton")
  return ("triton",)


def explicit_choice(spec: AttentionSpec) -> str | None:
  """The backend asked for: spec.backend, else PALLAS_ATTN_BACKEND (read when the call is traced,
  like PALLAS_ATTN_INTERPRET), else None."""
  return spec.backend or os.environ.get("PALLAS_ATTN_BACKEND") or None


def select(call: Call, explicit: str | None = None) -> str:
  """The name of the backend that runs `call`; ValueError when an explicit one is unknown or does
  not cover it, or when no backend covers it."""
  _import_backends()
  if explicit is not None and call.phase == "backward" and _forward_only(_BACKENDS.get(explicit),
                                                                        call):
    # A backend named for a differentiated call whose backward it declares it does not run (Mosaic
    # at head dim 256): the backward is the one the dispatcher picks without a name, which reads
    # the same (out, lse). Declared by the backend and documented, not a fallback from a failure.
    explicit = None
  if explicit is not None:
    _check_name(explicit)
    reason = _BACKENDS[explicit].covers(call)
    if reason is not None:
      raise ValueError(f"backend {explicit!r} does not cover the {call}: {reason}")
    return explicit
  reasons = []
  for name in preference(call):
    backend = _BACKENDS.get(name)
    if backend is None:
      continue
    # A backend may ask to run only when chosen by name (`automatic = False`), e.g. while its GPU
    # parity suite has not yet passed on the hardware it targets.
    reason = (backend.covers(call) if getattr(backend, "automatic", True)
              else "runs only when chosen by name")
    if reason is None:
      return name
    reasons.append(f"{name}: {reason}")
  raise ValueError(f"no backend covers the {call}: {'; '.join(reasons) or 'none registered'}")


def _forward_only(backend, call: Call) -> bool:
  flag = getattr(backend, "forward_only", False)
  return bool(flag(call) if callable(flag) else flag)


def _check_name(name: str) -> None:
  if name not in names():
    raise ValueError(f"backend: unknown backend {name!r} (spec.backend or PALLAS_ATTN_BACKEND); "
                     f"registered: {', '.join(names())}")


@functools.lru_cache(maxsize=None)
def compute_capability() -> tuple[int, int] | None:
  """(major, minor) of this process's first GPU, None without one."""
  try:
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
  except RuntimeError:
    return None
  cc = getattr(gpus[0], "compute_capability", None) if gpus else None
  if not cc:
    return None
  return tuple(int(x) for x in str(cc).split(".")[:2])


def force_interpret() -> bool:
  return os.environ.get("PALLAS_ATTN_INTERPRET", "0") not in ("", "0")


def dispatch(phase: str, spec: AttentionSpec, q, run: Callable, *args, n_sink: int = 0):
  """run(backend, interpret, *args) with the backend chosen for each lowering platform.

  q: the query operand (its dtype and head dim describe the call); n_sink: sink logits per head;
  run calls the backend's forward or backward and returns its result (any pytree of arrays).
  """
  explicit = explicit_choice(spec)
  if explicit is not None:
    _check_name(explicit)  # once, not per branch

  def branch(platform):
    call = Call(spec, phase, np.dtype(q.dtype), q.shape[-1], platform,
                compute_capability() if platform == "cuda" else None, n_sink)
    try:
      backend = get(select(call, explicit))
    except ValueError as e:
      return None, e
    return functools.partial(run, backend, platform == "interpret"), None

  if force_interpret():
    fn, error = branch("interpret")
    if error is not None:
      raise error
    return fn(*args)
  (gpu, gpu_error), (cpu, cpu_error) = branch("cuda"), branch("interpret")
  if gpu is None and cpu is None:
    raise ValueError(f"{gpu_error}; and {cpu_error}")
  if gpu is None:
    gpu = _fails_when_lowered(gpu_error, jax.eval_shape(cpu, *args))
  if cpu is None:
    cpu = _fails_when_lowered(cpu_error, jax.eval_shape(gpu, *args))
  return _compat.on_platforms(*args, gpu=gpu, cpu=cpu)


def by_platform(kernel: Callable, *args):
  """kernel(*args, interpret=...) for kernels with one implementation (decode, landmark): compiled
  when lowered for CUDA, interpret mode elsewhere or with PALLAS_ATTN_INTERPRET=1."""
  if force_interpret():
    return kernel(*args, interpret=True)
  return _compat.on_platforms(*args, gpu=functools.partial(kernel, interpret=False),
                              cpu=functools.partial(kernel, interpret=True))


# A branch that raises when it is lowered (or run eagerly): it stands for the platform the chosen
# backend does not cover, with the other branch's result types.
_unavailable_p = Primitive("pallas_attn_backend_unavailable")
_unavailable_p.multiple_results = True


def _raise(*_, out_avals, message):
  raise ValueError(message)


_unavailable_p.def_abstract_eval(lambda *_, out_avals, message: out_avals)
_unavailable_p.def_impl(_raise)
mlir.register_lowering(_unavailable_p, lambda ctx, *a, out_avals, message: _raise(message=message,
                                                                                  out_avals=out_avals))


def _batch(args, dims, *, out_avals, message):
  size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
  batched = tuple(a.update(shape=(size, *a.shape)) for a in out_avals)
  return _unavailable_p.bind(*args, out_avals=batched, message=message), (0,) * len(batched)


batching.primitive_batchers[_unavailable_p] = _batch


def _fails_when_lowered(error: ValueError, result_shape):
  leaves, tree = jax.tree.flatten(result_shape)
  out_avals = tuple(jax.core.ShapedArray(x.shape, x.dtype) for x in leaves)

  def branch(*args):
    outs = _unavailable_p.bind(*jax.tree.leaves(args), out_avals=out_avals, message=str(error))
    return jax.tree.unflatten(tree, outs)

  return branch
