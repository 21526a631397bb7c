"""Cost of options the main suite's peers do not have: sinks and dropout, against the same call
without them, at (4, 16, 4096, 128) bf16 causal. Forward and forward+backward, median ms.

Then varlen (issue 4): 8 sequences of mixed lengths summing to 16384 tokens, H=16, d=128, bf16,
against a dense batch of 8 x 2048 tokens (about the same work) and that batch packed as varlen
("even"), as TFLOP/s (forward 4 * H * d *
sum(l^2), halved for causal; forward+backward 3.5x that).

  python -m bench.options [--smoke]
"""
from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp

from bench.timing import jax_median_ms

import pallas_attn as pa


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--smoke", action="store_true")
  args = ap.parse_args()
  b, h, s, d = (4, 16, 4096, 128) if not args.smoke else (1, 2, 128, 64)
  dtype = jnp.bfloat16 if not args.smoke else jnp.float32
  ks = jax.random.split(jax.random.PRNGKey(0), 6)
  q, k, v, do = (jax.random.normal(kk, (b, s, h, d), dtype) for kk in ks[:4])
  sink = jax.random.normal(ks[4], (2, h), jnp.float32)
  key = ks[5]
  cases = {
      "plain causal": lambda q, k, v: pa.flash_attn_func(q, k, v, causal=True),
      "2 sinks (sh)": lambda q, k, v: pa.fa2_func_with_sink(q, k, v, sink, causal=True),
      "dropout 0.1": lambda q, k, v: pa.flash_attn_func(q, k, v, dropout_p=0.1, causal=True,
                                                        dropout_key=key),
  }
  rows = []
  for name, f in cases.items():
    def fb(q, k, v, f=f):
      _, vjp = jax.vjp(f, q, k, v)
      return vjp(do)
    rows.append((name, jax_median_ms(jax.jit(f), q, k, v), jax_median_ms(jax.jit(fb), q, k, v)))
    print("OPTIONS", rows[-1], flush=True)
  base = rows[0]
  print(f"\n(b, H, s, d) = {(b, h, s, d)} {jnp.dtype(dtype).name} causal")
  print("%-16s %9s %11s %9s %9s" % ("case", "fwd ms", "f+b ms", "fwd x", "f+b x"))
  for name, f, fb in rows:
    print("%-16s %9.3f %11.3f %9.3f %9.3f" % (name, f, fb, f / base[1], fb / base[2]))
  if not args.smoke:
    sdpa_dropout(b, h, s, d)
  varlen(args.smoke)


def _sdpa_flash(what: str, b, h, s, d):
  """(torch, SDPA, its flash-backend context, q, k, v, do) on the GPU, or None (says why)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
    from torch.nn.attention import SDPBackend, sdpa_kernel  # pylint: disable=import-outside-toplevel
  except ImportError as err:
    print(f"{what}: skipped ({err})")
    return None
  if not torch.cuda.is_available():
    print(f"{what}: skipped (no CUDA)")
    return None
  q, k, v, do = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                 for _ in range(4))
  return torch, F.scaled_dot_product_attention, sdpa_kernel(SDPBackend.FLASH_ATTENTION), q, k, v, do


def sdpa_dropout(b, h, s, d):
  """The peer's cost of dropout: torch SDPA's flash backend, causal, with and without p = 0.1."""
  peer = _sdpa_flash("sdpa dropout", b, h, s, d)
  if peer is None:
    return
  torch, sdpa, flash, q, k, v, do = peer
  from bench.timing import torch_median_ms  # pylint: disable=import-outside-toplevel
  rows = []
  with flash:
    for p in (0.0, 0.1):
      f = lambda p=p: sdpa(q, k, v, dropout_p=p, is_causal=True)
      fb = lambda f=f: torch.autograd.grad(f(), (q, k, v), do)
      rows.append((p, torch_median_ms(f), torch_median_ms(fb)))
  print("\ntorch SDPA flash backend, same shape, causal")
  print("%-16s %9s %11s %9s %9s" % ("case", "fwd ms", "f+b ms", "fwd x", "f+b x"))
  for p, f, fb in rows:
    print("%-16s %9.3f %11.3f %9.3f %9.3f" % (f"sdpa dropout {p}", f, fb, f / rows[0][1], fb / rows[0][2]))


VARLEN_LENGTHS = (1024, 3072, 2048, 2048, 512, 3584, 1536, 2560)


def cu_seqlens(lengths=VARLEN_LENGTHS):
  return jnp.asarray([0, *itertools.accumulate(lengths)], jnp.int32)


def mixed_varlen(causal: bool, tiles=None):
  """flash_attn_varlen_func over VARLEN_LENGTHS, taking and returning (1, 16384, H, d) arrays like a
  batch of one, so tools that time or profile dense calls can swap it in."""
  cu, m = cu_seqlens(), max(VARLEN_LENGTHS)
  return lambda q, k, v: pa.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, m, m, causal=causal,
                                                   tiles=tiles)[None]


def varlen(smoke: bool):
  h, d = (16, 128) if not smoke else (2, 32)
  lengths = VARLEN_LENGTHS if not smoke else (16, 48, 32, 32)
  dense_b, dense_s = len(lengths), sum(lengths) // len(lengths)
  dtype = jnp.bfloat16 if not smoke else jnp.float32
  total = sum(lengths)
  cu = cu_seqlens(lengths)
  # The dense batch's own sequences, packed: separates varlen's per-tile cost from its imbalance.
  cu_even = jnp.arange(dense_b + 1, dtype=jnp.int32) * dense_s
  ks = jax.random.split(jax.random.PRNGKey(1), 4)
  qv, kv, vv, dov = (jax.random.normal(kk, (total, h, d), dtype) for kk in ks)
  dense = [x.reshape(dense_b, dense_s, h, d) for x in (qv, kv, vv, dov)]
  rows = []
  for causal in (False, True):
    cases = {
        "dense": (lambda q, k, v, c=causal: pa.flash_attn_func(q, k, v, causal=c), dense,
                  dense_b * dense_s * dense_s),
        "varlen": (lambda q, k, v, c=causal: pa.flash_attn_varlen_func(
            q, k, v, cu, cu, max(lengths), max(lengths), causal=c), (qv, kv, vv, dov),
                   sum(l * l for l in lengths)),
        "even": (lambda q, k, v, c=causal: pa.flash_attn_varlen_func(
            q, k, v, cu_even, cu_even, dense_s, dense_s, causal=c), (qv, kv, vv, dov),
                 dense_b * dense_s * dense_s),
    }
    for name, (f, (q, k, v, do), pairs) in cases.items():
      def fb(q, k, v, f=f, do=do):
        _, vjp = jax.vjp(f, q, k, v)
        return vjp(do)
      flops = 4 * h * d * pairs * (0.5 if causal else 1.0)
      fwd_ms, fb_ms = jax_median_ms(jax.jit(f), q, k, v), jax_median_ms(jax.jit(fb), q, k, v)
      rows.append((name, causal, fwd_ms, fb_ms, flops / fwd_ms / 1e9, 3.5 * flops / fb_ms / 1e9))
      print("VARLEN", rows[-1], flush=True)
  print(f"\nvarlen {lengths} vs dense {dense_b} x {dense_s}, H={h} d={d} {jnp.dtype(dtype).name}; "
        "x: TFLOP/s over the dense row's")
  print("%-8s %-7s %9s %9s %11s %11s %9s %9s" % ("case", "causal", "fwd ms", "f+b ms", "fwd TF/s",
                                                   "f+b TF/s", "fwd x", "f+b x"))
  for i, (name, causal, f, fb, tf, tfb) in enumerate(rows):
    base = rows[i - i % len(cases)]
    print("%-8s %-7s %9.3f %9.3f %11.1f %11.1f %9.3f %9.3f" % (name, causal, f, fb, tf, tfb,
                                                              tf / base[4], tfb / base[5]))
  if not smoke:
    sdpa_dense(dense_b, h, dense_s, d)


def sdpa_dense(b, h, s, d):
  """The peer on the varlen table's dense batch: torch SDPA's flash backend (flash-attn 2), TFLOP/s."""
  peer = _sdpa_flash("sdpa dense", b, h, s, d)
  if peer is None:
    return
  torch, sdpa, flash, q, k, v, do = peer
  from bench.timing import torch_median_ms  # pylint: disable=import-outside-toplevel
  with flash:
    for causal in (False, True):
      f = lambda c=causal: sdpa(q, k, v, is_causal=c)
      fb = lambda f=f: torch.autograd.grad(f(), (q, k, v), do)
      flops = 4 * b * h * s * s * d * (0.5 if causal else 1.0)
      fwd_ms, fb_ms = torch_median_ms(f), torch_median_ms(fb)
      print("%-8s %-7s %9.3f %9.3f %11.1f %11.1f   (torch SDPA flash, dense batch)"
            % ("sdpa", causal, fwd_ms, fb_ms, flops / fwd_ms / 1e9, 3.5 * flops / fb_ms / 1e9))


if __name__ == "__main__":
  main()
