"""Tensors across the torch/JAX boundary: DLPack, stream order, and outputs that torch owns.

The rules every bridged call follows (`run`):
- Inputs cross zero-copy by the DLPack protocol (`__dlpack__` on the producer, the consumer's import
  on the other side), after being detached, made contiguous and 32-byte aligned where they are not.
- JAX reads nothing before the torch work already queued on the current stream has finished: the
  first operand is imported with JAX's stream for external events, which makes that stream wait on
  an event recorded on torch's current stream after every operand and output was prepared. The
  other operands skip the per-tensor handshake; the executable waits for all of its operands, so
  the one event orders all of them (one event per call instead of one per tensor). A call that
  reuses earlier views (`reusing`: a differentiable forward and its backward) fences its first
  newly imported tensor the same way, or makes one fresh fenced import when nothing is new.
- Outputs are allocated by torch and handed to the JAX function's donated, kernel-aliased buffers
  ("aliased" path). Where the JAX runtime does not honour donation of an imported buffer (XLA's
  CPU client does not), the plain function runs and torch copies its results ("copy" path); the
  JAX result buffers are then kept alive until torch's copy has finished, because XLA may hand
  freed memory to its next computation while a torch kernel on another stream still reads it.
- torch waits for JAX before it touches an output: JAX's `__dlpack__(stream=torch's stream)` makes
  torch's stream wait without blocking the host (CPU: the host waits).
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import functools
import os
import threading
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np
import torch

ALIGN = 32
_NO_SYNC = -1  # torch's __dlpack__ stream value for "no cross-stream handshake"


class Kernel(NamedTuple):
  """One jitted JAX computation in two forms with one calling convention.

  into(*operands, *outputs, *static) writes into the donated buffers `outputs` and returns them;
  plain(*operands, *static) returns fresh results of the same shapes.
  """
  into: Callable[..., Sequence[jax.Array]]
  plain: Callable[..., Sequence[jax.Array]]


# ----------------------------------------------------------------------------------------------------
# torch device -> JAX device


@dataclasses.dataclass(frozen=True)
class _Target:
  device: Any  # jax.Device
  platform: str  # "cpu" or "gpu"
  dl_type: int  # DLPack device type of the torch tensors
  stream: int | None  # JAX's stream for external-ready events (GPU); None on CPU


_TARGETS: dict[torch.device, _Target] = {}


def _gpu_device(index: int):
  try:
    devices = jax.local_devices(backend="gpu")
  except RuntimeError as err:
    raise RuntimeError(
        f"torch tensors are on cuda:{index} but JAX's GPU backend did not start ({err}). Install the "
        "jax CUDA plugin that matches this CUDA (pip install 'jax[cuda12]'); the bridge does not "
        "fall back to computing on the CPU.") from err
  for d in devices:
    if d.local_hardware_id == index:
      return d
  raise RuntimeError(f"torch tensors are on cuda:{index} but JAX sees no GPU with that index "
                     f"(JAX's GPUs: {devices}); CUDA_VISIBLE_DEVICES must be the same for both")


def _target(device: torch.device) -> _Target:
  target = _TARGETS.get(device)
  if target is not None:
    return target
  if device.type == "cpu":
    target = _Target(jax.devices("cpu")[0], "cpu", 1, None)
  elif device.type == "cuda":
    jdev = _gpu_device(device.index)
    stream = None
    try:
      stream = jdev.get_stream_for_external_ready_events()
    except Exception:  # noqa: BLE001  (UNIMPLEMENTED on some clients: import then blocks instead)
      stream = None
    target = _Target(jdev, "gpu", 2, stream or None)
  else:
    raise ValueError(f"tensors on {device} cannot cross to JAX; expected cpu or cuda tensors")
  _TARGETS[device] = target
  return target


# ----------------------------------------------------------------------------------------------------
# torch -> JAX


def _import_fn():
  """jax.dlpack.from_dlpack's import step without its per-call device lookups.

  from_dlpack looks the device up again, asks for the stream, probes it by raising on CPU and
  re-wraps the result: about 30 us per tensor. This calls the same import with the cached target;
  `_Importer` checks its result once per device (zero-copy, shape, device) and falls back to the
  public function on any mismatch or error.
  """
  # TORCH_BRIDGE_FAST_DLPACK=0 turns it off. (It was briefly opt-in after a SIGSEGV in a full CPU
  # test run; that crash was the process running out of memory mappings during an XLA compile,
  # see tests/conftest.py, not this import.)
  if os.environ.get("TORCH_BRIDGE_FAST_DLPACK", "1") in ("", "0"):
    return None
  try:
    from jax._src.lib import _jax as jaxlib  # pylint: disable=g-import-not-at-top
    from jax._src.lib import jaxlib_extension_version  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  fn = getattr(jaxlib, "dlpack_managed_tensor_to_buffer", None)
  if fn is None:
    return None
  if jaxlib_extension_version >= 467:
    return lambda cap, target, stream: fn(cap, target.device, stream, None, target.dl_type)
  return lambda cap, target, stream: fn(cap, target.device, stream, None)


def _capsule(t: torch.Tensor, stream: int | None):
  """t.__dlpack__(stream=...) for a tensor `ready` returned (CUDA: on the current device).

  Without a stream handshake (stream None: CPU, or CUDA, where the bridge orders the streams
  itself) torch's __dlpack__ only checks the tensor and calls its C++ export, about 2 us of Python
  per tensor; this calls the export directly where those checks pass (plain strided tensor, no
  grad, no conj bit) and the method itself otherwise (it raises what it raises).
  """
  if stream is None:
    if (type(t) is torch.Tensor and not t.requires_grad and not t.is_conj()  # pylint: disable=unidiomatic-typecheck
        and t.layout == torch.strided):
      return torch._C._to_dlpack(t)  # pylint: disable=protected-access
    return t.__dlpack__(stream=_NO_SYNC)
  return t.__dlpack__(stream=stream)


class _Importer:
  def __init__(self):
    self._fast = _import_fn()
    self._checked: dict[_Target, bool] = {}

  def __call__(self, t: torch.Tensor, target: _Target, fence: bool) -> jax.Array:
    ok = self._checked.get(target)
    if ok is None:
      ok = self._checked[target] = self._probe(t, target)
    if not ok or (target.platform == "cpu" and t.is_pinned()):
      # The public import handshakes on every tensor (slower, equally ordered) and knows pinned
      # host memory, which DLPack labels as a device type of its own.
      return jax.dlpack.from_dlpack(t)
    if fence and target.stream is not None:
      # torch's __dlpack__(stream=...) would order JAX's stream after torch's the same way, but
      # builds an ExternalStream on every call; this one is made once per stream.
      _jax_stream_waits_for_torch(t.device, target.stream)
      return self._fast(_capsule(t, None), target, target.stream)
    return self._fast(_capsule(t, None), target, None)

  def _probe(self, t, target) -> bool:
    if self._fast is None or (target.platform == "gpu" and target.stream is None):
      return False
    try:
      stream = target.stream
      x = self._fast(_capsule(t, stream), target, stream)
    except Exception:  # noqa: BLE001  (a changed private signature: use the public path)
      return False
    return (isinstance(x, jax.Array) and x.unsafe_buffer_pointer() == t.data_ptr()
            and tuple(x.shape) == tuple(t.shape) and x.devices() == {target.device})


_import = _Importer()
_JAX_STREAMS: dict[tuple[int, int], Any] = {}
_THREAD = threading.local()

# torch's current stream as a raw cudaStream_t, one C call (CUDA builds of torch only).
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # pylint: disable=protected-access


class _Cudart:
  """cudaEventRecord / cudaStreamWaitEvent from the CUDA runtime torch has loaded, through ctypes.

  The fence is two runtime calls; made through torch's Python stream and event objects it cost
  about 25 us a call on the H200 (current_stream's device lookups, Stream construction), through
  ctypes about 2. Events are per thread and device (see `_jax_stream_waits_for_torch`). None where
  the library or a symbol is missing: the torch objects serve then.
  """

  def __init__(self, lib):
    self._record, self._wait, self._create = (lib.cudaEventRecord, lib.cudaStreamWaitEvent,
                                              lib.cudaEventCreateWithFlags)
    for f in (self._record, self._wait, self._create):
      f.restype = ctypes.c_int
    self._record.argtypes = (ctypes.c_void_p, ctypes.c_void_p)
    self._wait.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint)
    self._create.argtypes = (ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint)

  @staticmethod
  def load():
    if _raw_stream is None or os.environ.get("TORCH_BRIDGE_CUDART_FENCE", "1") in ("", "0"):
      return None
    try:
      with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "libcudart.so" in line}
      return _Cudart(ctypes.CDLL(sorted(paths)[0])) if paths else None
    except (OSError, AttributeError, IndexError):
      return None

  def event(self) -> int:
    ev = ctypes.c_void_p()
    _check(self._create(ctypes.byref(ev), 2), "cudaEventCreateWithFlags")  # 2: disable timing
    return ev.value

  def order(self, event: int, before: int, after: int) -> None:
    """Stream `after` waits for what stream `before` has queued so far."""
    _check(self._record(event, before), "cudaEventRecord")
    _check(self._wait(after, event, 0), "cudaStreamWaitEvent")


def _check(status: int, what: str) -> None:
  if status:
    raise RuntimeError(f"{what} failed with CUDA error {status}")


_CUDART: list = []  # [_Cudart or None], loaded on the first fence (torch has loaded CUDA by then)


def _cudart():
  if not _CUDART:
    _CUDART.append(_Cudart.load())
  return _CUDART[0]


def _jax_stream_waits_for_torch(device: torch.device, jax_stream: int) -> None:
  """Queues on JAX's stream a wait for everything torch has queued so far on its current stream."""
  rt = _cudart()
  if rt is not None:
    current = _raw_stream(device.index)
    if current == jax_stream:
      return
    events = getattr(_THREAD, "raw_events", None)
    if events is None:
      events = _THREAD.raw_events = {}
    event = events.get(device.index)
    if event is None:
      event = events[device.index] = rt.event()
    rt.order(event, current, jax_stream)
    return
  key = (device.index, jax_stream)
  external = _JAX_STREAMS.get(key)
  if external is None:
    external = _JAX_STREAMS[key] = torch.cuda.ExternalStream(jax_stream, device=device)
  current = torch.cuda.current_stream(device)
  if current.cuda_stream == jax_stream:
    return
  # One event per thread and stream, re-recorded each call: a wait already queued keeps the point
  # the event had when it was queued. Per thread, because another thread (autograd runs CUDA
  # backward on one of its own) could otherwise re-record it between this record and this wait.
  # (H100: a fresh event per call added about 30 us to the fence, a reused one about nothing.)
  events = getattr(_THREAD, "events", None)
  if events is None:
    events = _THREAD.events = {}
  event = events.get(key)
  if event is None:
    event = events[key] = torch.cuda.Event()
  event.record(current)
  external.wait_event(event)


def ready(t: torch.Tensor) -> torch.Tensor:
  """The tensor as JAX can take it without a copy: detached, contiguous, 32-byte aligned."""
  if t.requires_grad:  # (a detach that is not needed costs a tensor object per operand)
    t = t.detach()
  if not t.is_contiguous():
    t = t.contiguous()
  if t.data_ptr() % ALIGN:
    t = t.clone()
  return t


def to_jax(t: torch.Tensor) -> jax.Array:
  """One tensor as a JAX array on the matching JAX device (zero-copy unless `ready` had to copy).

  Runs under the tensor's own CUDA device: torch's export syncs with that device's current stream.
  """
  t = ready(t)
  if t.is_cuda and t.device.index != torch.cuda.current_device():
    with torch.cuda.device(t.device):
      return _import(t, _target(t.device), fence=True)
  return _import(t, _target(t.device), fence=True)


def _view_key(t: torch.Tensor):
  return (t.data_ptr(), t.dtype, tuple(t.shape))  # `ready` tensors: contiguous, so no strides


@contextlib.contextmanager
def reusing(views: dict):
  """Within it, `run` on this thread takes JAX views of tensors from `views` instead of importing
  them again, and records there the views it imports and the outputs it writes.

  For a forward and its backward (`_ops.differentiable`): the backward reads the forward's saved
  inputs and outputs, whose memory autograd keeps alive and unmodified (saved-tensor versions), so
  the forward's views of it stay valid. Each call still fences streams once for itself.
  """
  previous = getattr(_THREAD, "views", None)
  _THREAD.views = views
  try:
    yield
  finally:
    _THREAD.views = previous


def _to_jax(target: _Target, tensors: Sequence[torch.Tensor | None]) -> list[jax.Array | None]:
  """JAX views of `tensors`; under `reusing`, views from there serve and new ones are recorded.

  The first tensor imported anew takes the stream fence: the computation waits for torch only
  through the definition event of a buffer imported with JAX's stream after the fence (a fence
  queued alone orders JAX's stream for external events, which the kernels do not wait on). When
  every tensor is a view from before, one fresh fenced import of the first stands in."""
  views = getattr(_THREAD, "views", None)
  if target.platform == "gpu" and target.stream is None:
    # No JAX stream to hand torch: order by waiting on the host instead.
    torch.cuda.current_stream().synchronize()
  out, fence, first = [], True, None
  for i, t in enumerate(tensors):
    if t is None:
      out.append(None)
      continue
    first = i if first is None else first
    x = None if views is None else views.get(_view_key(t))
    if x is None or x.is_deleted():  # a donated view is gone; its result took its place in `views`
      x = _import(t, target, fence)
      fence = False
      if views is not None:
        views[_view_key(t)] = x
    out.append(x)
  if fence and first is not None:
    out[first] = _import(tensors[first], target, True)
  return out


# ----------------------------------------------------------------------------------------------------
# JAX -> torch


def _current_stream_ptr() -> int:
  ptr = (torch.cuda.current_stream().cuda_stream if _raw_stream is None
         else _raw_stream(torch.cuda.current_device()))
  return 1 if ptr == 0 else ptr  # DLPack's number for the legacy default stream


def _export_fn():
  """The C++ export under jax.Array.__dlpack__, without its Python layers (device-set and sharding
  lookups, argument handling: about 4 us per array). Off with TORCH_BRIDGE_FAST_DLPACK=0."""
  if os.environ.get("TORCH_BRIDGE_FAST_DLPACK", "1") in ("", "0"):
    return None
  try:
    from jax._src.lib import _jax as jaxlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return getattr(jaxlib, "buffer_to_dlpack_managed_tensor", None)


class _Exporter:
  """JAX result -> DLPack capsule, with `stream` handed to JAX as __dlpack__(stream=...) does.

  jax.Array.__dlpack__ calls the same export on `x.addressable_data(0)`, which for the
  single-device results here is the array itself. The first export per device is checked (a
  capsule that torch imports to the array's own memory, shape and dtype); any mismatch or error
  falls back to the public method for good.
  """

  def __init__(self):
    self._fast = _export_fn()
    self._checked: dict[_Target, bool] = {}

  def __call__(self, x: jax.Array, target: _Target, stream: int | None):
    ok = self._checked.get(target)
    if ok is None:
      ok = self._checked[target] = self._probe(x, target, stream)
    if ok:
      return self._fast(x, stream=stream)
    return x.__dlpack__(stream=stream)

  def _probe(self, x, target, stream) -> bool:
    if self._fast is None:
      return False
    try:
      t = torch._C._from_dlpack(self._fast(x, stream=stream))  # pylint: disable=protected-access
      return (t.data_ptr() == x.unsafe_buffer_pointer() and tuple(t.shape) == tuple(x.shape)
              and _JAX_DTYPES.get(t.dtype) == x.dtype
              and (t.device.type == "cpu") == (target.platform == "cpu"))
    except Exception:  # noqa: BLE001  (a changed private signature: use the public path)
      return False


_export = _Exporter()


def _torch_waits_for(target: _Target, results: Sequence[jax.Array]) -> None:
  """Orders torch's current stream after the execution that produced `results`."""
  if target.platform == "cpu":
    jax.block_until_ready(results)
    return
  # All outputs of one execution become ready together (one event at its end), so one handshake
  # covers them. The capsule is dropped unconsumed: only the producer's stream wait is wanted.
  _export(results[-1], target, _current_stream_ptr())


class _KeepAlive:
  """JAX buffers that torch kernels still read, each released once its torch event has passed."""

  def __init__(self):
    self._pending: collections.deque = collections.deque()
    self._lock = threading.Lock()

  def hold(self, arrays) -> None:
    event = torch.cuda.Event()
    event.record()
    with self._lock:
      self._pending.append((event, arrays))

  def reap(self) -> None:
    if not self._pending:
      return
    with self._lock:
      while self._pending and self._pending[0][0].query():
        self._pending.popleft()

  def __len__(self) -> int:
    return len(self._pending)


_keep_alive = _KeepAlive()


def _copy_back(target: _Target, results: Sequence[jax.Array], outputs: Sequence[torch.Tensor]) -> None:
  # As torch.from_dlpack does: JAX gets torch's current stream (CUDA; the export makes it wait for
  # the kernel, so the copy is queued behind it) or none (CPU; the export waits on the host).
  stream = None if target.platform == "cpu" else _current_stream_ptr()
  for r, o in zip(results, outputs):
    o.copy_(torch._C._from_dlpack(_export(r, target, stream)))  # pylint: disable=protected-access
  if target.platform != "cpu":
    _keep_alive.hold(tuple(results))


# ----------------------------------------------------------------------------------------------------
# Which output path a platform takes


_PATHS: dict[str, str] = {}


@functools.partial(jax.jit, donate_argnums=0)
def _donation_probe(x):
  return x + 1


def _probe_path(target: _Target, device: torch.device) -> str:
  """Whether this runtime writes a jitted function's output into a donated DLPack-imported buffer."""
  t = torch.zeros(64, dtype=torch.float32, device=device)
  x = _import(t, target, fence=True)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # "donated buffers were not usable" is an answer, not a problem
      y = _donation_probe(x)
  except Exception:  # noqa: BLE001  (a runtime that refuses such donations outright)
    return "copy"
  path = "aliased" if y.unsafe_buffer_pointer() == t.data_ptr() else "copy"
  _torch_waits_for(target, [y])
  return path


def output_path(device: torch.device | str) -> str:
  """'aliased' when JAX writes straight into torch's output tensors on this device, else 'copy'."""
  device = torch.device(device)
  if device.type == "cuda" and device.index is None:
    device = torch.device("cuda", torch.cuda.current_device())
  target = _target(device)
  path = _PATHS.get(target.platform)
  if path is None:
    path = _PATHS[target.platform] = _probe_path(target, device)
  return path


# ----------------------------------------------------------------------------------------------------
# One bridged call


def run(kernel: Kernel, operands: Sequence[torch.Tensor | None], outputs: Sequence[torch.Tensor],
        static: tuple) -> None:
  """Computes `kernel` on torch tensors; results land in `outputs` (tensors torch allocated).

  operands may hold None for absent optional operands. Every tensor is on one device, the current
  one for CUDA (the caller checks, naming the argument).
  """
  device = outputs[0].device
  target = _target(device)
  _keep_alive.reap()
  operands = [None if t is None else ready(t) for t in operands]
  path = _PATHS.get(target.platform) or output_path(device)
  if path == "aliased":
    arrays = _to_jax(target, [*operands, *outputs])
    results = kernel.into(*arrays, *static)
    if all(r.unsafe_buffer_pointer() == o.data_ptr() for r, o in zip(results, outputs)):
      _torch_waits_for(target, results)
      views = getattr(_THREAD, "views", None)
      if views is not None:  # the results are JAX's views of torch's outputs
        for r, o in zip(results, outputs):
          views[_view_key(o)] = r
      return
    # The runtime declined this donation although the probe's was honoured: copy, and stop trying.
    _PATHS[target.platform] = "copy"
  else:
    arrays = _to_jax(target, operands)
    results = kernel.plain(*arrays, *static)
  _copy_back(target, results, outputs)


def pending_copies() -> int:
  """JAX buffers still held for torch copies in flight (diagnostics and tests)."""
  _keep_alive.reap()
  return len(_keep_alive)


# jax's bfloat16 is not a numpy builtin; everything else maps by name.
_JAX_DTYPES = {
    torch.float16: np.dtype("float16"),
    torch.bfloat16: jax.numpy.dtype("bfloat16"),
    torch.float32: np.dtype("float32"),
    torch.float64: np.dtype("float64"),
    torch.int8: np.dtype("int8"),
    torch.int16: np.dtype("int16"),
    torch.int32: np.dtype("int32"),
    torch.int64: np.dtype("int64"),
    torch.uint8: np.dtype("uint8"),
    torch.bool: np.dtype("bool"),
}


def jax_dtype(name: str, dtype: torch.dtype):
  """The JAX dtype of a torch dtype; TypeError naming the argument when JAX has none."""
  dt = _JAX_DTYPES.get(dtype)
  if dt is None:
    raise TypeError(f"{name}: tensors of dtype {dtype} cannot cross to JAX")
  return dt
