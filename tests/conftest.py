"""Shared pytest set-up: the `gpu` marker and the import path for a plain checkout."""
from __future__ import annotations

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
