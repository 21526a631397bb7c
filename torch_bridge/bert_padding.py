"""flash_attn.bert_padding on the torch face: flash-attn 2.8's padding helpers for the varlen path.

Plain torch indexing, so autograd needs no custom Function: gathering rows (`x[indices]`) has the
scatter of the gradient as its backward, and `index_put` the gather. Returns follow 2.8:
`unpad_input` gives 5 values (the last one, used_seqlens, counts only `attention_mask`'s tokens),
`unpad_input_for_concatenated_sequences` gives 4.
"""
from __future__ import annotations

import torch

from torch_bridge import compat


def _require_2d(name, x, batch_seq):
  if not isinstance(x, torch.Tensor) or x.dim() != 2 or tuple(x.shape) != tuple(batch_seq):
    got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
    raise ValueError(f"{name}: expected a tensor of shape (batch, seqlen) = {tuple(batch_seq)}, got {got}")


def _require_indices(indices):
  if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.is_floating_point():
    got = (f"{indices.dtype} of shape {tuple(indices.shape)}" if isinstance(indices, torch.Tensor)
           else type(indices).__name__)
    raise ValueError(f"indices: expected a 1-D integer tensor, got {got}")


def index_first_axis(input, indices):  # pylint: disable=redefined-builtin  (flash-attn's name)
  """input[indices] for input (first_axis_dim, ...) and indices (n,): (n, ...)."""
  if not isinstance(input, torch.Tensor) or input.dim() < 2:
    raise ValueError(f"input: expected a tensor with at least 2 dimensions, got "
                     f"{tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__}")
  _require_indices(indices)
  return input[indices]


def index_put_first_axis(values, indices, first_axis_dim):
  """A zero tensor (first_axis_dim, ...) with row indices[i] set to values[i]."""
  if not isinstance(values, torch.Tensor) or values.dim() < 2:
    raise ValueError(f"values: expected a tensor with at least 2 dimensions, got "
                     f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}")
  _require_indices(indices)
  if indices.shape[0] != values.shape[0]:
    raise ValueError(f"indices: expected {values.shape[0]} entries (values' first axis), got "
                     f"{indices.shape[0]}")
  out = values.new_zeros((first_axis_dim, *values.shape[1:]))
  return out.index_put((indices,), values)


def _cu_seqlens(seqlens):
  return torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))


def unpad_input(hidden_states, attention_mask, unused_mask=None):
  """The tokens of a padded batch, packed along one axis for the varlen functions.

  Arguments:
    hidden_states: (batch, seqlen, ...).
    attention_mask: (batch, seqlen) bool or int, nonzero marks a valid token.
    unused_mask: optional (batch, seqlen): tokens allocated but unused; they are packed too (and
      counted in cu_seqlens) but not in used_seqlens.
  Returns:
    (hidden_states (total_nnz, ...), indices (total_nnz,) into the flattened batch, cu_seqlens
    (batch + 1,) int32, max_seqlen_in_batch (a Python int), used_seqlens_in_batch (batch,) int32).
  """
  if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() < 2:
    raise ValueError("hidden_states: expected a tensor (batch, seqlen, ...), got "
                     f"{tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states).__name__}")
  _require_2d("attention_mask", attention_mask, hidden_states.shape[:2])
  all_masks = attention_mask
  if unused_mask is not None:
    _require_2d("unused_mask", unused_mask, hidden_states.shape[:2])
    all_masks = attention_mask.int() + unused_mask.int()
  seqlens = all_masks.sum(dim=-1, dtype=torch.int32)
  used_seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)
  indices = torch.nonzero(all_masks.flatten(), as_tuple=False).flatten()
  max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
  flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
  return flat[indices], indices, _cu_seqlens(seqlens), max_seqlen, used_seqlens


def unpad_input_for_concatenated_sequences(hidden_states, attention_mask_in_length):
  """unpad_input for rows that each hold several samples back to back.

  attention_mask_in_length (batch, seqlen) int: row b's nonzero entries, in order, are the lengths
  of the samples concatenated at the start of row b (e.g. [2, 3, 0, 0, 0, 0]: a sample of 2 tokens,
  then one of 3, then a padding token). Returns (hidden_states (total_nnz, ...), indices,
  cu_seqlens (num_samples + 1,) int32 with one entry per sample, max_seqlen_in_batch).
  """
  if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() < 2:
    raise ValueError("hidden_states: expected a tensor (batch, seqlen, ...)")
  _require_2d("attention_mask_in_length", attention_mask_in_length, hidden_states.shape[:2])
  lengths = attention_mask_in_length
  seqlen = lengths.shape[1]
  valid = torch.arange(seqlen, device=lengths.device)[None, :] < lengths.sum(dim=-1, keepdim=True)
  flat_lengths = lengths.flatten()
  seqlens = flat_lengths[flat_lengths != 0].to(torch.int32)
  indices = torch.nonzero(valid.flatten(), as_tuple=False).flatten()
  max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
  flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
  return flat[indices], indices, _cu_seqlens(seqlens), max_seqlen


def pad_input(hidden_states, indices, batch, seqlen):
  """The inverse of unpad_input: (total_nnz, ...) rows back into a zero-padded (batch, seqlen, ...)."""
  out = index_put_first_axis(hidden_states, indices, batch * seqlen)
  return out.view(batch, seqlen, *hidden_states.shape[1:])


_PUBLIC = dict(index_first_axis=index_first_axis, index_put_first_axis=index_put_first_axis,
               unpad_input=unpad_input, pad_input=pad_input,
               unpad_input_for_concatenated_sequences=unpad_input_for_concatenated_sequences)
compat.register("flash_attn.bert_padding", **_PUBLIC)
