"""reference: naive attention that materializes the (Nq, Nk) scores. The oracle of every
test and the "naive" baseline of every benchmark. Differentiable through plain autograd.

Low-precision inputs are computed in float32 and cast back; float64 stays float64 (the
tests' oracle)."""

from __future__ import annotations

import torch

from ..masking import decode_mask, window_mask
from ..score_mods import alibi_bias, apply_softcap, dropout_keep_mask
from .base import Backend, DecodeProblem, Problem


def reference_attention(q, k, v, *, scale: float, window=(-1, -1), mask=None,
                        compute_dtype=None, softcap: float = 0.0, alibi_slopes=None,
                        dropout_p: float = 0.0, dropout_seed: int = 0, alibi_offset=None):
    """q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv); mask: bool broadcastable to
    (B, Hq, Nq, Nk), True = visible. Returns out (B, Hq, Nq, Dv) in q's dtype and lse
    (B, Hq, Nq) float32. A row with no visible key gives out 0 and lse -inf.
    compute_dtype: the precision of the math (default float32, float64 for float64 inputs);
    tests pass the input dtype to measure torch's own low-precision error.
    softcap / alibi_slopes ((Hq,) or (B, Hq)) / dropout_p + dropout_seed: as defined in
    fastattn.score_mods (the dropout keep mask is materialized here); alibi_offset (B,):
    per-row query offsets for ALiBi distances (a KV cache's L_b - Nq; default Nk - Nq).
    The one naive oracle: attention, decode and the tests' float64 reference all use it."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    cdt = compute_dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    if Hkv != Hq:  # GQA: query head h reads kv head h // (Hq // Hkv)
        kc = kc.repeat_interleave(Hq // Hkv, dim=1)
        vc = vc.repeat_interleave(Hq // Hkv, dim=1)
    s = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # (B, Hq, Nq, Nk)
    s = apply_softcap(s, softcap)
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, B, Hq, Nq, Nk, alibi_offset).to(cdt)
    if window != (-1, -1):
        m = window_mask(Nq, Nk, *window, device=q.device)
        mask = m if mask is None else (mask & m)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m_row = s.amax(dim=-1, keepdim=True).detach()
    m_row = torch.where(torch.isfinite(m_row), m_row, torch.zeros_like(m_row))
    p = torch.exp(s - m_row)
    l_row = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(l_row == 0, torch.ones_like(l_row), l_row)
    if dropout_p > 0:
        keep = dropout_keep_mask(dropout_seed, dropout_p, B, Hq, Nq, Nk, device=q.device)
        p = p * keep.to(cdt) / (1.0 - dropout_p)
    out = torch.matmul(p, vc)
    lse = (m_row + torch.log(l_row)).squeeze(-1)
    return out.to(q.dtype), lse.float()


def decode_reference(q, k_cache, v_cache, *, cache_seqlens=None, window_left=-1, scale=None,
                     window_right=0, softcap=0.0, alibi_slopes=None):
    """Naive decode attention (fastattn.decode's rule through reference_attention);
    returns (out, lse). Differentiable; float64 inputs stay float64, others use float32."""
    B, Nq, D = q.shape[0], q.shape[2], q.shape[3]
    Ncache = k_cache.shape[2]
    mask = decode_mask(cache_seqlens, B, Nq, Ncache, window_left, q.device, window_right)
    offset = None
    if alibi_slopes is not None:
        L = (torch.full((B,), Ncache, device=q.device) if cache_seqlens is None
             else cache_seqlens.to(device=q.device, dtype=torch.long))
        offset = L - Nq
    return reference_attention(q, k_cache, v_cache, scale=D ** -0.5 if scale is None else scale,
                               mask=mask, softcap=softcap or 0.0, alibi_slopes=alibi_slopes,
                               alibi_offset=offset)


class ReferenceBackend(Backend):
    name = "reference"
    priority = 0
    devices = ("cpu", "cuda")
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    min_head_dim = 0
    max_head_dim = 1 << 30
    supports_window = True
    supports_block_mask = True
    supports_backward = True
    supports_lse = True
    supports_softcap = True
    supports_alibi = True
    supports_dropout = True
    supports_decode = True
    supports_decode_backward = True

    def decode(self, q, k_cache, v_cache, d: DecodeProblem):
        return decode_reference(q, k_cache, v_cache, cache_seqlens=d.cache_seqlens,
                                window_left=d.window[0], window_right=d.window[1],
                                scale=d.scale, softcap=d.softcap, alibi_slopes=d.alibi_slopes)

    def forward(self, q, k, v, p: Problem):
        mask = None
        if p.block_mask is not None:
            mask = p.block_mask.to_dense()  # (B|1, H|1, Nq, Nk) bool
        return reference_attention(q, k, v, scale=p.scale, window=p.window, mask=mask,
                                   softcap=p.softcap, alibi_slopes=p.alibi_slopes,
                                   dropout_p=p.dropout_p, dropout_seed=p.dropout_seed)
