"""JAX's GPU memory settings for a process that torch shares with it.

By default JAX's GPU backend reserves most of the card when it starts, which leaves torch almost
nothing. The environment variables below are read once, when the backend starts (lazily, at the
first JAX operation), so setting one at bridge import works even after `import jax`.
"""
from __future__ import annotations

import os
import sys
import warnings

# The variables a user sets to take charge of JAX's GPU memory; any one of them means hands off.
USER_MEMORY_VARS = ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                    "XLA_PYTHON_CLIENT_ALLOCATOR")


def _backends_started() -> bool:
  if "jax" not in sys.modules:
    return False
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  started = getattr(xla_bridge, "backends_are_initialized", None)
  return bool(started()) if started is not None else bool(getattr(xla_bridge, "_backends", None))


def _gpu_backend_started() -> bool:
  if not _backends_started():
    return False
  import jax  # pylint: disable=g-import-not-at-top
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


def configure(environ=os.environ) -> str:
  """Turns JAX's preallocation off unless the user chose; returns what was done (for tests and logs).

  'user': the user set a memory variable, nothing touched. 'set': preallocation turned off before
  the GPU backend started. 'late': the GPU backend already started with its defaults (warned).
  """
  if any(name in environ for name in USER_MEMORY_VARS):
    return "user"
  if _gpu_backend_started():
    warnings.warn(
        "torch_bridge was imported after JAX's GPU backend started, so JAX has preallocated most of "
        "the GPU memory and torch may run out. Import torch_bridge before the first JAX operation, "
        "or set XLA_PYTHON_CLIENT_PREALLOCATE=false in the environment.", RuntimeWarning, stacklevel=3)
    return "late"
  # Never XLA_PYTHON_CLIENT_MEM_FRACTION: it is deprecated, and a fraction only sizes the
  # preallocation we are turning off.
  environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  return "set"
