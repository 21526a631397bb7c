"""Everything that differs between the jax versions we support (0.10.2 to 0.12).

Kernel modules import Pallas names from here, so a rename in jax touches one file.
"""
from __future__ import annotations

import warnings

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# jax 0.11 deprecates the Triton backend and warns on every lowering; the warning says nothing
# actionable to our users, so it is silenced (not turned into an error).
warnings.filterwarnings("ignore", message=r".*[Tt]riton backend is deprecated.*")
warnings.filterwarnings("ignore", message=r".*Triton.*deprecated.*", category=DeprecationWarning)

load = pltriton.load
store = pltriton.store
inline_asm = getattr(pltriton, "elementwise_inline_asm", None)  # Triton lowering only


def triton_params(num_warps: int, num_stages: int):
  """Explicit Triton compiler params: since jax 0.9 a bare pallas_call on CUDA may pick Mosaic GPU."""
  cls = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams")
  return cls(num_warps=num_warps, num_stages=num_stages)


def on_platforms(*args, gpu, cpu):
  """Runs `gpu(*args)` when lowered for CUDA and `cpu(*args)` elsewhere (Pallas interpret mode).

  The choice is made at lowering time from the platform the computation is compiled for, so a
  CPU array on a machine with a GPU still takes the interpret path.
  """
  return jax.lax.platform_dependent(*args, cuda=gpu, default=cpu)


def has_gpu() -> bool:
  try:
    return any(d.platform == "gpu" for d in jax.devices())
  except RuntimeError:
    return False


next_power_of_2 = pl.next_power_of_2
