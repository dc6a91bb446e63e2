"""Decoding attention: a few new queries against a long KV cache (flash-decoding).

    out = decode_attention(q, k_cache, v_cache, *, cache_seqlens=None, window_left=None,
                           window_right=0, scale=None, softcap=None, alibi_slopes=None,
                           backend="auto", num_splits=None, return_lse=False)

q is (B, Hq, Nq, D) with Nq small (1 for token-by-token generation, a few for speculative
or chunked decoding); k_cache / v_cache are (B, Hkv, Ncache, D) / (B, Hkv, Ncache, Dv)
buffers of which row b holds cache_seqlens[b] valid tokens (default: all Ncache). The new
queries are the LAST Nq of those tokens (their keys are already written to the cache), so
causality is bottom-right aligned per row, with L = cache_seqlens[b]:

    query i sees key j  iff  j <= L - Nq + i  (and j >= L - Nq + i - window_left)

(that is window_right=0, the default; window_right=k lets query i see k keys past its own
position, window_right=None/-1 every key j < L: FlashAttention's non-causal KV cache)

    L = 6, Nq = 2, Ncache = 8:     keys 0 1 2 3 4 5 | 6 7 (beyond L: never read)
                        query 0:        x x x x x . | . .
                        query 1:        x x x x x x | . .

The kernels split the cache into chunks, attend to each chunk in parallel, and merge the
partial outputs by their log-sum-exp (Dao et al., "Flash-Decoding for long-context
inference", 2023), which keeps every core busy at batch 1. The backend is chosen by
fastattn.dispatch exactly as for attention (Backend.why_not_decode / Backend.decode):
"cpu" (csrc/cpu/decode_cpu.cpp), "triton" (backends/triton/decode.py; GPU, or
TRITON_INTERPRET=1 on CPU tensors, by name), "cuda" (csrc/cuda/decode_kernel.h: split-KV
warp-level kernels + combine; float16/bfloat16, head dims <= 128), "reference" (naive masked
softmax: the oracle, also differentiable). "auto" (FASTATTN_BACKEND overrides it when it names
a backend with a decode kernel) picks, for CUDA tensors, the GPU dispatch policy's family:
cuda only where a recorded gpu-check validated the cuda family on that arch, else triton;
cpu for CPU tensors, the reference when an input requires grad; an explicit backend that
cannot serve the call raises BackendUnavailableError with every backend's reasons.

softcap and alibi_slopes ((Hq,) or (B, Hq)) act as in fastattn.score_mods, with the ALiBi
distance measured from each row's own position p = L - Nq + i (-slope * |p - j|), as
FlashAttention does with a KV cache. The cpu and cuda kernels implement all of it; the triton
kernel implements softcap and ALiBi with window_right=0 (others go to the reference).

Inference only: the cpu, triton and cuda kernels have no backward (train with
fastattn.attention). Returns out (B, Hq, Nq, Dv) in q's dtype and, with return_lse=True,
lse (B, Hq, Nq) float32 natural log (-inf, with out 0, for a query that sees no key).
"""

from __future__ import annotations

import torch

from . import dispatch
from ._validate import validate_alibi_slopes, validate_qkv, validate_scale, validate_softcap
from .backends.base import DecodeProblem
from .backends.reference import decode_reference
from .masking import decode_mask

__all__ = ["decode_attention", "decode_reference", "decode_mask"]


def _validate_seqlens(cache_seqlens, B: int, Ncache: int, device) -> torch.Tensor | None:
    if cache_seqlens is None:
        return None
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be a torch.Tensor of shape ({B},) or None, "
                        f"got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cache_seqlens must be int32 or int64, got {cache_seqlens.dtype}")
    if cache_seqlens.shape != (B,):
        raise ValueError(f"cache_seqlens must have shape (B,) = ({B},), one length per batch row, "
                         f"got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens must be on the caches' device {device}, "
                         f"got {cache_seqlens.device}")
    if B and (int(cache_seqlens.min()) < 0 or int(cache_seqlens.max()) > Ncache):
        raise ValueError(f"cache_seqlens must lie in [0, Ncache = {Ncache}], got values in "
                         f"[{int(cache_seqlens.min())}, {int(cache_seqlens.max())}]")
    return cache_seqlens


def _validate_window_side(value, name: str, meaning: str) -> int:
    """window_left / window_right: an int >= 0, or None/-1 for unbounded."""
    if value is None:
        return -1
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise ValueError(f"{name} must be an int >= 0 ({meaning}), or None/-1 for "
                         f"unbounded, got {value!r}")
    return int(value)


def decode_attention(q, k_cache, v_cache, *, cache_seqlens=None, window_left=None,
                     window_right=0, scale=None, softcap=None, alibi_slopes=None,
                     backend="auto", num_splits=None, return_lse=False):
    """Split-KV attention of q (B, Hq, Nq, D) against k_cache/v_cache (B, Hkv, Ncache, D|Dv);
    see the module docstring for the masking rule and the backends."""
    name = dispatch.validate_backend_name(backend)
    if name != backend and not getattr(dispatch.get(name), "supports_decode", False):
        name = "auto"  # FASTATTN_BACKEND names a backend without a decode kernel: keep auto
    validate_qkv(q, k_cache, v_cache, names=("q", "k_cache", "v_cache"))
    B, Hq, Nq, D = q.shape
    Ncache, Dv = k_cache.shape[2], v_cache.shape[3]
    scale = validate_scale(scale, D)
    cache_seqlens = _validate_seqlens(cache_seqlens, B, Ncache, q.device)
    window_left = _validate_window_side(window_left, "window_left",
                                        "keys at most this far behind a query")
    window_right = _validate_window_side(window_right, "window_right",
                                         "keys at most this far past a query's own position; "
                                         "0 = causal")
    softcap = validate_softcap(softcap)
    alibi_slopes = validate_alibi_slopes(alibi_slopes, B, Hq, q.device)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None (automatic), got {num_splits!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache))
    d = DecodeProblem(device=q.device, dtype=q.dtype, B=B, Hq=Hq, Hkv=k_cache.shape[1], Nq=Nq,
                      Ncache=Ncache, D=D, Dv=Dv, window=(window_left, window_right), scale=scale,
                      needs_grad=needs_grad, cache_seqlens=cache_seqlens, softcap=softcap,
                      alibi_slopes=alibi_slopes, num_splits=num_splits or 0)
    # the same dispatch as attention: "auto" = the highest-priority backend that can serve
    # it (triton on a GPU, cpu on a CPU, the differentiable reference otherwise)
    impl = dispatch.select(d, name)
    if B == 0 or Hq == 0 or Nq == 0 or Ncache == 0:
        out = q.new_zeros((B, Hq, Nq, Dv))
        lse = torch.full((B, Hq, Nq), float("-inf"), dtype=torch.float32, device=q.device)
    else:
        out, lse = impl.decode(q, k_cache, v_cache, d)
    return (out, lse) if return_lse else out
