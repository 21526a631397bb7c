"""torch face of FlashAttention-2 (torch_bridge): parity, autograd, packing, torch.library citizenship,
drop-in imports, errors, recompiles. CPU tensors run the kernels in Pallas interpret mode, so shapes
stay small. The CUDA tests at the end (marker `gpu`) skip without CUDA.

Tolerance rule (tests/numerics.py): our error against a float64 reference is at most 2x (outputs) /
3x (gradients) the error of the same reference computed in the input dtype, plus a rounding floor.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import numerics
import torch_bridge
from torch_bridge import _dlpack, _jax_env, compat
from torch_bridge import flash_attn as bridge_fa

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------------
# Reference (SPEC sections 0-1), in torch


def attention_ref(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                  alibi_slopes=None, upcast=True):
  """out (b, sq, H, d) like q and lse (b, H, sq) float32 (+inf on empty rows).

  upcast=True computes in float64 (the accurate answer); False keeps the input dtype through the
  matmuls, the yardstick for acceptable rounding.
  """
  dtype = q.dtype
  b, sq, h, d = q.shape
  sk, hk = k.shape[1], k.shape[2]
  scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
  if upcast:
    q, k, v = q.double(), k.double(), v.double()
  k = k.repeat_interleave(h // hk, dim=2)
  v = v.repeat_interleave(h // hk, dim=2)
  raw = torch.einsum("bqhd,bkhd->bhqk", q, k)
  acc = torch.float64 if upcast else torch.float32
  raw = raw.to(acc)
  t = scale * raw if softcap <= 0 else softcap * torch.tanh(scale * raw / softcap)
  i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
  j = torch.arange(sk, device=q.device)[None, :]
  if alibi_slopes is not None:
    slopes = alibi_slopes.to(acc).expand(b, h)
    t = t - slopes[:, :, None, None] * (i - j).abs().to(acc)
  left, right = window_size
  if causal:
    right = 0
  visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
  if right >= 0:
    visible &= j <= i + right
  if left >= 0:
    visible &= j >= i - left
  t = t.masked_fill(~visible, -math.inf)
  lse = torch.logsumexp(t, dim=-1)
  empty = torch.isneginf(lse)
  p = torch.exp(t - torch.where(empty, 0.0, lse)[..., None]).masked_fill(empty[..., None], 0.0)
  out = torch.einsum("bhqk,bkhd->bqhd", p.to(v.dtype), v)
  return out.to(dtype), torch.where(empty, math.inf, lse).float()


def test_reference_matches_an_independent_formulation():
  # Dense, no mask: the reference against torch's own scaled_dot_product_attention in float64.
  torch.manual_seed(0)
  q, k, v = (torch.randn(2, 7, 3, 16, dtype=torch.float64) for _ in range(3))
  out, _ = attention_ref(q, k, v)
  sdpa = torch.nn.functional.scaled_dot_product_attention(
      q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
  torch.testing.assert_close(out, sdpa)


_JAX_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _host(t):
  return t.detach().float().cpu().numpy()


def check_parity(ours, lowp, ref):
  """(out, lse, dq, dk, dv) of torch tensors through the project's tolerance rule (tests/numerics.py).

  Ours keep their dtype (it picks the rounding floor); the references go as float32 arrays.
  """
  import jax.numpy as jnp
  ours = [jnp.asarray(_host(t)).astype(_JAX_DTYPES[t.dtype]) for t in ours]
  numerics.check_attention(ours, [_host(t) for t in lowp], [_host(t) for t in ref])


def _inputs(b, sq, sk, h, hk, d, dtype, seed=0, device="cpu"):
  """q, k, v (requiring grad) and an output cotangent do."""
  g = torch.Generator().manual_seed(seed)
  mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
  q, k, v = (x.requires_grad_() for x in (mk(b, sq, h, d), mk(b, sk, hk, d), mk(b, sk, hk, d)))
  return q, k, v, mk(b, sq, h, d)


def _grads(fn, q, k, v, do, dlse=None):
  out, lse = fn(q, k, v)
  loss = (out.float() * do.float()).sum()
  if dlse is not None:
    loss = loss + (torch.where(torch.isfinite(lse), lse, 0) * dlse).sum()
  return (out, lse, *torch.autograd.grad(loss, (q, k, v)))


CASES = [
    # b, sq, sk, h, hk, d, dtype, options
    (2, 33, 33, 2, 2, 32, torch.float32, {}),
    (1, 40, 56, 4, 2, 32, torch.float32, dict(causal=True)),
    (1, 48, 20, 2, 1, 24, torch.float32, dict(causal=True)),  # sq > sk: empty rows, MQA
    (1, 37, 45, 2, 2, 40, torch.float32, dict(window_size=(7, 3))),
    (2, 24, 24, 4, 2, 32, torch.float32, dict(softcap=3.0, softmax_scale=0.3)),
    (2, 30, 36, 2, 2, 16, torch.float32, dict(alibi="b", causal=True)),
    (1, 32, 32, 4, 1, 64, torch.bfloat16, dict(alibi="h", window_size=(-1, 5))),
    (1, 17, 29, 2, 2, 32, torch.float16, dict(causal=True, softcap=5.0)),
]


def _case_options(opts, b, h, device="cpu"):
  opts = dict(opts)
  alibi = opts.pop("alibi", None)
  if alibi is not None:
    shape = (h,) if alibi == "h" else (b, h)
    opts["alibi_slopes"] = torch.linspace(0.1, 0.9, math.prod(shape), device=device).reshape(shape)
  return opts


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-{c[1]}x{c[2]}-h{c[3]}/{c[4]}-d{c[5]}"
                         f"-{str(c[6])[6:]}-{'-'.join(f'{k}' for k in c[7]) or 'dense'}")
def test_flash_attn_func_parity(case):
  b, sq, sk, h, hk, d, dtype, opts = case
  opts = _case_options(opts, b, h)
  q, k, v, do = _inputs(b, sq, sk, h, hk, d, dtype)
  dlse = torch.randn(b, h, sq)
  ours = _grads(lambda q, k, v: torch_bridge.flash_attn_func(q, k, v, return_attn_probs=True, **opts)[:2],
                q, k, v, do, dlse)
  ref = _grads(lambda q, k, v: attention_ref(q, k, v, **opts), q, k, v, do, dlse)
  lowp = _grads(lambda q, k, v: attention_ref(q, k, v, upcast=False, **opts), q, k, v, do, dlse)
  for n, name in enumerate(("out", "lse", "dq", "dk", "dv")):
    assert ours[n].dtype == (torch.float32 if name == "lse" else dtype), name
    assert ours[n].shape == ref[n].shape, name
  check_parity(ours, lowp, ref)
  if opts.get("causal") and sq > sk:
    empty = sq - sk
    assert torch.all(ours[0][:, :empty] == 0) and torch.all(torch.isposinf(ours[1][:, :, :empty]))


def test_returns_and_defaults_follow_flash_attn():
  q, k, v, _ = _inputs(1, 16, 16, 2, 2, 32, torch.float32)
  out = torch_bridge.flash_attn_func(q, k, v)
  assert isinstance(out, torch.Tensor) and out.shape == q.shape and out.dtype == q.dtype
  out2, lse, s_dmask = torch_bridge.flash_attn_func(q, k, v, return_attn_probs=True, deterministic=True)
  assert lse.shape == (1, 2, 16) and lse.dtype == torch.float32
  assert s_dmask.numel() == 0 and s_dmask.dtype == q.dtype
  assert torch.equal(out, out2)
  # Reruns are bitwise identical, forward and backward.
  g1 = torch.autograd.grad(torch_bridge.flash_attn_func(q, k, v).sum(), (q, k, v))
  g2 = torch.autograd.grad(torch_bridge.flash_attn_func(q, k, v).sum(), (q, k, v))
  assert all(torch.equal(a, b) for a, b in zip(g1, g2))
  import inspect
  for fn in (torch_bridge.flash_attn_func, torch_bridge.flash_attn_qkvpacked_func,
             torch_bridge.flash_attn_kvpacked_func):
    params = inspect.signature(fn).parameters
    assert list(params)[-8:] == ["dropout_p", "softmax_scale", "causal", "window_size", "softcap",
                                 "alibi_slopes", "deterministic", "return_attn_probs"]
    assert params["window_size"].default == (-1, -1) and params["softcap"].default == 0.0


def test_packed_forms_match_unpacked():
  torch.manual_seed(1)
  qkv = torch.randn(2, 24, 3, 2, 32, requires_grad=True)
  do = torch.randn(2, 24, 2, 32)
  out = torch_bridge.flash_attn_qkvpacked_func(qkv, causal=True)
  (dqkv,) = torch.autograd.grad(out, qkv, do)
  q, k, v = (qkv[:, :, i].detach().clone().requires_grad_() for i in range(3))
  ref = torch_bridge.flash_attn_func(q, k, v, causal=True)
  grads = torch.autograd.grad(ref, (q, k, v), do)
  assert torch.equal(out, ref) and dqkv.shape == qkv.shape
  assert torch.equal(dqkv, torch.stack(grads, dim=2))

  q = torch.randn(1, 20, 4, 32, requires_grad=True)
  kv = torch.randn(1, 28, 2, 2, 32, requires_grad=True)
  do = torch.randn(1, 20, 4, 32)
  out, lse, _ = torch_bridge.flash_attn_kvpacked_func(q, kv, window_size=(4, 4), return_attn_probs=True)
  dq, dkv = torch.autograd.grad(out, (q, kv), do)
  k, v = (kv[:, :, i].detach().clone().requires_grad_() for i in range(2))
  ref, ref_lse, _ = torch_bridge.flash_attn_func(q, k, v, window_size=(4, 4), return_attn_probs=True)
  rdq, rdk, rdv = torch.autograd.grad(ref, (q, k, v), do)
  assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
  assert torch.equal(dq, rdq) and torch.equal(dkv, torch.stack((rdk, rdv), dim=2))


def test_inputs_that_need_preparing():
  # Non-contiguous, misaligned and grad-requiring inputs all work (the bridge copies where needed).
  torch.manual_seed(2)
  base = torch.randn(1, 16, 2, 64)
  q = base[..., :32]  # non-contiguous
  flat = torch.randn(1 + 16 * 2 * 32)
  k = flat[1:].view(1, 16, 2, 32)  # contiguous but 4 bytes off alignment
  assert k.data_ptr() % _dlpack.ALIGN
  v = torch.randn(1, 16, 2, 32, requires_grad=True)
  out = torch_bridge.flash_attn_func(q, k, v)
  ref, _ = attention_ref(q, k, v.detach())
  torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=1e-4)
  # The ALiBi-free, all-fresh case crosses zero-copy.
  t = torch.randn(2, 8, 2, 16)
  assert _dlpack.to_jax(t).unsafe_buffer_pointer() == t.data_ptr()
  moved = _dlpack.to_jax(k)
  assert moved.unsafe_buffer_pointer() % _dlpack.ALIGN == 0
  assert {d.platform for d in _dlpack.to_jax(t).devices()} == {"cpu"}


def test_outputs_are_torch_owned():
  # Whatever the path, run() writes into the tensors torch allocated; on CPU the path is 'copy'.
  import pallas_attn.flash as flash
  path = _dlpack.output_path("cpu")
  assert path in ("aliased", "copy")
  q, k, v = (torch.randn(1, 16, 2, 32) for _ in range(3))
  spec = bridge_fa._FLASH.static(q, k, v, None, 0.0, None, False, -1, -1, 0.0, None)
  out = torch.full_like(q, float("nan"))
  lse = torch.full((1, 2, 16), float("nan"))
  ptrs = out.data_ptr(), lse.data_ptr()
  _dlpack.run(_dlpack.Kernel(flash.forward_into, flash.forward), (q, k, v, None), (out, lse), spec)
  assert (out.data_ptr(), lse.data_ptr()) == ptrs
  _check_forward(out, lse, q, k, v)
  torch.testing.assert_close(out, torch_bridge.flash_attn_func(q, k, v), rtol=0, atol=0)
  assert _dlpack.pending_copies() == 0  # CPU copies are synchronous: nothing is held


def test_aliased_path_falls_back_when_the_runtime_copies(monkeypatch):
  # Pretend the CPU runtime honoured donations: run() must notice the unaliased results, copy them
  # into torch's tensors and stop trying.
  import pallas_attn.flash as flash
  monkeypatch.setitem(_dlpack._PATHS, "cpu", "aliased")  # pylint: disable=protected-access
  q, k, v = (torch.randn(1, 16, 2, 32) for _ in range(3))
  spec = bridge_fa._FLASH.static(q, k, v, None, 0.0, None, False, -1, -1, 0.0, None)
  out, lse = torch.full_like(q, float("nan")), torch.full((1, 2, 16), float("nan"))
  _dlpack.run(_dlpack.Kernel(flash.forward_into, flash.forward), (q, k, v, None), (out, lse), spec)
  assert _dlpack._PATHS["cpu"] == "copy"  # pylint: disable=protected-access
  _check_forward(out, lse, q, k, v)
  torch.testing.assert_close(out, torch_bridge.flash_attn_func(q, k, v), rtol=0, atol=0)


def _check_forward(out, lse, q, k, v):
  """out and lse written by run() against the float64 reference (fp32 inputs: the rounding floor)."""
  import jax.numpy as jnp
  ref, lowp = attention_ref(q, k, v), attention_ref(q, k, v, upcast=False)
  numerics.assert_output("out", jnp.asarray(_host(out)), _host(lowp[0]), _host(ref[0]))
  numerics.assert_lse(_host(lse), _host(lowp[1]), _host(ref[1]))


def test_no_grad_saves_nothing_and_builds_no_graph():
  q, k, v, _ = _inputs(1, 16, 16, 2, 2, 32, torch.float32)
  with torch.no_grad():
    out = torch_bridge.flash_attn_func(q, k, v)
  assert out.grad_fn is None and not out.requires_grad
  out = torch_bridge.flash_attn_func(q.detach(), k.detach(), v.detach())
  assert out.grad_fn is None


def test_opcheck():
  q, k, v, do = _inputs(1, 16, 24, 2, 1, 32, torch.float32, seed=3)
  alibi = torch.tensor([0.25, 0.5])
  fwd_args = (q, k, v, alibi, 0.0, None, True, -1, -1, 0.0, None)
  torch.library.opcheck(torch.ops.pallas_attn.flash_attn_fwd.default, fwd_args)
  out, lse = torch.ops.pallas_attn.flash_attn_fwd(*fwd_args)
  bwd_args = (do, None, q.detach(), k.detach(), v.detach(), alibi, 0.0, None, True, -1, -1, 0.0,
              None, out.detach(), lse.detach())
  torch.library.opcheck(torch.ops.pallas_attn.flash_attn_bwd.default, bwd_args)
  # The op itself is differentiable (register_autograd), not only the public function.
  out, lse = torch.ops.pallas_attn.flash_attn_fwd(*fwd_args)
  got = torch.autograd.grad((out * do).sum() + lse.sum(), (q, k, v))
  out, lse, _ = torch_bridge.flash_attn_func(q, k, v, causal=True, alibi_slopes=alibi, return_attn_probs=True)
  want = torch.autograd.grad((out * do).sum() + lse.sum(), (q, k, v))
  assert all(torch.equal(a, b) for a, b in zip(got, want))
  tags = torch.ops.pallas_attn.flash_attn_fwd.default.tags
  if hasattr(torch.Tag, "cudagraph_unsafe"):
    assert torch.Tag.cudagraph_unsafe in tags


def test_torch_compile_fullgraph():
  torch._dynamo.reset()

  def fn(q, k, v):
    out, lse, _ = torch_bridge.flash_attn_func(q, k, v, causal=True, softcap=4.0, return_attn_probs=True)
    return (out * 2).sum() + lse.sum()

  q, k, v, _ = _inputs(1, 24, 24, 2, 2, 32, torch.float32, seed=4)
  compiled = torch.compile(fn, fullgraph=True, backend="inductor")
  got = compiled(q, k, v)
  grads = torch.autograd.grad(got, (q, k, v))
  want = fn(q, k, v)
  want_grads = torch.autograd.grad(want, (q, k, v))
  torch.testing.assert_close(got, want)
  for a, b in zip(grads, want_grads):
    torch.testing.assert_close(a, b)
  with torch._dynamo.config.patch(error_on_recompile=True):  # pylint: disable=protected-access
    q2, k2, v2, _ = _inputs(1, 24, 24, 2, 2, 32, torch.float32, seed=5)
    torch.autograd.grad(compiled(q2, k2, v2), (q2, k2, v2))


def test_no_recompile_on_repeated_calls():
  import jax
  traces = []

  def listener(event, duration, **_):
    if "trace" in event or "compile" in event:
      traces.append(event)

  q, k, v, do = _inputs(1, 20, 20, 2, 2, 32, torch.float32, seed=5)
  run = lambda: torch.autograd.grad(torch_bridge.flash_attn_func(q, k, v, window_size=(3, 0)), (q, k, v), do)
  run()
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for _ in range(3):
      run()
    repeated = list(traces)
    torch_bridge.flash_attn_func(q[:, :7].detach(), k.detach(), v.detach())  # a new shape must trace
  finally:
    unregister = getattr(jax.monitoring, "unregister_event_duration_listener", None)
    if unregister is not None:
      unregister(listener)
  assert repeated == [], f"repeated calls traced or compiled again: {repeated}"
  assert traces, "the listener saw no compile at all: the check above proves nothing"


def test_compat_install_makes_flash_attn_imports_resolve():
  saved = {n: sys.modules.get(n) for n in ("flash_attn", "flash_attn.flash_attn_interface")}
  try:
    names = compat.install()
    assert "flash_attn" in names and "flash_attn.flash_attn_interface" in names
    import flash_attn  # pylint: disable=import-error
    from flash_attn import flash_attn_func  # pylint: disable=import-error
    from flash_attn.flash_attn_interface import flash_attn_kvpacked_func  # pylint: disable=import-error
    import flash_attn.flash_attn_interface as fai  # pylint: disable=import-error
    assert flash_attn_func is torch_bridge.flash_attn_func
    assert flash_attn_kvpacked_func is torch_bridge.flash_attn_kvpacked_func
    assert fai.flash_attn_qkvpacked_func is torch_bridge.flash_attn_qkvpacked_func
    assert flash_attn.flash_attn_interface is fai
    import importlib.util
    assert importlib.util.find_spec("flash_attn") is not None
    assert compat.install() == names  # idempotent
  finally:
    compat.uninstall()
  for n, m in saved.items():
    assert sys.modules.get(n) is m


def test_compat_registry_takes_new_families():
  compat.register("some_lib.sub", thing=1)
  try:
    compat.install()
    from some_lib.sub import thing  # pylint: disable=import-error
    assert thing == 1
  finally:
    compat.uninstall()
    compat._REGISTRY.pop("some_lib.sub")  # pylint: disable=protected-access
  assert "some_lib" not in sys.modules


def _raises(exc, match, *args, fn=None, **kwargs):
  with pytest.raises(exc, match=match):
    (fn or torch_bridge.flash_attn_func)(*args, **kwargs)


def test_errors_name_the_argument():
  q = torch.randn(1, 16, 4, 32)
  k = torch.randn(1, 16, 2, 32)
  _raises(TypeError, r"^q: expected a torch.Tensor", q.numpy(), k, k)
  _raises(TypeError, r"^k: expected dtype float32 \(the dtype of q\), got bfloat16", q, k.bfloat16(), k)
  _raises(TypeError, r"^q: expected dtype float16, bfloat16 or float32, got float64",
          q.double(), k.double(), k.double())
  _raises(TypeError, r"^q: tensors of dtype torch.complex64", q.to(torch.complex64), k, k)
  _raises(ValueError, r"^v: expected shape \(1, 16, 2, 32\) \(the shape of k\), got \(1, 15, 2, 32\)",
          q, k, k[:, :15])
  _raises(ValueError, r"^k: expected shape \(1, seqlen_k, nheads_k, 32\)", q, k[..., :16], k[..., :16])
  _raises(ValueError, r"^k: nheads \(4\) must be a multiple of nheads_k, got nheads_k=3",
          q, torch.randn(1, 16, 3, 32), torch.randn(1, 16, 3, 32))
  _raises(ValueError, r"^q: expected a 4-D array", q[0], k, k)
  _raises(ValueError, r"^k: expected a tensor on cpu \(the device of q\), got one on meta",
          q, k.to("meta"), k)
  _raises(ValueError, r"^window_size: expected a pair", q, k, k, window_size=(2, -3))
  _raises(ValueError, r"^window_size: expected a pair \(left, right\)", q, k, k, window_size=3)
  _raises(ValueError, r"^softcap: expected a float >= 0", q, k, k, softcap=-1.0)
  _raises(ValueError, r"^dropout_p: expected a float in \[0, 1\)", q, k, k, dropout_p=1.5)
  _raises(ValueError, r"^alibi_slopes: expected shape \(4,\) or \(1, 4\), got \(3,\)",
          q, k, k, alibi_slopes=torch.ones(3))
  _raises(TypeError, r"^alibi_slopes: expected dtype float32, got float16",
          q, k, k, alibi_slopes=torch.ones(4, dtype=torch.float16))
  _raises(ValueError, r"^qkv: expected shape \(batch, seqlen, 3, nheads, headdim\)",
          torch.randn(1, 16, 2, 4, 32), fn=torch_bridge.flash_attn_qkvpacked_func)
  _raises(ValueError, r"^kv: expected shape \(batch, seqlen_k, 2, nheads_k, headdim\)",
          q, torch.randn(1, 16, 3, 2, 32), fn=torch_bridge.flash_attn_kvpacked_func)


def test_missing_jax_gpu_backend_is_a_clear_error(monkeypatch):
  import jax

  def no_gpu(*_, **__):
    raise RuntimeError("Unknown backend gpu")

  monkeypatch.setattr(jax, "local_devices", no_gpu)
  with pytest.raises(RuntimeError, match=r"cuda:0 but JAX's GPU backend did not start.*CPU"):
    _dlpack._gpu_device(0)  # pylint: disable=protected-access


def test_memory_env_is_set_before_jax_starts():
  code = ("import os, torch_bridge, jax; jax.numpy.zeros(2).block_until_ready(); "
          "print(os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE'), "
          "os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION'))")
  env = {k: v for k, v in os.environ.items() if k not in _jax_env.USER_MEMORY_VARS}
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
  assert got.stdout.split() == ["false", "None"]
  env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = ".5"
  got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
  assert got.stdout.split() == ["None", ".5"]


def test_memory_env_warns_when_too_late(monkeypatch):
  monkeypatch.setattr(_jax_env, "_gpu_backend_started", lambda: True)
  environ = {}
  with pytest.warns(RuntimeWarning, match="after JAX's GPU backend started"):
    assert _jax_env.configure(environ) == "late"
  assert environ == {}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert _jax_env.configure({"XLA_PYTHON_CLIENT_ALLOCATOR": "platform"}) == "user"
  monkeypatch.setattr(_jax_env, "_gpu_backend_started", lambda: False)
  environ = {}
  assert _jax_env.configure(environ) == "set" and environ == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


# ----------------------------------------------------------------------------------------------------
# CUDA (run on the GPU machine: pytest tests/test_torch_bridge.py -m gpu)

SLEEP_CYCLES = 200_000_000  # torch.cuda._sleep: about 0.1 s on an H100, longer than any kernel here


def cuda_test(fn):
  return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(fn))


def _cuda_inputs(b, s, h, d, dtype=torch.bfloat16, seed=0):
  g = torch.Generator(device="cuda").manual_seed(seed)
  return tuple(torch.randn(b, s, h, d, generator=g, device="cuda", dtype=dtype) for _ in range(3))


@cuda_test
def test_cuda_zero_copy_and_output_path():
  import pallas_attn.flash as flash
  path = _dlpack.output_path("cuda")
  print(f"\nCUDA output path: {path}")
  t = torch.randn(2, 64, 4, 64, device="cuda", dtype=torch.bfloat16)
  a = _dlpack.to_jax(t)
  assert a.unsafe_buffer_pointer() == t.data_ptr(), "inputs must cross zero-copy"
  assert {d.platform for d in a.devices()} == {"gpu"}
  q, k, v = _cuda_inputs(1, 128, 4, 64)
  spec = bridge_fa._FLASH.static(q, k, v, None, 0.0, None, True, -1, -1, 0.0, None)
  out = torch.full_like(q, float("nan"))
  lse = torch.full((1, 4, 128), float("nan"), device="cuda")
  ptrs = out.data_ptr(), lse.data_ptr()
  before = torch.cuda.memory_allocated()
  _dlpack.run(_dlpack.Kernel(flash.forward_into, flash.forward), (q, k, v, None), (out, lse), spec)
  torch.cuda.synchronize()
  assert (out.data_ptr(), lse.data_ptr()) == ptrs and torch.isfinite(out).all()
  # The probe's answer must hold for the real kernel (else run() had to fall back mid-flight).
  assert _dlpack._PATHS["gpu"] == path, "donation probe and kernel disagree"  # pylint: disable=protected-access
  res = torch_bridge.flash_attn_func(q, k, v, causal=True)
  assert torch.cuda.memory_allocated() >= before + res.numel() * res.element_size(), \
      "the result must be a torch allocation"
  torch.testing.assert_close(res, out, rtol=0, atol=0)


CUDA_CASES = [
    (2, 113, 203, 4, 2, 64, torch.bfloat16, dict(causal=True)),
    (2, 203, 113, 4, 1, 96, torch.float16, dict(causal=True, alibi="b")),
    (1, 255, 257, 2, 2, 256, torch.bfloat16, dict(window_size=(32, 16))),
    (1, 1, 64, 8, 2, 128, torch.bfloat16, dict(causal=True, softcap=20.0)),
    # Scores of std 4 against a cap of 2: the backward needs softcap's derivative to pass.
    (2, 200, 260, 4, 2, 64, torch.bfloat16, dict(causal=True, softcap=2.0, softmax_scale=0.5)),
    (1, 96, 80, 4, 1, 64, torch.float32, dict(softcap=3.0, softmax_scale=0.5)),
    (2, 128, 128, 4, 4, 128, torch.float16, dict(alibi="h", softmax_scale=0.05)),
    (2, 7, 8, 2, 2, 32, torch.float32, {}),
]


@cuda_test
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: f"{c[1]}x{c[2]}-h{c[3]}/{c[4]}-d{c[5]}-{str(c[6])[6:]}")
def test_cuda_parity(case):
  b, sq, sk, h, hk, d, dtype, opts = case
  opts = _case_options(opts, b, h, device="cuda")
  q, k, v, do = _inputs(b, sq, sk, h, hk, d, dtype, device="cuda")
  dlse = torch.randn(b, h, sq, device="cuda")
  ours = _grads(lambda q, k, v: torch_bridge.flash_attn_func(q, k, v, return_attn_probs=True, **opts)[:2],
                q, k, v, do, dlse)
  ref = _grads(lambda q, k, v: attention_ref(q, k, v, **opts), q, k, v, do, dlse)
  lowp = _grads(lambda q, k, v: attention_ref(q, k, v, upcast=False, **opts), q, k, v, do, dlse)
  assert all(t.device.type == "cuda" for t in ours)
  check_parity(ours, lowp, ref)


def _naive_handoff(q, k, v):
  """What the bridge must not do: hand torch JAX's own result buffer (for the control test)."""
  from pallas_attn import flash
  spec, cfgs = bridge_fa._FLASH.static(q, k, v, None, 0.0, None, False, -1, -1, 0.0, None)
  arrays = [_dlpack.to_jax(x) for x in (q, k, v)]
  out, _ = flash.forward(*arrays, None, spec, cfgs)
  return torch.from_dlpack(out)


def _free_while_read(call, q, k, v, expected):
  """Frees a result while a delayed torch kernel still reads it, then lets JAX allocate and write.

  Pure JAX work comes first: it does not wait for torch's stream, so it would overwrite a freed
  JAX-owned result before the delayed reader gets to it. A bridged call follows (its output may
  take the freed torch block; its stream fence must order it after the reader).
  """
  import jax
  import jax.numpy as jnp
  out = call(q, k, v)
  torch.cuda._sleep(SLEEP_CYCLES)  # pylint: disable=protected-access
  reader = out.float() * 1.0  # queued behind the sleep: reads `out` about 0.1 s from now
  del out
  junk = [jnp.full(expected.shape, 7.0, jnp.bfloat16) for _ in range(8)]
  jax.block_until_ready(junk)
  other = torch_bridge.flash_attn_func(k, q, v)
  torch.cuda.synchronize()
  del other, junk
  return torch.equal(reader, expected.float())


@cuda_test
@pytest.mark.parametrize("path", ["auto", "copy"])
def test_cuda_result_freed_while_torch_reads_it(path, monkeypatch):
  if path == "copy":
    monkeypatch.setitem(_dlpack._PATHS, "gpu", "copy")  # pylint: disable=protected-access
    # Delay torch's copy of JAX's result behind a sleep, so JAX's next kernels run first: they
    # would reuse the result's memory if the bridge released it before the copy had read it.
    copy_back = _dlpack._copy_back  # pylint: disable=protected-access

    def slow_copy_back(*args):
      torch.cuda._sleep(SLEEP_CYCLES)  # pylint: disable=protected-access
      return copy_back(*args)

    monkeypatch.setattr(_dlpack, "_copy_back", slow_copy_back)
  q, k, v = _cuda_inputs(2, 1024, 8, 128, seed=7)
  expected = torch_bridge.flash_attn_func(q, k, v).clone()
  torch.cuda.synchronize()
  for _ in range(3):
    assert _free_while_read(torch_bridge.flash_attn_func, q, k, v, expected)
  if path == "copy":
    torch.cuda.synchronize()
    assert _dlpack.pending_copies() == 0, "held JAX buffers must be released once torch's copies ran"


@cuda_test
def test_cuda_control_naive_handoff_is_unsafe():
  """Control for test_cuda_result_freed_while_torch_reads_it: the same probe must catch the hazard
  in a handoff that has it, or that test's passing proves nothing."""
  q, k, v = _cuda_inputs(2, 1024, 8, 128, seed=7)
  expected = torch_bridge.flash_attn_func(q, k, v).clone()
  torch.cuda.synchronize()
  safe = [_free_while_read(_naive_handoff, q, k, v, expected) for _ in range(3)]
  assert not all(safe), ("the probe saw no corruption from a handoff that frees JAX's buffer under "
                         "a pending torch read: it cannot detect the hazard it guards against")


@cuda_test
def test_cuda_jax_waits_for_torch_and_torch_for_jax():
  q0, k, v = _cuda_inputs(2, 2048, 8, 128, seed=9)
  expected = torch_bridge.flash_attn_func(q0, k, v).float()
  torch.cuda.synchronize()
  for use_side_stream in (False, True):
    stream = torch.cuda.Stream() if use_side_stream else torch.cuda.current_stream()
    with torch.cuda.stream(stream):
      torch.cuda._sleep(SLEEP_CYCLES)  # pylint: disable=protected-access
      q = q0 * 1  # written about 0.1 s from now; JAX must not read it earlier
      out = torch_bridge.flash_attn_func(q, k, v)
      got = out.float()  # torch must not read `out` before JAX wrote it
    torch.cuda.synchronize()
    assert torch.equal(got, expected), f"side stream={use_side_stream}"


@cuda_test
def test_cuda_differentiable_calls_wait_for_torch():
  # Inputs that require grad take the forward/backward pair, which imports through the forward's
  # views (_dlpack.reusing): its kernels too must wait for torch's writes of q and of dout.
  q0, k0, v0 = _cuda_inputs(2, 2048, 8, 128, seed=12)
  do0 = torch.randn_like(q0)

  def run(delay: bool):
    leaves = [x.clone().requires_grad_() for x in (q0, k0, v0)]
    torch.cuda.synchronize()
    if delay:
      torch.cuda._sleep(SLEEP_CYCLES)  # pylint: disable=protected-access
    q = leaves[0] * 1  # written about 0.1 s from now with delay
    out = torch_bridge.flash_attn_func(q, leaves[1], leaves[2], causal=True)
    if delay:
      torch.cuda._sleep(SLEEP_CYCLES)  # pylint: disable=protected-access
    out.backward(do0 * 1)  # dout, likewise late
    got = [out.detach().float()] + [x.grad.float() for x in leaves]
    torch.cuda.synchronize()
    return got

  expected = run(False)
  for name, g, e in zip(("out", "dq", "dk", "dv"), run(True), expected):
    assert torch.equal(g, e), name


@cuda_test
def test_cuda_compile_fullgraph_and_opcheck():
  torch._dynamo.reset()
  q, k, v = (x.requires_grad_() for x in _cuda_inputs(1, 256, 4, 64, seed=11))

  def fn(q, k, v):
    out, lse, _ = torch_bridge.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    return out.float().square().sum() + lse.sum()

  got = torch.compile(fn, fullgraph=True)(q, k, v)
  grads = torch.autograd.grad(got, (q, k, v))
  want = fn(q, k, v)
  want_grads = torch.autograd.grad(want, (q, k, v))
  torch.testing.assert_close(got, want)
  for a, b in zip(grads, want_grads):
    torch.testing.assert_close(a, b)
  args = (q, k, v, None, 0.0, None, True, -1, -1, 0.0, None)  # inputs requiring grad: backward too
  torch.library.opcheck(torch.ops.pallas_attn.flash_attn_fwd.default, args)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_tensors_on_another_gpu_are_an_error():
  q = torch.randn(1, 16, 2, 32, device="cuda:1")
  with torch.cuda.device(0):
    with pytest.raises(ValueError, match=r"^q: expected tensors on the current CUDA device cuda:0, got cuda:1"):
      torch_bridge.flash_attn_func(q, q, q)
  with torch.cuda.device(1):
    assert torch_bridge.flash_attn_func(q, q, q).device == q.device
  with pytest.raises(ValueError, match=r"^k: expected a tensor on cuda:0"):
    torch_bridge.flash_attn_func(q.to("cuda:0"), q, q)


@cuda_test
def test_cpu_tensors_stay_on_the_cpu_on_a_gpu_machine():
  q, k, v, _ = _inputs(1, 16, 16, 2, 2, 32, torch.float32)
  assert {d.platform for d in _dlpack.to_jax(q.detach()).devices()} == {"cpu"}
  out = torch_bridge.flash_attn_func(q, k, v)
  assert out.device.type == "cpu"
  ref, _ = attention_ref(q, k, v)
  torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=1e-4)


@cuda_test
def test_cuda_jax_does_not_preallocate():
  # In a fresh process: how much of the card JAX takes when the bridge starts it (default: 75%).
  code = ("import torch, torch_bridge; torch.zeros(1, device='cuda'); torch.cuda.synchronize(); "
          "free0, total = torch.cuda.mem_get_info(); "
          "q = torch.randn(1, 64, 2, 64, device='cuda', dtype=torch.bfloat16); "
          "torch_bridge.flash_attn_func(q, q, q); torch.cuda.synchronize(); "
          "free1, _ = torch.cuda.mem_get_info(); print((free0 - free1) / total)")
  env = {k: v for k, v in os.environ.items() if k not in _jax_env.USER_MEMORY_VARS}
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
  assert float(got.stdout.split()[-1]) < 0.25, got.stdout + got.stderr


def test_stream_fence_records_then_waits_with_one_event_per_thread(monkeypatch):
  # The CUDA fence's bookkeeping, with torch.cuda's stream and event types replaced by recorders
  # (the fence itself runs on the H100 in the gpu-marked stream tests).
  import threading  # pylint: disable=import-outside-toplevel
  log = []

  class Stream:
    def __init__(self, ptr, device=None):
      self.cuda_stream = ptr

    def wait_event(self, event):
      log.append(("wait", self.cuda_stream, event))

  class Event:
    def record(self, stream):
      log.append(("record", stream.cuda_stream, self))

  current = {"ptr": 7}
  monkeypatch.setattr(torch.cuda, "ExternalStream", Stream)
  monkeypatch.setattr(torch.cuda, "Event", Event)
  monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(current["ptr"]))
  monkeypatch.setattr(_dlpack, "_JAX_STREAMS", {})
  monkeypatch.setattr(_dlpack, "_THREAD", threading.local())
  monkeypatch.setattr(_dlpack, "_CUDART", [None])  # torch's stream and event objects, not ctypes
  cuda0 = torch.device("cuda", 0)

  _dlpack._jax_stream_waits_for_torch(cuda0, 99)  # pylint: disable=protected-access
  _dlpack._jax_stream_waits_for_torch(cuda0, 99)  # pylint: disable=protected-access
  assert [(op, s) for op, s, _ in log] == [("record", 7), ("wait", 99)] * 2
  assert len({id(e) for _, _, e in log}) == 1, "one thread reuses its event"

  other = threading.Thread(target=_dlpack._jax_stream_waits_for_torch, args=(cuda0, 99))  # pylint: disable=protected-access
  other.start()
  other.join()
  assert [(op, s) for op, s, _ in log[4:]] == [("record", 7), ("wait", 99)]
  assert log[4][2] is log[5][2] and log[4][2] is not log[0][2], "another thread records its own event"

  current["ptr"] = 99  # JAX's own stream is current: nothing to order
  _dlpack._jax_stream_waits_for_torch(cuda0, 99)  # pylint: disable=protected-access
  assert len(log) == 6


def test_stream_fence_through_the_cuda_runtime_records_then_waits(monkeypatch):
  # The same bookkeeping on the ctypes path (cudaEventRecord / cudaStreamWaitEvent), with the
  # runtime replaced by a recorder.
  import threading  # pylint: disable=import-outside-toplevel
  log = []

  class Runtime:
    made = 0

    def event(self):
      Runtime.made += 1
      return 1000 + Runtime.made

    def order(self, event, before, after):
      log.append((event, before, after))

  current = {"ptr": 7}
  monkeypatch.setattr(_dlpack, "_CUDART", [Runtime()])
  monkeypatch.setattr(_dlpack, "_raw_stream", lambda index: current["ptr"])
  monkeypatch.setattr(_dlpack, "_THREAD", threading.local())
  cuda0 = torch.device("cuda", 0)
  _dlpack._jax_stream_waits_for_torch(cuda0, 99)  # pylint: disable=protected-access
  _dlpack._jax_stream_waits_for_torch(cuda0, 99)  # pylint: disable=protected-access
  assert log == [(1001, 7, 99)] * 2, "torch's stream recorded, JAX's waits; one event per thread"
  other = threading.Thread(target=_dlpack._jax_stream_waits_for_torch, args=(cuda0, 99))  # pylint: disable=protected-access
  other.start()
  other.join()
  assert log[2] == (1002, 7, 99), "another thread records its own event"
  current["ptr"] = 99
  _dlpack._jax_stream_waits_for_torch(cuda0, 99)  # pylint: disable=protected-access
  assert len(log) == 3, "JAX's own stream is current: nothing to order"


def test_backward_reuses_the_forwards_views_of_saved_tensors(monkeypatch):
  # The backward reads q, k, v (and, on the aliased path, out and lse) through the JAX views the
  # forward imported; it imports only what is new. Counted on the import itself.
  q, k, v, do = _inputs(1, 9, 11, 2, 2, 16, torch.float32)
  calls = []
  real = _dlpack._import  # pylint: disable=protected-access
  monkeypatch.setattr(_dlpack, "_import", lambda t, *a, **kw: calls.append(t.shape) or real(t, *a, **kw))
  out = torch_bridge.flash_attn_func(q, k, v, causal=True)
  forward_imports = len(calls)
  grads = torch.autograd.grad(out, (q, k, v), do)
  backward_shapes = calls[forward_imports:]
  assert (1, 9, 2, 16) in backward_shapes, "dout is new: imported"
  assert backward_shapes.count((1, 11, 2, 16)) == 0, "k and v: the forward's views serve"
  ref = _grads(lambda q, k, v: attention_ref(q, k, v, causal=True), q, k, v, do)
  for name, g, r in zip(("dq", "dk", "dv"), grads, ref[2:]):
    torch.testing.assert_close(g, r.float(), rtol=1e-4, atol=1e-4, msg=name)


def test_every_call_through_views_takes_the_stream_fence(monkeypatch):
  # A differentiable forward and its backward import through `views` (_dlpack.reusing). Each
  # bridged call must import its first new tensor with the fence: only a buffer imported with
  # JAX's stream after the fence makes the kernels wait for torch's queued work (the GPU check
  # is test_cuda_differentiable_calls_wait_for_torch).
  q, k, v, do = _inputs(1, 9, 11, 2, 2, 16, torch.float32)
  q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
  _dlpack.output_path(q.device)  # the once-per-process donation probe imports too: not counted
  calls = []
  real = _dlpack._import  # pylint: disable=protected-access
  monkeypatch.setattr(_dlpack, "_import",
                      lambda t, target, fence: calls.append((tuple(t.shape), fence)) or real(t, target, fence))
  out = torch_bridge.flash_attn_func(q, k, v, causal=True)
  n_fwd = len(calls)
  out.backward(do)
  assert calls[0] == ((1, 9, 2, 16), True) and not any(f for _, f in calls[1:n_fwd]), calls
  assert calls[n_fwd] == ((1, 9, 2, 16), True), "the backward's first new import (dout) is fenced"
  assert not any(f for _, f in calls[n_fwd + 1:]), calls
  # Nothing new to import: one fresh fenced import of the first tensor stands in.
  target = _dlpack._target(q.device)  # pylint: disable=protected-access
  views = {}
  with _dlpack.reusing(views):
    first = _dlpack._to_jax(target, [None, k.detach(), v.detach()])  # pylint: disable=protected-access
    calls.clear()
    again = _dlpack._to_jax(target, [None, k.detach(), v.detach()])  # pylint: disable=protected-access
  assert calls == [((1, 11, 2, 16), True)], calls
  assert again[0] is None and again[2] is first[2]


def test_dispatch_modes_still_see_the_ops():
  # Eager calls skip torch's dispatcher only where it would do nothing: an active dispatch mode
  # (what FakeTensor, profilers and tracers use) still sees every bridged op.
  from torch.utils._python_dispatch import TorchDispatchMode  # pylint: disable=import-outside-toplevel
  seen = []

  class Log(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
      seen.append(str(func))
      return func(*args, **(kwargs or {}))

  q, k, v, do = _inputs(1, 8, 8, 2, 2, 16, torch.float32)
  with Log():
    out = torch_bridge.flash_attn_func(q, k, v)
    torch.autograd.grad(out, (q, k, v), do)
  assert any("flash_attn_fwd" in s for s in seen) and any("flash_attn_bwd" in s for s in seen), seen
