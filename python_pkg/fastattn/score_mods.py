"""Score modifiers every kernel family applies inside the fused loop: softcap, ALiBi and
dropout. This module is their definition (the torch reference the tests check kernels
against); csrc/cpu, the Triton kernels and csrc/cuda implement exactly the same formulas.

For query i and key j (bottom-right aligned, offset = Nk - Nq), the logit is

    s_ij = scale * q_i . k_j
    s_ij = softcap * tanh(s_ij / softcap)                 if softcap > 0   (Gemma 2, Grok)
    s_ij = s_ij - slope[b, h] * |i + offset - j|          if alibi slopes are given
    s_ij = -inf                                           if (i, j) is masked

    lse_i = log sum_j exp(s_ij),  P_ij = exp(s_ij - lse_i)
    out_i = sum_j P_ij * keep_ij / (1 - p) * v_j          keep = 1 everywhere when p = 0

This matches FlashAttention 2 (softcap applied to the scaled score; ALiBi bias in logit
units, `-alibi_slope * |i + seqlen_k - seqlen_q - j|`). lse is that of the undropped logits.

Dropout keeps (i, j) of batch b, query head h iff a counter-based hash of
(seed, row, j), with row = (b * Hq + h) * Nq + i, is at or above p * 2^24 (24-bit
threshold). Nothing is stored: the backward regenerates the same keep bits from the seed.
The hash, all arithmetic modulo 2^32:

    fmix32(x):  x ^= x >> 16; x *= 0x85EBCA6B; x ^= x >> 13; x *= 0xC2B2AE35; x ^= x >> 16
    h = fmix32(row * 0x9E3779B1 + seed_lo)
    h = fmix32(h ^ (j * 0x85EBCA77 + seed_hi))
    keep = (h >> 8) >= threshold,   threshold = dropout_threshold(p) = round(p * 2^24)

seed is a 64-bit int (seed_lo = its low 32 bits, seed_hi = the next 32); fastattn draws it
from torch's default CPU generator (so torch.manual_seed reproduces a run) unless given.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
# Each kernel family encodes these constants; changing one here changes the definition.
GOLDEN = 0x9E3779B1
COL_MUL = 0x85EBCA77
FMIX_1 = 0x85EBCA6B
FMIX_2 = 0xC2B2AE35


def dropout_threshold(p: float) -> int:
    """24-bit integer threshold: a pair is dropped iff its 24-bit hash < threshold."""
    return int(round(float(p) * (1 << 24)))


def split_seed(seed: int) -> tuple[int, int]:
    """(seed_lo, seed_hi) as non-negative ints < 2^32 (what the kernels receive)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return seed & _M32, (seed >> 32) & _M32


@torch.compiler.disable(reason=(
    "fastattn draws a fresh dropout seed per call from torch's generator, a host-side int "
    "that a graph cannot hold: under torch.compile(fullgraph=True) pass dropout_seed=<int> "
    "yourself (e.g. from torch.randint outside the compiled function); without fullgraph "
    "this is a graph break and works"))
def draw_seed(generator: torch.Generator | None = None) -> int:
    """A fresh 63-bit seed from torch's (default CPU) generator. Under torch.compile this
    runs eagerly (a graph break), so every call of the compiled function gets a new seed."""
    return int(torch.randint(0, 2**63 - 1, (), generator=generator, dtype=torch.int64))


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    # int64 tensors holding uint32 values; products of two < 2^32 values overflow int64,
    # so multiply in 16-bit halves: (x * c) mod 2^32 = (x * c_lo + ((x * c_hi) << 16)) mod 2^32
    x = x ^ (x >> 16)
    x = _mul32(x, FMIX_1)
    x = x ^ (x >> 13)
    x = _mul32(x, FMIX_2)
    return x ^ (x >> 16)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    lo, hi = c & 0xFFFF, c >> 16
    return ((x * lo) + (((x * hi) & 0xFFFF) << 16)) & _M32


def dropout_hash(seed: int, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """The 24-bit hash (int64 tensor, values in [0, 2^24)) of broadcastable row/col
    index tensors (int64, taken modulo 2^32)."""
    seed_lo, seed_hi = split_seed(seed)
    row = row.to(torch.int64) & _M32
    col = col.to(torch.int64) & _M32
    h = _fmix32((_mul32(row, GOLDEN) + seed_lo) & _M32)
    h = _fmix32(h ^ ((_mul32(col, COL_MUL) + seed_hi) & _M32))
    return h >> 8


def dropout_keep_mask(seed: int, p: float, B: int, Hq: int, Nq: int, Nk: int,
                      device=None) -> torch.Tensor:
    """(B, Hq, Nq, Nk) bool, True = kept. Materializes N^2 values: tests and the
    reference backend only; kernels evaluate the hash per tile."""
    rows = torch.arange(B * Hq * Nq, device=device, dtype=torch.int64).view(B, Hq, Nq, 1)
    cols = torch.arange(Nk, device=device, dtype=torch.int64).view(1, 1, 1, Nk)
    return dropout_hash(seed, rows, cols) >= dropout_threshold(p)


def alibi_bias(slopes: torch.Tensor, B: int, Hq: int, Nq: int, Nk: int,
               query_offset: torch.Tensor | None = None) -> torch.Tensor:
    """(B or 1, Hq, Nq, Nk) float32 bias -slope * |i + offset - j|; slopes (Hq,) or (B, Hq).
    offset is Nk - Nq (bottom-right), or per batch row query_offset (B,) (a KV cache whose
    row b holds L_b tokens: offset L_b - Nq)."""
    s = slopes.to(torch.float32)
    s = s.view(1, Hq, 1, 1) if s.ndim == 1 else s.view(B, Hq, 1, 1)
    i = torch.arange(Nq, device=slopes.device).view(1, 1, Nq, 1)
    j = torch.arange(Nk, device=slopes.device).view(1, 1, 1, Nk)
    off = (torch.tensor(Nk - Nq, device=slopes.device) if query_offset is None
           else query_offset.to(device=slopes.device, dtype=torch.long).view(B, 1, 1, 1))
    dist = (i + off - j).abs().to(torch.float32)
    return -s * dist


def apply_softcap(s: torch.Tensor, softcap: float) -> torch.Tensor:
    """softcap * tanh(s / softcap); identity when softcap == 0."""
    return s if not softcap else torch.tanh(s / softcap) * softcap
