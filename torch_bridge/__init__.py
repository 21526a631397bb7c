"""pallas-attn's torch face: the original libraries' torch APIs, computed by the JAX Pallas kernels.

Import this before JAX starts its GPU backend: it turns off JAX's GPU memory preallocation (unless
the XLA_PYTHON_CLIENT_* memory variables are set), so torch and JAX can share the card.
"""
from torch_bridge import _jax_env

_jax_env.configure()

# pylint: disable=g-import-not-at-top,wrong-import-position
from torch_bridge import compat
from torch_bridge.flash_attn import flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func

__all__ = [
    "compat",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
]
