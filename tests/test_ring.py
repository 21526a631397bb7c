"""Ring attention (pallas_attn/ring.py) on four virtual CPU devices (conftest.py asks for them): out,
lse and every gradient of the sequence-sharded ring against the reference with the tolerance rule of
tests/numerics.py (the rule single-device flash_attn_func is held to), for both layouts, causal and
not, windows, softcap, ALiBi, GQA, fp32 and bf16; the compiled program moves K/V only by
collective-permute (no all-gather) and its per-device residuals are those of the local shard."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import numerics
import pallas_attn
from pallas_attn import ring

CPUS = jax.devices("cpu")
pytestmark = pytest.mark.skipif(len(CPUS) < 4, reason="needs 4 CPU devices "
                                "(XLA_FLAGS=--xla_force_host_platform_device_count=4 before jax starts)")


def _mesh(n=4, kind=AxisType.Explicit):
  return jax.make_mesh((n,), ("sp",), axis_types=(kind,), devices=CPUS[:n])


def _ring_vjp(mesh, layout, q, k, v, dout, dlse, **opts):
  """(out, lse, dq, dk, dv) of ring_flash_attn_func for the cotangents (dout, dlse), jitted."""
  def f(q, k, v):
    out, lse, _ = pallas_attn.ring_flash_attn_func(q, k, v, mesh=mesh, seq_axis="sp", layout=layout,
                                                   return_attn_probs=True, **opts)
    return out, lse

  @jax.jit
  def run(q, k, v, dout, dlse):
    (out, lse), vjp = jax.vjp(f, q, k, v)
    return (out, lse, *vjp((dout, dlse)))

  seq = NamedSharding(mesh, P(None, "sp"))
  with jax.set_mesh(mesh):
    return run(*(jax.device_put(x, seq) for x in (q, k, v, dout)),
               jax.device_put(dlse, NamedSharding(mesh, P(None, None, "sp"))))


CASES = [
    # (layout, causal, window, softcap, alibi, h, hk, dtype)
    ("zigzag", True, (-1, -1), 0.0, None, 4, 2, "float32"),
    ("zigzag", False, (-1, -1), 0.0, None, 2, 2, "bfloat16"),
    ("contiguous", True, (-1, -1), 0.0, None, 4, 1, "bfloat16"),
    ("zigzag", False, (6, 2), 5.0, None, 2, 1, "float32"),
    ("contiguous", True, (10, -1), 0.0, None, 2, 2, "float32"),
    ("contiguous", True, (-1, -1), 0.0, "h", 2, 1, "float32"),
]


@pytest.mark.parametrize("layout,causal,window,softcap,alibi,h,hk,dtype", CASES)
def test_ring_matches_reference(layout, causal, window, softcap, alibi, h, hk, dtype):
  q, k, v, slopes, dout, dlse = numerics.random_inputs(3, 1, 64, 64, h, hk, 16, dtype, alibi)
  opts = dict(causal=causal, window_size=window, softcap=softcap)
  ours = _ring_vjp(_mesh(), layout, q, k, v, dout, dlse, alibi_slopes=slopes, **opts)
  ref, lowp = numerics.references(q, k, v, slopes, dout, dlse, **opts)
  numerics.check_attention(ours, lowp, ref)


def test_ring_attention_in_user_shard_map():
  """ring_attention itself, on zigzag shards the caller laid out: local rows in the local order."""
  n, c = 4, 8
  q, k, v, _, _, _ = numerics.random_inputs(5, 2, 2 * n * c, 2 * n * c, 2, 2, 16)
  order = np.concatenate([np.r_[i * c:(i + 1) * c, (2 * n - 1 - i) * c:(2 * n - i) * c]
                          for i in range(n)])
  mesh = _mesh()
  body = lambda q, k, v: ring.ring_attention(q, k, v, axis_name="sp", causal=True,  # noqa: E731
                                             return_lse=True)
  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(None, "sp"),) * 3,
                            out_specs=(P(None, "sp"), P(None, None, "sp")), check_vma=False))
  placed = [jax.device_put(x[:, order], NamedSharding(mesh, P(None, "sp"))) for x in (q, k, v)]
  with jax.set_mesh(mesh):
    out, lse = f(*placed)
    with pytest.raises(ValueError, match="check_vma=False"):
      jax.eval_shape(jax.shard_map(body, mesh=mesh, in_specs=(P(None, "sp"),) * 3,
                                   out_specs=(P(None, "sp"), P(None, None, "sp"))), *placed)
  want, want_lse, _ = pallas_attn.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want[:, order]), atol=2e-5)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse[:, :, order]), atol=2e-5)


def test_ring_with_batch_sharded_over_another_axis():
  mesh = jax.make_mesh((2, 2), ("data", "sp"), axis_types=(AxisType.Explicit,) * 2, devices=CPUS[:4])
  q, k, v, _, _, _ = numerics.random_inputs(6, 2, 32, 32, 2, 1, 16)
  spec = NamedSharding(mesh, P("data", "sp"))
  f = jax.jit(lambda q, k, v: pallas_attn.ring_flash_attn_func(q, k, v, mesh=mesh, seq_axis="sp",
                                                               causal=True))
  with jax.set_mesh(mesh):
    out = f(*(jax.device_put(x, spec) for x in (q, k, v)))
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "sp")), 4)
  want = pallas_attn.flash_attn_func(q, k, v, causal=True)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5)


def _compiled_grad(n: int, length: int, layout="zigzag"):
  mesh = _mesh(n)
  q, k, v, _, _, _ = numerics.random_inputs(7, 1, length, length, 2, 2, 16)
  loss = lambda q, k, v: jnp.sum(pallas_attn.ring_flash_attn_func(  # noqa: E731
      q, k, v, mesh=mesh, seq_axis="sp", layout=layout, causal=True) ** 2)
  seq = NamedSharding(mesh, P(None, "sp"))
  with jax.set_mesh(mesh):
    return jax.jit(jax.grad(loss, (0, 1, 2))).lower(
        *(jax.device_put(x, seq) for x in (q, k, v))).compile()


def test_compiled_ring_has_no_gather():
  """K/V move only by collective-permute, forward and backward."""
  hlo = _compiled_grad(4, 64).as_text()
  assert "collective-permute" in hlo
  for op in ("all-gather", "all-to-all", "all-reduce", "reduce-scatter"):
    assert op not in hlo, f"{op} in the ring's compiled program"


@pytest.mark.parametrize("layout", ring.LAYOUTS)
def test_residuals_are_local(layout):
  """What the backward keeps per device: q, k, v, out and lse of the local shard, nothing longer
  (a gathered K/V or an (s, s) score block would show up here)."""
  n, local = 4, 16
  q, k, v, _, _, _ = numerics.random_inputs(8, 1, n * local, n * local, 2, 1, 16)
  saved = []

  def body(q, k, v):
    f = lambda q, k, v: ring.ring_attention(q, k, v, axis_name="sp", causal=True,  # noqa: E731
                                            layout=layout, return_lse=True)
    saved.extend(aval for aval, _ in saved_residuals(f, q, k, v))
    return f(q, k, v)[0]

  mesh = _mesh(n)
  with jax.set_mesh(mesh):
    jax.eval_shape(jax.shard_map(body, mesh=mesh, in_specs=(P(None, "sp"),) * 3,
                                 out_specs=P(None, "sp"), check_vma=False),
                   *(jax.device_put(x, NamedSharding(mesh, P(None, "sp"))) for x in (q, k, v)))
  local_bytes = lambda x: x.size * x.dtype.itemsize  # noqa: E731
  shard = [jax.ShapeDtypeStruct((1, local, 2, 16), q.dtype)] * 2 + [
      jax.ShapeDtypeStruct((1, local, 1, 16), k.dtype)] * 2 + [
      jax.ShapeDtypeStruct((1, 2, local), jnp.float32)]  # q, out, k, v, lse
  assert saved, "no residuals recorded"
  assert all(max(a.shape, default=0) <= local for a in saved), [a.shape for a in saved]
  assert sum(local_bytes(a) for a in saved) <= sum(local_bytes(a) for a in shard), [a.shape for a in saved]


def test_plan_skips_hidden_steps_and_balances_zigzag():
  # A window narrower than a chunk: contiguous sees only its own and the previous device's block.
  plan = ring.make_plan(4, "contiguous", 16, True, (4, -1), 1.0, 0.0, False)
  assert [s for s, _ in plan.steps] == [0, 1]
  # zigzag causal: after the diagonal step, each device computes exactly 2 of its 4 block pairs, as
  # two static full-block calls (no lax.switch: one mask per call on every device).
  plan = ring.make_plan(4, "zigzag", 16, True, (-1, -1), 1.0, 0.0, False)
  for s, calls in plan.steps[1:]:
    assert len(calls) == 2, s
    for call in calls:
      assert all(call.keep(i) for i in range(4)) and len(set(call.masks)) == 1, (s, call)


def test_errors():
  mesh = _mesh()
  q = jnp.zeros((1, 20, 2, 16))
  with pytest.raises(ValueError, match="multiple of 8"):
    pallas_attn.ring_flash_attn_func(q, q, q, mesh=mesh, seq_axis="sp")
  with pytest.raises(NotImplementedError, match="dropout"):
    pallas_attn.ring_flash_attn_func(q, q, q, mesh=mesh, seq_axis="sp", dropout_p=0.1)
  with pytest.raises(ValueError, match="layout"):
    pallas_attn.ring_flash_attn_func(q, q, q, mesh=mesh, seq_axis="sp", layout="striped")


@pytest.mark.gpu
@pytest.mark.parametrize("layout,causal,dtype", [("zigzag", True, "bfloat16"), ("contiguous", True, "float16"),
                                                 ("zigzag", False, "bfloat16")])
def test_ring_one_gpu_matches_reference(layout, causal, dtype):
  """The ring on a one-GPU mesh (N=1: one step, the flash kernels themselves) against the
  reference, out, lse and every gradient; odd lengths are refused by the layouts, so 2N-divisible."""
  gpus = [d for d in jax.devices() if d.platform == "gpu"][:1]
  mesh = jax.make_mesh((1,), ("sp",), axis_types=(AxisType.Explicit,), devices=gpus)
  q, k, v, slopes, dout, dlse = numerics.random_inputs(11, 2, 258, 258, 4, 2, 64, dtype, None)
  ours = _ring_vjp(mesh, layout, q, k, v, dout, dlse, causal=causal)
  ref, lowp = numerics.references(q, k, v, slopes, dout, dlse, causal=causal)
  numerics.check_attention(ours, lowp, ref)
