"""fastattn: fused and block-sparse attention for PyTorch (CPU C++, Triton, CUDA kernels)
behind one drop-in API."""

from . import nn, sparse
from .api import attention, scaled_dot_product_attention
from .dispatch import BackendUnavailableError, available_backends
from .patching import patch_sdpa, unpatch_sdpa

__version__ = "0.1.0"

__all__ = [
    "attention",
    "scaled_dot_product_attention",
    "available_backends",
    "BackendUnavailableError",
    "sparse",
    "nn",
    "patch_sdpa",
    "unpatch_sdpa",
    "__version__",
]
