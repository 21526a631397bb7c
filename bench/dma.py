"""Flash dynamic mask attention timing (issue: flash dynamic mask attention).

  python -m bench.dma [--smoke]

Shape: b=2, H=16, Hk=8, s=4096, d=128, bf16. Rows, forward and forward+backward (gradients of q, k,
v and zoh), median milliseconds:
- ours, top-k mask of zoh (keep_window_size = density * s, kept keys scattered over every tile) at
  densities 0.1, 0.25, 0.5 and 1;
- ours, clustered mask of the same densities: the kept keys of a row fill whole 128-key blocks, so
  the kernels skip the rest and time should fall with the kept tiles;
- ours with an all-ones mask (dense attention with the same bias) as the 1.0 reference;
- torch SDPA with the same bias and mask as one additive float mask (-inf where masked), when torch
  with CUDA is importable (SDPA picks its memory-efficient backend for a float mask).
The mask is built once outside the timed call.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench.timing import jax_median_ms, torch_median_ms

from pallas_attn import flash_dma

DENSITIES = (0.1, 0.25, 0.5, 1.0)


def _clustered(b, hk, sq, sk, density, block, seed):
  """Per row, round(density * sk / block) random key blocks of `block` keys kept whole."""
  n_blocks = sk // block
  keep = max(1, round(density * n_blocks))
  rng = np.random.default_rng(seed)
  scores = rng.random((b, hk, sq // block, n_blocks))
  picked = np.argsort(-scores, axis=-1)[..., :keep]
  tile = np.zeros((b, hk, sq // block, n_blocks), bool)
  np.put_along_axis(tile, picked, True, axis=-1)
  return np.repeat(np.repeat(tile, block, axis=2), block, axis=3)


def _fns(causal):
  def fwd(q, k, v, z, m):
    return flash_dma.fwd(q, k, v, z, m, is_causal=causal)[0]

  def fwd_bwd(q, k, v, z, m, do):
    _, vjp = jax.vjp(lambda q, k, v, z: fwd(q, k, v, z, m), q, k, v, z)
    return vjp(do)

  return jax.jit(fwd), jax.jit(fwd_bwd)


def _sdpa_row(q, k, v, z, m, do, group):
  try:
    import torch
    import torch.nn.functional as F
  except Exception as err:  # noqa: BLE001
    return ("sdpa float mask (skipped)", str(err)[:60], float("nan"), float("nan"))
  if not torch.cuda.is_available():
    return ("sdpa float mask (skipped)", "no CUDA in torch", float("nan"), float("nan"))
  t = lambda x: torch.from_dlpack(x).clone()  # jax -> torch on the same GPU
  tq, tk, tv, tdo = (t(x).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v, do))
  tk = tk.detach().repeat_interleave(group, dim=1).requires_grad_()
  tv = tv.detach().repeat_interleave(group, dim=1).requires_grad_()
  bias = t(z).repeat_interleave(group, dim=1)
  bias = bias.masked_fill(t(m).repeat_interleave(group, dim=1) <= 0, float("-inf"))
  bias.requires_grad_()
  call = lambda: F.scaled_dot_product_attention(tq, tk, tv, attn_mask=bias)
  fwd = torch_median_ms(call)
  fb = torch_median_ms(lambda: torch.autograd.grad(call(), (tq, tk, tv, bias), tdo))
  return ("sdpa float mask", "", fwd, fb)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--causal", action="store_true")
  args = ap.parse_args()
  b, h, hk, s, d = (2, 16, 8, 4096, 128) if not args.smoke else (1, 2, 1, 256, 32)
  dtype = jnp.bfloat16 if not args.smoke else jnp.float32
  ks = jax.random.split(jax.random.PRNGKey(0), 5)
  q = jax.random.normal(ks[0], (b, s, h, d), dtype)
  k, v = (jax.random.normal(kk, (b, s, hk, d), dtype) for kk in ks[1:3])
  do = jax.random.normal(ks[3], (b, s, h, d), dtype)
  z = jax.random.normal(ks[4], (b, hk, s, s), dtype)
  fwd, fwd_bwd = _fns(args.causal)
  rows = []

  def time_row(name, m, note=""):
    m = jax.block_until_ready(m)
    rows.append((name, note, jax_median_ms(fwd, q, k, v, z, m),
                 jax_median_ms(fwd_bwd, q, k, v, z, m, do)))
    print("DMA", rows[-1], flush=True)

  time_row("ours dense (ones)", jnp.ones((b, hk, s, s), dtype))
  block = 128 if not args.smoke else 32
  for density in DENSITIES:
    window = max(1, int(density * s))
    time_row(f"ours top-k {density:g}", flash_dma.topk_mask(z, window, args.causal),
             f"keep_window_size={window}")
    clustered = jnp.asarray(_clustered(b, hk, s, s, density, block, 0), dtype)
    time_row(f"ours clustered {density:g}", clustered, f"{block}-key blocks")
  if not args.smoke:
    rows.append(_sdpa_row(q, k, v, z, flash_dma.topk_mask(z, s // 4, args.causal), do, h // hk))
    print("DMA", rows[-1], flush=True)
  dense = rows[0]
  print(f"\nb={b} H={h} Hk={hk} s={s} d={d} {jnp.dtype(dtype).name} causal={args.causal}")
  print("%-24s %10s %12s %10s %10s  %s" % ("case", "fwd ms", "fwd+bwd ms", "fwd/dense", "f+b/dense",
                                          "note"))
  for name, note, f, fb in rows:
    print("%-24s %10.3f %12.3f %10.3f %10.3f  %s" % (name, f, fb, f / dense[2], fb / dense[3], note))


if __name__ == "__main__":
  main()
