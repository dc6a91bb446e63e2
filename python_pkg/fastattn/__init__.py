"""fastattn: fused and block-sparse attention for PyTorch (CPU C++, Triton, CUDA kernels)
behind one drop-in API."""

# The top floor: the public names only. No module below the API imports this file or the
# package itself (tests/test_layering.py), so the order here is free.
from . import distributed, flash_attn_compat, nn, sparse
from ._version import __version__
from .api import attention, scaled_dot_product_attention
from .backends.cpu import cpu_output_cache, empty_cpu_output_cache
from .backends.cpu import kernel_info as cpu_info
from .decode import decode_attention
from .dispatch import BackendUnavailableError, available_backends
from .patching import patch_sdpa, unpatch_sdpa
from .varlen import attention_varlen

__all__ = [
    "attention",
    "scaled_dot_product_attention",
    "attention_varlen",
    "decode_attention",
    "flash_attn_compat",
    "available_backends",
    "cpu_info",
    "cpu_output_cache",
    "empty_cpu_output_cache",
    "BackendUnavailableError",
    "sparse",
    "distributed",
    "nn",
    "patch_sdpa",
    "unpatch_sdpa",
    "__version__",
]
