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
inference", 2023), which keeps every core busy at batch 1. Backends: "cpu" (C++,
csrc/cpu/decode_cpu.cpp), "triton" (fastattn.decode_triton; GPU, or TRITON_INTERPRET=1 on
CPU tensors), "reference" (naive masked softmax: the oracle, also differentiable). "auto"
picks cpu for CPU tensors and triton for CUDA tensors, else reference.

softcap and alibi_slopes ((Hq,) or (B, Hq)) act as in fastattn.score_mods, with the ALiBi
distance measured from each row's own position p = L - Nq + i (-slope * |p - j|), as
FlashAttention does with a KV cache. The cpu kernel implements all of it; the triton
kernel implements softcap and ALiBi with window_right=0 (others go to the reference).

Inference only: the cpu and triton kernels have no backward (train with
fastattn.attention). Returns out (B, Hq, Nq, Dv) in q's dtype and, with return_lse=True,
lse (B, Hq, Nq) float32 natural log (-inf, with out 0, for a query that sees no key).
"""

from __future__ import annotations

import torch

from ._validate import validate_alibi_slopes, validate_qkv, validate_scale, validate_softcap

__all__ = ["decode_attention", "decode_reference"]

_BACKENDS = ("auto", "cpu", "triton", "reference")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cpu_ops_ok() -> tuple[bool, str]:
    from ._extension import load

    if load("_C")[0] is None:
        return False, f"the compiled extension fastattn._C is not usable: {load('_C')[1]}"
    if not hasattr(torch.ops.fastattn, "cpu_decode"):
        return False, "fastattn._C was built without the decode kernel; rebuild the extension"
    return True, "ok"


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


def _validate_window_right(window_right) -> int:
    if window_right is None:
        return -1
    if isinstance(window_right, bool) or not isinstance(window_right, int) or window_right < -1:
        raise ValueError(f"window_right must be an int >= 0 (keys at most this far past a "
                         f"query's own position; 0 = causal), or None/-1 for every cached key, "
                         f"got {window_right!r}")
    return int(window_right)


def _validate_window_left(window_left) -> int:
    if window_left is None:
        return -1
    if isinstance(window_left, bool) or not isinstance(window_left, int) or window_left < -1:
        raise ValueError(f"window_left must be an int >= 0 (keys at most this far behind a "
                         f"query), or None/-1 for unbounded, got {window_left!r}")
    return int(window_left)


def decode_mask(cache_seqlens, B: int, Nq: int, Ncache: int, window_left: int = -1,
                device=None, window_right: int = 0) -> torch.Tensor:
    """The (B, 1, Nq, Ncache) bool mask decode_attention applies (True = visible)."""
    L = (torch.full((B,), Ncache, device=device) if cache_seqlens is None
         else cache_seqlens.to(device=device, dtype=torch.long))
    i = torch.arange(Nq, device=device).view(1, Nq, 1)
    j = torch.arange(Ncache, device=device).view(1, 1, Ncache)
    diag = L.view(B, 1, 1) - Nq + i  # each query's own position
    ok = j < L.view(B, 1, 1)
    if window_right != -1:
        ok = ok & (j <= diag + window_right)
    if window_left != -1:
        ok = ok & (j >= diag - window_left)
    return ok.unsqueeze(1)


def decode_reference(q, k_cache, v_cache, *, cache_seqlens=None, window_left=-1, scale=None,
                     window_right=0, softcap=0.0, alibi_slopes=None):
    """Naive decode attention (materializes (Nq, Ncache) scores); returns (out, lse).
    Differentiable; float64 inputs stay float64, others compute in float32."""
    from .score_mods import apply_softcap

    B, Hq, Nq, D = q.shape
    Hkv, Ncache = k_cache.shape[1], k_cache.shape[2]
    mask = decode_mask(cache_seqlens, B, Nq, Ncache, window_left, q.device, window_right)
    scale = D ** -0.5 if scale is None else scale
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    k, v = k_cache.to(cdt), v_cache.to(cdt)
    if Hkv != Hq:
        k, v = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    s = apply_softcap(torch.matmul(q.to(cdt), k.transpose(-1, -2)) * scale, softcap or 0.0)
    if alibi_slopes is not None:
        L = (torch.full((B,), Ncache, device=q.device) if cache_seqlens is None
             else cache_seqlens.to(device=q.device, dtype=torch.long))
        pos = L.view(B, 1, 1) - Nq + torch.arange(Nq, device=q.device).view(1, Nq, 1)
        dist = (pos - torch.arange(Ncache, device=q.device).view(1, 1, Ncache)).abs()
        slopes = alibi_slopes.to(cdt).expand(B, Hq) if alibi_slopes.ndim == 2 \
            else alibi_slopes.to(cdt).view(1, Hq).expand(B, Hq)
        s = s - slopes.reshape(B, Hq, 1, 1) * dist.unsqueeze(1).to(cdt)
    s = s.masked_fill(~mask, float("-inf"))
    # rows that see no key: out 0, lse -inf, zero (not NaN) gradients
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p / torch.where(l == 0, torch.ones_like(l), l), v)
    lse = (m + torch.log(l)).squeeze(-1)
    return out.to(q.dtype), lse.float()


def _pick_backend(backend: str, q: torch.Tensor, needs_grad: bool) -> str:
    if backend == "auto":
        if needs_grad or q.dtype not in _KERNEL_DTYPES:
            return "reference"
        if q.device.type == "cpu" and _cpu_ops_ok()[0]:
            return "cpu"
        if q.device.type == "cuda":
            try:
                from . import decode_triton  # noqa: F401
                return "triton"
            except ImportError:
                pass
        return "reference"
    why = []
    if backend in ("cpu", "triton"):
        if needs_grad:
            why.append("its kernel is inference-only (no backward); call it under "
                       "torch.no_grad() or use backend='reference' / fastattn.attention")
        if q.dtype not in _KERNEL_DTYPES:
            why.append(f"it supports float32, bfloat16 and float16, got {q.dtype}")
    if backend == "cpu":
        if q.device.type != "cpu":
            why.append(f"it runs on CPU tensors, got {q.device}")
        ok, reason = _cpu_ops_ok()
        if not ok:
            why.append(reason)
    if backend == "triton":
        try:
            from . import decode_triton
            ok, reason = decode_triton.available(q.device)
            if not ok:
                why.append(reason)
        except ImportError as e:
            why.append(f"triton is not installed ({e})")
    if why:
        raise ValueError(f"decode_attention backend {backend!r} cannot serve this call: "
                         + "; ".join(why))
    return backend


def decode_attention(q, k_cache, v_cache, *, cache_seqlens=None, window_left=None,
                     window_right=0, scale=None, softcap=None, alibi_slopes=None,
                     backend="auto", num_splits=None, return_lse=False):
    """Split-KV attention of q (B, Hq, Nq, D) against k_cache/v_cache (B, Hkv, Ncache, D|Dv);
    see the module docstring for the masking rule and the backends."""
    if not isinstance(backend, str) or backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, _BACKENDS))}, got {backend!r}")
    validate_qkv(q, k_cache, v_cache, names=("q", "k_cache", "v_cache"))
    B, Hq, Nq, D = q.shape
    Ncache, Dv = k_cache.shape[2], v_cache.shape[3]
    scale = validate_scale(scale, D)
    cache_seqlens = _validate_seqlens(cache_seqlens, B, Ncache, q.device)
    window_left = _validate_window_left(window_left)
    window_right = _validate_window_right(window_right)
    softcap = validate_softcap(softcap)
    alibi_slopes = validate_alibi_slopes(alibi_slopes, B, Hq, q.device)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None (automatic), got {num_splits!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache))
    impl = _pick_backend(backend, q, needs_grad)
    if impl == "triton" and window_right != 0:
        if backend == "triton":
            raise ValueError("decode_attention backend 'triton' cannot serve this call: its "
                             "kernel is causal (window_right=0); use backend='auto' or 'cpu'")
        impl = "reference"

    if B == 0 or Hq == 0 or Nq == 0 or Ncache == 0:
        out = q.new_zeros((B, Hq, Nq, Dv))
        lse = torch.full((B, Hq, Nq), float("-inf"), dtype=torch.float32, device=q.device)
    elif impl == "cpu":
        if softcap or alibi_slopes is not None or window_right != 0:
            out, lse = torch.ops.fastattn.cpu_decode(q, k_cache, v_cache, cache_seqlens, scale,
                                                     window_left, num_splits or 0, window_right,
                                                     softcap, alibi_slopes)
        else:
            out, lse = torch.ops.fastattn.cpu_decode(q, k_cache, v_cache, cache_seqlens, scale,
                                                     window_left, num_splits or 0)
    elif impl == "triton":
        from .decode_triton import triton_decode_attention
        out, lse = triton_decode_attention(q, k_cache, v_cache, cache_seqlens=cache_seqlens,
                                           window_left=window_left, scale=scale,
                                           num_splits=num_splits, softcap=softcap,
                                           alibi_slopes=alibi_slopes)
    else:
        out, lse = decode_reference(q, k_cache, v_cache, cache_seqlens=cache_seqlens,
                                    window_left=window_left, scale=scale,
                                    window_right=window_right, softcap=softcap,
                                    alibi_slopes=alibi_slopes)
    return (out, lse) if return_lse else out
