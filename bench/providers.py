"""The implementations under test behind one interface.

A provider names the case features it handles and builds, per (case, direction), a Runner: `call()` runs
the op on the timing inputs (forward, or forward plus backward with a random cotangent) and `check()`
runs it once on the check cotangent and returns the checked slice (inputs.py). Imports happen on first
use, so a missing library only removes that provider's rows.
"""
from __future__ import annotations

import dataclasses
import importlib
import sys
from typing import Any, Callable

import jax
import numpy as np

from bench.cases import Case
from bench.inputs import Inputs

OURS = "pallas-attn"


@dataclasses.dataclass
class Runner:
  call: Callable[[], Any]
  check: Callable[[], dict[str, np.ndarray]]
  sync: Callable[[Any], None]
  cuda_events: bool = False


class Provider:
  name = ""
  framework = "jax"
  features: frozenset[str] = frozenset()
  ours = False  # our kernels (any face): excluded from "best peer"
  needs_gpu = True

  def __init__(self):
    self._unavailable = None
    self._probed = False

  def unavailable(self, platform: str) -> str | None:
    """Why this provider cannot run at all in this process, or None."""
    if self.needs_gpu and platform != "gpu":
      return "needs a GPU"
    if not self._probed:
      self._probed = True
      try:
        self._unavailable = self.probe()
      except Exception as e:  # pylint: disable=broad-except
        self._unavailable = f"{type(e).__name__}: {e}".splitlines()[0][:160]
    return self._unavailable

  def probe(self) -> str | None:
    return None

  def unsupported(self, case: Case) -> str | None:
    missing = case.features() - self.features
    if missing:
      return "does not support " + ", ".join(sorted(missing))
    return self.limits(case)

  def limits(self, case: Case) -> str | None:
    del case
    return None

  def build(self, case: Case, inputs: Inputs, direction: str) -> Runner:
    raise NotImplementedError


# jax providers wrap attn(q, k, v) -> out, all (b, s, H, d).


def _jax_runner(attn, inputs: Inputs, direction: str) -> Runner:
  q, k, v = inputs.q, inputs.k, inputs.v
  if direction == "fwd":
    f = jax.jit(attn)
    return Runner(call=lambda: f(q, k, v), check=lambda: inputs.slice_out(f(q, k, v)),
                  sync=jax.block_until_ready)

  def fwdbwd(q, k, v, do):
    _, vjp = jax.vjp(attn, q, k, v)
    return vjp(do)

  g = jax.jit(fwdbwd)
  return Runner(call=lambda: g(q, k, v, inputs.do),
                check=lambda: inputs.slice_grads(*g(q, k, v, inputs.do_check)), sync=jax.block_until_ready)


class PallasAttn(Provider):
  """Our kernels through the JAX face; `tiles` (a KernelConfigs) overrides the tuned tile table."""
  framework = "jax"
  features = frozenset({"causal", "window", "offset", "softcap", "alibi", "gqa", "decode"})
  ours = True
  needs_gpu = False

  def __init__(self, tiles=None, tag: str = "", backend: str | None = None):
    super().__init__()
    self.tiles = tiles
    self.backend = backend  # None: the registry's choice; "mosaic": Mosaic GPU (Triton's backward at d=256)
    self.name = OURS if not tag else f"{OURS}@{tag}"
    if backend:
      self.name += f"[{backend}]"
      self.needs_gpu = True

  def limits(self, case):
    import pallas_attn  # pylint: disable=import-outside-toplevel
    if case.kind == "decode" and not hasattr(pallas_attn, "flash_attn_with_kvcache"):
      return "pallas_attn.flash_attn_with_kvcache not available yet"
    if self.backend == "mosaic":
      if case.kind == "decode":
        return "the Mosaic backend has no decode kernel"
      if case.d not in (64, 128, 256) or case.dtype not in ("bfloat16", "float16"):
        return "the Mosaic forward covers bf16/fp16 at d 64, 128 and 256"
    return None

  def build(self, case, inputs, direction):
    import pallas_attn as pa  # pylint: disable=import-outside-toplevel
    if case.kind == "decode":
      def attn(q, k, v):
        res = pa.flash_attn_with_kvcache(q, k, v, causal=case.causal, window_size=case.window,
                                         softcap=case.softcap, alibi_slopes=inputs.slopes)
        return res[0] if isinstance(res, tuple) else res
    else:
      kw = {} if self.tiles is None else {"tiles": self.tiles}
      if self.backend:
        kw["backend"] = self.backend

      def attn(q, k, v):
        return pa.flash_attn_func(q, k, v, causal=case.causal, window_size=case.window,
                                  softcap=case.softcap, alibi_slopes=inputs.slopes, **kw)
    return _jax_runner(attn, inputs, direction)


class XlaReference(Provider):
  """pallas_attn.reference in the input dtype: plain XLA ops with the full score matrix in memory."""
  name = "xla-reference"
  framework = "jax"
  features = frozenset({"causal", "window", "offset", "softcap", "alibi", "gqa", "decode"})
  needs_gpu = False
  MAX_SCORES = 1 << 28  # fp32 score elements (1 GiB); beyond that it only measures memory traffic

  def limits(self, case):
    if case.b * case.h * case.sq * case.sk > self.MAX_SCORES:
      return "score matrix too large"
    return None

  def build(self, case, inputs, direction):
    from pallas_attn.reference import attention_reference  # pylint: disable=import-outside-toplevel

    def attn(q, k, v):
      return attention_reference(q, k, v, softmax_scale=case.scale, causal=case.causal,
                                 window_size=case.window, softcap=case.softcap,
                                 alibi_slopes=inputs.slopes, upcast=False)[0]
    return _jax_runner(attn, inputs, direction)


class JaxPallas(Provider):
  """jax.experimental.pallas.ops.gpu.attention.mha with the blocks tuned in PERF_NOTES.md."""
  name = "jax-pallas"
  framework = "jax"
  features = frozenset({"causal"})
  BLOCK = 128

  def probe(self):
    importlib.import_module("jax.experimental.pallas.ops.gpu.attention")

  def limits(self, case):
    if case.sq != case.sk or case.sq % self.BLOCK:
      return f"needs sq == sk, a multiple of {self.BLOCK}"
    return None

  def build(self, case, inputs, direction):
    from jax.experimental.pallas.ops.gpu import attention as jattn  # pylint: disable=import-outside-toplevel
    blocks = jattn.BlockSizes(block_q=128, block_k=64, block_q_dkv=64, block_kv_dkv=64, block_q_dq=64,
                              block_kv_dq=64)

    def attn(q, k, v):
      return jattn.mha(q, k, v, None, sm_scale=case.scale, causal=case.causal, block_sizes=blocks,
                       num_warps=4, num_stages=2)
    return _jax_runner(attn, inputs, direction)


class JaxCudnn(Provider):
  name = "jax-cudnn"
  framework = "jax"
  features = frozenset({"causal", "window", "gqa", "decode"})

  def limits(self, case):
    if "window" in case.features() and not case.causal:
      return "cuDNN windows are left-only with causal"
    if case.dtype not in ("bfloat16", "float16"):
      return "16-bit only"
    return None

  def build(self, case, inputs, direction):
    kw = {}
    if "window" in case.features():
      kw["local_window_size"] = (case.window_eff[0], 0)

    def attn(q, k, v):
      return jax.nn.dot_product_attention(q, k, v, scale=case.scale, is_causal=case.causal,
                                          implementation="cudnn", **kw)
    return _jax_runner(attn, inputs, direction)


def import_tokamax():
  """tokamax, made callable beside this process's argparse flags and this jax.

  - tokamax reads absl flags, which would otherwise parse sys.argv (our own argparse flags) and
    raise UnrecognizedFlagError at its first call.
  - tokamax 0.0.12 (the newest on PyPI) calls plgpu.kernel(out_shape=..., scratch_shapes=...),
    which jax 0.11 renamed out_type and scratch_types: the keywords are translated for its calls
    (ours already use the new names).
  """
  import tokamax  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1], known_only=True)
  try:
    import inspect  # pylint: disable=import-outside-toplevel
    from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=import-outside-toplevel
  except ImportError:
    return tokamax
  kernel = plgpu.kernel
  if "out_shape" not in inspect.signature(kernel).parameters and not hasattr(kernel, "_renamed"):
    def renamed(*args, out_shape=None, scratch_shapes=None, **kw):
      if out_shape is not None:
        kw["out_type"] = out_shape
      if scratch_shapes is not None:
        kw["scratch_types"] = scratch_shapes
      return kernel(*args, **kw)
    renamed._renamed = True
    plgpu.kernel = renamed
  return tokamax


class Tokamax(Provider):
  framework = "jax"
  features = frozenset({"causal", "window", "softcap", "gqa"})

  def __init__(self, impl: str):
    super().__init__()
    self.impl = impl
    self.name = f"tokamax-{impl}"

  def probe(self):
    importlib.import_module("tokamax")

  def build(self, case, inputs, direction):
    tokamax = import_tokamax()
    kw = {}
    if "window" in case.features():
      left, right = case.window_eff
      kw["local_window_size"] = (left if left >= 0 else case.sk, right if right >= 0 else case.sk)
    if case.softcap > 0:
      kw["logits_soft_cap"] = case.softcap

    def attn(q, k, v):
      return tokamax.dot_product_attention(q, k, v, scale=case.scale, is_causal=case.causal,
                                           implementation=self.impl, **kw)
    return _jax_runner(attn, inputs, direction)


# torch providers wrap attn(q, k, v) -> out in the provider's layout ("bshd" or "bhsd").


def _torch_runner(attn, inputs: Inputs, layout: str, direction: str) -> Runner:
  import torch  # pylint: disable=import-outside-toplevel
  q, k, v, do, do_check, _ = inputs.torch(layout)
  bshd = (lambda t: t.transpose(1, 2)) if layout == "bhsd" else (lambda t: t)
  cuda = q.is_cuda
  sync = (lambda _: torch.cuda.synchronize()) if cuda else (lambda _: None)
  if direction == "fwd":
    return Runner(call=lambda: attn(q, k, v), check=lambda: inputs.slice_out(bshd(attn(q, k, v))), sync=sync,
                  cuda_events=cuda)

  def fwdbwd(cot):
    return torch.autograd.grad(attn(q, k, v), (q, k, v), cot)
  return Runner(call=lambda: fwdbwd(do), check=lambda: inputs.slice_grads(*map(bshd, fwdbwd(do_check))),
                sync=sync, cuda_events=cuda)


class TorchBridge(Provider):
  """Our kernels through torch_bridge (torch tensors in, torch tensors out)."""
  name = f"{OURS}/torch"
  framework = "torch"
  features = frozenset({"causal", "window", "offset", "softcap", "alibi", "gqa", "decode"})
  ours = True
  needs_gpu = False

  def probe(self):
    mod = importlib.import_module("torch_bridge")
    if not hasattr(mod, "flash_attn_func"):
      return "torch_bridge.flash_attn_func not available"
    return None

  def limits(self, case):
    import torch_bridge  # pylint: disable=import-outside-toplevel
    if case.kind == "decode" and not hasattr(torch_bridge, "flash_attn_with_kvcache"):
      return "torch_bridge.flash_attn_with_kvcache not available yet"
    return None

  def build(self, case, inputs, direction):
    import torch_bridge  # pylint: disable=import-outside-toplevel
    slopes = inputs.torch("bshd")[5]
    fn = torch_bridge.flash_attn_with_kvcache if case.kind == "decode" else torch_bridge.flash_attn_func

    def attn(q, k, v):
      res = fn(q, k, v, causal=case.causal, window_size=case.window, softcap=case.softcap,
               alibi_slopes=slopes)
      return res[0] if isinstance(res, tuple) else res
    return _torch_runner(attn, inputs, "bshd", direction)


class Sdpa(Provider):
  """torch's scaled_dot_product_attention pinned to one backend."""
  framework = "torch"
  features = frozenset({"causal", "gqa", "decode"})

  def __init__(self, name: str, backend: str):
    super().__init__()
    self.name = name
    self.backend = backend

  def probe(self):
    from torch.nn.attention import SDPBackend  # pylint: disable=import-outside-toplevel
    getattr(SDPBackend, self.backend)

  def limits(self, case):
    if case.causal and case.sq != case.sk:
      return "SDPA's causal mask is top-left aligned"
    return None

  def build(self, case, inputs, direction):
    import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
    from torch.nn.attention import SDPBackend, sdpa_kernel  # pylint: disable=import-outside-toplevel
    backend = getattr(SDPBackend, self.backend)
    kw = {"enable_gqa": True} if case.group > 1 else {}

    def attn(q, k, v):
      with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal, scale=case.scale, **kw)
    return _torch_runner(attn, inputs, "bhsd", direction)


class Flex(Provider):
  """torch.compile'd FlexAttention; masks become a BlockMask so masked tiles are skipped."""
  name = "flex"
  framework = "torch"
  features = frozenset({"causal", "window", "offset", "softcap", "alibi", "gqa"})

  def __init__(self):
    super().__init__()
    self._case_key = None
    self._mods = None

  def probe(self):
    importlib.import_module("torch.nn.attention.flex_attention")

  def build(self, case, inputs, direction):
    import torch  # pylint: disable=import-outside-toplevel
    from torch.nn.attention import flex_attention as fa  # pylint: disable=import-outside-toplevel
    if self._case_key != case.key:
      # One compiled entry per case: dropping the last case's graphs keeps dynamo under its recompile
      # limit (past it, flex silently runs eagerly with the full score matrix).
      torch._dynamo.reset()  # pylint: disable=protected-access
      self._compiled = torch.compile(fa.flex_attention, dynamic=False)
      self._mods = self._make_mods(case, inputs, fa)
      self._case_key = case.key
    score_mod, block_mask = self._mods
    compiled = self._compiled
    gqa = case.group > 1

    def attn(q, k, v):
      return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=case.scale, enable_gqa=gqa)
    return _torch_runner(attn, inputs, "bhsd", direction)

  @staticmethod
  def _make_mods(case, inputs, fa):
    import torch  # pylint: disable=import-outside-toplevel
    off = case.sk - case.sq
    left, right = case.window_eff
    softcap = case.softcap
    slopes = inputs.torch("bhsd")[5]
    q = inputs.torch("bhsd")[0]

    score_mod = None
    if softcap > 0 or slopes is not None:
      def score_mod(score, b, h, q_idx, kv_idx):
        del b
        if softcap > 0:
          score = softcap * torch.tanh(score / softcap)
        if slopes is not None:
          score = score - slopes[h] * torch.abs(q_idx + off - kv_idx)
        return score

    block_mask = None
    if left >= 0 or right >= 0:
      def mask_mod(b, h, q_idx, kv_idx):
        del b, h
        i = q_idx + off
        ok = kv_idx >= 0
        if right >= 0:
          ok = ok & (kv_idx <= i + right)
        if left >= 0:
          ok = ok & (kv_idx >= i - left)
        return ok
      block_mask = fa.create_block_mask(mask_mod, B=None, H=None, Q_LEN=case.sq, KV_LEN=case.sk,
                                        device=q.device)
    return score_mod, block_mask


def registry(ours_tiles=()) -> list[Provider]:
  """Every provider, ours first (the others' ratios are taken against it)."""
  provs: list[Provider] = [PallasAttn()]
  provs += [PallasAttn(tiles=t, tag=tag) for tag, t in ours_tiles]
  provs.append(PallasAttn(backend="mosaic"))  # Mosaic GPU (Hopper); the backward at d=256 on Triton
  provs.append(PallasAttn(backend="triton"))  # the Triton-lowered kernels, on any GPU
  provs += [
      TorchBridge(),
      Sdpa("sdpa-flash", "FLASH_ATTENTION"),
      Sdpa("sdpa-cudnn", "CUDNN_ATTENTION"),
      Flex(),
      JaxPallas(),
      JaxCudnn(),
      Tokamax("triton"),
      Tokamax("mosaic"),
      XlaReference(),
  ]
  return provs


DEFAULT_EXCLUDED = ("xla-reference",)  # on the GPU only when named: it measures a naive baseline
SMOKE_PROVIDERS = (OURS, "xla-reference")


def parse_tiles(spec: str):
  """"128x64w4s2,64x64w4s2,64x64w4s2" (fwd, dq, dkv; w = warps, s = stages) -> (tag, KernelConfigs)."""
  import re  # pylint: disable=import-outside-toplevel

  from pallas_attn import KernelConfigs, TileConfig  # pylint: disable=import-outside-toplevel
  parts = spec.split(",")
  pat = re.compile(r"^(\d+)x(\d+)(?:w(\d+))?(?:s(\d+))?$")
  cfgs = []
  for p in parts:
    m = pat.match(p.strip())
    if not m or len(parts) != 3:
      raise ValueError(f"--ours-tiles: expected 'QxKwWsS,QxKwWsS,QxKwWsS' (fwd, dq, dkv), got {spec!r}")
    bq, bk, w, s = m.groups()
    cfgs.append(TileConfig(int(bq), int(bk), int(w or 4), int(s or 2)))
  return spec, KernelConfigs(*cfgs)
