"""Triton split-KV decoding attention (flash-decoding), the GPU twin of csrc/cpu/decode_cpu.cpp.

    out, lse = triton_decode_attention(q, k_cache, v_cache, cache_seqlens=None,
                                       window_left=-1, scale=None, num_splits=None,
                                       softcap=0.0, alibi_slopes=None)

Two kernels:
  _decode_split_kernel    grid (S, B * Hkv, T): one program per (cache chunk, batch, kv head,
                          row tile) runs the online softmax of BLOCK_M of the R = G * Nq query
                          rows of that kv head's group (GQA: each K/V tile is loaded once for
                          the whole row tile) over its chunk, and writes the partial output
                          and log-sum-exp. BLOCK_M is R rounded up to a power of two, capped
                          (DECODE_TILES: 64, 32 at head dim 256, 16 in the interpreter), and
                          T = cdiv(R, BLOCK_M) tiles cover large GQA groups or many queries
                          without growing the per-program register tile.
  _decode_combine_kernel  grid (B * Hq * Nq,): merges the S partials of one query row by
                          their log-sum-exp.
Masking (bottom-right causal among the new queries, per-row cache length, optional left
window) is fastattn.decode's rule. Score modifiers as fastattn.score_mods defines them, with
L = cache_seqlens[b] as the key length (query i sits at L - Nq + i): softcap
c * tanh(s / c), ALiBi -slope[b, h] * |L - Nq + i - j| (slopes (Hq,) or (B, Hq)); constexpr
switches, so the plain path compiles as before. No dropout (inference). Verified on CPU tensors in Triton's interpreter
(TRITON_INTERPRET=1), which cannot run bfloat16 tl.dot: DOT_F32 upcasts the dot operands.
Served by TritonBackend.decode (fastattn.decode_attention(..., backend="triton")).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _interpreter_on
from .kernels import _tanh  # the one exp2-based tanh of the triton kernels

__all__ = ["triton_decode_attention"]


@triton.jit
def _decode_split_kernel(
    Q, K, V, SEQLENS, O_PART, LSE_PART,
    stride_qz, stride_qh, stride_qm,
    stride_kz, stride_kh, stride_kn,
    stride_vz, stride_vh, stride_vn,
    Hkv, Nq, Ncache, CHUNK, scale_log2, window_left,
    cap_in, cap_out, Slopes,  # softcap: scale / c, c * log2(e); ALiBi slopes (B, Hq) float32
    G: tl.constexpr, R: tl.constexpr, S: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr,
    HAS_SEQLENS: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False,
):
    sp = tl.program_id(0)
    bh = tl.program_id(1)
    rt = tl.program_id(2)  # row tile: rows [rt * BLOCK_M, rt * BLOCK_M + BLOCK_M) of R
    b = bh // Hkv
    hk = bh % Hkv
    if HAS_SEQLENS:
        L = tl.load(SEQLENS + b).to(tl.int32)
    else:
        L = Ncache
    c0 = sp * CHUNK
    c1 = tl.minimum(c0 + CHUNK, L)

    offs_r = rt * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of this kv head: r = (h % G) * Nq + i
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_r < R
    h = hk * G + offs_r // Nq
    i = offs_r % Nq
    diag = L - Nq + i  # each query's own position in the cache
    # int64 offsets: batch x stride passes 2^31 once a tensor holds 2^31 elements
    b64 = b.to(tl.int64)
    q_ptrs = Q + b64 * stride_qz + (h.to(tl.int64)[:, None] * stride_qh
                                    + i.to(tl.int64)[:, None] * stride_qm + offs_d[None, :])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    if ALIBI:  # per row: its query head's slope, in log2 units
        slope2 = tl.load(Slopes + b64 * (Hkv * G) + h, mask=row_ok, other=0.0) * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    K_h = K + b64 * stride_kz + hk.to(tl.int64) * stride_kh
    V_h = V + b64 * stride_vz + hk.to(tl.int64) * stride_vh
    for start in range(c0, c1, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < c1
        k = tl.load(K_h + (offs_n.to(tl.int64)[:, None] * stride_kn + offs_d[None, :]),
                    mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        v = tl.load(V_h + (offs_n.to(tl.int64)[:, None] * stride_vn + offs_dv[None, :]),
                    mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        if SOFTCAP:
            qk = _tanh(tl.dot(q, tl.trans(k)) * cap_in) * cap_out  # (BLOCK_M, BLOCK_N), log2
        else:
            qk = tl.dot(q, tl.trans(k)) * scale_log2  # (BLOCK_M, BLOCK_N), log2 units
        if ALIBI:
            qk -= slope2[:, None] * tl.abs(diag[:, None] - offs_n[None, :]).to(tl.float32)
        vis = row_ok[:, None] & n_ok[None, :] & (offs_n[None, :] <= diag[:, None])
        if HAS_WINDOW:
            vis = vis & (offs_n[None, :] >= diag[:, None] - window_left)
        qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: p = 0
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    lse2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_i))
    base = (bh.to(tl.int64) * S + sp) * R
    tl.store(O_PART + ((base + offs_r[:, None]) * DV + offs_dv[None, :]), o,
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE_PART + base + offs_r, lse2, mask=row_ok)


@triton.jit
def _decode_combine_kernel(
    O_PART, LSE_PART, Out, LSE,
    Hq, Nq, Hkv,
    G: tl.constexpr, R: tl.constexpr, S: tl.constexpr, DV: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # (b, h, i) flattened, the layout of Out
    i = row % Nq
    bh = row // Nq
    b = bh // Hq
    h = bh % Hq
    r = (h % G) * Nq + i
    base = (b * Hkv + h // G) * S * R + r  # int64 (row is)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    lse_s = tl.load(LSE_PART + base + offs_s * R, mask=offs_s < S, other=float("-inf"))
    M = tl.max(lse_s, 0)
    M_safe = tl.where(M == float("-inf"), 0.0, M)
    w = tl.math.exp2(lse_s - M_safe)  # -inf partials weigh 0
    o_s = tl.load(O_PART + ((base + offs_s[:, None] * R) * DV + offs_dv[None, :]),
                  mask=(offs_s[:, None] < S) & (offs_dv[None, :] < DV), other=0.0)
    wsum = tl.sum(w, 0)
    o = tl.sum(o_s * w[:, None], 0) / tl.where(wsum == 0.0, 1.0, wsum)
    tl.store(Out + row * DV + offs_dv, o.to(Out.dtype.element_ty), mask=offs_dv < DV)
    tl.store(LSE + row, tl.where(wsum == 0.0, float("-inf"), (M_safe + tl.math.log2(wsum)) * 0.6931471805599453))


# Split-kernel tiles per padded head dim: (row-tile cap BLOCK_M, BLOCK_N, num_warps), chosen
# by ahead-of-time compiles (fastattn.bench.triton_compile.decode_compile; the caps are
# re-checked by tests/test_triton_compile.py): every BLOCK_M of 16, 32 and the cap compiled
# with 0 spills on sm_80 and sm_90, fp16 and bf16, with softcap and ALiBi on.
# Its fp32 accumulator is BLOCK_M x BLOCK_DV and q BLOCK_M x BLOCK_D per program, so a row
# tile of 128 (e.g. GQA group 8 x 16 queries) spilled kilobytes at head dim 128; head dim 256
# also needs the shorter key tile and 8 warps. The interpreter runs 16 x 16 tiles, so CPU tests
# cover several row tiles cheaply.
DECODE_TILES = {64: (64, 64, 4), 128: (64, 64, 8), 256: (32, 32, 8)}
INTERPRET_DECODE_TILE = (16, 16, 4)


def decode_tiles(block_d: int, interpret: bool = False) -> tuple[int, int, int]:
    """(max BLOCK_M, BLOCK_N, num_warps) of the split kernel for a padded head dim."""
    if interpret:
        return INTERPRET_DECODE_TILE
    return DECODE_TILES[next(d for d in sorted(DECODE_TILES) if block_d <= d)]


def default_splits(B: int, Hkv: int, max_len: int, block_n: int, n_sm: int = 108) -> int:
    """Enough (batch, kv head, split) programs to fill the GPU, each over >= 4 tiles."""
    want = max(1, -(-2 * n_sm // max(1, B * Hkv)))
    return max(1, min(want, max_len // (4 * block_n), 128))


def triton_decode_attention(q, k_cache, v_cache, *, cache_seqlens=None, window_left=-1,
                            scale=None, num_splits=None, softcap=0.0, alibi_slopes=None):
    """(out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) float32). Inputs as validated by
    fastattn.decode.decode_attention; softcap (float, 0 = off) and alibi_slopes ((Hq,) or
    (B, Hq), None = off) as fastattn.score_mods defines them (lse is that of the modified
    logits)."""
    B, Hq, Nq, D = q.shape
    Hkv, Ncache, Dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    G, R = Hq // Hkv, (Hq // Hkv) * Nq
    scale = D ** -0.5 if scale is None else scale
    q = q if q.stride(3) == 1 else q.contiguous()
    k_cache = k_cache if k_cache.stride(3) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(3) == 1 else v_cache.contiguous()
    interp = _interpreter_on()
    pow2 = lambda n, lo=16: max(lo, triton.next_power_of_2(n))
    cap_m, BLOCK_N, warps = decode_tiles(max(pow2(D), pow2(Dv)), interp)
    block_m = min(pow2(R), cap_m)
    Lmax = int(cache_seqlens.max()) if cache_seqlens is not None else Ncache
    n_tiles = max(1, -(-Lmax // BLOCK_N))
    S = num_splits or default_splits(B, Hkv, Lmax, BLOCK_N)
    S = max(1, min(S, n_tiles))
    chunk = -(-n_tiles // S) * BLOCK_N
    f32 = dict(device=q.device, dtype=torch.float32)
    o_part = torch.empty((B, Hkv, S, R, Dv), **f32)
    lse_part = torch.empty((B, Hkv, S, R), **f32)
    out = torch.empty((B, Hq, Nq, Dv), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, Hq, Nq), **f32)
    seqlens = cache_seqlens.to(torch.int32) if cache_seqlens is not None else q  # unused if None
    softcap = float(softcap or 0.0)
    cap_in = float(scale) / softcap if softcap > 0 else 0.0
    cap_out = softcap * math.log2(math.e) if softcap > 0 else 0.0
    if alibi_slopes is not None:  # (B, Hq) contiguous float32, indexed b * Hq + h
        slopes = alibi_slopes.detach().to(device=q.device, dtype=torch.float32)
        slopes = slopes.expand(B, Hq).contiguous()
    else:
        slopes = lse  # unused
    _decode_split_kernel[(S, B * Hkv, -(-R // block_m))](
        q, k_cache, v_cache, seqlens, o_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        Hkv, Nq, Ncache, chunk, float(scale) * math.log2(math.e), max(window_left, 0),
        cap_in, cap_out, slopes,
        G=G, R=R, S=S, D=D, DV=Dv,
        HAS_SEQLENS=cache_seqlens is not None, HAS_WINDOW=window_left >= 0,
        DOT_F32=interp or q.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_D=pow2(D), BLOCK_DV=pow2(Dv),
        SOFTCAP=softcap > 0, ALIBI=alibi_slopes is not None, num_warps=warps,
    )
    _decode_combine_kernel[(B * Hq * Nq,)](
        o_part, lse_part, out, lse, Hq, Nq, Hkv,
        G=G, R=R, S=S, DV=Dv, BLOCK_S=pow2(S, 2), BLOCK_DV=pow2(Dv),
    )
    return out, lse
