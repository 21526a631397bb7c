"""torch custom ops computed by JAX kernels, with their fake implementations and autograd.

A family describes its ops once (`OpDesc`: the forward's arguments by name and kind, its output
shapes, its static spec, the kernel's operands, the kernels, which arguments are differentiable) and
`build` makes the rest: `kernel_op` turns each op into a torch.library custom op (one opaque node
for torch.compile), the backward op's schema and adapters are derived from the forward's, and
`differentiable` attaches autograd with the eager fast path. None of it knows anything about
attention.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np
import torch

from torch_bridge import _dlpack

NAMESPACE = "pallas_attn"

# The kernels run on JAX's stream, outside anything a CUDA graph capturing torch's stream records.
TAGS = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None)

OutputSpec = Sequence[tuple[Sequence[Any], torch.dtype]]  # (shape, dtype) per output, in order

_ARG_NAMES: dict[Any, tuple[str, tuple[str, ...]]] = {}  # kernel op -> (name, argument names)
_IMPLS: dict[Any, Callable[..., Any]] = {}  # kernel op -> its eager implementation (`impl` below)

# Entering this, a call dispatches past the Autograd keys: what torch's own autograd kernel for a
# custom op does (torch/_library/autograd.py, forward_no_grad) when grad mode is off or no input
# requires grad, without its Python layers (about 10 us a call). Keys above (autocast, functorch)
# and below (Python modes, FakeTensor, the backend kernel) still run.
# Both are private; without them (another torch) the calls simply pass through the Autograd keys.
_BelowAutograd = getattr(torch._C, "_AutoDispatchBelowAutograd", contextlib.nullcontext)  # pylint: disable=protected-access
_any_requires_grad = getattr(  # that kernel's test
    torch._C, "_any_requires_grad",  # pylint: disable=protected-access
    lambda *args: any(isinstance(a, torch.Tensor) and a.requires_grad for a in args))


# Functorch transforms, Python dispatch and torch-function modes, and tensor subclasses all act on
# the op through the dispatcher; without any of them, torch's dispatch of a custom op ends in the
# op's own Python implementation after about 25-40 us of dispatcher, autograd-key and
# dynamo-disable layers (H200, torch 2.11; bench/bridge_probe), which eager calls skip.
_len_dispatch_stack = getattr(torch._C, "_len_torch_dispatch_stack", None)  # pylint: disable=protected-access
_function_mode_on = getattr(torch._C, "_is_torch_function_mode_enabled", None)  # pylint: disable=protected-access
_functorch_on = getattr(torch._C, "_are_functorch_transforms_active", None)  # pylint: disable=protected-access
_DIRECT_OK = None not in (_len_dispatch_stack, _function_mode_on, _functorch_on) and \
    os.environ.get("TORCH_BRIDGE_EAGER_DIRECT", "1") not in ("", "0")


def direct_ok(args) -> bool:
  """Whether an eager call with `args` may run the op's implementation without the dispatcher:
  what the dispatcher would do then is exactly that (no mode, transform or subclass to honour)."""
  if not _DIRECT_OK or torch.compiler.is_compiling() or _len_dispatch_stack() \
      or _function_mode_on() or _functorch_on():
    return False
  for a in args:
    if isinstance(a, torch.Tensor) and (type(a) is not torch.Tensor  # pylint: disable=unidiomatic-typecheck
                                        or not (a.is_cuda or a.is_cpu)):
      return False
  return True


def eager(op) -> Callable[..., Any]:
  """`op` as a function: its implementation directly where `direct_ok`, else the op itself."""
  impl = _IMPLS[op]
  overload = getattr(getattr(torch.ops, NAMESPACE), _ARG_NAMES[op][0]).default

  def call(*args):
    if direct_ok(args):
      return impl(*args)
    return overload(*args)
  return call


def _arguments(qualname: str, schema: str):
  parsed = torch._C.parse_schema(qualname + schema)  # pylint: disable=protected-access
  names = tuple(a.name for a in parsed.arguments)
  tensors = tuple(i for i, a in enumerate(parsed.arguments) if str(a.type).startswith("Tensor"))
  return names, tensors


def check_devices(names: Sequence[str], args: Sequence[Any], tensor_slots: Sequence[int]) -> torch.device:
  """All tensors on one device, which for CUDA is the current one; returns that device."""
  device, first = None, None
  for i in tensor_slots:
    x = args[i]
    if x is None:
      continue
    if device is None:
      device, first = x.device, names[i]
    elif x.device != device:
      raise ValueError(f"{names[i]}: expected a tensor on {device} (the device of {first}), "
                       f"got one on {x.device}")
  if device is not None and device.type == "cuda":
    current = torch.cuda.current_device()
    if device.index != current:
      # torch's own DLPack export and stream lookups work on the current device only.
      raise ValueError(
          f"{first}: expected tensors on the current CUDA device cuda:{current}, got {device}; "
          f"call torch.cuda.set_device({device.index}) or run inside "
          f"`with torch.cuda.device({device.index}):`")
  return device


def _concrete(args, tensor_slots) -> bool:
  return all(isinstance(s, int) for i in tensor_slots if args[i] is not None for s in args[i].shape)


def kernel_op(name: str, schema: str, *, kernel: _dlpack.Kernel,
              outputs: Callable[..., OutputSpec],
              static: Callable[..., tuple],
              operands: Callable[..., Sequence[torch.Tensor | None]],
              zeroed: Sequence[int] = ()):
  """Defines `pallas_attn::name` computed by `kernel` (see `_dlpack.run` for the calling convention).

  outputs(*args): the (shape, dtype) of each output, allocated by torch on the arguments' device;
    also run on fake tensors, so it must only do shape arithmetic.
  static(*args): validates the arguments (errors name the argument) and returns the kernel's static
    arguments; runs on concrete shapes only and should cache, since it runs on every call.
  operands(*args): the kernel's tensor operands (None where absent), in its order.
  zeroed: indices of outputs torch allocates zero-filled (the kernel writes only part of them).
  """
  qualname = f"{NAMESPACE}::{name}"
  names, tensor_slots = _arguments(qualname, schema)

  def allocate(args):
    like = next(args[i] for i in tensor_slots if args[i] is not None)
    return [(like.new_zeros if n in zeroed else like.new_empty)(tuple(shape), dtype=dtype)
            for n, (shape, dtype) in enumerate(outputs(*args))]

  def result(outs):
    return tuple(outs) if len(outs) > 1 else outs[0]

  def impl(*args):
    check_devices(names, args, tensor_slots)
    static_args = static(*args)
    outs = allocate(args)
    _dlpack.run(kernel, operands(*args), outs, static_args)
    return result(outs)

  def fake(*args):
    check_devices(names, args, tensor_slots)
    if _concrete(args, tensor_slots):
      static(*args)  # validate at trace time, so torch.compile reports bad arguments as eager does
    return result(allocate(args))

  op = torch.library.custom_op(qualname, impl, mutates_args=(), schema=schema, tags=TAGS)
  op.register_fake(fake)
  _ARG_NAMES[op] = (name, names)
  _IMPLS[op] = impl
  return op


def differentiable(fwd, bwd, *, wrt: Sequence[str]) -> Callable[..., Any]:
  """Autograd for the kernel op `fwd`, computed by the kernel op `bwd`.

  bwd's arguments are the gradients of fwd's outputs (None for an output that got none), then fwd's
  arguments, then fwd's outputs; it returns the gradients of the arguments named in `wrt`, in order.
  Only tensors reach save_for_backward (fwd's tensor arguments and outputs, which is what the
  backward kernels read); everything else rides on ctx.

  The formula is registered on `fwd` itself (torch.library.register_autograd), so the op is
  differentiable wherever it is called, and is also wrapped in a thin autograd.Function: the
  returned function uses that, because register_autograd's Python layers cost about 4x as much per
  call with inputs that require grad (torch 2.13: 95 us against 25 us on a slow CPU). Without grad
  mode or without an input that requires grad it calls `fwd` directly: nothing is saved.

  Where torch's autograd kernel for the op would only pass the call through (inside the Function's
  forward, in a backward without create_graph, and on calls with nothing to record) the op is
  called below the Autograd dispatch keys instead, as that kernel itself does; calls it has to see
  (an argument outside `wrt` requires grad, create_graph) still go through it.
  """
  name, names = _ARG_NAMES[fwd]
  slots = tuple(names.index(n) for n in wrt)
  # The ops' overloads: calling them skips CustomOpDef.__call__ (a Python frame; same dispatch).
  fwd_op = getattr(getattr(torch.ops, NAMESPACE), name).default
  bwd_op = getattr(getattr(torch.ops, NAMESPACE), _ARG_NAMES[bwd][0]).default
  fwd_impl, bwd_impl = _IMPLS[fwd], _IMPLS[bwd]

  def setup_context(ctx, inputs, output):
    outs = output if isinstance(output, tuple) else (output,)
    ctx.tensor_slots = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
    ctx.others = [None if isinstance(x, torch.Tensor) else x for x in inputs]
    ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_slots), *outs)
    # A None gradient lets the backward skip an output's term instead of reading zeros.
    ctx.set_materialize_grads(False)

  def backward(ctx, *grads):
    saved = ctx.saved_tensors
    n = len(ctx.tensor_slots)
    args = list(ctx.others)
    for j, i in enumerate(ctx.tensor_slots):
      args[i] = saved[j]
    views = getattr(ctx, "views", None)
    if torch.is_grad_enabled():  # create_graph: torch's autograd kernel sees the call (and refuses
      got = bwd_op(*grads, *args, *saved[n:])  # a double backward, which bwd has no formula for)
    elif views is not None and direct_ok(grads):
      # The forward's JAX views of the saved tensors serve again (same memory, and autograd has
      # checked that nothing modified it since): only the incoming gradients and the new outputs
      # are imported.
      with _dlpack.reusing(dict(views)):  # a copy: the gradients' views are not kept on ctx
        got = bwd_impl(*grads, *args, *saved[n:])
    else:
      with _BelowAutograd():
        got = bwd_op(*grads, *args, *saved[n:])
    got = got if isinstance(got, tuple) else (got,)
    result = [None] * len(args)
    for i, g in zip(slots, got):
      result[i] = g
    return tuple(result)

  torch.library.register_autograd(fwd, backward, setup_context=setup_context)

  class Function(torch.autograd.Function):
    """The same formula as an autograd.Function; see `differentiable`."""

    @staticmethod
    def forward(ctx, *args):
      if direct_ok(args):
        views = {}
        with _dlpack.reusing(views):
          outs = fwd_impl(*args)
        ctx.views = views
      else:
        with _BelowAutograd():  # grad mode is off in here: fwd's autograd layer would pass through
          outs = fwd_op(*args)
      setup_context(ctx, args, outs)
      return outs

    @staticmethod
    def backward(ctx, *grads):
      return backward(ctx, *grads)

  Function.__name__ = Function.__qualname__ = f"{name}_autograd"

  def call(*args):
    # Under torch.compile the op's registered autograd serves: Dynamo cannot trace the
    # autograd.Function when one tensor is passed twice (qkvpacked varlen: cu_seqlens_q is cu_seqlens_k).
    if torch.compiler.is_compiling():
      return fwd(*args)
    if torch.is_grad_enabled() and _any_requires_grad(*args):
      if any(args[i] is not None and args[i].requires_grad for i in slots):
        return Function.apply(*args)
      return fwd(*args)  # only arguments outside `wrt` require grad: torch's layer records it
    if direct_ok(args):  # nothing to record and nothing else to honour: the implementation itself
      return fwd_impl(*args)
    with _BelowAutograd():  # nothing to record: what fwd's autograd layer would do, minus its layers
      return fwd_op(*args)

  return call


# ----------------------------------------------------------------------------------------------------
# Families: a forward op, its backward op and autograd from one description


def require_tensor(name: str, x, layout: str, optional: bool = False) -> None:
  """TypeError naming the argument unless x is a tensor (or None, when optional)."""
  if not isinstance(x, torch.Tensor) and not (optional and x is None):
    raise TypeError(f"{name}: expected a torch.Tensor of shape {layout}, got {type(x).__name__}")


@dataclasses.dataclass(frozen=True)
class Offsets:
  """An index tensor as a cached spec sees it: shape and dtype only.

  Its values never key a compiled kernel, so the JAX face's checks must treat it as they treat a
  tracer under jit: numpy conversion fails, and the value checks are skipped.
  """
  shape: tuple
  dtype: Any

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __array__(self, *_, **__):
    raise TypeError("cu_seqlens values are not part of the static configuration")


def _params(fn) -> tuple[str, ...]:
  """fn's named parameters (not *args / **kwargs)."""
  return tuple(n for n, p in inspect.signature(fn).parameters.items()
               if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


def _signature(*groups) -> inspect.Signature:
  """A signature of the names in `groups`, in order, each once."""
  names = dict.fromkeys(n for g in groups for n in g)
  return inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                            for n in names])


@dataclasses.dataclass(frozen=True)
class Spec:
  """The kernel's static arguments, computed by the JAX face's own checks and cached.

  prepare's parameters are forward-argument names. Tensors arrive as stand-ins of their shape and
  dtype: jax.ShapeDtypeStruct, numpy zeros for the names in `host` (checks that read values see
  zeros), `Offsets` for the names in `offsets`; None stays None; everything else arrives as it is.
  prepare returns the static arguments (a hashable tuple). The cache is keyed by torch shapes,
  dtypes and the other arguments, so a call that hits it costs one dict lookup.
  check: parameters named the same way, run on every call before prepare, for what the cache does
  not see (the dropout seed's presence, a dtype error worded with torch's names).
  """
  prepare: Callable[..., tuple]
  host: Sequence[str] = ()
  offsets: Sequence[str] = ()
  check: Callable[..., None] | None = None

  def extend(self, step: Callable[..., tuple], check: Callable[..., None] | None = None) -> Spec:
    """This spec followed by `step(static, *named arguments)`, for a family that extends another
    with more arguments (step's parameters after the first may name the base's arguments too);
    `check` runs after the base's check."""
    base, more = _params(self.prepare), _params(step)[1:]

    def prepare(**kw):  # runs on cache misses only
      return step(self.prepare(**{n: kw[n] for n in base}), **{n: kw[n] for n in more})
    prepare.__signature__ = _signature(base, more)
    checks = [c for c in (self.check, check) if c is not None]
    if len(checks) > 1:  # straight-line code: it runs on every call
      names = _signature(*map(_params, checks)).parameters
      body = [f"_c{i}({', '.join(_params(c))})" for i, c in enumerate(checks)]
      checks = [_function("check", names, body, **{f"_c{i}": c for i, c in enumerate(checks)})]
    return Spec(prepare, self.host, self.offsets, checks[0] if checks else None)

  def bind(self, names: Sequence[str], tensors: Sequence[int]) -> Callable[..., tuple]:
    """static(*args) over arguments named `names` (`tensors`: the tensor slots)."""
    params = _params(self.prepare)
    t_slots = tuple(names.index(p) for p in params if names.index(p) in tensors)
    o_slots = tuple(names.index(p) for p in params if names.index(p) not in tensors)
    kinds = tuple(Offsets if names[i] in self.offsets else np.zeros if names[i] in self.host
                  else jax.ShapeDtypeStruct for i in t_slots)
    t_names, o_names = tuple(names[i] for i in t_slots), tuple(names[i] for i in o_slots)

    @functools.lru_cache(maxsize=1024)
    def cached(metas, others):
      kw = dict(zip(o_names, others))
      for name, kind, meta in zip(t_names, kinds, metas):
        kw[name] = None if meta is None else kind(tuple(meta[0]), _dlpack.jax_dtype(name, meta[1]))
      return self.prepare(**kw)

    check = self.check
    body = []
    if check is not None:
      body.append(f"_check({', '.join(_params(check))})")
    metas = _tuple(f"(None if {n} is None else ({n}.shape, {n}.dtype))" for n in t_names)
    body.append(f"return _cached({metas}, {_tuple(o_names)})")
    static = _function("static", names, body, _check=check, _cached=cached)
    static.cache = cached
    return static


@dataclasses.dataclass(frozen=True)
class OpDesc:
  """One family's ops: the forward op `pallas_attn::{name}` and, with a backward kernel, its
  backward op (the name with `_fwd` replaced by `_bwd`, or `_bwd` appended).

  args: the forward's arguments in torch schema syntax (names and kinds).
  outputs(*args): (shape, dtype) of each forward output; shape arithmetic only (runs on fake
    tensors). output_names: their names in the backward's schema (gradients are "d" + name).
  static: a Spec, or any function of the arguments that validates them and returns the kernel's
    static arguments (cached: it runs on every call).
  operands: the kernel's operands in order: an argument name, None (absent), or (fn, *names) for
    fn(*those arguments), e.g. a torch view the kernel wants.
  forward / backward: the kernels (`_dlpack.run`'s convention). The backward kernel takes the
    forward's operands, the forward's outputs, then their gradients, and returns the gradients of
    the arguments named in `wrt`, shaped and typed as those arguments.
  zero_grads: outputs whose missing gradient is handed to the kernel as zeros (others as None);
    default the first output.
  zeroed: names in `wrt` whose gradient buffers torch allocates zero-filled.
  forward_only: without a backward kernel, the NotImplementedError a backward through the op raises.
  """
  name: str
  args: str
  outputs: Callable[..., OutputSpec]
  static: Spec | Callable[..., tuple]
  operands: Sequence[Any]
  forward: _dlpack.Kernel
  backward: _dlpack.Kernel | None = None
  wrt: Sequence[str] = ()
  output_names: Sequence[str] = ("out", "softmax_lse")
  zero_grads: Sequence[str] | None = None
  zeroed: Sequence[str] = ()
  forward_only: str | None = None


class Ops(NamedTuple):
  """What `build` returns: the ops, the function the public API calls, and the argument helpers."""
  fwd: Any  # the forward kernel op
  bwd: Any  # the backward kernel op (None for forward-only families)
  call: Callable[..., Any]  # the forward with autograd and the eager fast path
  static: Callable[..., tuple]  # static(*forward args)
  operands: Callable[..., tuple]  # operands(*forward args)


def _function(name: str, params: Sequence[str], body: Sequence[str], **env) -> Callable[..., Any]:
  """A function `name(*params)` with the statements `body`, over the globals `env`.

  The per-call adapters (static arguments, operands) are generated from the descriptions as the
  straight-line code one would write by hand, so the description costs no host time per call.
  """
  params = tuple(params) + ("*_",)  # trailing arguments (a backward's forward outputs) are ignored
  src = f"def {name}({', '.join(params)}):\n" + "".join(f"  {line}\n" for line in body)
  scope: dict[str, Any] = {}
  exec(compile(src, f"<torch_bridge._ops {name}>", "exec"), dict(env), scope)  # pylint: disable=exec-used
  return scope[name]


def _tuple(items) -> str:
  return "(" + "".join(f"{x}, " for x in items) + ")"


def _operand_exprs(names: Sequence[str], operands: Sequence[Any]) -> tuple[list[str], dict]:
  """An OpDesc's `operands` as expressions over the arguments `names`, and the functions they call."""
  exprs, env = [], {}
  for o in operands:
    if o is None or isinstance(o, str):
      if o is not None and o not in names:
        raise ValueError(f"operands: {o!r} is not an argument ({names})")
      exprs.append(str(o))
    else:
      fn, *using = o
      if not all(n in names for n in using):
        raise ValueError(f"operands: {using} are not all arguments ({names})")
      env[f"_f{len(env)}"] = fn
      exprs.append(f"_f{len(env) - 1}({', '.join(using)})")
  return exprs, env


FAMILIES: dict[str, tuple[OpDesc, Ops]] = {}  # forward op name -> its description and ops (tests)


def build(desc: OpDesc) -> Ops:
  """The ops `desc` describes, with autograd (see `differentiable`) when it has a backward."""
  ops = _build(desc)
  FAMILIES[desc.name] = (desc, ops)
  return ops


def _build(desc: OpDesc) -> Ops:
  fwd_schema = f"({desc.args}) -> ({', '.join(['Tensor'] * len(desc.output_names))})"
  names, _ = _arguments(f"{NAMESPACE}::{desc.name}", fwd_schema)
  parsed = torch._C.parse_schema(f"{NAMESPACE}::{desc.name}{fwd_schema}")  # pylint: disable=protected-access
  tensors = tuple(i for i, a in enumerate(parsed.arguments) if "Tensor" in str(a.type))  # optional too
  static = desc.static.bind(names, tensors) if isinstance(desc.static, Spec) else desc.static
  exprs, env = _operand_exprs(names, desc.operands)
  operands = _function("operands", names, [f"return {_tuple(exprs)}"], **env)
  fwd = kernel_op(desc.name, fwd_schema, kernel=desc.forward, outputs=desc.outputs,
                  static=static, operands=operands)
  if desc.backward is None:
    message = desc.forward_only or f"{desc.name}: forward-only, it has no backward"

    def forward_only(ctx, *grads):
      del ctx, grads
      raise NotImplementedError(message)

    # Inputs that require grad still get a forward; only an actual backward through it fails.
    torch.library.register_autograd(fwd, forward_only)
    direct = eager(fwd)

    def call(*args):
      if torch.compiler.is_compiling() or (torch.is_grad_enabled() and _any_requires_grad(*args)):
        return fwd(*args)  # recorded, so that a backward raises `message`
      return direct(*args)
    return Ops(fwd, None, call, static, operands)

  grads = ", ".join(f"Tensor? d{n}" for n in desc.output_names)
  outs = ", ".join(f"Tensor {n}" for n in desc.output_names)
  bwd_schema = f"({grads}, {desc.args}, {outs}) -> ({', '.join(['Tensor'] * len(desc.wrt))})"

  grad_names = tuple(f"d{n}" for n in desc.output_names)
  bwd_names = (*grad_names, *names, *desc.output_names)
  bwd_outputs = _function("bwd_outputs", bwd_names, [
      f"return {_tuple(f'({n}.shape, {n}.dtype)' for n in desc.wrt)}"])
  bwd_static = _function("bwd_static", bwd_names, [f"return _static({', '.join(names)})"],
                         _static=static)
  # A missing gradient is None (the kernel skips its term) or, for `zero_grads`, zeros.
  zero_grads = desc.output_names[:1] if desc.zero_grads is None else desc.zero_grads
  for n in (*desc.wrt, *desc.zeroed, *zero_grads):
    if n not in names and n not in desc.output_names:
      raise ValueError(f"{desc.name}: {n!r} is neither an argument nor an output")
  zero = [f"if d{n} is None: d{n} = _zeros_like({n})" for n in zero_grads]
  bwd_operands = _function("bwd_operands", bwd_names, [
      *zero, f"return {_tuple([*exprs, *desc.output_names, *grad_names])}"],
                           _zeros_like=torch.zeros_like, **env)

  base = desc.name[:-4] if desc.name.endswith("_fwd") else desc.name
  bwd = kernel_op(f"{base}_bwd", bwd_schema, kernel=desc.backward, outputs=bwd_outputs,
                  static=bwd_static, operands=bwd_operands,
                  zeroed=tuple(desc.wrt.index(n) for n in desc.zeroed))
  return Ops(fwd, bwd, differentiable(fwd, bwd, wrt=desc.wrt), static, operands)
