"""pallas-attn's torch face: the original libraries' torch APIs, computed by the JAX Pallas kernels.

Import this before JAX starts its GPU backend: it turns off JAX's GPU memory preallocation (unless
the XLA_PYTHON_CLIENT_* memory variables are set), so torch and JAX can share the card.
"""
from torch_bridge import _jax_env

_jax_env.configure()

# pylint: disable=g-import-not-at-top,wrong-import-position
from torch_bridge import compat
from torch_bridge import bert_padding  # noqa: F401  (registers flash_attn.bert_padding with compat)
from torch_bridge import flash_attn_private  # noqa: F401  (registers flash-attn's private entry points)
from torch_bridge import rotary  # noqa: F401  (registers flash_attn.layers.rotary with compat)
from torch_bridge import flash_dma  # noqa: F401  (registers flash_dma.fwd / bwd with compat)
from torch_bridge import landmark  # noqa: F401  (registers ltriton.flash_landmark_attention with compat)
from torch_bridge.flash_attn import flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func
from torch_bridge.flash_attn_varlen import (flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                                            flash_attn_varlen_qkvpacked_func)
from torch_bridge.kvcache import flash_attn_with_kvcache
from torch_bridge.landmark import FusedLandmarkAttention, fused_landmark_attention
from torch_bridge.sink import (fa2_func_with_sink, fa2_kvpacked_func_with_sink,
                               fa2_qkvpacked_func_with_sink, fa2_varlen_func_with_sink,
                               fa2_varlen_kvpacked_func_with_sink, fa2_varlen_qkvpacked_func_with_sink,
                               fa3_func_with_sink, fa3_qkvpacked_func_with_sink,
                               fa3_varlen_func_with_sink)
from torch_bridge.sparse import SparseAttention, sparse_attention

__all__ = [
    "compat",
    "flash_dma",
    "fused_landmark_attention",
    "FusedLandmarkAttention",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "fa2_func_with_sink",
    "fa2_kvpacked_func_with_sink",
    "fa2_qkvpacked_func_with_sink",
    "fa2_varlen_func_with_sink",
    "fa2_varlen_kvpacked_func_with_sink",
    "fa2_varlen_qkvpacked_func_with_sink",
    "fa3_func_with_sink",
    "fa3_qkvpacked_func_with_sink",
    "fa3_varlen_func_with_sink",
    "SparseAttention",
    "sparse_attention",
]
