"""FlashAttention-2's dense API on the torch face: flash-attn 2.8's names, arguments and returns.

Two custom ops carry the work (`pallas_attn::flash_attn_fwd` / `flash_attn_bwd`, backed by
pallas_attn.flash's jitted forward and backward); the public functions only unpack packed layouts
and shape the return value, so torch.compile sees a single opaque node per call.

Dropout: the public functions draw an int32 (1,) seed from torch's default generator on the tensors'
device (so torch.manual_seed reproduces a run) and pass it to the ops as the tensor `seed`; the keep
mask is a pure function of (seed, batch, head, i, j) (pallas_attn/dropout.py), so the backward op
replays it from the saved seed. S_dmask comes from a third op, `pallas_attn::flash_attn_s_dmask`.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import torch

from pallas_attn import flash, flash_attn as jax_flash_attn
from torch_bridge import _buckets, _dlpack, _ops, compat

_FWD_ARGS = ("Tensor q, Tensor k, Tensor v, Tensor? alibi_slopes, float dropout_p, float? softmax_scale, "
             "bool causal, int window_left, int window_right, float softcap, Tensor? seed")


def _prepare(q, k, v, alibi_slopes, dropout_p, softmax_scale, causal, window_left, window_right,
             softcap):
  """The kernel spec of one static configuration, validated by pallas_attn's own checks."""
  spec, _ = jax_flash_attn.prepare(q, k, v, dropout_p, softmax_scale, causal,
                                   (window_left, window_right), softcap, alibi_slopes)
  return spec, None  # (spec, tile configs: None = the tuned table)


def check_seed(dropout_p, seed):
  """The ops' `seed` operand: required (int32, shape (1,)) with dropout, ignored without."""
  if dropout_p > 0 and seed is None:
    raise ValueError("seed: dropout_p > 0 needs an int32 seed tensor of shape (1,), got None")
  if seed is not None and (seed.dtype != torch.int32 or tuple(seed.shape) != (1,)):
    raise TypeError(f"seed: expected an int32 tensor of shape (1,), got {seed.dtype} of shape "
                    f"{tuple(seed.shape)}")


def check_s_dmask(dropout_p, seed):
  """The S_dmask ops' arguments: only with dropout (there is no mask without it)."""
  if not dropout_p > 0 or seed is None:
    raise ValueError(f"dropout_p: S_dmask exists only with dropout (dropout_p > 0 and a seed), got "
                     f"dropout_p={dropout_p!r}")
  check_seed(dropout_p, seed)


def dropout_seed(dropout_p, device):
  """The kernels' int32 (1,) seed drawn from torch's default generator for `device` (None without
  dropout). Drawn as a tensor on the device, so neither a host sync nor a torch.compile graph break."""
  if not dropout_p > 0:
    return None
  return torch.randint(-2 ** 31, 2 ** 31, (1,), dtype=torch.int64, device=device).to(torch.int32)


def _alibi_rows(alibi_slopes, q):
  """(nheads,) or (batch, nheads) slopes as the kernels' (batch, nheads, 1) rows."""
  if alibi_slopes is None:
    return None
  b, _, h, _ = q.shape
  return alibi_slopes.expand(b, h).unsqueeze(-1)


def _fwd_outputs(q, *_):
  b, sq, h, _ = q.shape
  return [(q.shape, q.dtype), ((b, h, sq), torch.float32)]


# pallas_attn.flash takes the seed after its static arguments; these put it in the bridge's order
# (operands, outputs, static). The jitted callees do the donating.
def _forward_into(q, k, v, alibi, seed, out, lse, kernel_spec, cfgs):
  return flash.forward_into(q, k, v, alibi, out, lse, kernel_spec, cfgs, None, None, seed)


def _forward(q, k, v, alibi, seed, kernel_spec, cfgs):
  return flash.forward(q, k, v, alibi, kernel_spec, cfgs, None, None, seed)


def _backward_into(q, k, v, alibi, seed, out, lse, dout, dlse, dq, dk, dv, kernel_spec, cfgs):
  return flash.backward_into(q, k, v, alibi, out, lse, dout, dlse, dq, dk, dv, kernel_spec, cfgs,
                             None, None, seed)


def _backward(q, k, v, alibi, seed, out, lse, dout, dlse, kernel_spec, cfgs):
  return flash.backward(q, k, v, alibi, out, lse, dout, dlse, kernel_spec, cfgs, None, None, seed)


FLASH = _ops.OpDesc(
    "flash_attn_fwd", _FWD_ARGS, outputs=_fwd_outputs,
    static=_ops.Spec(_prepare, host=("alibi_slopes",), check=check_seed),
    operands=("q", "k", "v", (_alibi_rows, "alibi_slopes", "q"), "seed"),
    forward=_dlpack.Kernel(into=_forward_into, plain=_forward),
    backward=_dlpack.Kernel(into=_backward_into, plain=_backward), wrt=("q", "k", "v"))
_FLASH = _ops.build(FLASH)
_attention_op = _FLASH.call


# S_dmask: the forward op's arguments after its lse; computed by pallas_attn's own s_dmask (the
# kernels' keep mask, P from the kernels' lse), so the debugging output cannot drift from the kernel.
@functools.partial(jax.jit, static_argnums=(5, 6))
def _s_dmask(q, k, alibi, lse, seed, kernel_spec, cfgs):
  del cfgs
  return (jax_flash_attn.s_dmask(q, k, lse, kernel_spec, alibi, seed),)


# The output buffer is never read; keep_unused keeps its donation, so XLA can write into it.
@functools.partial(jax.jit, static_argnums=(6, 7), donate_argnums=5, keep_unused=True)
def _s_dmask_into(q, k, alibi, lse, seed, out, kernel_spec, cfgs):
  del out, cfgs
  return (jax_flash_attn.s_dmask(q, k, lse, kernel_spec, alibi, seed),)


def _s_dmask_outputs(lse, q, k, *_):
  b, sq, h, _ = q.shape
  return [((b, h, sq, k.shape[1]), q.dtype)]


_s_dmask_op = _ops.build(_ops.OpDesc(
    "flash_attn_s_dmask", f"Tensor softmax_lse, {_FWD_ARGS}", outputs=_s_dmask_outputs,
    output_names=("S_dmask",),
    static=_ops.Spec(_prepare, host=("alibi_slopes",), check=check_s_dmask),
    operands=("q", "k", (_alibi_rows, "alibi_slopes", "q"), "softmax_lse", "seed"),
    forward=_dlpack.Kernel(into=_s_dmask_into, plain=_s_dmask))).call




def _window(window_size):
  """(left, right) as ints from any sequence of two ints: a tuple, a list, a numpy array or a tensor
  (flash-attn's own tests pass `torch.tensor([left, right])`)."""
  if isinstance(window_size, torch.Tensor):
    if window_size.shape != (2,) or window_size.is_floating_point() or window_size.is_complex():
      raise ValueError(f"window_size: expected a pair (left, right) of ints, got a {window_size.dtype} "
                       f"tensor of shape {tuple(window_size.shape)}")
    window_size = window_size.tolist()
  try:
    left, right = window_size
  except (TypeError, ValueError):
    raise ValueError(f"window_size: expected a pair (left, right) of ints, got {window_size!r}") from None
  if not all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) for w in (left, right)):
    raise ValueError(f"window_size: expected a pair (left, right) of ints, got {window_size!r}")
  return int(left), int(right)


def attn_probs(op, lse, args):
  """S_dmask of a call whose forward op took `args` (ending in the seed): empty without dropout,
  else computed by the S_dmask op `op` (not differentiable: a debugging output)."""
  q, seed = args[0], args[-1]
  if seed is None:
    return torch.empty(0, dtype=q.dtype, device=q.device)
  return op(lse.detach(), *(a.detach() if isinstance(a, torch.Tensor) else a for a in args))


def op_args(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes):
  """The forward op's arguments after the public checks, with a freshly drawn dropout seed."""
  _ops.require_tensor("q", q, "(batch, seqlen_q, nheads, headdim)")
  _ops.require_tensor("k", k, "(batch, seqlen_k, nheads_k, headdim)")
  _ops.require_tensor("v", v, "(batch, seqlen_k, nheads_k, headdim)")
  if alibi_slopes is not None:
    _ops.require_tensor("alibi_slopes", alibi_slopes, "(nheads,) or (batch, nheads)")
  left, right = _window(window_size)
  dropout_p = float(dropout_p)
  return (q, k, v, alibi_slopes, dropout_p, None if softmax_scale is None else float(softmax_scale),
          bool(causal), left, right, float(softcap), dropout_seed(dropout_p, q.device))


BUCKETS = _buckets.Buckets()


def _length_config(q, k, v, alibi_slopes, rest):
  """Everything of a call's static configuration but its sequence lengths."""
  b, _, h, d = q.shape
  return (b, h, d, tuple(k.shape[2:]), v.shape[-1], q.dtype, k.dtype, q.device, q.requires_grad,
          None if alibi_slopes is None else (tuple(alibi_slopes.shape), alibi_slopes.dtype), rest)


def bucketed(q, k, v, alibi_slopes, softmax_scale, causal, left, right, softcap, varlen_op):
  """(out, lse) of a call without dropout run padded to its bucket lengths: the batch flattened to
  equal-length sequences (a view), padded at the end to the bucket of its token count, through the
  varlen op `varlen_op`, whose kernels read the real lengths from cu_seqlens; out comes back as a
  view of the padded rows, lse as a (batch, nheads, seqlen_q) view of varlen's (nheads, total_q).
  Autograd runs through the padding and the views (torch's own ops)."""
  b, sq, h, d = q.shape
  sk = k.shape[1]
  n_q, n_k = b * sq, b * sk
  pad = lambda x, n, rows: torch.nn.functional.pad(x.reshape(n, *x.shape[2:]),
                                                   (0, 0, 0, 0, 0, _buckets.bucket(n) - n))
  cu_q = torch.arange(0, n_q + 1, sq, dtype=torch.int32, device=q.device)
  cu_k = torch.arange(0, n_k + 1, sk, dtype=torch.int32, device=q.device)
  out, lse = varlen_op(pad(q, n_q, sq), pad(k, n_k, sk), pad(v, n_k, sk), cu_q, cu_k, sq, sk,
                       alibi_slopes, 0.0, softmax_scale, causal, left, right, softcap, None)
  return out[:n_q].view(b, sq, h, -1), lse[:, :n_q].view(h, b, sq).transpose(0, 1)


def _pads(args, extra=()) -> bool:
  """Whether a call with the forward op's `args` runs padded to its buckets (`extra`: further
  static arguments that key the configuration, e.g. whether sinks come along)."""
  q, k = args[0], args[1]
  if args[-1] is not None or torch.compiler.is_compiling() or 0 in (q.shape[1], k.shape[1]) \
      or q.dim() != 4 or k.dim() != 4:
    return False  # dropout (its keep mask hashes batch rows), compiled graphs, empty calls: exact
  return BUCKETS.padded(_length_config(q, k, args[2], args[3], (args[4:10], extra)),
                        (q.shape[1], k.shape[1]))


def _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
               return_attn_probs):
  args = op_args(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes)
  if _pads(args):
    from torch_bridge import flash_attn_varlen  # pylint: disable=g-import-not-at-top  (imports this)
    out, lse = bucketed(*args[:4], *args[5:10], varlen_op=flash_attn_varlen._varlen_op)  # pylint: disable=protected-access
    if return_attn_probs:
      return out, lse.contiguous(), torch.empty(0, dtype=q.dtype, device=q.device)
    return out
  out, lse = _attention_op(*args)
  if return_attn_probs:
    return out, lse, attn_probs(_s_dmask_op, lse, args)
  return out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
  """softmax(q k^T * softmax_scale) v, computed blockwise without materializing the scores.

  MQA/GQA: k and v may have fewer heads than q (nheads a multiple of nheads_k); query head h reads
  kv head h // (nheads // nheads_k). With 6 query heads and 2 kv heads, heads 0-2 read kv head 0.

  causal is aligned to the bottom-right corner of the score matrix. seqlen_q=2, seqlen_k=5:
      1 1 1 1 0
      1 1 1 1 1
  seqlen_q=5, seqlen_k=2:
      0 0
      0 0
      0 0
      1 0
      1 1
  A row with no visible key gives out 0 (and softmax_lse +inf).

  window_size=(left, right) != (-1, -1): query i sees keys in
  [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]; -1 is unbounded on that side.

  Arguments:
    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim). float16,
      bfloat16 or float32, all on one device (CUDA: the current device; CPU tensors run the
      kernels in Pallas interpret mode). headdim <= 256.
    dropout_p: probability of dropping each attention probability (kept ones are scaled by
      1 / (1 - dropout_p)). The seed is drawn from torch's default generator on the tensors' device,
      so torch.manual_seed reproduces a run bit for bit; the backward replays the same keep mask.
      Pass 0.0 for evaluation, as with flash-attn.
    softmax_scale: default 1 / sqrt(headdim).
    causal: bottom-right aligned causal mask (see above).
    window_size: (left, right) sliding window.
    softcap: > 0 applies softcap * tanh(scores / softcap) before ALiBi and masking.
    alibi_slopes: (nheads,) or (batch, nheads) float32; adds -slope * |i + seqlen_k - seqlen_q - j|.
    deterministic: accepted; the backward is always deterministic.
    return_attn_probs: also return softmax_lse and S_dmask.
  Returns:
    out (batch, seqlen_q, nheads, headdim), or with return_attn_probs (out, softmax_lse, S_dmask):
    softmax_lse (batch, nheads, seqlen_q) float32, the natural-log logsumexp of each row's scores
    (differentiable, taken before dropout), and S_dmask: an empty tensor without dropout, else
    (batch, nheads, seqlen_q, seqlen_k) in q's dtype holding the normalized probabilities P with the
    dropped entries negated (not differentiable; flash-attn pads its shape to multiples of 128 and
    stores unnormalized values, this does not).
  """
  del deterministic
  return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                    return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):
  """flash_attn_func with qkv (batch, seqlen, 3, nheads, headdim) stacked; same arguments and returns.

  The gradient of qkv comes back as one (batch, seqlen, 3, nheads, headdim) tensor.
  """
  del deterministic
  _ops.require_tensor("qkv", qkv, "(batch, seqlen, 3, nheads, headdim)")
  if qkv.dim() != 5 or qkv.shape[2] != 3:
    raise ValueError(f"qkv: expected shape (batch, seqlen, 3, nheads, headdim), got {tuple(qkv.shape)}")
  q, k, v = qkv.unbind(2)
  return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                    return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False):
  """flash_attn_func with kv (batch, seqlen_k, 2, nheads_k, headdim) stacked; same arguments and returns."""
  del deterministic
  _ops.require_tensor("kv", kv, "(batch, seqlen_k, 2, nheads_k, headdim)")
  if kv.dim() != 5 or kv.shape[2] != 2:
    raise ValueError(f"kv: expected shape (batch, seqlen_k, 2, nheads_k, headdim), got {tuple(kv.shape)}")
  k, v = kv.unbind(2)
  return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                    return_attn_probs)


_PUBLIC = dict(flash_attn_func=flash_attn_func, flash_attn_qkvpacked_func=flash_attn_qkvpacked_func,
               flash_attn_kvpacked_func=flash_attn_kvpacked_func)
# __version__: the flash-attn API level mirrored here, for callers that gate features on it.
compat.register("flash_attn", __version__="2.8.0", **_PUBLIC)
compat.register("flash_attn.flash_attn_interface", **_PUBLIC)
