"""Shared pytest set-up: four virtual CPU devices, the `gpu` marker, the import path for a plain
checkout, and a bound on the memory mappings that compiled executables pile up in one long test
process."""
from __future__ import annotations

import gc
import os
import sys

import pytest

# Four virtual CPU devices for the multi-device tests (test_ring.py, test_sharded.py). XLA reads the
# flag when jax first initializes its CPU backend, so it is set here, before any test imports jax;
# single-device tests are unaffected (they run on device 0). A flag set by the caller wins.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4").strip()

# Mosaic GPU interpret mode (tests/test_mosaic.py) runs each warpgroup as a thread whose barrier
# waits block inside XLA host callbacks; with the CPU client's default thread pool (one thread per
# core: 2 on CI) the blocked waits can hold every pool thread while the warpgroup that would
# release them waits for one, and the test hangs (seen: the dK/dV kernel at sq=77). PJRT_NPROC
# sizes that pool; a value set by the caller wins.
os.environ.setdefault("PJRT_NPROC", "8")

# Without a CUDA plugin every kernel runs in Pallas interpret mode, where a test's time is mostly
# XLA's CPU compile of the interpreted kernel (a loop over the grid, run once at a small shape):
# backend optimization level 0 halves the CPU suite's time (measured: 211 s -> 121 s on 25 sweep
# cases). Only on machines without a CUDA plugin, because XLA_FLAGS also reaches the GPU compiler;
# a level set by the caller wins.
def _has_cuda_plugin() -> bool:
  import importlib.util
  for name in ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_plugins.xla_cuda13",
               "jax_plugins.xla_cuda12"):
    try:
      if importlib.util.find_spec(name) is not None:
        return True
    except ImportError:  # a dotted name whose parent package is absent
      pass
  return False


if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "") and not _has_cuda_plugin():
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

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


def pytest_addoption(parser):
  parser.addoption("--shard", default=None, metavar="I/N",
                   help="run every N-th selected test starting at the I-th (0-based), so N processes "
                        "share one run (bench/gpu_suite.sh: compiles are CPU-bound, the GPU is idle)")


def pytest_configure(config):
  config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def _shard(config, items):
  spec = config.getoption("--shard")
  if not spec:
    return
  try:
    index, count = (int(x) for x in spec.split("/"))
    assert 0 <= index < count
  except (ValueError, AssertionError):
    raise pytest.UsageError(f"--shard: expected I/N with 0 <= I < N, got {spec!r}") from None
  # Round-robin over the collected order: neighbours are alike in cost (one parametrized test),
  # so each shard gets its share of every kind of test.
  keep = [item for n, item in enumerate(items) if n % count == index]
  config.hook.pytest_deselected(items=[item for n, item in enumerate(items) if n % count != index])
  items[:] = keep


def pytest_collection_modifyitems(config, items):
  _shard(config, items)
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
