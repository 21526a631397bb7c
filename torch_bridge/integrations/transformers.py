"""transformers integration: `register()` adds `attn_implementation="pallas_attn"`.

transformers calls an attention function per layer as
`fn(module, query, key, value, attention_mask, dropout=, scaling=, sliding_window=, softcap=,
is_causal=, s_aux=, **kwargs)` with query (batch, nheads, seqlen_q, headdim) and key/value
(batch, nheads_k, seqlen_k, headdim), and builds `attention_mask` with the mask function
registered under the same name. Ours is transformers' own `flash_attention_mask`: None when nothing
is padded, else the (batch, seqlen_k) bool padding mask. So the mapping onto our functions is the
FlashAttention-2 one: no mask -> flash_attn_func; a padding mask -> unpad, flash_attn_varlen_func,
pad back; packed sequences (cu_seq_lens_* kwargs, as transformers' padding-free training passes
them) -> flash_attn_varlen_func directly. Sinks (gpt-oss's `s_aux`, one logit per head) go to the
FA2 sink functions.

The name avoids "flash": transformers treats any implementation whose name contains it as a request
for a hub kernel.
"""
from __future__ import annotations

import torch

from torch_bridge import bert_padding
from torch_bridge.flash_attn import flash_attn_func
from torch_bridge.flash_attn_varlen import flash_attn_varlen_func
from torch_bridge.sink import fa2_func_with_sink, fa2_varlen_func_with_sink

NAME = "pallas_attn"


def _window(sliding_window, key_length):
  # transformers' windows count the current token (a window of 4 sees 3 earlier tokens); flash-attn's
  # bounds are inclusive distances. Symmetric as in transformers' flash path; causal zeroes the right.
  if sliding_window is None or key_length <= sliding_window:
    return (-1, -1)
  return (sliding_window - 1, sliding_window - 1)


def _unpad(query, key, value, mask):
  """transformers' FA2 unpadding for a (batch, seqlen_k) mask: keys by the mask; queries by the
  mask too (prefill), one per row (decoding), or by the mask's last seqlen_q columns (a chunk after
  a cache, which assumes left padding, as transformers does)."""
  if mask.dim() != 2 or mask.shape[0] != key.shape[0]:
    raise ValueError(f"attention_mask: expected the (batch, seqlen_k) padding mask that the "
                     f"'{NAME}' mask function builds, got shape {tuple(mask.shape)}; a custom 4-D mask "
                     f"needs attn_implementation='sdpa' or 'eager'")
  batch, q_len = query.shape[:2]
  if key.shape[1] > mask.shape[1]:  # static caches hold more slots than the mask covers
    key, value = key[:, :mask.shape[1]], value[:, :mask.shape[1]]
  k, idx_k, cu_k, max_k, _ = bert_padding.unpad_input(key, mask)
  v = bert_padding.index_first_axis(value.reshape(-1, *value.shape[2:]), idx_k)
  if q_len == key.shape[1]:
    q = bert_padding.index_first_axis(query.reshape(-1, *query.shape[2:]), idx_k)
    idx_q, cu_q, max_q = idx_k, cu_k, max_k
  elif q_len == 1:
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=query.device)
    q, idx_q, max_q = query.reshape(batch, *query.shape[2:]), cu_q[:-1], 1
  else:
    q, idx_q, cu_q, max_q, _ = bert_padding.unpad_input(query, mask[:, -q_len:])
  return q, k, v, idx_q, (cu_q, cu_k), (max_q, max_k)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      sliding_window=None, softcap=None, is_causal=None, s_aux=None, **kwargs):
  """transformers' attention-function interface over our kernels; returns (out, None) with out
  (batch, seqlen_q, nheads, headdim), as transformers' own flash and SDPA functions do."""
  if kwargs.get("output_attentions", False):
    raise ValueError(f"output_attentions: the '{NAME}' attention never materializes the weights; "
                     "expected False, got True (use attn_implementation='eager')")
  # Bottom-right causal, as flash-attn aligns it: a decoding step's single query (the newest token)
  # sees every cached key, so causal can stay on there.
  causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
  query, key, value = (x.transpose(1, 2) for x in (query, key, value))  # (batch, seqlen, heads, d)
  q_len = query.shape[1]
  options = dict(dropout_p=float(dropout), softmax_scale=scaling, causal=causal,
                 window_size=_window(sliding_window, key.shape[1]), softcap=float(softcap or 0.0))
  sink = None
  if s_aux is not None:
    # One sink logit per query head ("sh" layout, one sink); fp32 as the kernels take it.
    sink = s_aux.float().reshape(1, query.shape[2])
  cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
  max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")

  def varlen(q, k, v, cu, maxlen):
    cu = tuple(c.to(torch.int32) for c in cu)
    maxlen = tuple(int(m) for m in maxlen)
    if sink is None:
      return flash_attn_varlen_func(q, k, v, *cu, *maxlen, **options)
    return fa2_varlen_func_with_sink(q, k, v, *cu, *maxlen, sink=sink, **options)

  if attention_mask is not None:
    q, k, v, idx_q, cu, maxlen = _unpad(query, key, value, attention_mask)
    out = bert_padding.pad_input(varlen(q, k, v, cu, maxlen), idx_q, query.shape[0], q_len)
  elif None not in (cu_q, cu_k, max_q, max_k):
    flat = lambda x: x.reshape(-1, *x.shape[2:])
    out = varlen(flat(query), flat(key), flat(value), (cu_q, cu_k), (max_q, max_k))
    out = out.view(query.shape[0], -1, *out.shape[1:])
  elif sink is None:
    out = flash_attn_func(query, key, value, **options)
  else:
    out = fa2_func_with_sink(query, key, value, sink=sink, **options)
  return out, None


def register(name: str = NAME) -> str:
  """Registers the attention function and its mask function with transformers' AttentionInterface
  and AttentionMaskInterface under `name`; returns the name to pass as attn_implementation."""
  if "flash" in name:
    raise ValueError(f"name: transformers loads a hub kernel for any attention implementation whose "
                     f"name contains 'flash'; expected another name, got {name!r}")
  from transformers import AttentionInterface  # pylint: disable=g-import-not-at-top
  from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask  # pylint: disable=g-import-not-at-top
  AttentionInterface.register(name, attention_forward)
  AttentionMaskInterface.register(name, flash_attention_mask)
  return name
