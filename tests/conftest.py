"""Shared pytest set-up: the `gpu` marker, the import path for a plain checkout, and a bound on the
memory mappings that compiled executables pile up in one long test process."""
from __future__ import annotations

import gc
import os
import sys

import pytest

# `pytest tests` from a checkout that was not pip-installed still imports the package under test.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)


def has_gpu() -> bool:
  import jax
  try:
    return any(d.platform == "gpu" for d in jax.devices())
  except RuntimeError:
    return False


def pytest_configure(config):
  config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
  if has_gpu():
    return
  skip = pytest.mark.skip(reason="needs a GPU (jax.devices() has none)")
  for item in items:
    if item.get_closest_marker("gpu") is not None:
      item.add_marker(skip)


@pytest.fixture(scope="session")
def on_gpu() -> bool:
  return has_gpu()


# Every XLA:CPU executable (each interpret-mode kernel variant compiles one) holds on the order of 100
# memory mappings until JAX's caches drop it. A full run compiles thousands, and once the process
# reaches the kernel's vm.max_map_count (65530 by default) the next compile dies with SIGSEGV.
# Clearing the caches whenever the count gets high keeps the run far from that limit; it costs only
# recompiles of what later tests still use.
_MAPS_PATH = "/proc/self/maps"
_MAPS_HIGH = 20000


def _mapping_count() -> int:
  try:
    with open(_MAPS_PATH, "rb") as f:
      return f.read().count(b"\n")
  except OSError:  # not Linux: no such limit to stay under
    return 0


@pytest.fixture(autouse=True)
def _bounded_mappings():
  yield
  if _mapping_count() > _MAPS_HIGH:
    import jax
    jax.clear_caches()
    gc.collect()
