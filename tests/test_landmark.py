"""fused_landmark_attention (SPEC section 3): the reference against the definition, then the kernels
(out, dq, dk, dv) against the reference under the tolerance rule (numerics.py), argument checks, and
the Triton lowering on the CPU. Interpret mode compiles each new shape for seconds, so the CPU sweep
reuses few shapes; `gpu`-marked cases add the large ones.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numerics
from pallas_attn import KernelConfigs, TileConfig, fused_landmark_attention
from pallas_attn import landmark
from pallas_attn.landmark import required_is_mem
from pallas_attn.reference import landmark_attention_reference

_SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


@dataclasses.dataclass(frozen=True)
class Case:
  b: int
  h: int
  sq: int
  n_hist: int
  d: int
  bs: int
  dtype: str = "float32"
  block_q: int | None = None  # query tile of all three kernels; None: the default configs
  scale: float | None = None

  @property
  def sk(self) -> int:
    return self.sq + self.n_hist

  def __str__(self):
    parts = [f"b{self.b}h{self.h}", f"{self.sq}+{self.n_hist}", f"d{self.d}", f"bs{self.bs}",
             _SHORT[self.dtype]]
    if self.block_q:
      parts.append(f"bq{self.block_q}")
    if self.scale is not None:
      parts.append(f"scale{self.scale:g}")
    return "-".join(parts)

  def tiles(self):
    if self.block_q is None:
      return None
    return KernelConfigs(*(TileConfig(self.block_q, self.bs),) * 3)

  def inputs(self, seed: int = 0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    dt = jnp.dtype(self.dtype)
    q = jax.random.normal(ks[0], (self.b, self.h, self.sq, self.d), dt)
    k = jax.random.normal(ks[1], (self.b, self.h, self.sk, self.d), dt)
    v = jax.random.normal(ks[2], (self.b, self.h, self.sk, self.d), dt)
    dout = jax.random.normal(ks[3], (self.b, self.h, self.sq, self.d), dt)
    return q, k, v, dout

  @property
  def sm_scale(self) -> float:
    return 1.0 / np.sqrt(self.d) if self.scale is None else self.scale


def run_ours(case: Case, q, k, v, dout):
  is_mem = required_is_mem(case.sk, case.bs)
  fn = functools.partial(fused_landmark_attention, is_mem=is_mem, sm_scale=case.scale, block_size=case.bs,
                         tiles=case.tiles())
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(dout))


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_size", "upcast"))
def reference_vjp(q, k, v, dout, *, sm_scale, block_size, upcast):
  fn = functools.partial(landmark_attention_reference, is_mem=None, sm_scale=sm_scale,
                         block_size=block_size, upcast=upcast)
  out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v), q, k, v)
  return (out, *vjp(dout))


def check_case(case: Case, seed: int = 0):
  q, k, v, dout = case.inputs(seed)
  ours = run_ours(case, q, k, v, dout)
  ref, lowp = (reference_vjp(q, k, v, dout, sm_scale=case.sm_scale, block_size=case.bs, upcast=up)
               for up in (True, False))
  numerics.assert_output("out", ours[0], lowp[0], ref[0])
  for name, o, lo, r in zip(("dq", "dk", "dv"), ours[1:], lowp[1:], ref[1:]):
    numerics.assert_grad(name, o, lo, r)
  return ours


# ----------------------------------------------------------------------------------------------------
# The reference against the definition


def grouped_softmax_loop(q, k, v, sm_scale, bs):
  """SPEC section 3 read literally, one query at a time, in float64."""
  b, h, sq, d = q.shape
  n_hist = k.shape[2] - sq
  out = np.zeros((b, h, sq, d))
  for bi, hi, m in np.ndindex(b, h, sq):
    p = m + n_hist
    c = p // bs
    p_ = p - 1 if p % bs == bs - 1 else p
    s = sm_scale * (k[bi, hi] @ q[bi, hi, m])
    logits, values = [], []
    for cb in range(c):
      ordinary = np.arange(cb * bs, cb * bs + bs - 1)
      w = np.exp(s[ordinary] - s[ordinary].max())
      logits.append(s[cb * bs + bs - 1])
      values.append((w / w.sum()) @ v[bi, hi, ordinary])
    for j in range(c * bs, p_ + 1):
      logits.append(s[j])
      values.append(v[bi, hi, j])
    a = np.exp(np.array(logits) - max(logits))
    out[bi, hi, m] = (a / a.sum()) @ np.array(values)
  return out


@pytest.mark.parametrize("sq,n_hist,bs", [(40, 32, 16), (37, 0, 16), (70, 64, 32), (33, 0, 32),
                                         (1, 48, 16)])
def test_reference_matches_definition(sq, n_hist, bs):
  rng = np.random.default_rng(sq + n_hist)
  q = rng.standard_normal((2, 2, sq, 8))
  k, v = (rng.standard_normal((2, 2, sq + n_hist, 8)) for _ in range(2))
  want = grouped_softmax_loop(q, k, v, 0.7, bs)
  got = landmark_attention_reference(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), None, 0.7, bs)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-6)


# ----------------------------------------------------------------------------------------------------
# Kernel parity


CASES = [
    Case(1, 2, 40, 32, 32, 16),  # history, partial last tile; queries 15, 31 (at 47, 63) are landmarks
    Case(2, 2, 37, 0, 40, 16, "bfloat16"),  # no history, padded head dim
    Case(1, 2, 100, 64, 64, 32, "bfloat16", scale=0.3),
    Case(1, 2, 64, 0, 64, 32),  # whole blocks only
    Case(1, 1, 150, 128, 96, 64),
    Case(1, 2, 130, 0, 128, 64, "bfloat16"),
    Case(1, 1, 200, 128, 64, 128, "bfloat16"),
    Case(1, 2, 1, 16, 32, 16),  # one query: the first token of its block
    Case(1, 2, 70, 32, 32, 32, block_q=16),  # query tiles inside one block
    Case(1, 2, 70, 32, 32, 16, "bfloat16", block_q=64),  # query tiles spanning four blocks
    Case(2, 2, 90, 64, 64, 32, "float16"),
]

GPU_CASES = [
    Case(2, 8, 2048, 1024, 128, 64, "bfloat16"),
    Case(2, 8, 2000, 0, 128, 64, "bfloat16"),
    Case(1, 8, 1500, 512, 64, 32, "float16"),
    Case(1, 4, 2047, 256, 128, 128, "bfloat16"),
    Case(1, 4, 1024, 64, 96, 16, "bfloat16"),
    Case(1, 4, 1000, 128, 64, 64, "float32"),
    Case(1, 4, 1100, 0, 128, 64, "bfloat16", block_q=64),
    Case(1, 4, 600, 128, 128, 128, "float32"),  # shared-memory fit cuts stages and query rows
    Case(1, 2, 700, 64, 256, 64, "bfloat16"),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=str(c)) for c in CASES]
                         + [pytest.param(c, id=str(c), marks=pytest.mark.gpu) for c in GPU_CASES])
def test_fused_landmark_attention(case):
  check_case(case)


def test_landmarks_never_contribute_values_and_reruns_are_bitwise_identical():
  case = CASES[0]  # compiled above: no new shape
  q, k, v, dout = case.inputs(seed=1)
  out, dq, dk, dv = run_ours(case, q, k, v, dout)
  landmark = required_is_mem(case.sk, case.bs)
  v_changed = v.at[:, :, landmark].set(100.0)
  assert np.array_equal(np.asarray(run_ours(case, q, k, v_changed, dout)[0]), np.asarray(out))
  assert np.all(np.asarray(dv)[:, :, landmark] == 0.0), "dv: landmark values must get no gradient"
  again = run_ours(case, q, k, v, dout)
  for name, a, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), again):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), f"{name}: rerun differs bitwise"


def test_under_jit_with_traced_is_mem():
  case = CASES[0]
  q, k, v, _ = case.inputs()

  @jax.jit
  def f(q, k, v):
    is_mem = jnp.arange(case.sk) % case.bs == case.bs - 1
    return fused_landmark_attention(q, k, v, is_mem, block_size=case.bs)

  want = run_ours(case, q, k, v, jnp.zeros_like(q))[0]
  np.testing.assert_array_equal(np.asarray(f(q, k, v)), np.asarray(want))


def test_lse_and_its_cotangent():
  """forward's lse is the outer softmax's logsumexp, and backward folds an lse cotangent in (the torch ops
  expose lse)."""
  case = CASES[0]
  q, k, v, dout = case.inputs(seed=4)
  dlse = jax.random.normal(jax.random.PRNGKey(5), q.shape[:3], jnp.float32)
  spec = landmark.prepare(q, k, v, required_is_mem(case.sk, case.bs), case.scale, case.bs)

  def reference(q, k, v):
    s = case.sm_scale * jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=jax.lax.Precision.HIGHEST)
    p, j = jnp.arange(case.sq)[:, None] + case.n_hist, jnp.arange(case.sk)[None, :]
    is_landmark = j % case.bs == case.bs - 1
    block, own_block = j // case.bs, p // case.bs
    outer = (is_landmark & (block < own_block)) | ((block == own_block) & (j <= p) & ~is_landmark)
    lse = jax.nn.logsumexp(jnp.where(outer, s, -jnp.inf), axis=-1)
    return landmark_attention_reference(q, k, v, None, case.sm_scale, case.bs), lse

  (out, lse), vjp = jax.vjp(reference, q, k, v)
  want = (out, lse, *vjp((dout, dlse)))
  got_out, got_lse = landmark.forward(q, k, v, spec)
  got = (got_out, got_lse, *landmark.backward(q, k, v, got_out, got_lse, dout, dlse, spec))
  for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5, err_msg=name)


# ----------------------------------------------------------------------------------------------------
# Arguments


def test_argument_errors():
  q = jnp.zeros((1, 2, 20, 32), jnp.float32)
  k = jnp.zeros((1, 2, 52, 32), jnp.float32)
  good = required_is_mem(52, 16)
  # The seed example's all-False is_mem.
  pattern = r"is_mem.*j % block_size == block_size - 1.*is_mem\[\.\.\., 15\] = False"
  with pytest.raises(ValueError, match=pattern):
    fused_landmark_attention(q, k, k, np.zeros(52, bool), block_size=16)
  with pytest.raises(ValueError, match="is_mem.*mismatching"):
    fused_landmark_attention(q, k, k, np.stack([good, ~good]), block_size=16)
  with pytest.raises(ValueError, match=r"is_mem: expected shape \(\.\.\., 52\)"):
    fused_landmark_attention(q, k, k, good[:20], block_size=16)
  with pytest.raises(ValueError, match="block_size"):
    fused_landmark_attention(q, k, k, required_is_mem(52, 8), block_size=8)
  with pytest.raises(ValueError, match="n_hist"):
    fused_landmark_attention(q, k[:, :, :50], k[:, :, :50], required_is_mem(50, 16), block_size=16)
  with pytest.raises(ValueError, match="k: expected shape"):
    fused_landmark_attention(q, k[:, :1], k[:, :1], good, block_size=16)
  with pytest.raises(TypeError, match="v"):
    fused_landmark_attention(q, k, k.astype(jnp.bfloat16), good, block_size=16)
  with pytest.raises(ValueError, match="q"):
    fused_landmark_attention(q[0], k, k, good, block_size=16)


# ----------------------------------------------------------------------------------------------------
# Triton lowering (runs on the CPU: catches what only the GPU compiler would otherwise reject)


@pytest.mark.parametrize("bs,d", [(64, 128), (16, 128), (128, 128), (32, 80)])
def test_lowers_for_cuda(bs, d):
  q = jax.ShapeDtypeStruct((2, 4, 200, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 4, 200 + 2 * bs, d), jnp.bfloat16)
  fn = functools.partial(fused_landmark_attention, is_mem=required_is_mem(kv.shape[2], bs), block_size=bs)

  fwd = jax.jit(fn).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
  assert "triton" in fwd
  bwd = jax.jit(lambda q, k, v, do: jax.vjp(fn, q, k, v)[1](do)).trace(q, kv, kv, q)
  text = bwd.lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 3  # forward (residuals), dQ, dK/dV


# ----------------------------------------------------------------------------------------------------
# torch face (torch_bridge.landmark); CPU tensors run the same kernels in interpret mode


def test_torch_seed_example_with_valid_is_mem():
  torch = pytest.importorskip("torch")
  from torch_bridge import compat
  from torch_bridge import landmark as bridge

  # The seed's example, smaller, with the is_mem the original asserts (its all-False one is rejected).
  batch, nheads, seqlen, d, bs = 2, 3, 128, 64, 64
  torch.manual_seed(0)
  q, k, v = (torch.randn(batch, nheads, seqlen, d, requires_grad=True) for _ in range(3))
  with pytest.raises(ValueError, match="is_mem"):
    bridge.fused_landmark_attention(q, k, v, torch.zeros(seqlen, dtype=torch.bool))
  is_mem = torch.arange(seqlen) % bs == bs - 1
  output = bridge.fused_landmark_attention(q, k, v, is_mem)
  assert output.shape == (batch, nheads, seqlen, d)
  dout = torch.randn_like(output)
  output.backward(dout)
  grads = [x.grad.clone() for x in (q, k, v)]

  ref_fn = functools.partial(landmark_attention_reference, is_mem=None, sm_scale=d ** -0.5, block_size=bs)
  as_jax = lambda t: jnp.asarray(t.detach().numpy())
  ref_out, vjp = jax.vjp(lambda q, k, v: ref_fn(q, k, v), *(as_jax(x) for x in (q, k, v)))
  for name, got, want in zip(("out", "dq", "dk", "dv"), [output, *grads], [ref_out, *vjp(as_jax(dout))]):
    np.testing.assert_allclose(got.detach().numpy(), np.asarray(want), rtol=0, atol=2e-5, err_msg=name)

  # The original's autograd class, with n_prefix_q given directly: the same kernels, the same numbers.
  for x in (q, k, v):
    x.grad = None
  out2 = bridge.FusedLandmarkAttention.apply(q, k, v, 0, d ** -0.5, bs)
  out2.backward(dout)
  assert torch.equal(out2, output)
  for name, x, g in zip(("dq", "dk", "dv"), (q, k, v), grads):
    assert torch.equal(x.grad, g), name

  names = compat.install()
  try:
    assert "ltriton.flash_landmark_attention" in names
    from ltriton.flash_landmark_attention import FusedLandmarkAttention, fused_landmark_attention
    assert fused_landmark_attention is bridge.fused_landmark_attention
    assert FusedLandmarkAttention is bridge.FusedLandmarkAttention
  finally:
    compat.uninstall()


def test_torch_ops_opcheck_and_compile():
  torch = pytest.importorskip("torch")
  from torch_bridge import landmark as bridge

  torch.manual_seed(1)
  q = torch.randn(1, 2, 24, 32, requires_grad=True)
  k, v = (torch.randn(1, 2, 40, 32, requires_grad=True) for _ in range(2))
  do = torch.randn(1, 2, 24, 32)
  fwd_args = (q, k, v, 1, None, 16)
  torch.library.opcheck(torch.ops.pallas_attn.landmark_fwd.default, fwd_args)
  out, lse = torch.ops.pallas_attn.landmark_fwd(*fwd_args)
  bwd_args = (do, None, q.detach(), k.detach(), v.detach(), 1, None, 16, out.detach(), lse.detach())
  torch.library.opcheck(torch.ops.pallas_attn.landmark_bwd.default, bwd_args)
  with pytest.raises(ValueError, match="n_prefix_q"):
    bridge.FusedLandmarkAttention.apply(q, k, v, 2, None, 16)

  torch._dynamo.reset()  # pylint: disable=protected-access
  is_mem = torch.arange(40) % 16 == 15
  fn = lambda q, k, v: (bridge.fused_landmark_attention(q, k, v, is_mem, block_size=16) * do).sum()
  compiled = torch.compile(fn, fullgraph=True, backend="inductor")
  got = compiled(q, k, v)
  want = fn(q, k, v)
  torch.testing.assert_close(got, want)
  for a, b in zip(torch.autograd.grad(got, (q, k, v)), torch.autograd.grad(want, (q, k, v))):
    torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_torch_cuda_parity():
  torch = pytest.importorskip("torch")
  if not torch.cuda.is_available():
    pytest.skip("torch has no CUDA")
  from torch_bridge import landmark as bridge

  case = Case(2, 4, 1000, 128, 128, 64, "bfloat16")
  q, k, v, dout = case.inputs(seed=6)
  to_torch = lambda x: torch.tensor(np.asarray(x, np.float32), device="cuda", dtype=torch.bfloat16)
  tq, tk, tv = (to_torch(x).requires_grad_() for x in (q, k, v))
  is_mem = torch.arange(case.sk, device="cuda") % case.bs == case.bs - 1
  out = bridge.fused_landmark_attention(tq, tk, tv, is_mem, block_size=case.bs)
  got = [out, *torch.autograd.grad(out, (tq, tk, tv), to_torch(dout))]
  to_jax = lambda t: jnp.asarray(t.detach().float().cpu().numpy()).astype(jnp.bfloat16)
  ref, lowp = (reference_vjp(q, k, v, dout, sm_scale=case.sm_scale, block_size=case.bs, upcast=up)
               for up in (True, False))
  numerics.assert_output("out", to_jax(got[0]), lowp[0], ref[0])
  for name, o, lo, r in zip(("dq", "dk", "dv"), got[1:], lowp[1:], ref[1:]):
    numerics.assert_grad(name, to_jax(o), lo, r)
