"""Landmark attention timing (issue 7): B=2, H=16, L=8192, d=128, block_size=64, bf16.

  python -m bench.landmark [--smoke] [--batch B] [--heads H] [--seqlen L] [--headdim D] [--block-size BS]

Rows: ours (fused_landmark_attention, no history: Lq = Lk = L), our causal flash attention at the same
shape (flash_attn_func, (B, L, H, d) layout), and torch's SDPA causal and FlexAttention causal when torch
with CUDA is importable. Forward and forward+backward, median milliseconds, and the ratio to our causal
flash (landmark attention visits the same key tiles as causal attention). Ours is first checked against
the reference on a smaller problem; a failed check prints FAILED and times nothing.
`--smoke`: tiny shapes on the CPU (Pallas interpret mode), ours only.
"""
from __future__ import annotations

import os

# jax and torch share the GPU in this process (as in bench/run.py).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import timing  # noqa: E402
from pallas_attn import flash_attn_func, fused_landmark_attention  # noqa: E402
from pallas_attn.landmark import required_is_mem  # noqa: E402
from pallas_attn.reference import landmark_attention_reference  # noqa: E402


def _fwd_bwd(f):
  def run(q, k, v, dout):
    _, vjp = jax.vjp(f, q, k, v)
    return vjp(dout)
  return jax.jit(run)


def _jax_ms(fn, args, cfg):
  return timing.measure(lambda: fn(*args), jax.block_until_ready, cfg).median_s * 1e3


def _inputs(b, h, lq, lk, d, dtype, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  return (jax.random.normal(ks[0], (b, h, lq, d), dtype), jax.random.normal(ks[1], (b, h, lk, d), dtype),
          jax.random.normal(ks[2], (b, h, lk, d), dtype), jax.random.normal(ks[3], (b, h, lq, d), dtype))


def check(bs: int, d: int, dtype, smoke: bool) -> str | None:
  """Ours against the reference (2x / 3x the input-dtype reference's error, plus one ulp); None if ok."""
  b, h, lq, n_hist = (1, 2, 100, bs) if smoke else (1, 4, 1000, 2 * bs)
  q, k, v, dout = _inputs(b, h, lq, lq + n_hist, d, dtype, seed=1)
  ours_fn = functools.partial(fused_landmark_attention, is_mem=required_is_mem(lq + n_hist, bs),
                              block_size=bs)

  @functools.partial(jax.jit, static_argnames="upcast")
  def ref(q, k, v, dout, upcast):
    fn = lambda q, k, v: landmark_attention_reference(q, k, v, None, d ** -0.5, bs, upcast=upcast)
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(dout))

  out, vjp = jax.vjp(ours_fn, q, k, v)
  ours = (out, *vjp(dout))
  exact, lowp = ref(q, k, v, dout, True), ref(q, k, v, dout, False)
  f32 = lambda x: np.asarray(x, np.float32)
  for name, o, lo, r, factor in zip(("out", "dq", "dk", "dv"), ours, lowp, exact, (2, 3, 3, 3)):
    err, err_lowp = np.abs(f32(o) - f32(r)).max(), np.abs(f32(lo) - f32(r)).max()
    ulps = 32 if dtype == jnp.float32 else 1
    floor = ulps * float(jnp.finfo(dtype).eps) * max(np.abs(f32(r)).max(), 1.0)
    if not err <= factor * err_lowp + floor:
      return f"{name}: err {err:.3e} > {factor} * {err_lowp:.3e} + {floor:.3e}"
  return None


def _torch_rows(b, h, l, d, cfg):
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  except ImportError as err:
    return [("torch (skipped)", float("nan"), float("nan"), str(err)[:60])]
  if not torch.cuda.is_available():
    return [("torch (skipped)", float("nan"), float("nan"), "no CUDA")]
  q, k, v, do = (torch.randn(b, h, l, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                 for _ in range(4))

  def ms(fn):
    return timing.measure(fn, lambda _: torch.cuda.synchronize(), cfg, cuda_events=True).median_s * 1e3

  def fwd_bwd(f):
    return lambda: torch.autograd.grad(f(), (q, k, v), do)

  sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
  rows = [("torch SDPA causal", ms(sdpa), ms(fwd_bwd(sdpa)), "")]
  try:
    # pylint: disable-next=import-outside-toplevel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    mask = create_block_mask(lambda b_, h_, i, j: j <= i, None, None, l, l, device="cuda")
    flex_c = torch.compile(flex_attention)
    flex = lambda: flex_c(q, k, v, block_mask=mask)
    rows.append(("torch FlexAttention causal", ms(flex), ms(fwd_bwd(flex)), ""))
  except Exception as err:  # noqa: BLE001  (FlexAttention is optional: report, do not fail)
    note = str(err).splitlines()[0][:60]
    rows.append(("torch FlexAttention (skipped)", float("nan"), float("nan"), note))
  return rows


def sweep(q, k, v, dout, bs: int, cfg) -> None:
  """Times tile configs one pass at a time (the others at their defaults) and prints one row each;
  the fitted config (stages or rows cut to fit shared memory) is what ran."""
  import itertools  # pylint: disable=import-outside-toplevel
  from pallas_attn.backends import triton_landmark  # pylint: disable=import-outside-toplevel
  from pallas_attn.backends.triton_landmark import LandmarkSpec  # pylint: disable=import-outside-toplevel
  from pallas_attn.tiles import TileConfig  # pylint: disable=import-outside-toplevel
  d, l = q.shape[-1], q.shape[2]
  spec = LandmarkSpec(sq=l, sk=l, block_size=bs, scale=d ** -0.5)
  base = triton_landmark.configs(spec, _next_pow2(d), q.dtype.itemsize)
  print(f"SWEEP default {base}", flush=True)
  grid = list(itertools.product((32, 64, 128), (4, 8), (2, 3)))
  for which in ("fwd", "bwd_dq", "bwd_dkv"):
    for bq, warps, stages in grid:
      if which == "fwd" and bq == 32:
        continue
      tiles = dataclasses.replace(base, **{which: TileConfig(bq, bs, warps, stages)})
      fitted = getattr(triton_landmark.configs(spec, _next_pow2(d), q.dtype.itemsize, tiles), which)
      fn = functools.partial(fused_landmark_attention, is_mem=required_is_mem(l, bs), block_size=bs,
                             tiles=tiles)
      try:
        ms = (_jax_ms(jax.jit(fn), (q, k, v), cfg) if which == "fwd"
              else _jax_ms(_fwd_bwd(fn), (q, k, v, dout), cfg))
      except Exception as err:  # noqa: BLE001  (a config that does not compile: say so, go on)
        print(f"SWEEP {which} {fitted} failed: {str(err).splitlines()[0][:90]}", flush=True)
        continue
      print(f"SWEEP {which:8s} bq={fitted.block_q:<4d} w={fitted.num_warps} s={fitted.num_stages} "
            f"{'fwd' if which == 'fwd' else 'fwd+bwd'} {ms:8.3f} ms", flush=True)


def _next_pow2(x: int) -> int:
  return 1 << (max(x, 16) - 1).bit_length()


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m bench.landmark", description=__doc__.splitlines()[0])
  ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (interpret mode), ours only")
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--seqlen", type=int, default=8192)
  ap.add_argument("--headdim", type=int, default=128)
  ap.add_argument("--block-size", type=int, default=64)
  ap.add_argument("--sweep", action="store_true",
                  help="time query-tile configs of each pass (fwd, dq, dkv) instead of the table")
  args = ap.parse_args(argv)
  b, h, l, d, bs = args.batch, args.heads, args.seqlen, args.headdim, args.block_size
  dtype, cfg = jnp.bfloat16, timing.TimingConfig()
  if args.smoke:
    b, h, l, d, bs = 1, 2, 256, 64, 64
    dtype, cfg = jnp.float32, timing.SMOKE_TIMING
  print(f"devices: {jax.devices()}", flush=True)

  problem = check(bs, d, dtype, args.smoke)
  if problem is not None:
    print(f"landmark check FAILED ({problem}); not timing", flush=True)
    return 1

  q, k, v, dout = _inputs(b, h, l, l, d, dtype)
  if args.sweep:
    sweep(q, k, v, dout, bs, cfg)
    return 0
  landmark = functools.partial(fused_landmark_attention, is_mem=required_is_mem(l, bs), block_size=bs)
  rows = [("ours landmark", _jax_ms(jax.jit(landmark), (q, k, v), cfg),
           _jax_ms(_fwd_bwd(landmark), (q, k, v, dout), cfg), f"block_size={bs}")]
  print(rows[-1], flush=True)
  qt, kt, vt, dt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v, dout))  # (B, L, H, d)
  causal = functools.partial(flash_attn_func, causal=True)
  rows.append(("ours flash causal", _jax_ms(jax.jit(causal), (qt, kt, vt), cfg),
               _jax_ms(_fwd_bwd(causal), (qt, kt, vt, dt), cfg), ""))
  print(rows[-1], flush=True)
  if not args.smoke:
    rows += _torch_rows(b, h, l, d, cfg)

  flops = 4 * b * h * l * l * d / 2  # causal forward, half the square
  ref_f, ref_fb = rows[1][1], rows[1][2]
  print(f"\nB={b} H={h} L={l} d={d} {jnp.dtype(dtype).name}; TFLOP/s counts causal attention's flops "
        f"(fwd 4BHL^2d/2, fwd+bwd 3.5x that)")
  print("%-30s %9s %11s %9s %11s %9s %9s  %s" % ("case", "fwd ms", "fwd+bwd ms", "fwd TF/s", "f+b TF/s",
                                                 "fwd/flash", "f+b/flash", "note"))
  for name, f, fb, note in rows:
    print("%-30s %9.3f %11.3f %9.1f %11.1f %9.2f %9.2f  %s" % (
        name, f, fb, flops / f / 1e9, 3.5 * flops / fb / 1e9, f / ref_f, fb / ref_fb, note))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
