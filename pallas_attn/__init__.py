"""pallas-attn: attention kernels in JAX Pallas (Triton lowering on NVIDIA GPUs, interpret mode on CPU)."""
from pallas_attn import _compat  # noqa: F401  (installs the Triton deprecation filter first)
from pallas_attn.flash_attn import flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func
from pallas_attn.flash_attn_varlen import (flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                                           flash_attn_varlen_qkvpacked_func)
from pallas_attn import flash_dma  # noqa: F401  (flash_dma.fwd / bwd / topk_mask)
from pallas_attn.dot_product_attention import dot_product_attention
from pallas_attn.kvcache import flash_attn_with_kvcache
from pallas_attn.landmark import fused_landmark_attention
from pallas_attn.ring import ring_attention, ring_flash_attn_func
from pallas_attn.sink import (fa2_func_with_sink, fa2_kvpacked_func_with_sink,
                              fa2_qkvpacked_func_with_sink, fa2_varlen_func_with_sink,
                              fa2_varlen_kvpacked_func_with_sink, fa2_varlen_qkvpacked_func_with_sink,
                              fa3_func_with_sink, fa3_qkvpacked_func_with_sink,
                              fa3_varlen_func_with_sink)
from pallas_attn.sparse import sparse_attention
from pallas_attn.tiles import KernelConfigs, TileConfig

__all__ = [
    "dot_product_attention",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "flash_dma",
    "fused_landmark_attention",
    "ring_attention",
    "ring_flash_attn_func",
    "fa2_func_with_sink",
    "fa2_kvpacked_func_with_sink",
    "fa2_qkvpacked_func_with_sink",
    "fa2_varlen_func_with_sink",
    "fa2_varlen_kvpacked_func_with_sink",
    "fa2_varlen_qkvpacked_func_with_sink",
    "fa3_func_with_sink",
    "fa3_qkvpacked_func_with_sink",
    "fa3_varlen_func_with_sink",
    "sparse_attention",
    "KernelConfigs",
    "TileConfig",
]
