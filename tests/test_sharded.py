"""Every public JAX function under jax.jit on inputs sharded over batch and heads (a 2 x 2 mesh of the
four virtual CPU devices conftest.py asks for), for Explicit and Auto mesh axes: the same results as
the unsharded call, outputs sharded like the inputs, and no collective in the compiled program. A
sequence-sharded input raises an error that points to the ring."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import pallas_attn
from pallas_attn import flash_dma

CPUS = jax.devices("cpu")
pytestmark = pytest.mark.skipif(len(CPUS) < 4, reason="needs 4 CPU devices "
                                "(XLA_FLAGS=--xla_force_host_platform_device_count=4 before jax starts)")

COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce", "reduce-scatter")
B, S, H, HK, D = 2, 16, 4, 2, 16


def _mesh(kind):
  t = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}[kind]
  return jax.make_mesh((2, 2), ("data", "model"), axis_types=(t, t), devices=CPUS[:4])


def _rand(i, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.PRNGKey(i), shape, dtype)


def _run_sharded(fn, args, specs, kind, *, allow=()):
  """fn jitted on args placed with specs (None = replicated / not an array), under the mesh."""
  mesh = _mesh(kind)
  placed = [a if s is None else jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
  with jax.set_mesh(mesh):
    f = jax.jit(fn)
    out = f(*placed)
    hlo = f.lower(*placed).compile().as_text()
  found = [c for c in COLLECTIVES if c in hlo and c not in allow]
  assert not found, f"collectives in the compiled program: {found}"
  return out


def _close(a, b, what):
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5,
                             atol=1e-5, err_msg=what)


def _check(fn, args, specs, kind, out_specs, *, allow=()):
  """fn sharded == fn unsharded, and each output leaf i sharded as out_specs[i] (None: not checked)."""
  want = jax.tree.leaves(jax.jit(fn)(*args))
  got = jax.tree.leaves(_run_sharded(fn, args, specs, kind, allow=allow))
  assert len(got) == len(want)
  for i, (g, w) in enumerate(zip(got, want)):
    _close(g, w, f"output {i}")
    if i < len(out_specs) and out_specs[i] is not None:
      assert g.sharding.is_equivalent_to(NamedSharding(_mesh(kind), out_specs[i]), g.ndim), (
          f"output {i}: sharding {g.sharding.spec}, expected {out_specs[i]}")


BSHD = P("data", None, "model", None)  # batch over data, heads over model
# Both kinds for the dense function, the ring pointer and dot_product_attention; the other families
# take one each, alternating: the Explicit (shard_map) and Auto (custom_partitioning) mechanisms are
# shared by every family (pallas_attn/sharding.local), and a family's own part, the roles of its
# operands, is checked by either (which keeps this file's CPU time in the CI budget).
KINDS = ("explicit", "auto")


def _grads(f, argnums):
  def loss(*a):
    out = f(*a)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return jnp.sum(out * jnp.cos(out))
  return lambda *a: (f(*a), jax.grad(loss, argnums)(*a))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", [P("data"), P(None, None, "model"), BSHD, P()],
                         ids=["batch", "heads", "both", "replicated"])
def test_flash_attn_func(kind, spec):
  q, k, v = _rand(0, (B, S, H, D)), _rand(1, (B, S, HK, D)), _rand(2, (B, S, HK, D))
  f = _grads(lambda q, k, v: pallas_attn.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)[:2],
             (0, 1, 2))
  full = tuple(spec) + (None,) * (4 - len(spec))
  lse_spec = P(full[0], full[2], None)
  _check(f, (q, k, v), [spec] * 3, kind, [P(*full), lse_spec, P(*full), P(*full), P(*full)])


@pytest.mark.parametrize("kind", ["auto"])  # one kind: see KINDS
def test_packed_and_alibi(kind):
  qkv = _rand(0, (B, S, 3, H, D))
  q, kv = _rand(1, (B, S, H, D)), _rand(2, (B, S, 2, H, D))
  slopes = jnp.linspace(0.1, 0.4, H, dtype=jnp.float32)
  packed = P("data", None, None, "model", None)
  f = _grads(lambda qkv: pallas_attn.flash_attn_qkvpacked_func(qkv, window_size=(3, 2),
                                                               alibi_slopes=slopes), (0,))
  _check(f, (qkv,), [packed], kind, [BSHD, packed])
  f = _grads(lambda q, kv: pallas_attn.flash_attn_kvpacked_func(q, kv, softcap=2.0), (0, 1))
  _check(f, (q, kv), [BSHD, packed], kind, [BSHD, BSHD, packed])


def _varlen_inputs():
  cu = jnp.array([0, 5, 16, 24], jnp.int32)
  return _rand(0, (24, H, D)), _rand(1, (24, HK, D)), _rand(2, (24, HK, D)), cu


@pytest.mark.parametrize("kind", ["explicit"])  # one kind: see KINDS
def test_varlen_heads(kind):
  q, k, v, cu = _varlen_inputs()
  heads = P(None, "model", None)
  f = _grads(lambda q, k, v: pallas_attn.flash_attn_varlen_func(q, k, v, cu, cu, 11, 11, causal=True),
             (0, 1, 2))
  _check(f, (q, k, v), [heads] * 3, kind, [heads, heads, heads, heads])
  qkv = jnp.stack([q, q, q], axis=1)
  f = lambda qkv: pallas_attn.flash_attn_varlen_qkvpacked_func(qkv, cu, 11)  # noqa: E731
  _check(f, (qkv,), [P(None, None, "model", None)], kind, [heads])
  kv = jnp.stack([k, v], axis=1)
  f = lambda q, kv: pallas_attn.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 11, 11)  # noqa: E731
  _check(f, (q, kv), [heads, P(None, None, "model", None)], kind, [heads])


@pytest.mark.parametrize("kind", ["auto"])  # one kind: see KINDS
def test_sinks(kind):
  q, k, v = _rand(0, (B, S, H, D)), _rand(1, (B, S, HK, D)), _rand(2, (B, S, HK, D))
  sink = _rand(3, (2, H))
  sink_spec = P(None, "model")
  # dsink sums over the batch: the one all-reduce a batch-sharded backward needs.
  f = _grads(lambda q, k, v, s: pallas_attn.fa2_func_with_sink(q, k, v, s, causal=True), (0, 1, 2, 3))
  _check(f, (q, k, v, sink), [BSHD] * 3 + [sink_spec], kind, [BSHD, BSHD, BSHD, BSHD, sink_spec],
         allow=("all-reduce",))
  f = lambda q, k, v, s: pallas_attn.fa3_func_with_sink(q, k, v, s, window_size=(4, 0))  # noqa: E731
  _check(f, (q, k, v, sink), [BSHD] * 3 + [sink_spec], kind, [BSHD])
  kv, qkv = jnp.stack([k, v], axis=2), jnp.stack([q, q, q], axis=2)
  packed = P("data", None, None, "model", None)
  f = lambda q, kv, s: pallas_attn.fa2_kvpacked_func_with_sink(q, kv, s)  # noqa: E731
  _check(f, (q, kv, sink), [BSHD, packed, sink_spec], kind, [BSHD])
  f = lambda qkv, s: pallas_attn.fa2_qkvpacked_func_with_sink(qkv, s)  # noqa: E731
  _check(f, (qkv, sink), [packed, sink_spec], kind, [BSHD])
  f = lambda qkv, s: pallas_attn.fa3_qkvpacked_func_with_sink(qkv, s)  # noqa: E731
  _check(f, (qkv, sink), [packed, sink_spec], kind, [BSHD])
  ssh = _rand(4, (B, S, 2, H))
  f = lambda q, k, v, s: pallas_attn.fa2_func_with_sink(q, k, v, s, "ssh")  # noqa: E731
  _check(f, (q, k, v, ssh), [BSHD] * 3 + [P("data", None, None, "model")], kind, [BSHD])


@pytest.mark.parametrize("kind", ["explicit"])  # one kind: see KINDS
def test_varlen_sinks(kind):
  q, k, v, cu = _varlen_inputs()
  sink = _rand(3, (2, H))
  heads = P(None, "model", None)
  f = lambda q, k, v, s: pallas_attn.fa2_varlen_func_with_sink(q, k, v, cu, cu, 11, 11, s)  # noqa: E731
  _check(f, (q, k, v, sink), [heads] * 3 + [P(None, "model")], kind, [heads])
  f = lambda q, k, v, s: pallas_attn.fa3_varlen_func_with_sink(q, k, v, cu, cu, 11, 11, s)  # noqa: E731
  _check(f, (q, k, v, sink), [heads] * 3 + [P(None, "model")], kind, [heads])
  kv, qkv = jnp.stack([k, v], axis=1), jnp.stack([q, q, q], axis=1)
  packed = P(None, None, "model", None)
  f = lambda q, kv, s: pallas_attn.fa2_varlen_kvpacked_func_with_sink(q, kv, cu, cu, 11, 11, s)  # noqa: E731
  _check(f, (q, kv, sink), [heads, packed, P(None, "model")], kind, [heads])
  f = lambda qkv, s: pallas_attn.fa2_varlen_qkvpacked_func_with_sink(qkv, cu, 11, s)  # noqa: E731
  _check(f, (qkv, sink), [packed, P(None, "model")], kind, [heads])


@pytest.mark.parametrize("kind", ["auto"])  # one kind: see KINDS
def test_kvcache(kind):
  q, kn, vn = _rand(0, (B, 1, H, D)), _rand(1, (B, 1, HK, D)), _rand(2, (B, 1, HK, D))
  kc, vc = _rand(3, (B, 32, HK, D)), _rand(4, (B, 32, HK, D))
  seqlens = jnp.array([5, 20], jnp.int32)

  def f(q, kc, vc, kn, vn, sl):
    (out, lse), kc, vc = pallas_attn.flash_attn_with_kvcache(
        q, kc, vc, kn, vn, cache_seqlens=sl, causal=True, num_splits=2, return_softmax_lse=True)
    return out, lse, kc, vc

  _check(f, (q, kc, vc, kn, vn, seqlens), [BSHD] * 5 + [P("data")], kind,
         [BSHD, P("data", "model", None), BSHD, BSHD])


@pytest.mark.parametrize("kind", ["explicit"])  # one kind: see KINDS
def test_kvcache_paged_heads(kind):
  q, kn, vn = _rand(0, (B, 1, H, D)), _rand(1, (B, 1, HK, D)), _rand(2, (B, 1, HK, D))
  kc, vc = _rand(3, (4, 16, HK, D)), _rand(4, (4, 16, HK, D))
  table = jnp.array([[2, 0], [1, 3]], jnp.int32)
  seqlens = jnp.array([5, 20], jnp.int32)
  heads = P(None, None, "model", None)

  def f(q, kc, vc, kn, vn):
    out, kc, vc = pallas_attn.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=seqlens,
                                                      block_table=table)
    return out, kc, vc

  _check(f, (q, kc, vc, kn, vn), [heads] * 5, kind, [heads, heads, heads])


@pytest.mark.parametrize("kind", ["auto"])  # one kind: see KINDS
def test_flash_dma(kind):
  q, k, v = _rand(0, (B, S, H, D)), _rand(1, (B, S, HK, D)), _rand(2, (B, S, HK, D))
  zoh = _rand(3, (B, HK, S, S))
  mask_spec = P("data", "model", None, None)

  def f(q, k, v, zoh):
    active = flash_dma.topk_mask(zoh, 8, True)
    out, lse, _, _ = flash_dma.fwd(q, k, v, zoh, active, is_causal=True)
    grads = flash_dma.bwd(jnp.cos(out), q, k, v, zoh, active, out, lse, is_causal=True)
    return active, out, lse, *grads

  _check(f, (q, k, v, zoh), [BSHD] * 3 + [mask_spec], kind,
         [mask_spec, BSHD, P("data", "model", None), BSHD, BSHD, BSHD, mask_spec])


@pytest.mark.parametrize("kind", ["explicit"])  # one kind: see KINDS
def test_landmark_and_sparse(kind):
  q, k, v = (_rand(i, (B, H, 32, D)) for i in range(3))
  bhsd = P("data", "model", None, None)
  is_mem = (jnp.arange(32) % 16 == 15)
  f = _grads(lambda q, k, v: pallas_attn.fused_landmark_attention(q, k, v, is_mem, block_size=16),
             (0, 1, 2))
  _check(f, (q, k, v), [bhsd] * 3, kind, [bhsd] * 4)
  x = [_rand(i, (B, S, H * D)) for i in range(3)]
  embd = P("data", None, "model")
  f = _grads(lambda q, k, v: pallas_attn.sparse_attention(q, k, v, H, "local", local_attn_ctx=4),
             (0, 1, 2))
  _check(f, x, [embd] * 3, kind, [embd] * 4)


@pytest.mark.parametrize("kind", KINDS)
def test_sequence_sharded_points_to_ring(kind):
  q = _rand(0, (B, S, H, D))
  with pytest.raises(Exception, match="ring_attention"):
    _run_sharded(lambda q: pallas_attn.flash_attn_func(q, q, q), (q,), [P(None, "data")], kind)


def test_dropout_sharded_is_refused():
  q = _rand(0, (B, S, H, D))
  with pytest.raises(NotImplementedError, match="dropout"):
    _run_sharded(lambda q: pallas_attn.flash_attn_func(q, q, q, 0.1, dropout_key=jax.random.PRNGKey(0)),
                 (q,), [P("data")], "explicit")


@pytest.mark.parametrize("kind", KINDS)
def test_dot_product_attention(kind):
  q, k, v = _rand(0, (B, S, H, D)), _rand(1, (B, S, HK, D)), _rand(2, (B, S, HK, D))
  f = _grads(lambda q, k, v: pallas_attn.dot_product_attention(q, k, v, is_causal=True,
                                                               local_window_size=(5, 0)), (0, 1, 2))
  _check(f, (q, k, v), [BSHD] * 3, kind, [BSHD] * 4)
  bias = _rand(3, (B, H, S, S))
  f = lambda q, k, v, bias: pallas_attn.dot_product_attention(q, k, v, bias)  # noqa: E731
  _check(f, (q, k, v, bias), [BSHD] * 3 + [P("data", "model", None, None)], kind, [BSHD])


@pytest.mark.parametrize("kind", ["auto"])  # one kind: see KINDS
def test_dot_product_attention_lengths(kind):
  """The length packing mixes batch rows: per shard under Explicit axes; under Auto axes (where the
  shardings are known only inside the kernel call) batch sharding is refused, not gathered."""
  q, k, v = _rand(0, (B, S, H, D)), _rand(1, (B, S, HK, D)), _rand(2, (B, S, HK, D))
  lengths = jnp.array([9, 16], jnp.int32)
  f = lambda q, k, v, n: pallas_attn.dot_product_attention(  # noqa: E731
      q, k, v, query_seq_lengths=n, key_value_seq_lengths=n)
  if kind == "auto":
    with pytest.raises(Exception, match="only batch and head dimensions may be sharded"):
      _run_sharded(f, (q, k, v, lengths), [BSHD] * 3 + [P("data")], kind)
    heads = P(None, None, "model", None)
    _check(f, (q, k, v, lengths), [heads] * 3 + [None], kind, [heads])
    return
  _check(f, (q, k, v, lengths), [BSHD] * 3 + [P("data")], kind, [BSHD])
