"""flash_attn_varlen_func with block_table (paged keys/values, forward only), both faces.

The reference is the packed varlen reference of tests/test_varlen.py run on the keys gathered out of
the pages. Pages nobody should read hold NaN, and table entries past a sequence's last page point
nowhere, so a stray read shows up as NaN or a crash rather than a small error.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import numerics
from pallas_attn.flash_attn_varlen import flash_attn_varlen_func
from pallas_attn.reference import attention_reference
from pallas_attn.sink import fa2_varlen_func_with_sink
from test_varlen import _cu, _packed_references

_NOWHERE = 1 << 20  # a page index far past num_blocks


def _paged(k, v, lengths, page, seed, spare=3):
  """Scatters packed k/v (total_k, Hk, d) into shuffled pages; returns (k_cache, v_cache, table).

  The rows after each sequence's end and `spare` extra pages are NaN; table entries after a
  sequence's last page are out of range.
  """
  rng = np.random.default_rng(seed)
  n_pages = [-(-n // page) for n in lengths]
  max_blocks = max(max(n_pages), 1) + 1
  num_blocks = sum(n_pages) + spare
  order = rng.permutation(num_blocks)
  k_np, v_np = np.asarray(k, np.float32), np.asarray(v, np.float32)
  shape = (num_blocks, page) + k_np.shape[1:]
  k_cache, v_cache = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
  table = np.full((len(lengths), max_blocks), _NOWHERE, np.int32)
  used, start = 0, 0
  for s, n in enumerate(lengths):
    for b in range(n_pages[s]):
      p = order[used]
      used += 1
      table[s, b] = p
      rows = slice(start + b * page, start + min((b + 1) * page, n))
      k_cache[p, :rows.stop - rows.start] = k_np[rows]
      v_cache[p, :rows.stop - rows.start] = v_np[rows]
    start += n
  return (jnp.asarray(k_cache, k.dtype), jnp.asarray(v_cache, v.dtype), jnp.asarray(table))


def _inputs(lq, lk, h, hk, d, dtype, seed, alibi=False):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = jax.random.normal(ks[0], (sum(lq), h, d), jnp.dtype(dtype))
  k = jax.random.normal(ks[1], (sum(lk), hk, d), jnp.dtype(dtype))
  v = jax.random.normal(ks[2], (sum(lk), hk, d), jnp.dtype(dtype))
  slopes = jax.random.uniform(ks[3], (len(lq), h), jnp.float32, 0.01, 0.3) if alibi else None
  return q, k, v, slopes


CASES = [
    # lq, lk, h, hk, d, page, options, dtype
    ([5, 0, 33, 1, 17], [9, 3, 40, 1, 0], 4, 2, 32, 16, dict(causal=True), "float32"),
    ([7, 30, 12], [40, 9, 12], 4, 1, 64, 32, dict(window_size=(4, 2), softcap=5.0), "bfloat16"),
    ([20, 3, 45], [20, 50, 45], 4, 2, 16, 16, dict(causal=True, alibi=True), "float32"),
    ([1, 1, 0, 9], [0, 70, 5, 33], 2, 2, 40, 32, dict(), "float16"),
    ([16, 64], [64, 16], 2, 1, 32, 16, dict(window_size=(-1, 0), softmax_scale=0.3), "float32"),
]


@pytest.mark.parametrize("lq,lk,h,hk,d,page,opts,dtype", CASES)
def test_paged_parity(lq, lk, h, hk, d, page, opts, dtype):
  opts = dict(opts)
  q, k, v, slopes = _inputs(lq, lk, h, hk, d, dtype, sum(lq) + page, opts.pop("alibi", False))
  if slopes is not None:
    opts["alibi_slopes"] = slopes
  cq, ck = _cu(lq), _cu(lk)
  k_cache, v_cache, table = _paged(k, v, lk, page, seed=len(lq))

  # Under jit the offsets and the table are traced: the kernel, not the host, reads them.
  @jax.jit
  def paged(q, k_cache, v_cache, cq, ck, table):
    return flash_attn_varlen_func(q, k_cache, v_cache, cq, ck, max(lq), max(lk), block_table=table,
                                  return_attn_probs=True, **opts)

  out, lse, s_dmask = paged(q, k_cache, v_cache, cq, ck, table)
  assert s_dmask.shape == (0,)
  ref, lowp = _packed_references(q, k, v, jnp.zeros_like(q), cq, ck, **opts)
  numerics.assert_output("out", out, lowp[0], ref[0])
  numerics.assert_lse(lse, lowp[1], ref[1])


def test_non_power_of_two_page():
  """flash-attn's page sizes are multiples of 256; 768 is split into 256-aligned key tiles."""
  lq, lk = [3, 20], [800, 0]
  q, k, v, _ = _inputs(lq, lk, 2, 1, 16, "float32", 7)
  k_cache, v_cache, table = _paged(k, v, lk, 768, seed=1, spare=1)
  out, lse, _ = flash_attn_varlen_func(q, k_cache, v_cache, _cu(lq), _cu(lk), 20, 800, causal=True,
                                       block_table=table, return_attn_probs=True)
  ref, lowp = _packed_references(q, k, v, jnp.zeros_like(q), _cu(lq), _cu(lk), causal=True)
  numerics.assert_output("out", out, lowp[0], ref[0])
  numerics.assert_lse(lse, lowp[1], ref[1])


def test_paged_equals_contiguous_for_equal_tiles():
  """With pages no smaller than the key tile, paged and packed runs do the same arithmetic."""
  lq, lk = [9, 17], [31, 64]
  q, k, v, _ = _inputs(lq, lk, 4, 2, 32, "float32", 3)
  k_cache, v_cache, table = _paged(k, v, lk, 64, seed=2)
  a = flash_attn_varlen_func(q, k_cache, v_cache, _cu(lq), _cu(lk), 17, 64, causal=True,
                             block_table=table)
  b = flash_attn_varlen_func(q, k, v, _cu(lq), _cu(lk), 17, 64, causal=True)
  ref, lowp = _packed_references(q, k, v, jnp.zeros_like(q), _cu(lq), _cu(lk), causal=True)
  numerics.assert_output("out", a, lowp[0], ref[0])
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sink_family_takes_block_table():
  lq, lk = [5, 12], [20, 33]
  q, k, v, _ = _inputs(lq, lk, 2, 1, 16, "float32", 5)
  sink = jax.random.normal(jax.random.PRNGKey(0), (3, 2), jnp.float32)
  k_cache, v_cache, table = _paged(k, v, lk, 16, seed=3)
  out, lse, _ = fa2_varlen_func_with_sink(q, k_cache, v_cache, _cu(lq), _cu(lk), 12, 33, sink,
                                          causal=True, block_table=table, return_attn_probs=True)
  ref, lowp = (_sink_references(q, k, v, sink, lq, lk, causal=True, upcast=u) for u in (True, False))
  numerics.assert_output("out", out, lowp[0], ref[0])
  numerics.assert_lse(lse, lowp[1], ref[1])


def _sink_references(q, k, v, sink, lq, lk, upcast, **opts):
  """attention_reference with "sh" sinks, one sequence at a time: out (total_q, H, d), lse
  (H, total_q)."""
  cq, ck = np.cumsum([0] + lq), np.cumsum([0] + lk)
  outs, lses = [], []
  for s in range(len(lq)):
    out, lse = attention_reference(q[cq[s]:cq[s + 1]][None], k[ck[s]:ck[s + 1]][None],
                                   v[ck[s]:ck[s + 1]][None], sink=sink, upcast=upcast, **opts)
    outs.append(out[0])
    lses.append(lse[0])
  return jnp.concatenate(outs), jnp.concatenate(lses, axis=1)


def test_gradients_raise():
  lq, lk = [4, 6], [16, 20]
  q, k, v, _ = _inputs(lq, lk, 2, 2, 16, "float32", 1)
  k_cache, v_cache, table = _paged(k, v, lk, 16, seed=0, spare=0)
  f = lambda q, kc: flash_attn_varlen_func(q, kc, v_cache, _cu(lq), _cu(lk), 6, 20,
                                           block_table=table).sum()
  with pytest.raises(NotImplementedError, match="block_table"):
    jax.grad(f)(q, k_cache)
  with pytest.raises(NotImplementedError, match="block_table"):
    jax.grad(f, argnums=1)(q, k_cache)


def _bad_args():
  q = jnp.ones((19, 2, 16))
  cache = jnp.ones((5, 16, 2, 16))
  return dict(q=q, k=cache, v=cache, cu_seqlens_q=_cu([9, 10]), cu_seqlens_k=_cu([20, 16]),
              max_seqlen_q=10, max_seqlen_k=20, block_table=jnp.asarray([[0, 1], [2, 3]], jnp.int32))


@pytest.mark.parametrize("mutate,err,match", [
    (lambda a: dict(a, block_table=a["block_table"].astype(jnp.int16)), TypeError,
     "^block_table: expected dtype int32"),
    (lambda a: dict(a, block_table=[[0, 1], [2, 3]]), TypeError, "^block_table: expected an int32"),
    (lambda a: dict(a, block_table=jnp.zeros((3, 2), jnp.int32)), ValueError,
     r"^block_table: expected shape \(2, max_num_blocks_per_seq\)"),
    (lambda a: dict(a, block_table=jnp.zeros((2, 0), jnp.int32)), ValueError, "^block_table"),
    (lambda a: dict(a, block_table=a["block_table"][:, :1]), ValueError,
     "^block_table: 1 pages of 16 keys hold at most 16"),
    (lambda a: dict(a, block_table=jnp.asarray([[0, 5], [2, 3]], jnp.int32)), ValueError,
     r"^block_table: expected page indices in \[0, 5\)"),
    (lambda a: dict(a, k=jnp.ones((5, 24, 2, 16)), v=jnp.ones((5, 24, 2, 16))), ValueError,
     "^block_table: the page size"),
    (lambda a: dict(a, k=jnp.ones((5, 8, 2, 16)), v=jnp.ones((5, 8, 2, 16))), ValueError,
     "^block_table: the page size"),
    (lambda a: dict(a, k=jnp.ones((80, 2, 16))), ValueError, "^k: expected a 4-D array"),
    (lambda a: dict(a, v=jnp.ones((5, 32, 2, 16))), ValueError, "^v: expected shape"),
    (lambda a: dict(a, k=jnp.ones((5, 16, 2, 8)), v=jnp.ones((5, 16, 2, 8))), ValueError, "^k"),
    (lambda a: dict(a, k=jnp.ones((5, 16, 3, 16)), v=jnp.ones((5, 16, 3, 16))), ValueError,
     "^k: nheads"),
    (lambda a: dict(a, dropout_p=0.1), ValueError, "^block_table: .*dropout_p=0"),
    (lambda a: dict(a, cu_seqlens_k=_cu([20, 16]).astype(jnp.int16)), TypeError, "^cu_seqlens_k"),
    (lambda a: dict(a, max_seqlen_k=16), ValueError, "^max_seqlen_k"),
])
def test_bad_input(mutate, err, match):
  with pytest.raises(err, match=match):
    flash_attn_varlen_func(**mutate(_bad_args()))


def test_lengths_past_block_table_raise_runtime_error():
  """As flash-attn: a RuntimeError (ours is also a ValueError, like every other bad value)."""
  args = _bad_args()
  with pytest.raises(RuntimeError, match="^block_table: 1 pages of 16 keys hold at most 16"):
    flash_attn_varlen_func(**dict(args, block_table=args["block_table"][:, :1]))


def test_traced_lengths_past_block_table_are_clamped():
  """Under jit nobody checks cu_seqlens_k: a length past the table's capacity is clamped to it in
  the kernel, so no tile looks up a table entry past the sequence's row."""
  lq, lk, page = [5, 7], [32, 20], 16
  q, k, v, _ = _inputs(lq, lk, 2, 1, 16, "float32", 9)
  k_cache, v_cache, table = _paged(k, v, lk, page, seed=5, spare=1)
  table = table[:, :2]  # sequence 0 fills both of its pages: capacity 32
  f = jax.jit(lambda ck: flash_attn_varlen_func(q, k_cache, v_cache, _cu(lq), ck, 7, 64,
                                                block_table=table, return_attn_probs=True)[:2])
  out, lse = f(_cu([32 + 30, 20]))
  ref, lowp = _packed_references(q, k, v, jnp.zeros_like(q), _cu(lq), _cu(lk))
  numerics.assert_output("out", out, lowp[0], ref[0])
  numerics.assert_lse(lse, lowp[1], ref[1])


def test_unused_table_entries_are_not_checked():
  args = _bad_args()
  # Sequence 1 has 16 keys: its second entry is never read, whatever it holds.
  args["block_table"] = jnp.asarray([[0, 1], [2, -7]], jnp.int32)
  flash_attn_varlen_func(**args)


@pytest.mark.parametrize("dtype,d,h,hk,page,opts", [
    ("bfloat16", 128, 8, 2, 16, dict(causal=True)),
    ("float16", 96, 4, 4, 256, dict(window_size=(64, 16), softcap=30.0)),
    ("bfloat16", 64, 6, 3, 32, dict(causal=True, alibi=True)),
    ("float32", 256, 2, 1, 512, dict()),
])
def test_paged_lowers_for_cuda(dtype, d, h, hk, page, opts):
  opts = dict(opts)
  if opts.pop("alibi", False):
    opts["alibi_slopes"] = jnp.linspace(0.1, 0.5, h).astype(jnp.float32)
  q = jnp.zeros((300, h, d), dtype)
  cache = jnp.zeros((40, page, hk, d), dtype)
  cu = jnp.asarray([0, 100, 300], jnp.int32)
  table = jnp.zeros((2, 20), jnp.int32)
  f = lambda q, kc, vc, cq, ck, t: flash_attn_varlen_func(q, kc, vc, cq, ck, 200, 1000,
                                                         block_table=t, **opts)
  text = jax.jit(f).trace(q, cache, cache, cu, cu, table).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 1


# ----------------------------------------------------------------------------------------------------
# torch face

def _torch(x):
  return torch.from_numpy(np.array(jnp.asarray(x, jnp.float32))).to(
      {jnp.dtype("float32"): torch.float32, jnp.dtype("bfloat16"): torch.bfloat16,
       jnp.dtype("float16"): torch.float16}[jnp.dtype(x.dtype)])


@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=["window-softcap-bf16", "alibi"])
def test_torch_matches_jax(case):
  import torch_bridge

  lq, lk, h, hk, d, page, opts, dtype = case
  opts = dict(opts)
  q, k, v, slopes = _inputs(lq, lk, h, hk, d, dtype, 11, opts.pop("alibi", False))
  k_cache, v_cache, table = _paged(k, v, lk, page, seed=4)
  cq, ck = _cu(lq), _cu(lk)
  want = flash_attn_varlen_func(q, k_cache, v_cache, cq, ck, max(lq), max(lk), alibi_slopes=slopes,
                                block_table=table, return_attn_probs=True, **opts)
  got = torch_bridge.flash_attn_varlen_func(
      _torch(q), _torch(k_cache), _torch(v_cache), torch.from_numpy(np.array(cq)),
      torch.from_numpy(np.array(ck)), max(lq), max(lk), alibi_slopes=None if slopes is None
      else _torch(slopes), block_table=torch.from_numpy(np.array(table)), return_attn_probs=True,
      **opts)
  assert got[0].dtype == _torch(q).dtype and got[1].dtype == torch.float32
  assert got[2].numel() == 0
  ref, lowp = _packed_references(q, k, v, jnp.zeros_like(q), cq, ck, alibi_slopes=slopes, **opts)
  numerics.assert_output("out", jnp.asarray(got[0].float().numpy()).astype(q.dtype), lowp[0], ref[0])
  numerics.assert_lse(got[1].numpy(), lowp[1], ref[1])
  # The bridge adds no arithmetic of its own: bit for bit the JAX face's result.
  np.testing.assert_array_equal(got[0].float().numpy(), numerics.as_f32(want[0]))
  np.testing.assert_array_equal(got[1].numpy(), numerics.as_f32(want[1]))


def _torch_args():
  return {n: (torch.from_numpy(np.array(a)) if hasattr(a, "shape") else a)
          for n, a in _bad_args().items()}


def test_torch_forward_with_grad_inputs_and_backward_raises():
  import torch_bridge

  args = _torch_args()
  g = torch.Generator().manual_seed(0)
  args["q"] = torch.randn(19, 2, 16, generator=g)
  args["k"], args["v"] = (torch.randn(5, 16, 2, 16, generator=g) for _ in range(2))
  plain = torch_bridge.flash_attn_varlen_func(**args)
  # Sequence 0 holds its 20 keys in pages 0 and 1, sequence 1 its 16 in page 2 (the table's [2, 3]).
  packed = lambda cache: jnp.asarray(torch.cat([cache[:2].reshape(32, 2, 16)[:20], cache[2]]).numpy())
  jq = jnp.asarray(args["q"].numpy())
  ref, lowp = _packed_references(jq, packed(args["k"]), packed(args["v"]), jnp.zeros_like(jq),
                                 _cu([9, 10]), _cu([20, 16]))
  numerics.assert_output("out", jnp.asarray(plain.numpy()), lowp[0], ref[0])
  args["q"] = args["q"].clone().requires_grad_()
  out = torch_bridge.flash_attn_varlen_func(**args)
  torch.testing.assert_close(out.detach(), plain, rtol=0, atol=0)
  with pytest.raises(NotImplementedError, match="block_table"):
    out.sum().backward()
  with torch.no_grad():
    torch.testing.assert_close(torch_bridge.flash_attn_varlen_func(**args), plain, rtol=0, atol=0)


@pytest.mark.parametrize("mutate,err,match", [
    (lambda a: dict(a, block_table=a["block_table"].long()), TypeError,
     "^block_table: expected dtype int32"),
    (lambda a: dict(a, block_table=[[0, 1], [2, 3]]), TypeError, "^block_table: expected an int32"),
    (lambda a: dict(a, block_table=a["block_table"][:, :1]), RuntimeError, "^block_table: 1 pages"),
    (lambda a: dict(a, block_table=torch.tensor([[0, 9], [2, 3]], dtype=torch.int32)), ValueError,
     r"^block_table: expected page indices in \[0, 5\)"),
    (lambda a: dict(a, k=torch.ones(5, 24, 2, 16), v=torch.ones(5, 24, 2, 16)), ValueError,
     "^block_table: the page size"),
    (lambda a: dict(a, k=torch.ones(80, 2, 16)), ValueError, "^k: expected a 4-D array"),
    (lambda a: dict(a, dropout_p=0.1), ValueError, "^block_table: .*dropout_p=0"),
    (lambda a: dict(a, max_seqlen_k=16), ValueError, "^max_seqlen_k"),
])
def test_torch_bad_input(mutate, err, match):
  import torch_bridge

  with pytest.raises(err, match=match):
    torch_bridge.flash_attn_varlen_func(**mutate(_torch_args()))


@pytest.mark.gpu
@pytest.mark.parametrize("page", [16, 256])
def test_paged_parity_gpu(page):
  test_paged_parity([300, 1, 700, 0], [900, 256, 700, 33], 8, 2, 128, page, dict(causal=True),
                    "bfloat16")
