"""Argument validation with messages that name the argument, what was expected and what was given."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)
MAX_HEAD_DIM = 256


class CapacityError(RuntimeError, ValueError):
  """Lengths past what a block table holds (paged KV cache and paged varlen).

  A RuntimeError, which is what flash-attn raises there, and also a ValueError, what this package
  raises for every other bad value (as numpy's AxisError is both a ValueError and an IndexError).
  """


def _dtype_name(x) -> str:
  return str(np.dtype(x.dtype)) if hasattr(x, "dtype") else type(x).__name__


def require_array(name: str, x, ndim: int, layout: str):
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name}: expected an array of shape {layout}, got {type(x).__name__}")
  if x.ndim != ndim:
    raise ValueError(f"{name}: expected a {ndim}-D array {layout}, got shape {tuple(x.shape)}")
  if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in FLOAT_DTYPES]:
    raise TypeError(f"{name}: expected dtype float16, bfloat16 or float32, got {_dtype_name(x)}")


def require_same_dtype(**arrays):
  names = list(arrays)
  first = arrays[names[0]]
  for n in names[1:]:
    if jnp.dtype(arrays[n].dtype) != jnp.dtype(first.dtype):
      raise TypeError(f"{n}: expected dtype {_dtype_name(first)} (the dtype of {names[0]}), "
                      f"got {_dtype_name(arrays[n])}")


def check_qkv(q, k, v):
  """q (b, sq, H, d), k/v (b, sk, Hk, d) with H % Hk == 0 and d <= 256."""
  require_array("q", q, 4, "(batch, seqlen_q, nheads, headdim)")
  require_array("k", k, 4, "(batch, seqlen_k, nheads_k, headdim)")
  require_array("v", v, 4, "(batch, seqlen_k, nheads_k, headdim)")
  require_same_dtype(q=q, k=k, v=v)
  b, _, h, d = q.shape
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"k: expected shape ({b}, seqlen_k, nheads_k, {d}) to match q {tuple(q.shape)}, "
                     f"got {tuple(k.shape)}")
  if tuple(v.shape) != tuple(k.shape):
    raise ValueError(f"v: expected shape {tuple(k.shape)} (the shape of k), got {tuple(v.shape)}")
  if h % k.shape[2] != 0:
    raise ValueError(f"k: nheads ({h}) must be a multiple of nheads_k, got nheads_k={k.shape[2]}")
  if not 0 < d <= MAX_HEAD_DIM:
    raise ValueError(f"q: expected head dim in [1, {MAX_HEAD_DIM}], got {d}")
  if q.shape[1] == 0 or k.shape[1] == 0:
    raise ValueError(f"q/k: expected non-empty sequences, got seqlen_q={q.shape[1]}, seqlen_k={k.shape[1]}")


def check_options(*, dropout_p, softmax_scale, window_size, softcap, alibi_slopes, batch, nheads):
  if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
    raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
  if softmax_scale is not None and not isinstance(softmax_scale, (int, float)):
    raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}")
  if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
      or not all(isinstance(w, (int, np.integer)) and w >= -1 for w in window_size)):
    raise ValueError(f"window_size: expected a pair of ints >= -1 (-1 = unbounded), got {window_size!r}")
  if not isinstance(softcap, (int, float)) or softcap < 0:
    raise ValueError(f"softcap: expected a float >= 0 (0 disables it), got {softcap!r}")
  if alibi_slopes is not None:
    shape = tuple(getattr(alibi_slopes, "shape", ()))
    if shape not in ((nheads,), (batch, nheads)):
      raise ValueError(f"alibi_slopes: expected shape ({nheads},) or ({batch}, {nheads}), got {shape}")
    if jnp.dtype(alibi_slopes.dtype) != jnp.float32:
      raise TypeError(f"alibi_slopes: expected dtype float32, got {_dtype_name(alibi_slopes)}")


def check_qkv_varlen(q, k, v):
  """q (total_q, H, d), k/v (total_k, Hk, d) with H % Hk == 0 and d <= 256."""
  require_array("q", q, 3, "(total_q, nheads, headdim)")
  require_array("k", k, 3, "(total_k, nheads_k, headdim)")
  require_array("v", v, 3, "(total_k, nheads_k, headdim)")
  require_same_dtype(q=q, k=k, v=v)
  _, h, d = q.shape
  if k.shape[2] != d:
    raise ValueError(f"k: expected shape (total_k, nheads_k, {d}) to match q {tuple(q.shape)}, "
                     f"got {tuple(k.shape)}")
  if tuple(v.shape) != tuple(k.shape):
    raise ValueError(f"v: expected shape {tuple(k.shape)} (the shape of k), got {tuple(v.shape)}")
  if h % k.shape[1] != 0:
    raise ValueError(f"k: nheads ({h}) must be a multiple of nheads_k, got nheads_k={k.shape[1]}")
  if not 0 < d <= MAX_HEAD_DIM:
    raise ValueError(f"q: expected head dim in [1, {MAX_HEAD_DIM}], got {d}")


def check_cu_seqlens(name: str, cu, total: int, batch: int | None = None, rows: str = "") -> int:
  """cu_seqlens: int32 (b + 1,), starting at 0, non-decreasing, ending at most at `total` rows.

  The value checks run only when cu is concrete (not traced under jit; the kernels clamp traced
  offsets instead). rows: what `total` counts, for the message ("q": the rows of q). Returns b.
  """
  if not hasattr(cu, "shape") or not hasattr(cu, "dtype"):
    raise TypeError(f"{name}: expected an int32 array of shape (batch + 1,), got {type(cu).__name__}")
  if jnp.dtype(cu.dtype) != jnp.int32:
    raise TypeError(f"{name}: expected dtype int32, got {_dtype_name(cu)}")
  if cu.ndim != 1 or cu.shape[0] < 2:
    raise ValueError(f"{name}: expected shape (batch + 1,) with batch >= 1, got {tuple(cu.shape)}")
  if batch is not None and cu.shape[0] != batch + 1:
    raise ValueError(f"{name}: expected shape ({batch + 1},) to match the other cu_seqlens, "
                     f"got {tuple(cu.shape)}")
  try:
    vals = np.asarray(cu)
  except Exception:  # noqa: BLE001  (a tracer: values unknown until run time)
    return cu.shape[0] - 1
  if vals[0] != 0 or np.any(np.diff(vals) < 0) or vals[-1] > total:
    what = f" (the rows of {rows})" if rows else ""
    raise ValueError(f"{name}: expected non-decreasing offsets from 0 to at most {total}{what}, got "
                     f"{vals.tolist() if vals.size <= 16 else str(vals[:16].tolist()) + '...'}")
  return cu.shape[0] - 1


def check_max_seqlen(name: str, value, cu) -> int:
  """A Python int >= every sequence length (checked when cu_seqlens is concrete)."""
  if not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}: expected a positive Python int, got {value!r}")
  try:
    vals = np.asarray(cu)
  except Exception:  # noqa: BLE001
    return int(value)
  longest = int(np.max(np.diff(vals)))
  if longest > value:
    raise ValueError(f"{name}: expected at least the longest sequence ({longest}), got {value}")
  return int(value)


def check_block_table(block_table, batch: int):
  """block_table: int32 (batch, max_num_blocks_per_seq) with at least one column."""
  if not hasattr(block_table, "shape") or not hasattr(block_table, "dtype"):
    raise TypeError(f"block_table: expected an int32 array (batch, max_num_blocks_per_seq), got "
                    f"{type(block_table).__name__}")
  if jnp.dtype(block_table.dtype) != jnp.int32:
    raise TypeError(f"block_table: expected dtype int32, got {_dtype_name(block_table)}")
  if block_table.ndim != 2 or block_table.shape[0] != batch or block_table.shape[1] == 0:
    raise ValueError(f"block_table: expected shape ({batch}, max_num_blocks_per_seq), got "
                     f"{tuple(block_table.shape)}")


def check_page_size(what: str, page: int) -> int:
  """flash-attn's page sizes (multiples of 256) and the powers of two >= 16 our kernels also take.

  what: how the error names the page size, argument first ("k_cache: page_block_size").
  """
  if not ((page >= 16 and page & (page - 1) == 0) or (page > 0 and page % 256 == 0)):
    raise ValueError(f"{what} must be a power of two >= 16 or a multiple of 256, got {page}")
  return page
