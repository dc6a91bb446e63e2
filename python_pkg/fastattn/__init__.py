"""fastattn: fused and block-sparse attention for PyTorch (CPU C++, Triton, CUDA kernels)
behind one drop-in API."""

from .api import attention, scaled_dot_product_attention
from . import distributed, nn, sparse  # noqa: E402,I001  (they import the API above)
from .dispatch import BackendUnavailableError, available_backends
from .patching import patch_sdpa, unpatch_sdpa
from .decode import decode_attention  # noqa: I001
from .varlen import attention_varlen
from . import flash_attn_compat  # (imports the API, varlen and decode)
from .backends.cpu import kernel_info as cpu_info

from ._version import __version__

__all__ = [
    "attention",
    "scaled_dot_product_attention",
    "attention_varlen",
    "decode_attention",
    "flash_attn_compat",
    "available_backends",
    "cpu_info",
    "BackendUnavailableError",
    "sparse",
    "distributed",
    "nn",
    "patch_sdpa",
    "unpatch_sdpa",
    "__version__",
]
