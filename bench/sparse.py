"""Sparse attention timing (issue: sparse attention): n_ctx 16384, n_embd 2048, 16 heads, bf16.

  python -m bench.sparse [--smoke]

Rows: local L=1024 and strided L=128 (regrouped, and through tile tables), our dense causal kernel at
the same size, and FlexAttention's sliding-window causal mask of 1024 when torch is importable.
Forward and forward+backward, median milliseconds.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from bench.timing import jax_median_ms, torch_median_ms

from pallas_attn import sparse_attention


def _fwd_bwd(f, dout):
  def run(q, k, v):
    _, vjp = jax.vjp(f, q, k, v)
    return vjp(dout)
  return jax.jit(run)


def _flex_rows(n, e, heads, window, smoke):
  try:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
  except Exception as err:  # noqa: BLE001
    return [("flex local (skipped)", str(err)[:60], float("nan"), float("nan"))]
  if smoke or not torch.cuda.is_available():
    return []
  d = e // heads
  q, k, v, do = (torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                 for _ in range(4))
  mask = create_block_mask(lambda b, h, i, j: (j <= i) & (i - j < window), 1, 1, n, n, device="cuda")
  flex = torch.compile(flex_attention)

  fwd = torch_median_ms(lambda: flex(q, k, v, block_mask=mask))
  fb = torch_median_ms(lambda: torch.autograd.grad(flex(q, k, v, block_mask=mask), (q, k, v), do))
  return [(f"flex local L={window}", "", fwd, fb)]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--smoke", action="store_true")
  args = ap.parse_args()
  n, e, heads, local, stride = (16384, 2048, 16, 1024, 128) if not args.smoke else (256, 128, 2, 64, 8)
  dtype = jnp.bfloat16 if not args.smoke else jnp.float32
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v, dout = (jax.random.normal(kk, (1, n, e), dtype) for kk in ks)
  rows = []
  cases = [
      ("ours local", lambda q, k, v: sparse_attention(q, k, v, heads, "local", local)),
      ("ours strided (regroup)", lambda q, k, v: sparse_attention(q, k, v, heads, "strided", stride)),
      ("ours strided (tables)",
       lambda q, k, v: sparse_attention(q, k, v, heads, "strided", stride, strided_impl="tables")),
      ("ours dense causal", lambda q, k, v: sparse_attention(q, k, v, heads, "all")),
  ]
  for name, f in cases:
    rows.append((name, "", jax_median_ms(jax.jit(f), q, k, v), jax_median_ms(_fwd_bwd(f, dout), q, k, v)))
    print("SPARSE", rows[-1], flush=True)
  rows += _flex_rows(n, e, heads, local, args.smoke)
  dense = rows[3]
  print(f"\nn_ctx={n} n_embd={e} heads={heads} {jnp.dtype(dtype).name}; local L={local}, strided L={stride}")
  print("%-26s %10s %12s %12s %12s" % ("case", "fwd ms", "fwd+bwd ms", "fwd/dense", "f+b/dense"))
  for name, note, f, fb in rows:
    print("%-26s %10.3f %12.3f %12.3f %12.3f %s" % (name, f, fb, f / dense[2], fb / dense[3], note))


if __name__ == "__main__":
  main()
