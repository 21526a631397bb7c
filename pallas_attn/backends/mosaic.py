"""The Mosaic GPU backend as the registry sees it (backends/registry.py): the forward of
mosaic_flash.py and the backward of mosaic_backward.py, for compiled calls on Hopper (9.x).

Interpret mode on the CPU runs the Triton kernels, which the whole CPU suite checks; the Mosaic
kernels' own interpret mode is for tests/test_mosaic.py. The backward covers head dims 64 and 128;
at 256 (dK and dV would need 256 fp32 registers per thread) the backend is forward-only, so
naming it for a differentiated call takes that backward from the default choice, which reads the
same (out, lse).

`automatic` is False until the whole GPU suite (bench/gpu_suite.sh) has passed with these kernels
chosen automatically on an H100/H200: until then they run only when chosen by name
(backend="mosaic" or PALLAS_ATTN_BACKEND=mosaic). tests/test_mosaic.py -m gpu checks them either
way.
"""
from __future__ import annotations

import os

from pallas_attn.backends import mosaic_backward, mosaic_flash, registry


class MosaicBackend:
  # PALLAS_ATTN_MOSAIC_AUTOMATIC=1/0 overrides the default (read at import), for suite runs.
  automatic = os.environ.get("PALLAS_ATTN_MOSAIC_AUTOMATIC", "0") not in ("", "0")

  @staticmethod
  def forward_only(call) -> bool:
    return call.head_dim not in mosaic_backward.HEAD_DIMS

  @staticmethod
  def covers(call) -> str | None:
    if call.platform != "cuda":
      return "compiled for CUDA only (interpret mode runs the Triton kernels)"
    cc = call.compute_capability
    if cc is None or cc[0] != 9:
      return f"needs compute capability 9.x (Hopper's wgmma and TMA), got {cc}"
    check = mosaic_backward.covers if call.phase == "backward" else mosaic_flash.covers
    return check(call.spec, call.dtype, call.head_dim, has_alibi=call.spec.alibi,
                 has_sink=bool(call.spec.sink) and call.n_sink > 0, n_sink=call.n_sink)

  @staticmethod
  def forward(q, k, v, ops, *, spec, cfgs, head_dim, interpret, into=None):
    return mosaic_flash.forward(q, k, v, ops.alibi, ops.sink, seqlens=ops.seqlens, seed=ops.seed,
                                bias=ops.bias, keep=ops.keep, spec=spec, cfgs=cfgs,
                                head_dim=head_dim, interpret=interpret, into=into)

  @staticmethod
  def backward(q, k, v, out, lse, dout, dlse, ops, *, spec, cfgs, head_dim, interpret, into=None):
    return mosaic_backward.backward(q, k, v, out, lse, dout, dlse, ops, spec=spec, cfgs=cfgs,
                                    head_dim=head_dim, interpret=interpret, into=into)


if mosaic_flash._UNAVAILABLE is None:  # pylint: disable=protected-access
  registry.register("mosaic", MosaicBackend)
