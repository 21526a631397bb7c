"""The kernel-backend dispatcher (pallas_attn/backends/registry.py) and the Operands pytree, on the CPU.

A fake backend, registered as "mosaic" or "fake", covers only some calls and delegates its kernels
to Triton's (in interpret mode on the CPU), so the choices can be checked through the public
functions as well as on simulated calls. Shapes differ between tests because flash.forward's jit
cache would otherwise replay an earlier choice (the choice is made when a call is traced).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_attn as pa
from pallas_attn import flash_attn_func
from pallas_attn.backends import registry, triton_flash
from pallas_attn.masking import BandMask
from pallas_attn.operands import Grads, Operands
from pallas_attn.spec import AttentionSpec

SPEC = AttentionSpec(mask=BandMask(sq=8, sk=8, right=0), scale=0.5)


def _call(cc=(9, 0), phase="forward", platform="cuda", head_dim=64, spec=SPEC):
  return registry.Call(spec, phase, np.dtype(jnp.bfloat16), head_dim, platform,
                       cc if platform == "cuda" else None)


class FakeBackend:
  """Covers what `rule` allows; records (phase, interpret) of every kernel call it traces."""

  def __init__(self, rule):
    self.rule, self.calls = rule, []

  def covers(self, call):
    return self.rule(call)

  def forward(self, *args, **kwargs):
    self.calls.append(("forward", kwargs["interpret"]))
    return triton_flash.forward(*args, **kwargs)

  def backward(self, *args, **kwargs):
    self.calls.append(("backward", kwargs["interpret"]))
    return triton_flash.backward(*args, **kwargs)


def hopper_forward_d64(call):
  """A Mosaic-like coverage: compiled forward passes at d=64 on compute capability 9.x."""
  if call.platform != "cuda":
    return "compiled kernels only (no interpret mode)"
  if call.compute_capability is None or call.compute_capability[0] != 9:
    return "needs compute capability 9.x"
  if call.phase != "forward":
    return "forward only"
  if call.head_dim != 64:
    return f"head dim 64 only, got {call.head_dim}"
  return None


def interpret_forward(call):
  if call.platform != "interpret":
    return "interpret mode only"
  return None if call.phase == "forward" else "forward only"


@pytest.fixture
def register():
  """register(name, rule) -> a FakeBackend under `name`, removed (or the original put back) after."""
  saved = {}

  def add(name, rule):
    backend = FakeBackend(rule)
    saved.setdefault(name, registry.register(name, backend))
    return backend

  yield add
  for name, previous in saved.items():
    registry.unregister(name)
    if previous is not None:
      registry.register(name, previous)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
  monkeypatch.delenv("PALLAS_ATTN_BACKEND", raising=False)
  monkeypatch.delenv("PALLAS_ATTN_INTERPRET", raising=False)


def test_triton_is_registered_and_covers_the_family():
  assert "triton" in registry.names()
  for cc in ((8, 0), (9, 0), None):
    for phase in registry.PHASES:
      assert registry.get("triton").covers(_call(cc, phase)) is None
      if cc != (9, 0):  # on Hopper the Mosaic kernels come first (tests/test_mosaic.py)
        assert registry.select(_call(cc, phase)) == "triton"
  assert registry.select(_call(platform="interpret")) == "triton"
  assert "256" in registry.get("triton").covers(_call(head_dim=320))


def test_preference_by_compute_capability_and_pass(register):
  register("mosaic", hopper_forward_d64)
  assert registry.select(_call((9, 0), "forward")) == "mosaic"
  assert registry.select(_call((9, 0), "backward")) == "triton"  # mosaic declines: forward only
  assert registry.select(_call((9, 0), "forward", head_dim=128)) == "triton"
  for phase in registry.PHASES:
    assert registry.select(_call((8, 0), phase)) == "triton"  # not preferred off Hopper
    assert registry.select(_call(None, phase)) == "triton"
    assert registry.select(_call(phase=phase, platform="interpret")) == "triton"


def test_explicit_choice_overrides_and_never_falls_back(register):
  register("mosaic", hopper_forward_d64)
  assert registry.select(_call((9, 0)), "triton") == "triton"
  assert registry.select(_call((9, 0)), "mosaic") == "mosaic"
  with pytest.raises(ValueError, match=r"backend 'mosaic' does not cover the forward of bfloat16 "
                                       r"d=64 on cuda \(compute capability 8\.0\).*: needs compute "
                                       r"capability 9\.x"):
    registry.select(_call((8, 0)), "mosaic")
  with pytest.raises(ValueError, match="'mosaic' does not cover the backward.*: forward only"):
    registry.select(_call((9, 0), "backward"), "mosaic")


def test_unknown_backend_raises(register):
  with pytest.raises(ValueError, match=r"unknown backend 'nope'.*registered: .*triton"):
    registry.select(_call(), "nope")
  q = jnp.ones((1, 9, 1, 16), jnp.float32)
  cu = jnp.asarray([0, 9], jnp.int32)
  calls = {  # every function of the family that takes backend=
      "flash_attn_func": lambda b: flash_attn_func(q, q, q, backend=b),
      "qkvpacked": lambda b: pa.flash_attn_qkvpacked_func(jnp.stack([q] * 3, 2), backend=b),
      "kvpacked": lambda b: pa.flash_attn_kvpacked_func(q, jnp.stack([q] * 2, 2), backend=b),
      "varlen": lambda b: pa.flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 9, 9, backend=b),
      "varlen_qkvpacked": lambda b: pa.flash_attn_varlen_qkvpacked_func(
          jnp.stack([q[0]] * 3, 1), cu, 9, backend=b),
      "varlen_kvpacked": lambda b: pa.flash_attn_varlen_kvpacked_func(
          q[0], jnp.stack([q[0]] * 2, 1), cu, cu, 9, 9, backend=b),
  }
  for call in calls.values():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
      call("nope")
  with pytest.raises(TypeError, match="backend"):
    AttentionSpec(mask=SPEC.mask, scale=1.0, backend=3)


def test_environment_variable_and_spec_override(monkeypatch):
  monkeypatch.setenv("PALLAS_ATTN_BACKEND", "mosaic")
  assert registry.explicit_choice(SPEC) == "mosaic"
  assert registry.explicit_choice(dataclasses.replace(SPEC, backend="triton")) == "triton"
  monkeypatch.setenv("PALLAS_ATTN_BACKEND", "nope")
  q = jnp.ones((1, 10, 1, 16), jnp.float32)
  with pytest.raises(ValueError, match="unknown backend 'nope'.*PALLAS_ATTN_BACKEND"):
    flash_attn_func(q, q, q)
  monkeypatch.setenv("PALLAS_ATTN_BACKEND", "triton")
  assert flash_attn_func(q, q, q).shape == q.shape


def test_explicit_backend_runs_and_uncovered_branches_raise_when_lowered(register):
  fake = register("fake", interpret_forward)
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (1, 11, 2, 16), jnp.float32) for i in range(3))
  out = flash_attn_func(q, k, v, causal=True, backend="fake")
  np.testing.assert_array_equal(np.asarray(out), np.asarray(flash_attn_func(q, k, v, causal=True)))
  assert fake.calls and set(fake.calls) == {("forward", True)}  # the CPU branch: interpret mode
  # Its backward is not covered anywhere: the gradient raises, naming backend, call and reason.
  loss = lambda q: flash_attn_func(q, k, v, causal=True, backend="fake").sum()  # noqa: E731
  with pytest.raises(ValueError, match="'fake' does not cover the backward.*: forward only"):
    jax.grad(loss)(q)
  # Lowered for CUDA, the forward's CUDA branch (not covered) raises too, with its own reason.
  f = lambda q: flash_attn_func(q, k, v, causal=True, backend="fake")  # noqa: E731
  with pytest.raises(ValueError, match="'fake' does not cover the forward.* on cuda.*interpret mode "
                                       "only"):
    jax.jit(f).trace(q).lower(lowering_platforms=("cuda",))


def test_cuda_lowering_picks_the_preferred_backend_by_compute_capability(register, monkeypatch):
  mosaic = register("mosaic", hopper_forward_d64)
  q = jnp.zeros((1, 12, 2, 64), jnp.bfloat16)
  fn = lambda q: flash_attn_func(q, q, q)  # noqa: E731
  monkeypatch.setattr(registry, "compute_capability", lambda: (8, 0))
  jax.jit(fn).trace(q).lower(lowering_platforms=("cuda",))
  assert mosaic.calls == []
  monkeypatch.setattr(registry, "compute_capability", lambda: (9, 0))
  q = jnp.zeros((1, 13, 2, 64), jnp.bfloat16)
  text = jax.jit(fn).trace(q).lower(lowering_platforms=("cuda",)).as_text()
  assert ("forward", False) in mosaic.calls and ("forward", True) not in mosaic.calls
  assert text.count("__gpu$xla.gpu.triton") == 1  # the fake delegates to Triton's kernel


def _operands():
  cu = jnp.asarray([0, 3, 8], jnp.int32)
  return Operands(seqlens=(cu, cu), block_table=jnp.zeros((2, 4), jnp.int32),
                  alibi=jnp.ones((2, 3, 1)), seed=jnp.asarray([7], jnp.int32))


def test_operands_pytree_round_trips_through_tree_util_and_jit():
  ops = _operands()
  leaves, tree = jax.tree.flatten(ops)
  assert len(leaves) == 5  # absent operands (None) are empty subtrees
  back = jax.tree.unflatten(tree, leaves)
  assert isinstance(back, Operands) and back.sink is None and back.bias is None
  out = jax.jit(lambda ops: jax.tree.map(lambda x: x + 1, ops))(ops)
  assert isinstance(out, Operands) and out.keep is None and len(out.seqlens) == 2
  np.testing.assert_array_equal(np.asarray(out.seed), [8])
  np.testing.assert_array_equal(np.asarray(out.seqlens[1]), [1, 4, 9])
  grads = jax.jit(lambda g: g)(Grads(*leaves[:3], dsink=leaves[3]))
  assert grads.dbias is None and len(grads.astuple()) == 4


def test_operands_follow_the_spec_flags():
  cu = jnp.asarray([0, 3], jnp.int32)
  table = jnp.zeros((1, 2), jnp.int32)
  ops = Operands.of(seqlens=(cu, cu, table))
  assert ops.block_table is table and len(ops.seqlens) == 2
  assert Operands.flag("block_table") == "page" and Operands.flag("seed") == "dropout_p"
  paged = AttentionSpec(mask=BandMask(sq=8, sk=32), scale=1.0, varlen=True, page=16)
  ops.check(paged)
  with pytest.raises(ValueError, match="sink: spec.sink=None takes none"):
    dataclasses.replace(ops, sink=jnp.zeros((1, 1))).check(paged)
  with pytest.raises(ValueError, match=r"alibi: spec.alibi=True needs it \(fp32"):
    ops.check(dataclasses.replace(paged, alibi=True))
