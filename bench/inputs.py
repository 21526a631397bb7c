"""Random inputs shared by every provider of a case, and the numerical gate they must pass before timing.

The gate compares a slice of each provider's full-size results with the float32 reference computed on
that slice alone: batch 0, kv head 0 with its G query heads, the last CHECK_ROWS query rows, every key.
The check cotangent is zero outside those rows, so the provider's dK and dV (which sum over all rows)
hold exactly the slice's contribution. Checking at the timed shape means no extra compile per provider.

Tolerance (STYLE.md's rule): error against the float32 reference at most 2x (output) or 3x (gradients)
the error of the same reference computed in the input dtype, plus a rounding floor. It is there to catch
semantic disagreements (masks, alignment, scaling), which show up as errors of order one.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bench.cases import Case
from pallas_attn.reference import attention_reference

CHECK_ROWS = 512
FLOOR = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 5e-3}
FACTOR = {"out": 2.0, "dq": 3.0, "dk": 3.0, "dv": 3.0}


def alibi_slopes(h: int) -> np.ndarray:
  """The ALiBi paper's geometric slopes 2^(-8 (i + 1) / H)."""
  return np.exp2(-8.0 * (np.arange(h, dtype=np.float64) + 1) / h).astype(np.float32)


def to_numpy(x) -> np.ndarray:
  if hasattr(x, "detach"):  # torch
    return x.detach().float().cpu().numpy().astype(np.float64)
  return np.asarray(jnp.asarray(x, jnp.float32)).astype(np.float64)


class Inputs:
  """q, k, v and cotangents (b, s, H, d) as jax arrays, with torch copies made on first request."""

  def __init__(self, case: Case, seed: int = 0, device=None):
    self.case = case
    self.device = device
    c = case
    dt = jnp.dtype(c.dtype)
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    with jax.default_device(device):
      self.q = jax.random.normal(keys[0], (c.b, c.sq, c.h, c.d), dt)
      self.k = jax.random.normal(keys[1], (c.b, c.sk, c.hk, c.d), dt)
      self.v = jax.random.normal(keys[2], (c.b, c.sk, c.hk, c.d), dt)
      self.do = jax.random.normal(keys[3], (c.b, c.sq, c.h, c.d), dt)
      self.rows = min(c.sq, CHECK_ROWS)
      r0 = c.sq - self.rows
      self.do_check = jnp.zeros_like(self.do).at[0, r0:, :c.group].set(self.do[0, r0:, :c.group])
      self.slopes = jnp.asarray(alibi_slopes(c.h)) if c.alibi else None
    jax.block_until_ready((self.q, self.k, self.v, self.do, self.do_check))
    self._torch = {}
    self._ref = {}

  def slice_out(self, out) -> dict[str, np.ndarray]:
    """out in (b, s, H, d) layout (jax or torch) -> the checked slice."""
    c = self.case
    return {"out": to_numpy(out[0:1, c.sq - self.rows:, 0:c.group])}

  def slice_grads(self, dq, dk, dv) -> dict[str, np.ndarray]:
    c = self.case
    return {"dq": to_numpy(dq[0:1, c.sq - self.rows:, 0:c.group]),
            "dk": to_numpy(dk[0:1, :, 0:1]), "dv": to_numpy(dv[0:1, :, 0:1])}

  def torch(self, layout: str):
    """(q, k, v, do, do_check, slopes) as torch tensors; q, k, v are leaves that require grad.

    layout "bshd" is ours and flash-attn's, "bhsd" is SDPA's and FlexAttention's; each layout is a
    contiguous copy so no provider pays for a strided read.
    """
    if layout not in self._torch:
      import torch  # pylint: disable=import-outside-toplevel
      dev = "cuda" if torch.cuda.is_available() else "cpu"
      conv = lambda x: _jax_to_torch(x, dev)
      perm = (lambda t: t.transpose(1, 2).contiguous()) if layout == "bhsd" else (lambda t: t.clone())
      q, k, v = (perm(conv(x)).requires_grad_() for x in (self.q, self.k, self.v))
      do, do_check = (perm(conv(x)) for x in (self.do, self.do_check))
      slopes = None if self.slopes is None else conv(self.slopes)
      if dev == "cuda":
        torch.cuda.synchronize()
      self._torch[layout] = (q, k, v, do, do_check, slopes)
    return self._torch[layout]

  def reference(self, direction: str) -> dict[str, dict[str, np.ndarray]]:
    """{"hi": float32 reference, "lo": input-dtype reference} on the checked slice."""
    if direction not in self._ref:
      c = self.case
      r0 = c.sq - self.rows
      q = self.q[0:1, r0:, :c.group]
      k, v = self.k[0:1, :, :1], self.v[0:1, :, :1]
      do = self.do[0:1, r0:, :c.group]
      slopes = None if self.slopes is None else self.slopes[:c.group]
      f_hi, f_lo = (functools.partial(_reference_out, case=c, slopes=slopes, upcast=u) for u in (True, False))
      if direction == "fwd":
        both = jax.jit(lambda q, k, v: (f_hi(q, k, v), f_lo(q, k, v)))(q, k, v)
        res = {name: {"out": to_numpy(o)} for name, o in zip(("hi", "lo"), both)}
      else:
        vjps = lambda q, k, v, do: tuple(jax.vjp(f, q, k, v)[1](do) for f in (f_hi, f_lo))
        grads = jax.jit(vjps)(q, k, v, do)
        res = {name: dict(zip(("dq", "dk", "dv"), map(to_numpy, g))) for name, g in zip(("hi", "lo"), grads)}
      self._ref[direction] = res
    return self._ref[direction]

  def compare(self, results: dict[str, np.ndarray], direction: str) -> tuple[bool, dict]:
    """(ok, {name: {"err", "lowp", "tol"}}) for a provider's sliced results."""
    ref = self.reference(direction)
    ok, report = True, {}
    for name, want in ref["hi"].items():
      got = results.get(name)
      if got is None or got.shape != want.shape:
        ok = False
        report[name] = {"err": float("nan"), "lowp": float("nan"), "tol": float("nan"),
                        "note": f"shape {None if got is None else got.shape} != {want.shape}"}
        continue
      err = _rel(got, want) if np.isfinite(got).all() else float("inf")
      lowp = _rel(ref["lo"][name], want)
      tol = FACTOR[name] * lowp + FLOOR[self.case.dtype]
      ok = ok and err <= tol
      report[name] = {"err": err, "lowp": lowp, "tol": tol}
    return ok, report


def _reference_out(q, k, v, *, case: Case, slopes, upcast: bool):
  out, _ = attention_reference(q, k, v, softmax_scale=case.scale, causal=case.causal,
                               window_size=case.window, softcap=case.softcap, alibi_slopes=slopes,
                               upcast=upcast)
  return out


def _rel(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _jax_to_torch(x, device: str):
  import torch  # pylint: disable=import-outside-toplevel
  try:
    t = torch.from_dlpack(x)
  except Exception:  # pylint: disable=broad-except
    # bf16 has no numpy twin torch accepts; float32 holds bf16 and fp16 values exactly.
    t = torch.from_numpy(np.asarray(jnp.asarray(x, jnp.float32))).to(_torch_dtype(x.dtype))
  return t.to(device)


def _torch_dtype(dtype):
  import torch  # pylint: disable=import-outside-toplevel
  table = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
  return table[jnp.dtype(dtype).name]
