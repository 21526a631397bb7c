"""FlashAttention-2's varlen API on the torch face: flash-attn 2.8's names, arguments and returns.

Sequences are packed along the token axis: sequence s owns rows [cu_seqlens[s], cu_seqlens[s + 1]).
Two custom ops carry the work (`pallas_attn::flash_attn_varlen_fwd` / `flash_attn_varlen_bwd`,
backed by pallas_attn.flash's jitted forward and backward with the offsets as operands); the public
functions only check the offsets, unpack packed layouts and shape the return value. Paged keys
(block_table) take a third op, `flash_attn_varlen_paged_fwd`: forward only, as in flash-attn (its
autograd formula raises). Dropout is seeded
as on the dense face (torch_bridge/flash_attn.py); the keep mask hashes (sequence index, head, row,
column) with rows and columns counted within the sequence.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import torch

from pallas_attn import checks, flash
from pallas_attn.flash_attn_varlen import _check_block_table, prepare_varlen, s_dmask_varlen
from torch_bridge import _buckets, _dlpack, _ops, compat
from torch_bridge.flash_attn import _window, attn_probs, check_s_dmask, check_seed, dropout_seed


_FWD_ARGS = ("Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
            "int max_seqlen_k, Tensor? alibi_slopes, float dropout_p, float? softmax_scale, bool causal, "
            "int window_left, int window_right, float softcap, Tensor? seed")


def _prepare(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, dropout_p,
             softmax_scale, causal, window_left, window_right, softcap):
  """The kernel spec of one static configuration, validated by pallas_attn's own checks."""
  kernel_spec, _, _ = prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                     dropout_p, softmax_scale, causal, (window_left, window_right),
                                     softcap, alibi_slopes)
  return kernel_spec, None  # (spec, tile configs: None = the tuned table)


def _alibi_rows(alibi_slopes, q, cu_seqlens_q):
  """(nheads,) or (batch, nheads) slopes as the kernels' (batch, nheads, 1) rows."""
  if alibi_slopes is None:
    return None
  return alibi_slopes.expand(cu_seqlens_q.shape[0] - 1, q.shape[1]).unsqueeze(-1)


_ALIBI = (_alibi_rows, "alibi_slopes", "q", "cu_seqlens_q")


def _fwd_outputs(q, *_):
  total, h, _ = q.shape
  return [(q.shape, q.dtype), ((h, total), torch.float32)]


# pallas_attn.flash takes the offsets and the seed after its static arguments; these put them in the
# bridge's order (operands, outputs, static). The jitted callees do the donating.
def _forward_into(q, k, v, alibi, cu_q, cu_k, seed, out, lse, kernel_spec, cfgs):
  return flash.forward_into(q, k, v, alibi, out, lse, kernel_spec, cfgs, None, (cu_q, cu_k), seed)


def _forward(q, k, v, alibi, cu_q, cu_k, seed, kernel_spec, cfgs):
  return flash.forward(q, k, v, alibi, kernel_spec, cfgs, None, (cu_q, cu_k), seed)


def _backward_into(q, k, v, alibi, cu_q, cu_k, seed, out, lse, dout, dlse, dq, dk, dv, kernel_spec,
                   cfgs):
  return flash.backward_into(q, k, v, alibi, out, lse, dout, dlse, dq, dk, dv, kernel_spec, cfgs, None,
                             (cu_q, cu_k), seed)


def _backward(q, k, v, alibi, cu_q, cu_k, seed, out, lse, dout, dlse, kernel_spec, cfgs):
  return flash.backward(q, k, v, alibi, out, lse, dout, dlse, kernel_spec, cfgs, None, (cu_q, cu_k),
                        seed)


_OFFSETS = ("cu_seqlens_q", "cu_seqlens_k")
VARLEN = _ops.OpDesc(
    "flash_attn_varlen_fwd", _FWD_ARGS, outputs=_fwd_outputs,
    static=_ops.Spec(_prepare, host=("alibi_slopes",), offsets=_OFFSETS, check=check_seed),
    operands=("q", "k", "v", _ALIBI, "cu_seqlens_q", "cu_seqlens_k", "seed"),
    forward=_dlpack.Kernel(into=_forward_into, plain=_forward),
    backward=_dlpack.Kernel(into=_backward_into, plain=_backward), wrt=("q", "k", "v"))
_VARLEN = _ops.build(VARLEN)
_varlen_op = _VARLEN.call


# S_dmask: the forward op's arguments after its lse, computed by pallas_attn's s_dmask_varlen.
@functools.partial(jax.jit, static_argnums=(7, 8, 9))
def _s_dmask(q, k, alibi, cu_q, cu_k, lse, seed, kernel_spec, max_q, max_k):
  return (s_dmask_varlen(q, k, lse, cu_q, cu_k, max_q, max_k, kernel_spec, alibi, seed),)


# The output buffer is never read; keep_unused keeps its donation, so XLA can write into it.
@functools.partial(jax.jit, static_argnums=(8, 9, 10), donate_argnums=7, keep_unused=True)
def _s_dmask_into(q, k, alibi, cu_q, cu_k, lse, seed, out, kernel_spec, max_q, max_k):
  del out
  return (s_dmask_varlen(q, k, lse, cu_q, cu_k, max_q, max_k, kernel_spec, alibi, seed),)


@functools.wraps(_prepare)
def _s_dmask_prepare(**kw):
  return _prepare(**kw)[0], kw["max_seqlen_q"], kw["max_seqlen_k"]  # the unbucketed bounds size it


def _s_dmask_outputs(lse, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *_):
  return [((cu_seqlens_q.shape[0] - 1, q.shape[1], max_seqlen_q, max_seqlen_k), q.dtype)]


_s_dmask_op = _ops.build(_ops.OpDesc(
    "flash_attn_varlen_s_dmask", f"Tensor softmax_lse, {_FWD_ARGS}", outputs=_s_dmask_outputs,
    output_names=("S_dmask",),
    static=_ops.Spec(_s_dmask_prepare, host=("alibi_slopes",), offsets=_OFFSETS, check=check_s_dmask),
    operands=("q", "k", _ALIBI, "cu_seqlens_q", "cu_seqlens_k", "softmax_lse", "seed"),
    forward=_dlpack.Kernel(into=_s_dmask_into, plain=_s_dmask))).call


# Paged keys/values (block_table): forward only and without dropout, so no seed and no backward op.
_PAGED_ARGS = ("Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
               "Tensor block_table, int max_seqlen_q, int max_seqlen_k, Tensor? alibi_slopes, "
               "float? softmax_scale, bool causal, int window_left, int window_right, float softcap")


def _paged_prepare(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, max_seqlen_q, max_seqlen_k,
                   alibi_slopes, softmax_scale, causal, window_left, window_right, softcap):
  kernel_spec, _, _ = prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                     0.0, softmax_scale, causal, (window_left, window_right), softcap,
                                     alibi_slopes, block_table)
  return kernel_spec, None


def _paged_forward_into(q, k, v, alibi, cu_q, cu_k, table, out, lse, kernel_spec, cfgs):
  return flash.forward_into(q, k, v, alibi, out, lse, kernel_spec, cfgs, None, (cu_q, cu_k, table))


def _paged_forward(q, k, v, alibi, cu_q, cu_k, table, kernel_spec, cfgs):
  return flash.forward(q, k, v, alibi, kernel_spec, cfgs, None, (cu_q, cu_k, table))


# Inputs that require grad still get a forward (flash-attn's paged path works in eval code that
# forgot no_grad); only an actual backward through it fails, and says why.
_paged_fwd = _ops.build(_ops.OpDesc(
    "flash_attn_varlen_paged_fwd", _PAGED_ARGS, outputs=_fwd_outputs,
    static=_ops.Spec(_paged_prepare, host=("alibi_slopes",), offsets=(*_OFFSETS, "block_table")),
    operands=("q", "k", "v", _ALIBI, "cu_seqlens_q", "cu_seqlens_k", "block_table"),
    forward=_dlpack.Kernel(into=_paged_forward_into, plain=_paged_forward),
    forward_only="block_table: paged keys/values are forward-only, as in flash-attn; run the paged "
                 "call under torch.no_grad() or without block_table")).call


def _require_offsets(name, cu):
  """cu_seqlens must be int32 tensors, as in flash-attn (whose kernels read them as int32)."""
  if not isinstance(cu, torch.Tensor):
    raise TypeError(f"{name}: expected an int32 torch.Tensor of shape (batch + 1,), "
                    f"got {type(cu).__name__}")
  if cu.dtype != torch.int32:
    raise TypeError(f"{name}: expected dtype torch.int32, got {cu.dtype} (convert with .int())")


def _require_max_seqlen(name, value):
  # The bound sizes the kernel grid, so it has to be known on the host: a Python int.
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}: expected a positive Python int, got {value!r}")
  return int(value)


def _check_offset_values(names, cu_seqlens, totals, max_seqlens):
  """The offsets' values against the row counts and max_seqlen bounds, where that costs no sync.

  CUDA offsets are not read back (a device-to-host copy per call; flash-attn does not check them
  either), nor are offsets being traced by torch.compile.
  """
  if torch.compiler.is_compiling() or any(cu.device.type != "cpu" for cu in cu_seqlens):
    return
  batch = None
  for (cu_name, max_name), cu, total, bound, rows in zip(names, cu_seqlens, totals, max_seqlens,
                                                        ("q", "k")):
    values = cu.detach().numpy()
    batch = checks.check_cu_seqlens(cu_name, values, total, batch, rows)
    checks.check_max_seqlen(max_name, bound, values)


def _varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, names):
  """Checks what the op schema cannot say well; returns the max_seqlen bounds as ints.

  names: the caller's argument names ((cu_q, max_q), (cu_k, max_k)); the packed-qkv form has
  a single cu_seqlens and max_seqlen.
  """
  _ops.require_tensor("q", q, "(total_q, nheads, headdim)")
  _ops.require_tensor("k", k, "(total_k, nheads_k, headdim)")
  _ops.require_tensor("v", v, "(total_k, nheads_k, headdim)")
  (cu_q_name, max_q_name), (cu_k_name, max_k_name) = names
  _require_offsets(cu_q_name, cu_seqlens_q)
  _require_offsets(cu_k_name, cu_seqlens_k)
  max_q = _require_max_seqlen(max_q_name, max_seqlen_q)
  max_k = _require_max_seqlen(max_k_name, max_seqlen_k)
  if q.dim() == 3 and k.dim() == 3:
    _check_offset_values(names, (cu_seqlens_q, cu_seqlens_k), (q.shape[0], k.shape[0]),
                         (max_q, max_k))
  return max_q, max_k


_NAMES = (("cu_seqlens_q", "max_seqlen_q"), ("cu_seqlens_k", "max_seqlen_k"))


def _paged_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                softmax_scale, causal, window_size, softcap, alibi_slopes, block_table):
  """The paged forward op's arguments after the public checks (the op's static step checks shapes)."""
  if not isinstance(block_table, torch.Tensor):
    raise TypeError(f"block_table: expected an int32 torch.Tensor (batch, max_num_blocks_per_seq), "
                    f"got {type(block_table).__name__}")
  if float(dropout_p) != 0.0:
    raise ValueError(f"block_table: paged keys/values are a forward-only (inference) path without "
                     f"dropout; expected dropout_p=0, got {dropout_p!r}")
  _ops.require_tensor("q", q, "(total_q, nheads, headdim)")
  _ops.require_tensor("k", k, "(num_blocks, page_block_size, nheads_k, headdim)")
  _ops.require_tensor("v", v, "(num_blocks, page_block_size, nheads_k, headdim)")
  _require_offsets("cu_seqlens_q", cu_seqlens_q)
  _require_offsets("cu_seqlens_k", cu_seqlens_k)
  max_q = _require_max_seqlen("max_seqlen_q", max_seqlen_q)
  max_k = _require_max_seqlen("max_seqlen_k", max_seqlen_k)
  if alibi_slopes is not None:
    _ops.require_tensor("alibi_slopes", alibi_slopes, "(nheads,) or (batch, nheads)")
  tensors = (cu_seqlens_q, cu_seqlens_k, block_table)
  if (not torch.compiler.is_compiling() and all(t.device.type == "cpu" for t in tensors)
      and q.dim() == 3 and k.dim() == 4 and block_table.dim() == 2
      and block_table.dtype == torch.int32):
    # Values, where reading them costs no device sync (see _check_offset_values).
    cu_q, cu_k = cu_seqlens_q.detach().numpy(), cu_seqlens_k.detach().numpy()
    batch = checks.check_cu_seqlens("cu_seqlens_q", cu_q, q.shape[0], rows="q")
    checks.check_max_seqlen("max_seqlen_q", max_q, cu_q)
    if block_table.shape[0] == batch and block_table.shape[1] > 0 and k.shape[1] > 0:
      _check_block_table(block_table.detach().numpy(), batch, k.shape[0], k.shape[1], cu_k)
      checks.check_max_seqlen("max_seqlen_k", max_k, cu_k)
  left, right = _window(window_size)
  return (q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, max_q, max_k, alibi_slopes,
          None if softmax_scale is None else float(softmax_scale), bool(causal), left, right,
          float(softcap))


def op_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
            softmax_scale, causal, window_size, softcap, alibi_slopes, block_table, names=_NAMES):
  """The forward op's arguments after the public checks, with a freshly drawn dropout seed."""
  if block_table is not None:
    # flash_attn_varlen_func routes paged calls to their own op; other callers (the sink family)
    # have no paged kernel on this face.
    raise NotImplementedError("block_table (paged keys/values) is supported by "
                              "flash_attn_varlen_func only")
  max_q, max_k = _varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, names)
  if alibi_slopes is not None:
    _ops.require_tensor("alibi_slopes", alibi_slopes, "(nheads,) or (batch, nheads)")
  left, right = _window(window_size)
  dropout_p = float(dropout_p)
  return (q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, alibi_slopes, dropout_p,
          None if softmax_scale is None else float(softmax_scale), bool(causal), left, right,
          float(softcap), dropout_seed(dropout_p, q.device))


BUCKETS = _buckets.Buckets()


def pad_tokens(x: torch.Tensor, n: int) -> torch.Tensor:
  """x (total, ...) with rows appended (zeros) up to n: rows past cu_seqlens[-1] belong to no
  sequence, so the kernels never read them, and their outputs are sliced off."""
  return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, n - x.shape[0]))


def padded_args(args, extra=()):
  """The varlen op's arguments with q, k, v padded to their token counts' buckets (see
  torch_bridge/_buckets.py), or None where the call keeps its exact shapes. `extra`: further
  static arguments that key the configuration (the sink layout)."""
  q, k, v = args[:3]
  if torch.compiler.is_compiling() or q.dim() != 3 or k.dim() != 3 or 0 in (q.shape[0], k.shape[0]):
    return None
  config = (tuple(q.shape[1:]), tuple(k.shape[1:]), v.shape[-1], q.dtype, k.dtype, q.device,
            q.requires_grad, tuple(args[3].shape), args[5], args[6],
            None if args[7] is None else (tuple(args[7].shape), args[7].dtype), args[8:14],
            args[14] is None, extra)
  if not BUCKETS.padded(config, (q.shape[0], k.shape[0])):
    return None
  n_q, n_k = _buckets.bucket(q.shape[0]), _buckets.bucket(k.shape[0])
  return (pad_tokens(q, n_q), pad_tokens(k, n_k), pad_tokens(v, n_k), *args[3:])


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
            softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs, block_table,
            names=_NAMES):
  if block_table is not None:
    out, lse = _paged_fwd(*_paged_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                       max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                                       softcap, alibi_slopes, block_table))
    if return_attn_probs:
      return out, lse, torch.empty(0, dtype=q.dtype, device=q.device)
    return out
  args = op_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                 softmax_scale, causal, window_size, softcap, alibi_slopes, block_table, names)
  padded = padded_args(args)
  if padded is not None:
    out, lse = _varlen_op(*padded)
    total = args[0].shape[0]
    if return_attn_probs:
      return out[:total], lse[:, :total].contiguous(), attn_probs(_s_dmask_op, lse, padded)
    return out[:total]
  out, lse = _varlen_op(*args)
  if return_attn_probs:
    return out, lse, attn_probs(_s_dmask_op, lse, args)
  return out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None):
  """flash_attn_func over sequences packed along the token axis.

  Sequence s owns query rows [cu_seqlens_q[s], cu_seqlens_q[s + 1]) and key rows
  [cu_seqlens_k[s], cu_seqlens_k[s + 1]); causal masks and windows are aligned to the bottom-right
  corner of each sequence's own score matrix. An empty sequence is allowed; a query row that sees no
  key gives out 0 and softmax_lse +inf.

  Arguments:
    q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim), nheads a multiple of nheads_k,
      or with block_table paged caches (num_blocks, page_block_size, nheads_k, headdim),
      page_block_size a power of two >= 16 or a multiple of 256.
      float16, bfloat16 or float32, all on one device (CUDA: the current device; CPU tensors run the
      kernels in Pallas interpret mode). headdim <= 256.
    cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) offsets, starting at 0 and non-decreasing
      (values are checked for CPU tensors only). With block_table, cu_seqlens_k gives only each
      sequence's key count.
    max_seqlen_q, max_seqlen_k: Python ints >= every sequence length. They are rounded up to a power
      of two for the compiled kernel, so a new value recompiles only when it crosses one.
    dropout_p: as flash_attn_func (seeded from torch's default generator; torch.manual_seed
      reproduces a run). The keep mask hashes (sequence index, head, row, column) with rows and
      columns counted within the sequence.
    softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic: as flash_attn_func;
      alibi_slopes (nheads,) or (batch, nheads) float32.
    return_attn_probs: also return softmax_lse and S_dmask.
    block_table: optional int32 (batch, max_num_blocks_per_seq): key p of sequence s is row
      p % page_block_size of page block_table[s, p // page_block_size]. Forward only, as in
      flash-attn: dropout_p must be 0, and a backward through the result raises
      NotImplementedError.
  Returns:
    out (total_q, nheads, headdim), or with return_attn_probs (out, softmax_lse, S_dmask):
    softmax_lse (nheads, total_q) float32 (differentiable), and S_dmask: an empty tensor without
    dropout, else (batch, nheads, max_seqlen_q, max_seqlen_k) in q's dtype, sequence s's
    probabilities P in [s, :, :seqlen_q, :seqlen_k] with dropped entries negated, zeros outside each
    sequence (not differentiable).
  """
  del deterministic
  return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                 softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs,
                 block_table)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                     causal=False, window_size=(-1, -1), softcap=0.0,
                                     alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
  """flash_attn_varlen_func with qkv (total, 3, nheads, headdim) and one set of offsets.

  The gradient of qkv comes back as one (total, 3, nheads, headdim) tensor.
  """
  del deterministic
  _ops.require_tensor("qkv", qkv, "(total, 3, nheads, headdim)")
  if qkv.dim() != 4 or qkv.shape[1] != 3:
    raise ValueError(f"qkv: expected shape (total, 3, nheads, headdim), got {tuple(qkv.shape)}")
  q, k, v = qkv.unbind(1)
  names = (("cu_seqlens", "max_seqlen"),) * 2
  return _varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                 causal, window_size, softcap, alibi_slopes, return_attn_probs, None, names)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None, causal=False,
                                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                    deterministic=False, return_attn_probs=False):
  """flash_attn_varlen_func with kv (total_k, 2, nheads_k, headdim); same arguments and returns."""
  del deterministic
  _ops.require_tensor("kv", kv, "(total_k, 2, nheads_k, headdim)")
  if kv.dim() != 4 or kv.shape[1] != 2:
    raise ValueError(f"kv: expected shape (total_k, 2, nheads_k, headdim), got {tuple(kv.shape)}")
  k, v = kv.unbind(1)
  return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                 softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs, None)


_PUBLIC = dict(flash_attn_varlen_func=flash_attn_varlen_func,
               flash_attn_varlen_qkvpacked_func=flash_attn_varlen_qkvpacked_func,
               flash_attn_varlen_kvpacked_func=flash_attn_varlen_kvpacked_func)
compat.register("flash_attn", **_PUBLIC)
compat.register("flash_attn.flash_attn_interface", **_PUBLIC)
