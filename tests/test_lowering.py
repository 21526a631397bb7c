"""Every kernel variant lowers to Triton for CUDA, checked on the CPU.

jax lowers Pallas to Triton IR in Python, so lowering for the "cuda" platform needs no GPU; it is
where Triton's restrictions (power-of-two tile shapes, supported ops) are enforced. This catches most
of what only the GPU run would otherwise reveal.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_attn import flash_attn_func

CASES = [
    dict(),
    dict(causal=True),
    dict(window_size=(64, 16)),
    dict(window_size=(32, -1), softcap=30.0),
    dict(causal=True, alibi=True),
]


@pytest.mark.parametrize("opts", CASES, ids=lambda o: ",".join(sorted(o)) or "plain")
@pytest.mark.parametrize("dtype,d,h,hk,sq,sk", [
    ("bfloat16", 128, 8, 2, 1000, 1000),
    ("float16", 96, 4, 4, 1, 300),
    ("float32", 256, 2, 1, 257, 255),
    ("bfloat16", 64, 6, 3, 77, 513),
])
def test_flash_attn_lowers_for_cuda(opts, dtype, d, h, hk, sq, sk):
  opts = dict(opts)
  alibi = jnp.linspace(0.1, 0.5, h).astype(jnp.float32) if opts.pop("alibi", False) else None
  q = jnp.zeros((2, sq, h, d), dtype)
  k = jnp.zeros((2, sk, hk, d), dtype)

  def f(q, k, v):
    (out, lse, _), vjp = jax.vjp(lambda q, k, v: flash_attn_func(
        q, k, v, alibi_slopes=alibi, return_attn_probs=True, **opts), q, k, v)
    return vjp((out, lse, jnp.zeros((0,), q.dtype)))

  text = jax.jit(f).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 3
