"""pallas_attn.kernel_cache: the XLA flag it adds, when it keeps its hands off, and (on a GPU) that
compiled kernels land in the file."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import pytest

import pallas_attn
from pallas_attn import kernel_cache


@pytest.fixture
def not_started(monkeypatch):
  monkeypatch.setattr(kernel_cache, "_backends_started", lambda: False)


def test_adds_a_per_process_file(not_started):
  env = {"XLA_FLAGS": "--xla_dump_to=/x"}
  path = kernel_cache.enable(env)
  assert env["XLA_FLAGS"] == f"--xla_dump_to=/x {kernel_cache.FLAG}={path}"
  assert os.path.isdir(os.path.dirname(path)) and path != kernel_cache.enable({})


def test_hands_off(not_started, monkeypatch):
  assert kernel_cache.enable({"PALLAS_ATTN_KERNEL_CACHE": "0"}) == "off"
  env = {"XLA_FLAGS": f"{kernel_cache.FLAG}=/mine.bin"}
  assert kernel_cache.enable(env) == "user" and env["XLA_FLAGS"] == f"{kernel_cache.FLAG}=/mine.bin"
  env = {"PALLAS_ATTN_KERNEL_CACHE": "/shared/k.bin"}
  assert kernel_cache.enable(env) == "/shared/k.bin"
  assert env["XLA_FLAGS"] == f"{kernel_cache.FLAG}=/shared/k.bin"
  monkeypatch.setattr(kernel_cache, "_backends_started", lambda: True)
  env = {}
  assert kernel_cache.enable(env) == "late" and "XLA_FLAGS" not in env


@pytest.mark.gpu
def test_compiled_kernels_land_in_the_file():
  flags = os.environ.get("XLA_FLAGS", "")
  if kernel_cache.FLAG not in flags:
    pytest.skip("kernel cache not enabled in this process")
  path = flags.split(f"{kernel_cache.FLAG}=")[1].split()[0]
  q = jnp.ones((1, 40, 2, 64), jnp.bfloat16)
  before = os.path.getsize(path) if os.path.exists(path) else 0
  jax.block_until_ready(jax.jit(lambda q: pallas_attn.flash_attn_func(q, q, q, softcap=7.0))(q))
  assert os.path.getsize(path) > before
