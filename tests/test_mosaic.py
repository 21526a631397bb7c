"""The Mosaic GPU kernels (pallas_attn/backends/mosaic_flash.py's forward, mosaic_backward.py's
backward, registered by backends/mosaic.py) against the reference.

On the CPU: covers()'s answers; every variant lowers to Mosaic GPU for CUDA (jax lowers Pallas to
Mosaic GPU's MLIR in Python, so this needs no GPU and catches what only the GPU would otherwise
reveal at compile time); and a few small problems run end to end in Mosaic GPU interpret mode
(producer and consumer warpgroups as threads, barriers, TMA copies and wgmma simulated; the
module extends the interpreter where it lacks what the kernel uses), each checked under the
tolerance rule (numerics.py) for out and lse, and where the backward covers the head dim for dq,
dk, dv and dsink. With a GPU: the parity sweep over dtypes, head dims, kv head layouts, variants
and awkward lengths, gradients included.
"""
from __future__ import annotations

import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import numerics
from pallas_attn.backends import mosaic_backward, mosaic_flash, mosaic_interpret
from pallas_attn.operands import Operands
from pallas_attn.masking import StridedCausalMask
from pallas_attn.reference import attention_reference
from pallas_attn.spec import AttentionSpec, band_from_window

needs_mosaic = pytest.mark.skipif(mosaic_flash.plgpu is None, reason=str(mosaic_flash._UNAVAILABLE))


def _spec(sq, sk, *, causal=False, window=(-1, -1), softcap=0.0, alibi=False, sink=False, d=64,
          **extra):
  return AttentionSpec(mask=band_from_window(sq, sk, causal, window), scale=1.0 / math.sqrt(d),
                       softcap=softcap, alibi=alibi, sink="sh" if sink else None, **extra)


def _covers(spec, dtype="bfloat16", d=64, alibi=None, n_sink=0):
  return mosaic_flash.covers(spec, jnp.dtype(dtype), d, has_alibi=spec.alibi if alibi is None
                             else alibi, has_sink=n_sink > 0, n_sink=n_sink)


@needs_mosaic
def test_covers_accepts_the_dense_family():
  for opts in (dict(), dict(causal=True), dict(window=(64, 16)), dict(softcap=30.0),
               dict(alibi=True), dict(causal=True, sink=True)):
    for d in (64, 128, 256):
      for dtype in ("bfloat16", "float16"):
        spec = _spec(77, 300, d=d, **opts)
        assert _covers(spec, dtype, d, n_sink=2 if opts.get("sink") else 0) is None, (opts, d, dtype)


@needs_mosaic
def test_registered_choices():
  """On Hopper the dispatcher picks Mosaic for what it covers (both passes at d 64 and 128; the
  forward at 256, whose backward then comes from Triton, named or not); never for interpret mode
  or another architecture."""
  from pallas_attn.backends import mosaic, registry

  def call(phase="forward", platform="cuda", cc=(9, 0), d=64, **kw):
    return registry.Call(_spec(77, 300, causal=True), phase, jnp.dtype("bfloat16"), d, platform,
                         cc if platform == "cuda" else None, **kw)

  assert "mosaic" in registry.names()
  auto = "mosaic" if mosaic.MosaicBackend.automatic else "triton"
  for phase in ("forward", "backward"):
    assert registry.select(call(phase)) == auto
    assert registry.select(call(phase), "mosaic") == "mosaic"
    with pytest.raises(ValueError, match="compute capability 9.x"):
      registry.select(call(phase, cc=(8, 0)), "mosaic")
    with pytest.raises(ValueError, match="CUDA only"):
      registry.select(call(phase, "interpret"), "mosaic")
  assert registry.select(call(d=256), "mosaic") == "mosaic"
  # Forward-only at d=256: naming it for a differentiated call leaves the backward to the default.
  assert registry.select(call("backward", d=256), "mosaic") == "triton"
  assert registry.select(call("backward", d=256)) == "triton"
  assert "backward head dim" in mosaic.MosaicBackend.covers(call("backward", d=256))
  sinks = registry.Call(_spec(64, 64, sink=True), "forward", jnp.dtype("float16"), 128, "cuda",
                        (9, 0), n_sink=64)
  with pytest.raises(ValueError, match="sink logits"):
    registry.select(sinks, "mosaic")


@needs_mosaic
@pytest.mark.parametrize("value,want", [("1", True), ("0", False), ("", False)])
def test_automatic_flag_follows_the_environment(value, want):
  """PALLAS_ATTN_MOSAIC_AUTOMATIC (read at import) sets whether the dispatcher may pick Mosaic
  unasked; a fresh process, since the flag is read once."""
  code = ("from pallas_attn.backends import mosaic, registry; import jax.numpy as jnp; "
          "from pallas_attn.spec import AttentionSpec, band_from_window; "
          "spec = AttentionSpec(mask=band_from_window(128, 128, True, (-1, -1)), scale=0.125); "
          "call = registry.Call(spec, 'forward', jnp.dtype('bfloat16'), 64, 'cuda', (9, 0)); "
          "print(mosaic.MosaicBackend.automatic, registry.select(call))")
  env = dict(os.environ, PALLAS_ATTN_MOSAIC_AUTOMATIC=value, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.stdout.split() == [str(want), "mosaic" if want else "triton"], out.stdout


@needs_mosaic
@pytest.mark.parametrize("what,spec,kw", [
    ("varlen", _spec(64, 64, varlen=True), {}),
    ("paged", _spec(64, 64, varlen=True, page=16), {}),
    ("dropout", _spec(64, 64, dropout_p=0.1), {}),
    ("bias_mask", _spec(64, 64, bias_mask=True), {}),
    ("tabled", AttentionSpec(mask=StridedCausalMask(64, 64, 4), scale=0.125), {}),
    ("float32", _spec(64, 64), dict(dtype="float32")),
    ("head dim", _spec(64, 64), dict(d=96)),
    ("head dim", _spec(64, 64), dict(d=32)),
    ("sink layout", AttentionSpec(mask=band_from_window(64, 64, False, (-1, -1)), scale=0.125,
                                  sink="ssh"), dict(n_sink=1)),
    ("sink logits", _spec(64, 64, sink=True), dict(n_sink=64)),
])
def test_covers_refuses_with_a_reason(what, spec, kw):
  reason = _covers(spec, **kw)
  assert isinstance(reason, str) and reason, what
  word = {"float32": "dtype", "tabled": "tabled", "head dim": "head dim", "sink layout": "sink",
          "sink logits": "sink", "bias_mask": "bias_mask", "paged": "paged", "varlen": "varlen",
          "dropout": "dropout"}[what]
  assert word in reason, (what, reason)


def _inputs(b, sq, sk, h, hk, d, dtype, *, alibi=False, n_sink=0, seed=0):
  q, k, v, _, _, _ = numerics.random_inputs(seed, b, sq, sk, h, hk, d, dtype)
  ks = jax.random.split(jax.random.PRNGKey(seed + 1), 2)
  slopes = jax.random.uniform(ks[0], (b, h), jnp.float32, 0.01, 0.3) if alibi else None
  sink = jax.random.normal(ks[1], (h, n_sink), jnp.float32) if n_sink else None
  return q, k, v, slopes, sink


@functools.partial(jax.jit, static_argnames=("spec", "interpret"))
def _ours(q, k, v, slopes, sink, *, spec, interpret):
  alibi = None if slopes is None else slopes[..., None]
  return mosaic_flash.forward(q, k, v, alibi, sink, spec=spec, cfgs=None, head_dim=q.shape[-1],
                              interpret=interpret)


@functools.partial(jax.jit, static_argnames=("causal", "window", "softcap", "upcast"))
def _reference(q, k, v, slopes, sink, *, causal, window, softcap, upcast):
  return attention_reference(q, k, v, causal=causal, window_size=window, softcap=softcap,
                             alibi_slopes=slopes, upcast=upcast,
                             sink=None if sink is None else sink.T)


@functools.partial(jax.jit, static_argnames=("spec", "interpret"))
def _ours_grads(q, k, v, slopes, sink, out, lse, dout, dlse, *, spec, interpret):
  ops = Operands(alibi=None if slopes is None else slopes[..., None], sink=sink)
  return mosaic_backward.backward(q, k, v, out, lse, dout, dlse, ops, spec=spec, cfgs=None,
                                  head_dim=q.shape[-1], interpret=interpret)


@functools.partial(jax.jit, static_argnames=("causal", "window", "softcap", "upcast"))
def _reference_grads(q, k, v, slopes, sink, dout, dlse, *, causal, window, softcap, upcast):
  f = lambda q, k, v, sink: _reference(q, k, v, slopes, sink, causal=causal, window=window,  # noqa: E731
                                       softcap=softcap, upcast=upcast)
  return jax.vjp(f, q, k, v, sink)[1]((dout, dlse))


def _check(b, sq, sk, h, hk, d, dtype, *, interpret, causal=False, window=(-1, -1), softcap=0.0,
           alibi=False, n_sink=0, seed=0, grads=None):
  """Forward against the reference; with grads (default: where the backward covers d) the
  backward too, from our (out, lse) and random cotangents of both."""
  q, k, v, slopes, sink = _inputs(b, sq, sk, h, hk, d, dtype, alibi=alibi, n_sink=n_sink, seed=seed)
  spec = _spec(sq, sk, causal=causal, window=window, softcap=softcap, alibi=alibi, sink=n_sink > 0,
               d=d)
  out, lse = _ours(q, k, v, slopes, sink, spec=spec, interpret=interpret)
  opts = dict(causal=causal, window=tuple(window), softcap=softcap)
  ref = _reference(q, k, v, slopes, sink, upcast=True, **opts)
  lowp = _reference(q, k, v, slopes, sink, upcast=False, **opts)
  assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (b, h, sq)
  numerics.assert_output("out", out, lowp[0], ref[0])
  numerics.assert_lse(lse, lowp[1], ref[1])
  if not (d in mosaic_backward.HEAD_DIMS if grads is None else grads):
    return
  _, _, _, _, dout, dlse = numerics.random_inputs(seed + 2, b, sq, sk, h, hk, d, dtype)
  ours = _ours_grads(q, k, v, slopes, sink, out, lse, dout, dlse, spec=spec, interpret=interpret)
  ref = _reference_grads(q, k, v, slopes, sink, dout, dlse, upcast=True, **opts)
  lowp = _reference_grads(q, k, v, slopes, sink, dout, dlse, upcast=False, **opts)
  names = ("dq", "dk", "dv", "dsink")[:4 if n_sink else 3]
  for name, x, lo, r in zip(names, (ours.dq, ours.dk, ours.dv, ours.dsink), lowp, ref):
    assert x.shape == r.shape, (name, x.shape, r.shape)
    numerics.assert_grad(name, x, lo, r)


def _needs_interpreter():
  try:
    mosaic_interpret.params()
  except NotImplementedError as e:  # a jax whose interpreter internals differ from 0.10.2's
    pytest.skip(str(e))


# Each case runs the kernels in the interpreter (forward and backward: 10 to 20 s each on 2 CPU
# cores).
INTERPRET_CASES = [
    # GQA, causal with sq > sk (rows 0..36 see no key: out 0, lse +inf), ragged query and key
    # tiles, rows padded to a multiple of 8; in dK/dV a consumer whose keys all lie past sk.
    dict(b=1, sq=77, sk=40, h=2, hk=1, d=64, dtype="bfloat16", causal=True),
    # Window with both bounds (leading and trailing skip steps), softcap, ALiBi, two query tiles.
    # A cap of 2 bends the scores, so that a wrong softcap derivative fails the gradients.
    dict(b=1, sq=130, sk=200, h=1, hk=1, d=128, dtype="float16", window=(40, 20), softcap=2.0,
         alibi=True),
    # The backward with GQA sinks (dsink) and three key tiles per query tile.
    dict(b=1, sq=65, sk=150, h=2, hk=1, d=64, dtype="bfloat16", causal=True, n_sink=2),
    # Causal ALiBi: the forward's split row/column distance (every visible key left of the
    # diagonal), sq < sk so that the diagonal is offset.
    dict(b=1, sq=100, sk=160, h=2, hk=2, d=64, dtype="float16", causal=True, alibi=True),
    # d=256 (64-row key tiles), causal, sinks; four key tiles through a ring of two slots.
    dict(b=1, sq=65, sk=200, h=1, hk=1, d=256, dtype="bfloat16", causal=True, n_sink=2),
]


@needs_mosaic
@pytest.mark.parametrize("case", INTERPRET_CASES,
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items() if k != "b"))
def test_interpret_matches_reference(case):
  _needs_interpreter()
  with jax.default_device(jax.devices("cpu")[0]):  # the interpreter runs on the host
    _check(**case, interpret=True)


LOWER_CASES = [
    dict(),
    dict(causal=True),
    dict(window=(100, 30)),
    dict(window=(64, -1), softcap=10.0),
    dict(softcap=30.0, alibi=True),
    dict(causal=True, n_sink=3),
    dict(causal=True, alibi=True),
    dict(window=(0, 50), alibi=True),
]


def _lower(d, dtype, h, hk, sq, sk, opts):
  opts = dict(opts)
  n_sink = opts.pop("n_sink", 0)
  q, k, v, slopes, sink = _inputs(2, sq, sk, h, hk, d, dtype, alibi=opts.get("alibi", False),
                                  n_sink=n_sink)
  spec = _spec(sq, sk, sink=n_sink > 0, d=d, **opts)
  fn = lambda q, k, v, s, z: mosaic_flash.forward(  # noqa: E731
      q, k, v, None if s is None else s[..., None], z, spec=spec, cfgs=None, head_dim=d,
      interpret=False)
  text = jax.jit(fn).trace(q, k, v, slopes, sink).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text and "pallas_attn_mosaic_fwd" in text
  if d not in mosaic_backward.HEAD_DIMS:
    return
  ops = Operands(alibi=None if slopes is None else slopes[..., None], sink=sink)
  lse = jnp.zeros((q.shape[0], h, sq), jnp.float32)
  bwd = lambda q, k, v, o, lse, ops: mosaic_backward.backward(  # noqa: E731
      q, k, v, o, lse, o, lse, ops, spec=spec, cfgs=None, head_dim=d, interpret=False).astuple()
  text = jax.jit(bwd).trace(q, k, v, q, lse, ops).lower(lowering_platforms=("cuda",)).as_text()
  assert "pallas_attn_mosaic_bwd_dq" in text and "pallas_attn_mosaic_bwd_dkv" in text


SHAPES = [(64, "bfloat16", 4, 1, 1000, 1000), (128, "float16", 4, 2, 77, 300),
          (256, "bfloat16", 2, 2, 300, 5)]


@needs_mosaic
@pytest.mark.parametrize("opts", LOWER_CASES, ids=lambda o: ",".join(sorted(o)) or "plain")
@pytest.mark.parametrize("d,dtype,h,hk,sq,sk", SHAPES)
def test_lowers_to_mosaic_gpu(opts, d, dtype, h, hk, sq, sk):
  _lower(d, dtype, h, hk, sq, sk, opts)


@needs_mosaic
@pytest.mark.parametrize("opts", [dict(causal=True), dict(window=(100, 30), n_sink=1)],
                         ids=lambda o: ",".join(sorted(o)))
def test_lowers_with_warpgroup_semantics(opts, monkeypatch):
  # jax >= 0.11 defaults to Warpgroup semantics; PALLAS_ATTN_MGPU_SEMANTICS picks it explicitly.
  monkeypatch.setenv("PALLAS_ATTN_MGPU_SEMANTICS", "warpgroup")
  _lower(*SHAPES[1], opts)


@needs_mosaic
def test_forward_refuses_what_it_does_not_cover():
  q = jnp.zeros((1, 8, 2, 96), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="head dim"):
    mosaic_flash.forward(q, q, q, None, spec=_spec(8, 8, d=96), cfgs=None, head_dim=96,
                         interpret=True)


@needs_mosaic
@pytest.mark.parametrize("cfg,word", [
    (dict(block=64, stages=2, regs=236), "multiple of 8"),
    (dict(block=64, stages=2, regs=248), "producer"),  # would leave it 8 registers
    (dict(block=40, stages=2), "multiple of 16"),
])
def test_backward_refuses_bad_configs(cfg, word):
  q = jnp.zeros((1, 64, 2, 128), jnp.bfloat16)
  lse = jnp.zeros((1, 2, 64), jnp.float32)
  with pytest.raises(ValueError, match=word):
    mosaic_backward.backward(q, q, q, q, lse, q, lse, Operands(), spec=_spec(64, 64, d=128),
                             cfgs=None, head_dim=128, interpret=True,
                             dkv_config=mosaic_backward.BwdConfig(**cfg))


@needs_mosaic
def test_no_keys_gives_empty_rows():
  with jax.default_device(jax.devices("cpu")[0]):
    _no_keys()


def _no_keys():
  q = jnp.ones((1, 5, 2, 64), jnp.bfloat16)
  k = jnp.zeros((1, 0, 2, 64), jnp.bfloat16)
  out, lse = mosaic_flash.forward(q, k, k, None, spec=_spec(5, 0), cfgs=None, head_dim=64,
                                  interpret=True)
  assert float(jnp.max(jnp.abs(out.astype(jnp.float32)))) == 0.0 and bool(jnp.all(jnp.isposinf(lse)))
  sink = jnp.array([[0.5, -1.0], [2.0, 0.0]], jnp.float32)
  _, lse = mosaic_flash.forward(q, k, k, None, sink, spec=_spec(5, 0, sink=True), cfgs=None,
                                head_dim=64, interpret=True)
  assert jnp.allclose(lse[0, :, 0], jax.nn.logsumexp(sink, axis=-1))


# ---------------------------------------------------------------------------------------------------
# GPU parity sweep

GPU_SHAPES = [(1, 1), (77, 77), (128, 128), (300, 300), (77, 300), (300, 77), (1, 300), (128, 1)]
GPU_VARIANTS = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window": dict(window=(48, 16)),
    "window_left": dict(window=(100, -1)),
    "softcap": dict(softcap=20.0, causal=True),
    "softcap_small": dict(softcap=1.5),  # bends unit-normal scores: tests tanh's derivative
    "alibi": dict(alibi=True, causal=True),
    "sink": dict(n_sink=2, causal=True),
    "all": dict(window=(64, 0), softcap=15.0, alibi=True, n_sink=1),
}
GPU_LAYOUTS = {"mha": 4, "gqa": 2, "mqa": 1}  # kv heads for 4 query heads


# Every variant with GQA; MHA and MQA (only the kv head count differs) for plain and causal.
GPU_CELLS = ([(variant, "gqa") for variant in GPU_VARIANTS] +
             [(variant, layout) for variant in ("plain", "causal") for layout in ("mha", "mqa")])


@pytest.mark.gpu
@pytest.mark.parametrize("variant,layout", GPU_CELLS, ids=lambda x: x)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gpu_matches_reference(dtype, d, variant, layout):
  # Two shapes per cell, rotating through GPU_SHAPES, so that the matrix covers every shape.
  n = (GPU_CELLS.index((variant, layout)) + d // 64 + (dtype == "float16")) % len(GPU_SHAPES)
  for sq, sk in (GPU_SHAPES[n], GPU_SHAPES[(n + 4) % len(GPU_SHAPES)]):
    _check(2, sq, sk, 4, GPU_LAYOUTS[layout], d, dtype, interpret=False, **GPU_VARIANTS[variant])


@pytest.mark.gpu
@pytest.mark.parametrize("sq,sk", [(1000, 1000), (4096, 4096), (1024, 3000), (3000, 1024)])
def test_gpu_long_sequences(sq, sk):
  for opts in (dict(), dict(causal=True), dict(window=(256, 0))):
    _check(1, sq, sk, 2, 1, 128, "bfloat16", interpret=False, **opts)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [128, 256])
def test_gpu_public_face_runs_mosaic(causal, d):
  """flash_attn_func(backend="mosaic") on Hopper under jax.vjp: both passes on Mosaic at d=128; at
  d=256 the forward on Mosaic and the Triton backward from its (out, lse); against the Triton
  route on the same inputs."""
  import pallas_attn
  from pallas_attn.backends import registry
  if (registry.compute_capability() or (0,))[0] != 9:
    pytest.skip("Mosaic GPU kernels need compute capability 9.x")
  keys = jax.random.split(jax.random.PRNGKey(3), 4)
  q = jax.random.normal(keys[0], (2, 300, 4, d), jnp.bfloat16)
  k, v = (jax.random.normal(x, (2, 257, 2, d), jnp.bfloat16) for x in keys[1:3])
  dout = jax.random.normal(keys[3], q.shape, jnp.bfloat16)

  def run(backend):
    f = lambda q, k, v: pallas_attn.flash_attn_func(q, k, v, causal=causal, backend=backend)  # noqa: E731
    out, vjp = jax.vjp(f, q, k, v)
    return (out, *vjp(dout))

  for ours, theirs, name in zip(run("mosaic"), run("triton"), ("out", "dq", "dk", "dv")):
    ours, theirs = (jnp.asarray(x, jnp.float32) for x in (ours, theirs))
    scale = float(jnp.max(jnp.abs(theirs)))
    assert float(jnp.max(jnp.abs(ours - theirs))) <= 2e-2 * scale + 1e-3, name
