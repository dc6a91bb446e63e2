"""Triton kernels of the `triton` backend: FlashAttention-2 forward and backward over dense,
windowed (causal) and block-sparse layouts.

Order as in Triton's fused-attention tutorial: inner-loop helpers, autotune configs with
their pruning, forward kernel, backward kernels (preprocess, dK/dV, dQ).

Conventions
    q (Z, H, N_CTX_Q, HEAD_DIM), k (Z, H // GROUP, N_CTX_K, HEAD_DIM),
    v (Z, H // GROUP, N_CTX_K, HEAD_DIM_V); query head h reads kv head h // GROUP.
    Head dims are padded to BLOCK_D / BLOCK_DV (powers of two >= 16) inside the kernel.
    Masks are bottom-right aligned: offset = N_CTX_K - N_CTX_Q, query i sees key j iff
    (not WINDOW_LEFT or j >= i + offset - WIN_LEFT) and
    (not WINDOW_RIGHT or j <= i + offset + WIN_RIGHT)   (causal: WIN_RIGHT = 0).
    Scores live in log2 units: s2 = q.k * sm_scale * log2(e), so exp2 replaces exp; the
    saved log-sum-exp Lse is in natural log (the public contract), converted on load.
    SPARSE: kernels walk a BlockMask's full and partial lists; its blocks are
    MASK_BM x MASK_BN and the kernel tiles (BLOCK_M, BLOCK_N) divide them.

This file is executed twice by `fastattn.backends.triton.ops.load_kernels`, once with
Triton's interpreter on (CPU tensors) and once off (CUDA / ahead-of-time compiles), so its
@triton.jit objects always match the device they run on whatever the import order.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# --------------------------------------------------------------------------- helpers


@triton.jit
def _dot(a, b, acc, DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # DOT_UPCAST is the one switch for Triton's interpreter, whose tl.dot multiplies the
    # raw bits of bfloat16 (triton issue #11584): operands go through float32 there.
    if DOT_UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


# Only Triton builtins and this file's own @triton.jit functions are called from the kernels:
# Triton's library helpers (tl.zeros, tl.max, tl.sum, tl.cdiv) are @jit objects built when
# triton is imported, which under the interpreter only work if TRITON_INTERPRET was already
# set then. Row reductions reuse the library's combine functions, which the interpreter
# recognizes and runs as numpy reductions.


@triton.jit
def _row_max(x):  # tl.max(x, 1)
    return tl.reduce(x, 1, tl.standard._elementwise_max)


@triton.jit
def _row_sum(x):  # tl.sum(x, 1)
    return tl.reduce(x, 1, tl.standard._sum_combine)


@triton.jit
def _off2(rows, cols, stride_r, stride_c):
    # Element offsets of a (rows x cols) tile, in int64: row index x row stride passes 2^31
    # for long or strided inputs (e.g. a (B, N, H, D) view with N * H * D >= 2^31), and one
    # int64 tensor keeps the whole tile's address a single 64-bit offset from its base.
    return rows.to(tl.int64)[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c


@triton.jit
def _visible(rows, cols, offset, N_CTX_K, WIN_LEFT, WIN_RIGHT,
             WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    # rows, cols broadcast against each other (either orientation); True = may attend
    d = cols - (rows + offset)  # key position relative to the query's diagonal
    vis = cols < N_CTX_K
    if WINDOW_LEFT:
        vis = vis & (d >= -WIN_LEFT)
    if WINDOW_RIGHT:
        vis = vis & (d <= WIN_RIGHT)
    return vis


@triton.jit
def _bitmask(PM, mask_id, rows_local, cols_local, MASK_BM: tl.constexpr, MASK_BN: tl.constexpr):
    # partial_masks[mask_id, rows_local, cols_local] != 0, all True for mask_id == -1
    # (only called when the mask stores bitmasks, so id 0 exists and the load is in bounds)
    base = PM + tl.maximum(mask_id, 0).to(tl.int64) * (MASK_BM * MASK_BN)
    bits = tl.load(base + rows_local * MASK_BN + cols_local)
    return (bits != 0) | (mask_id < 0)


@triton.jit
def _kv_range(m0, N_CTX_Q, N_CTX_K, WIN_LEFT, WIN_RIGHT,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    # Key columns seen by query rows [m0, m0 + BLOCK_M), as block-aligned ranges
    #   [lo, full_lo) masked | [full_lo, full_hi) every token visible | [full_hi, hi) masked
    offset = N_CTX_K - N_CTX_Q
    m_last = tl.minimum(m0 + BLOCK_M, N_CTX_Q) - 1
    lo = 0
    hi = N_CTX_K
    full_lo = 0
    full_hi = (N_CTX_K // BLOCK_N) * BLOCK_N
    if WINDOW_LEFT:
        lo = (tl.maximum(m0 + offset - WIN_LEFT, 0) // BLOCK_N) * BLOCK_N
        full_lo = (tl.maximum(m_last + offset - WIN_LEFT, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    if WINDOW_RIGHT:
        hi = tl.minimum(tl.maximum(m_last + offset + WIN_RIGHT + 1, 0), N_CTX_K)
        full_hi = tl.minimum(full_hi,
                             (tl.maximum(m0 + offset + WIN_RIGHT + 1, 0) // BLOCK_N) * BLOCK_N)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _q_range(n0, N_CTX_Q, N_CTX_K, WIN_LEFT, WIN_RIGHT,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    # Query rows that see key columns [n0, n0 + BLOCK_N): the transpose of _kv_range.
    # Rows >= N_CTX_Q may sit in "full" blocks: the dK/dV kernel zeroes them through lse.
    offset = N_CTX_K - N_CTX_Q
    n_last = tl.minimum(n0 + BLOCK_N, N_CTX_K) - 1
    lo = 0
    hi = N_CTX_Q
    full_lo = 0
    full_hi = N_CTX_Q
    if WINDOW_RIGHT:  # i >= j - offset - WIN_RIGHT
        lo = (tl.maximum(n0 - offset - WIN_RIGHT, 0) // BLOCK_M) * BLOCK_M
        full_lo = (tl.maximum(n_last - offset - WIN_RIGHT, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    if WINDOW_LEFT:  # i <= j - offset + WIN_LEFT
        hi = tl.minimum(tl.maximum(n_last - offset + WIN_LEFT + 1, 0), N_CTX_Q)
        full_hi = tl.minimum(full_hi,
                             (tl.maximum(n0 - offset + WIN_LEFT + 1, 0) // BLOCK_M) * BLOCK_M)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _tanh(x):
    # tanh from exp2, so one code path runs in the interpreter (no libdevice there) and on
    # sm_80/sm_90: (1 - e) / (1 + e) with e = exp(-2|x|), and its Taylor series below 0.25
    # where 1 - e would cancel. Max relative error ~2e-7 (float32).
    ax = tl.abs(x)
    e = tl.math.exp2(ax * -2.8853900817779268)  # exp(-2|x|)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * 0.021869488536155203))))
    return tl.where(ax < 0.25, small, tl.where(x < 0, -big, big))


@triton.jit
def _score_mods(qk, rows, cols, offset, qk_scale, mods,
                SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    # Logits in log2 units from the raw q.k (fastattn.score_mods, times log2(e)):
    #   softcap: c * tanh(scale * q.k / c);  ALiBi: - slope * |i + offset - j|
    # rows, cols broadcast (either orientation). Also returns t = tanh(scale * q.k / c),
    # the backward's softcap derivative 1 - t^2 (t is unused when SOFTCAP is off).
    cap_in, cap_out, slope2 = mods[0], mods[1], mods[2]
    if SOFTCAP:
        t = _tanh(qk * cap_in)  # cap_in = scale / c
        s = t * cap_out  # cap_out = c * log2(e)
    else:
        t = qk
        s = qk * qk_scale
    if ALIBI:
        s -= slope2 * tl.abs(rows + offset - cols).to(tl.float32)  # slope2 = slope * log2(e)
    return s, t


@triton.jit
def _fmix32(x):  # murmur3's finalizer, uint32 arithmetic (wraps modulo 2^32)
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    return x


@triton.jit
def _row_hash(rows, mods):
    # first half of fastattn.score_mods' dropout hash, per query position i (int32):
    # fmix32(row * 0x9E3779B1 + seed_lo), row = (b * Hq + h) * Nq + i modulo 2^32
    return _fmix32((mods[7] + rows.to(tl.uint32)) * 0x9E3779B1 + mods[4])


@triton.jit
def _col_hash(cols, mods):  # per key position j (int32): j * 0x85EBCA77 + seed_hi
    return cols.to(tl.uint32) * 0x85EBCA77 + mods[5]


@triton.jit
def _dropout_keep(hrow, hcol, mods):
    # True = kept: the 24-bit hash fmix32(hrow ^ hcol) >> 8 at or above the threshold.
    # hrow and hcol broadcast (either orientation); the row half is computed once per
    # query, the column half once per key, so a tile pays one fmix32 per pair.
    return (_fmix32(hrow ^ hcol) >> 8) >= mods[6]


@triton.jit
def _mods_tuple(cap_in, cap_out, Slopes, off_hz, N_CTX_Q, seed_lo, seed_hi, drop_thresh,
                drop_scale, ALIBI: tl.constexpr):
    # The score modifiers' per-(batch, query head) constants, one tuple for the inner loops:
    #   (cap_in, cap_out, slope2, drop_scale, seed_lo, seed_hi, drop_thresh, row_base)
    # cap_in = scale / softcap, cap_out = softcap * log2(e), drop_scale = 1 / (1 - p) come
    # from the host (no divisions here); entries a switched-off modifier would use are dead.
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(Slopes + off_hz.to(tl.int64)) * 1.4426950408889634  # (B, Hq) contiguous
    row_base = (off_hz.to(tl.int64) * N_CTX_Q).to(tl.uint32)  # wraps modulo 2^32 as specified
    return (cap_in, cap_out, slope2, drop_scale, seed_lo.to(tl.uint32, bitcast=True),
            seed_hi.to(tl.uint32, bitcast=True), drop_thresh.to(tl.uint32, bitcast=True),
            row_base)


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K, V, start_n, offs_m, offs_d, offs_dv,
                    stride_kn, stride_kk, stride_vn, stride_vk, qk_scale,
                    N_CTX_Q, N_CTX_K, WIN_LEFT, WIN_RIGHT, PM, mask_id, mrow0, mcol0,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    MASK_BM: tl.constexpr, MASK_BN: tl.constexpr,
                    MASKED: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
                    BITMASK: tl.constexpr, DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    mods, dhash, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
                    TMA: tl.constexpr = False):
    # One key block [start_n, start_n + BLOCK_N) of the online softmax.
    # TMA: K and V are tensor descriptors (rows x head dim of this (batch, kv head)), whose
    # loads zero-fill rows >= N_CTX_K and columns >= HEAD_DIM as the masked loads below do.
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if TMA:
        k = K.load([start_n, 0])
    else:
        kmask = offs_n[:, None] < N_CTX_K
        if HEAD_DIM != offs_d.shape[0]:
            kmask = kmask & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(K + _off2(offs_n, offs_d, stride_kn, stride_kk), mask=kmask, other=0.0)
    qk = _dot(q, tl.trans(k), tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32),
              DOT_UPCAST, DOT_PRECISION)
    qk, _ = _score_mods(qk, offs_m[:, None], offs_n[None, :], N_CTX_K - N_CTX_Q, qk_scale, mods,
                        SOFTCAP, ALIBI)
    if MASKED:
        vis = _visible(offs_m[:, None], offs_n[None, :], N_CTX_K - N_CTX_Q, N_CTX_K,
                       WIN_LEFT, WIN_RIGHT, WINDOW_LEFT, WINDOW_RIGHT)
        if BITMASK:
            vis = vis & _bitmask(PM, mask_id, mrow0 + tl.arange(0, BLOCK_M)[:, None],
                                 mcol0 + tl.arange(0, BLOCK_N)[None, :], MASK_BM, MASK_BN)
        qk = tl.where(vis, qk, float("-inf"))
    m_ij = tl.maximum(m_i, _row_max(qk))
    # A row that has seen no visible key keeps m = -inf; shift it by 0 so exp2 gives 0, not NaN.
    m_shift = tl.where(m_ij == float("-inf"), 0.0, m_ij)
    p = tl.math.exp2(qk - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + _row_sum(p)
    acc = acc * alpha[:, None]
    if TMA:
        v = V.load([start_n, 0])
    else:
        vmask = offs_n[:, None] < N_CTX_K
        if HEAD_DIM_V != offs_dv.shape[0]:
            vmask = vmask & (offs_dv[None, :] < HEAD_DIM_V)
        v = tl.load(V + _off2(offs_n, offs_dv, stride_vn, stride_vk), mask=vmask, other=0.0)
    if DROPOUT:  # l_i sums the undropped P; dropped entries leave P.V (1/(1-p): epilogue)
        p = tl.where(_dropout_keep(dhash[:, None], _col_hash(offs_n, mods)[None, :], mods), p, 0.0)
    if MASKED:  # non-finite policy (DESIGN.md): a NaN/inf v row reaches only the rows that
        # see its key. A plain P V gives 0 * NaN = NaN to every row of the block, so on a
        # block with such rows they are zeroed for the product, and the rows that see one
        # become NaN (whole rows: the triton kernels are exact per row, not per column).
        badrow = _row_max(((v != v) | (v == float("inf")) | (v == float("-inf"))).to(tl.int32))
        if tl.reduce(badrow, 0, tl.standard._elementwise_max) > 0:
            acc = _dot(p.to(v.dtype), tl.where(badrow[:, None] > 0, 0.0, v).to(v.dtype), acc,
                       DOT_UPCAST, DOT_PRECISION)
            seen = _row_max((vis & (badrow[None, :] > 0)).to(tl.int32))
            acc = tl.where(seen[:, None] > 0, float("nan"), acc)
        else:
            acc = _dot(p.to(v.dtype), v, acc, DOT_UPCAST, DOT_PRECISION)
    else:
        acc = _dot(p.to(v.dtype), v, acc, DOT_UPCAST, DOT_PRECISION)
    return acc, l_i, m_ij


# --------------------------------------------------------------------------- configs
# Tiles (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]) per kernel and padded head dim,
# chosen from ptxas -v over sm_80 and sm_90 (benchmarks/results/triton_compile_report.md):
# every entry compiles with 0 spills and fits shared memory. Why they shrink with the head
# dim: the fp32 accumulators (fwd: acc; dK/dV: dk + dv; dQ: dq) grow with it, and ptxas
# spills past 255 registers per thread. Hopper's wgmma wants the MMA's M side (BLOCK_M for
# fwd/dQ, BLOCK_N for dK/dV) >= 64 and num_warps a multiple of 4, so entries keep both (one
# exception, dK/dV at head dim 256, below).
# dK/dV: BLOCK_N key rows per program, BLOCK_M query rows per step; dQ: the reverse.
# maxnreg (triton.Config(maxnreg=...), the PTX's .maxnreg): without it ptxas may spill a
# few bytes to reach the next occupancy step (128 registers at 8 warps, 168 at 4). With score
# modifiers on (more live values: tanh, bias, hash) every entry gets MODS_MAXNREG, and a few
# entries change (TILES_MODS); dK/dV at head dim 256 always carries its own.
# float32 is not served on GPUs (TritonBackend.why_not): its products would be FMAs (see
# dot_precision) or 3xTF32 MMAs, and both spill registers in these kernels at every tile
# the compile report tried; the interpreter runs float32 exactly.

TILES = {  # 16-bit inputs (float16, bfloat16)
    "fwd": {
        16: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
        32: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
        # 64 and 128: tutorial-class tiles from benchmarks/results/triton_tile_sweep.md (clean
        # on sm_80 and sm_90, sparse with every score modifier and causal without); there
        # 128x64 w4 spills at head dim 128 (376-1648 B), 128x128 w8 s2 (16-104 B) and 64x128
        # w4 (16-532 B) too, and 128x64 w4 s3 at head dim 64 (16-144 B on sm_80)
        64: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4), (64, 64, 8, 3),
             (128, 32, 8, 3)],
        # (64x32 w8 s3 carries maxnreg 255: uncapped, ptxas spills 8 B to stay at 128
        # registers, the 8-warp occupancy step; capped it takes 159 and spills nothing)
        128: [(128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 3), (64, 64, 8, 2),
              (64, 32, 8, 3, 255)],
        256: [(64, 32, 8, 2), (64, 32, 8, 1)],
    },
    "dkdv": {
        16: [(32, 128, 8, 2), (32, 64, 4, 2), (64, 64, 8, 2)],
        32: [(32, 128, 8, 2), (32, 64, 8, 2), (16, 64, 4, 2)],
        64: [(32, 64, 8, 2), (16, 64, 4, 2), (32, 128, 8, 2)],
        # 128: the best tile that does not spill. Every 32-64 x 128 tile of the tutorial's
        # space spills here (triton_tile_sweep.md: 32x128 w8 s2 72-400 B, 64x128 w8 488-1084 B,
        # 32x128 w4 KBs), as do 32x64 (w8 s2: 8 B on sm_90; w4 s3: 136-1068 B) and 16x128
        # w8 s2 (16 B on sm_80): the resident K, V and the fp32 dK, dV accumulators of 64-128
        # keys x 128 leave too few registers for the streamed q/dO tiles.
        128: [(16, 64, 8, 2)],
        # 256: split into dV / dK launches (dkdv_parts). A 64-row wgmma tile needs a
        # 64 x 256 fp32 accumulator beside resident K and V and spills in the dK launch, so
        # this one runs 32-row mma.sync tiles on both archs; two pipeline stages (q, dO
        # staged through shared memory by cp.async) and the full register file keep it clean.
        256: [(32, 32, 8, 2, 255)],
    },
    "dq": {
        16: [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2)],
        32: [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2)],
        64: [(128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)],
        # 128: 128x32 w8 s2 from the sweep; 128x64 w8 s2 (8 B on sm_80) and 64x64 w4 s2
        # (56 B) spill
        128: [(128, 32, 8, 2), (64, 32, 8, 2), (64, 64, 8, 2)],
        256: [(64, 32, 8, 2)],
    },
}
TILES_MODS = {  # entries that replace TILES' when softcap, ALiBi or dropout is on
    "dq": {
        64: [(64, 32, 4, 2), (128, 32, 8, 2)],  # 128 x 64 spills 36 B under the sparse loop
        256: [(64, 16, 8, 2)],  # 64 x 32 spills 8-12 B on sm_90
    },
}
# The tutorial-class search space (Triton's fused-attention tutorial; FlexAttention's
# templates): benchmarks/triton_tile_sweep.py compiles all of it ahead of time for sm_80 and
# sm_90 and the tables above keep what fits shared memory and compiles without spills.
SEARCH_SPACE = {
    "fwd": dict(BLOCK_M=(64, 128), BLOCK_N=(32, 64, 128), num_warps=(4, 8), num_stages=(2, 3, 4, 5)),
    "dq": dict(BLOCK_M=(64, 128), BLOCK_N=(32, 64, 128), num_warps=(4, 8), num_stages=(2, 3, 4, 5)),
    # dK/dV: BLOCK_N key rows per program (the MMA's M side), BLOCK_M query rows per step
    "dkdv": dict(BLOCK_M=(16, 32, 64), BLOCK_N=(64, 128), num_warps=(4, 8), num_stages=(2, 3, 4, 5)),
}


def search_space(kernel):
    """[(BLOCK_M, BLOCK_N, num_warps, num_stages)] of SEARCH_SPACE[kernel]."""
    sp = SEARCH_SPACE[kernel]
    return [(bm, bn, w, st) for bm in sp["BLOCK_M"] for bn in sp["BLOCK_N"]
            for w in sp["num_warps"] for st in sp["num_stages"]]


MODS_MAXNREG = 255
SMEM_LIMIT = {80: 164 * 1024, 90: 228 * 1024}  # opt-in shared memory per block
INTERPRET_TILE = dict(BLOCK_M=32, BLOCK_N=16)  # the one fixed config under the interpreter


def pad_dim(d):
    return max(16, triton.next_power_of_2(d))


def smem_estimate(kernel, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, num_stages, elem_bytes):
    """Shared-memory bytes a config needs (pipelined tiles + MMA operand staging): an upper
    estimate to prune with before compiling; the compile report records the real figure."""
    st = max(num_stages, 1)
    if kernel == "fwd":  # q resident, k and v streamed, p staged for the second MMA
        return elem_bytes * (BLOCK_M * BLOCK_D + st * BLOCK_N * (BLOCK_D + BLOCK_DV)
                             + BLOCK_M * BLOCK_N)
    if kernel == "dkdv":  # k, v resident; q, do streamed; pT, dsT staged
        return elem_bytes * (BLOCK_N * (BLOCK_D + BLOCK_DV)
                             + st * BLOCK_M * (BLOCK_D + BLOCK_DV) + 2 * BLOCK_M * BLOCK_N)
    if kernel == "dq":  # q, do resident; k, v streamed; ds staged
        return elem_bytes * (BLOCK_M * (BLOCK_D + BLOCK_DV) + st * BLOCK_N * (BLOCK_D + BLOCK_DV)
                             + BLOCK_M * BLOCK_N)
    raise ValueError(kernel)


# Table tiles the forward's TMA variant (TMA=True) leaves out under a block mask: on sm_90 the
# descriptor loads of the flat sparse loop cost registers, and these spill there (128x128 w8
# s3 at head dim 64: 255 registers + 24 B, 16 B under .maxnreg 255, in the first sm_90 TMA
# compile run; the same tile is clean in the dense/causal loops and without TMA). Every tile
# left is clean: benchmarks/results/triton_tma_compile_report.md.
TILES_TMA_SPARSE_EXCLUDE = {"fwd": {64: [(128, 128, 8, 3)]}}


def default_tiles(kernel, BLOCK_D, BLOCK_DV, elem_bytes, smem_limit, mask_block=None,
                  mods=False, tma=False):
    """The tiles (BLOCK_M, BLOCK_N, num_warps, num_stages, maxnreg or None) the autotuner
    may pick for this problem class: the table's entry for the head dim (TILES_MODS' when
    score modifiers are on), kept if it fits `smem_limit`; with a block mask, only tiles
    dividing its blocks (powers of two: tile <= block), else the mask's own blocks.
    tma: the forward's TMA variant (drops TILES_TMA_SPARSE_EXCLUDE under a block mask)."""
    bd = min(max(BLOCK_D, BLOCK_DV, 16), 256)
    tiles = TILES_MODS.get(kernel, {}).get(bd) if mods else None
    tiles = [tuple(t) + (None,) * (5 - len(t)) for t in (tiles or TILES[kernel][bd])]
    if tma and mask_block is not None:
        drop = TILES_TMA_SPARSE_EXCLUDE.get(kernel, {}).get(bd, ())
        tiles = [t for t in tiles if tuple(t[:4]) not in drop] or tiles
    if mods:
        tiles = [(bm, bn, w, s, r or MODS_MAXNREG) for bm, bn, w, s, r in tiles]
    if mask_block is not None:  # clip to the mask's blocks (powers of two: tile divides block)
        mbm, mbn = mask_block
        clipped = [(min(bm, mbm), min(bn, mbn), w, s, r) for bm, bn, w, s, r in tiles]
        tiles = [t for i, t in enumerate(clipped) if t not in clipped[:i]]
    fit = [t for t in tiles
           if smem_estimate(kernel, t[0], t[1], BLOCK_D, BLOCK_DV, t[3], elem_bytes) <= smem_limit]
    return fit or [min(tiles, key=lambda t: (t[3], t[0] * t[1]))]


def dot_precision(elem_bytes, BLOCK_D, interpret=False):
    """tl.dot input_precision. float32 inputs multiply as IEEE float32: TF32 would miss the
    DESIGN.md error rule (3xTF32 keeps it but spills registers here, as do FMAs; the GPU
    path therefore declines float32). 16-bit inputs: the setting does not apply. The
    interpreter computes exactly."""
    if interpret:
        return "ieee"
    return "ieee" if elem_bytes == 4 else "tf32"


def dkdv_parts(BLOCK_D, BLOCK_DV):
    """PART values of the dK/dV launches: one fused launch, or dV then dK at head dim 256."""
    return (1, 2) if max(BLOCK_D, BLOCK_DV) >= 256 else (0,)


def _device_smem():
    import torch  # only on the GPU path

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return getattr(props, "shared_memory_per_block_optin", SMEM_LIMIT[80])


def _all_tiles():
    # every tile the tables (or their clipping to a block mask) can produce; the pruning
    # function keeps the ones default_tiles names for the call
    sizes = (16, 32, 64, 128)
    return [(bm, bn, w, s, r) for bm in sizes for bn in sizes for w in (4, 8)
            for s in (1, 2, 3, 4, 5) for r in (None, MODS_MAXNREG)]


def _make_prune(kernel, sparse):
    def prune(configs, named_args, **kwargs):
        mask_block = (kwargs["MASK_BM"], kwargs["MASK_BN"]) if sparse else None
        mods = bool(kwargs["SOFTCAP"] or kwargs["ALIBI"] or kwargs["DROPOUT"])
        want = default_tiles(kernel, kwargs["BLOCK_D"], kwargs["BLOCK_DV"],
                             named_args["Q"].element_size(), _device_smem(), mask_block, mods,
                             tma=bool(kwargs.get("TMA", False)))
        keep = [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages,
                    c.maxnreg) in want]
        return keep
    return prune


def _configs(kernel):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, maxnreg=r)
            for bm, bn, w, s, r in _all_tiles()]


# Autotune key: the problem class (power-of-two length buckets, head dims, masking mode);
# Triton adds dtypes. The buckets (len_bucket, passed as the otherwise unused LEN_BUCKET_Q /
# LEN_BUCKET_K) keep a new exact length from re-tuning: 1000 and 1024 share a bucket.
_KEY = ["LEN_BUCKET_Q", "LEN_BUCKET_K", "BLOCK_D", "BLOCK_DV", "WINDOW_LEFT", "WINDOW_RIGHT",
        "SPARSE", "MASK_BM", "MASK_BN", "SOFTCAP", "ALIBI", "DROPOUT"]
_KEY_FWD = _KEY + ["TMA"]  # the forward's TMA variant tunes apart from the pointer one


def len_bucket(n: int) -> int:
    """Autotune bucket of a sequence length: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


# --------------------------------------------------------------------------- forward
# The dropout seed and threshold change from call to call, the length buckets with the
# lengths: one compiled kernel for all.
_SEED_ARGS = ["seed_lo", "seed_hi", "drop_thresh", "LEN_BUCKET_Q", "LEN_BUCKET_K"]


@triton.jit(do_not_specialize=_SEED_ARGS)
def _attn_fwd(Q, K, V, Out, Lse, sm_scale,
              stride_qz, stride_qh, stride_qm, stride_qk,
              stride_kz, stride_kh, stride_kn, stride_kk,
              stride_vz, stride_vh, stride_vn, stride_vk,
              stride_oz, stride_oh, stride_om, stride_ok,
              H, GROUP, N_CTX_Q, N_CTX_K, WIN_LEFT, WIN_RIGHT,
              LEN_BUCKET_Q, LEN_BUCKET_K,  # autotune key only: length buckets
              KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX, KV_MASK_ID, PM,
              stride_bz, stride_bh, stride_bm,  # block-mask counts (Z, H, NQB), 0 = broadcast
              stride_iz, stride_ih, stride_im,  # partial lists (Z, H, NQB, KMAX)
              stride_fz, stride_fh, stride_fm,  # full lists (Z, H, NQB, KMAXF)
              cap_in, cap_out, Slopes, seed_lo, seed_hi, drop_thresh, drop_scale,  # score mods
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              MASK_BM: tl.constexpr, MASK_BN: tl.constexpr,
              WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
              SPARSE: tl.constexpr, BITMASK: tl.constexpr, EVEN_N: tl.constexpr,
              DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
              SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
              TMA: tl.constexpr = False):
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    tl.static_assert(BLOCK_DV >= HEAD_DIM_V)
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_z = off_hz // H
    off_h = off_hz % H
    off_hk = off_h // GROUP  # GQA: kv head of this query head, K/V never expanded
    Q += off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
    K += off_z.to(tl.int64) * stride_kz + off_hk.to(tl.int64) * stride_kh
    V += off_z.to(tl.int64) * stride_vz + off_hk.to(tl.int64) * stride_vh
    Out += off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh

    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_i = tl.full([BLOCK_M], 0.0, tl.float32) - float("inf")
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp2 below instead of exp
    mods = _mods_tuple(cap_in, cap_out, Slopes, off_hz, N_CTX_Q, seed_lo, seed_hi, drop_thresh,
                       drop_scale, ALIBI)
    dhash = 0  # dropout: the row half of the hash of this program's queries
    if DROPOUT:
        dhash = _row_hash(offs_m, mods)

    qmask = offs_m[:, None] < N_CTX_Q
    if HEAD_DIM != BLOCK_D:
        qmask = qmask & (offs_d[None, :] < HEAD_DIM)
    if TMA:
        # sm_90 tensor descriptors (TMA): 2-D (rows x head dim) views of this program's
        # (batch, head) slices of q, k, v, out. Bounds are the true sizes, so loads zero-fill
        # past N_CTX / HEAD_DIM and the store is clipped; the host (ops.tma_layout_ok) checks
        # the rules: unit inner stride, 16-byte aligned bases and row strides.
        Qd = tl.make_tensor_descriptor(Q, shape=[N_CTX_Q, HEAD_DIM], strides=[stride_qm, 1],
                                       block_shape=[BLOCK_M, BLOCK_D])
        K = tl.make_tensor_descriptor(K, shape=[N_CTX_K, HEAD_DIM], strides=[stride_kn, 1],
                                      block_shape=[BLOCK_N, BLOCK_D])
        V = tl.make_tensor_descriptor(V, shape=[N_CTX_K, HEAD_DIM_V], strides=[stride_vn, 1],
                                      block_shape=[BLOCK_N, BLOCK_DV])
        q = Qd.load([m0, 0])
    else:
        q = tl.load(Q + _off2(offs_m, offs_d, stride_qm, stride_qk), mask=qmask, other=0.0)

    if SPARSE:
        # kernel tiles divide the mask's blocks: this program is rows [mrow0, mrow0 + BLOCK_M)
        # of mask block qb, and each listed key block is walked in BLOCK_N sub-tiles, in one
        # flat loop per list over (listed block, sub-tile) pairs as FlexAttention does: every
        # step derives its key offset from the list, so the software pipeline runs across
        # block boundaries instead of restarting at each block
        qb = m0 // MASK_BM
        mrow0 = m0 - qb * MASK_BM
        lay = off_z * stride_bz + off_h * stride_bh + qb * stride_bm
        lay_i = off_z * stride_iz + off_h * stride_ih + qb * stride_im
        lay_f = off_z * stride_fz + off_h * stride_fh + qb * stride_fm
        # full blocks: no token mask (only the key bound of a ragged last block)
        for j in range(0, tl.load(FULL_KV_NUM + lay) * (MASK_BN // BLOCK_N)):
            i = j // (MASK_BN // BLOCK_N)  # the i-th listed block
            sub = (j % (MASK_BN // BLOCK_N)) * BLOCK_N
            kb_ = tl.load(FULL_KV_IDX + lay_f + i)
            start_n = kb_ * MASK_BN + sub
            acc, l_i, m_i = _attn_fwd_inner(
                acc, l_i, m_i, q, K, V, start_n, offs_m, offs_d, offs_dv,
                stride_kn, stride_kk, stride_vn, stride_vk, qk_scale,
                N_CTX_Q, N_CTX_K, WIN_LEFT, WIN_RIGHT, PM, -1, 0, 0,
                HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_BM, MASK_BN, not EVEN_N, False, False, False,
                DOT_UPCAST, DOT_PRECISION,
                mods, dhash, SOFTCAP, ALIBI, DROPOUT, TMA)
        # partial blocks: the mask's window rule, then its bitmask
        for j in range(0, tl.load(KV_NUM + lay) * (MASK_BN // BLOCK_N)):
            i = j // (MASK_BN // BLOCK_N)  # the i-th listed block
            sub = (j % (MASK_BN // BLOCK_N)) * BLOCK_N
            kb_ = tl.load(KV_IDX + lay_i + i)
            mask_id = -1
            if BITMASK:
                mask_id = tl.load(KV_MASK_ID + lay_i + i)
            start_n = kb_ * MASK_BN + sub
            acc, l_i, m_i = _attn_fwd_inner(
                acc, l_i, m_i, q, K, V, start_n, offs_m, offs_d, offs_dv,
                stride_kn, stride_kk, stride_vn, stride_vk, qk_scale,
                N_CTX_Q, N_CTX_K, WIN_LEFT, WIN_RIGHT, PM, mask_id, mrow0, sub,
                HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_BM, MASK_BN, True, WINDOW_LEFT, WINDOW_RIGHT, BITMASK,
                DOT_UPCAST, DOT_PRECISION,
                mods, dhash, SOFTCAP, ALIBI, DROPOUT, TMA)
    else:
        lo, full_lo, full_hi, hi = _kv_range(m0, N_CTX_Q, N_CTX_K, WIN_LEFT, WIN_RIGHT,
                                             BLOCK_M, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT)
        # masked blocks left of the window's interior
        for start_n in range(lo, full_lo, BLOCK_N):
            acc, l_i, m_i = _attn_fwd_inner(
                acc, l_i, m_i, q, K, V, start_n, offs_m, offs_d, offs_dv,
                stride_kn, stride_kk, stride_vn, stride_vk, qk_scale,
                N_CTX_Q, N_CTX_K, WIN_LEFT, WIN_RIGHT, PM, -1, 0, 0,
                HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_BM, MASK_BN, True, WINDOW_LEFT, WINDOW_RIGHT, False,
                DOT_UPCAST, DOT_PRECISION,
                mods, dhash, SOFTCAP, ALIBI, DROPOUT, TMA)
        # interior: every token visible, no mask
        for start_n in range(full_lo, full_hi, BLOCK_N):
            acc, l_i, m_i = _attn_fwd_inner(
                acc, l_i, m_i, q, K, V, start_n, offs_m, offs_d, offs_dv,
                stride_kn, stride_kk, stride_vn, stride_vk, qk_scale,
                N_CTX_Q, N_CTX_K, WIN_LEFT, WIN_RIGHT, PM, -1, 0, 0,
                HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_BM, MASK_BN, False, False, False, False,
                DOT_UPCAST, DOT_PRECISION,
                mods, dhash, SOFTCAP, ALIBI, DROPOUT, TMA)
        # masked blocks right of it (the causal diagonal, the ragged end)
        for start_n in range(full_hi, hi, BLOCK_N):
            acc, l_i, m_i = _attn_fwd_inner(
                acc, l_i, m_i, q, K, V, start_n, offs_m, offs_d, offs_dv,
                stride_kn, stride_kk, stride_vn, stride_vk, qk_scale,
                N_CTX_Q, N_CTX_K, WIN_LEFT, WIN_RIGHT, PM, -1, 0, 0,
                HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_BM, MASK_BN, True, WINDOW_LEFT, WINDOW_RIGHT, False,
                DOT_UPCAST, DOT_PRECISION,
                mods, dhash, SOFTCAP, ALIBI, DROPOUT, TMA)

    # epilogue: rows that saw no key get out 0 and lse -inf
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    if DROPOUT:
        acc = acc * drop_scale  # kept probabilities weigh 1 / (1 - p)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    row_ok = offs_m < N_CTX_Q
    tl.store(Lse + off_hz.to(tl.int64) * N_CTX_Q + offs_m, lse, mask=row_ok)
    omask = row_ok[:, None]
    if HEAD_DIM_V != BLOCK_DV:
        omask = omask & (offs_dv[None, :] < HEAD_DIM_V)
    if TMA:
        Od = tl.make_tensor_descriptor(Out, shape=[N_CTX_Q, HEAD_DIM_V], strides=[stride_om, 1],
                                       block_shape=[BLOCK_M, BLOCK_DV])
        Od.store([m0, 0], acc.to(Out.dtype.element_ty))
    else:
        tl.store(Out + _off2(offs_m, offs_dv, stride_om, stride_ok),
                 acc.to(Out.dtype.element_ty), mask=omask)


# --------------------------------------------------------------------------- backward


@triton.jit
def _attn_bwd_preprocess(O, DO, DLse, Delta,
                         stride_oz, stride_oh, stride_om, stride_ok,
                         stride_dz, stride_dh, stride_dm, stride_dk,
                         H, N_CTX_Q,
                         HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                         HAS_DLSE: tl.constexpr):
    # Delta = rowsum(dO * O) - dLse: the softmax backward's row term. dLse enters because
    # d lse_i / d s_ij = P_ij, so a loss on lse shifts dS = P * (dP - Delta) the same way.
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_z = off_hz // H
    off_h = off_hz % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = offs_m[:, None] < N_CTX_Q
    if HEAD_DIM_V != BLOCK_DV:
        mask = mask & (offs_dv[None, :] < HEAD_DIM_V)
    o = tl.load(O + off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh
                + _off2(offs_m, offs_dv, stride_om, stride_ok), mask=mask, other=0.0)
    do = tl.load(DO + off_z.to(tl.int64) * stride_dz + off_h.to(tl.int64) * stride_dh
                 + _off2(offs_m, offs_dv, stride_dm, stride_dk), mask=mask, other=0.0)
    delta = _row_sum(o.to(tl.float32) * do.to(tl.float32))
    row = off_hz.to(tl.int64) * N_CTX_Q + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLse + row, mask=offs_m < N_CTX_Q, other=0.0)
    tl.store(Delta + row, delta, mask=offs_m < N_CTX_Q)


@triton.jit
def _load_lse2(Lse, row, row_ok):
    # lse in log2 units; rows without keys (-inf) and rows past the end become +inf so that
    # exp2(s - lse) is exactly 0 there (no NaN, zero gradients).
    lse = tl.load(Lse + row, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    return lse * 1.4426950408889634


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, Lse, Delta, start_m, offs_n, offs_d, offs_dv,
                         stride_qm, stride_qk, stride_dom, stride_dok, qk_scale,
                         N_CTX_Q, N_CTX_K, WIN_LEFT, WIN_RIGHT, PM, mask_id, mrow0, mcol0,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    MASK_BM: tl.constexpr, MASK_BN: tl.constexpr,
                         MASKED: tl.constexpr, WINDOW_LEFT: tl.constexpr,
                         WINDOW_RIGHT: tl.constexpr, BITMASK: tl.constexpr,
                         DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         PART: tl.constexpr,
                         mods, dhash, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr):
    # One query block [start_m, start_m + BLOCK_M) against this program's key block,
    # computed transposed (keys on rows): pT = exp2(k.qT - lse), dsT = pT * (v.doT - Delta).
    # Dropout: dV gets the kept pT (times 1/(1-p) at the store), dpT is scaled by
    # keep/(1-p) before dsT; softcap: dsT *= 1 - tanh^2.
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N_CTX_Q
    qmask = row_ok[:, None]
    if HEAD_DIM != offs_d.shape[0]:
        qmask = qmask & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + _off2(offs_m, offs_d, stride_qm, stride_qk), mask=qmask, other=0.0)
    lse2 = _load_lse2(Lse, offs_m, row_ok)
    qkT = _dot(k, tl.trans(q), tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32),
               DOT_UPCAST, DOT_PRECISION)
    sT, tT = _score_mods(qkT, offs_m[None, :], offs_n[:, None], N_CTX_K - N_CTX_Q, qk_scale, mods,
                         SOFTCAP, ALIBI)
    pT = tl.math.exp2(sT - lse2[None, :])
    if MASKED:
        vis = _visible(offs_m[None, :], offs_n[:, None], N_CTX_K - N_CTX_Q, N_CTX_K,
                       WIN_LEFT, WIN_RIGHT, WINDOW_LEFT, WINDOW_RIGHT)
        if BITMASK:
            vis = vis & _bitmask(PM, mask_id, mrow0 + tl.arange(0, BLOCK_M)[None, :],
                                 mcol0 + tl.arange(0, BLOCK_N)[:, None], MASK_BM, MASK_BN)
        pT = tl.where(vis, pT, 0.0)
    domask = row_ok[:, None]
    if HEAD_DIM_V != offs_dv.shape[0]:
        domask = domask & (offs_dv[None, :] < HEAD_DIM_V)
    do = tl.load(DO + _off2(offs_m, offs_dv, stride_dom, stride_dok),
                 mask=domask, other=0.0)
    if DROPOUT:
        keepT = _dropout_keep(_row_hash(offs_m, mods)[None, :], dhash[:, None], mods)
    gT = pT  # what multiplies (dP - Delta) in dS: P, times 1 - t^2 under softcap
    if SOFTCAP:
        if PART != 1:
            gT = pT * (1.0 - tT * tT)
    if PART != 2:
        if DROPOUT:
            dv = _dot(tl.where(keepT, pT, 0.0).to(do.dtype), do, dv, DOT_UPCAST, DOT_PRECISION)
        else:
            dv = _dot(pT.to(do.dtype), do, dv, DOT_UPCAST, DOT_PRECISION)
    if PART != 1:
        delta = tl.load(Delta + offs_m, mask=row_ok, other=0.0)
        dpT = _dot(v, tl.trans(do), tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32),
                   DOT_UPCAST, DOT_PRECISION)
        if DROPOUT:
            dpT = tl.where(keepT, dpT * mods[3], 0.0)
        dsT = gT * (dpT - delta[None, :])
        dk = _dot(dsT.to(q.dtype), q, dk, DOT_UPCAST, DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=_SEED_ARGS)
def _attn_bwd_dkdv(Q, K, V, DO, Lse, Delta, DK, DV, sm_scale,
                   stride_qz, stride_qh, stride_qm, stride_qk,
                   stride_kz, stride_kh, stride_kn, stride_kk,
                   stride_vz, stride_vh, stride_vn, stride_vk,
                   stride_doz, stride_doh, stride_dom, stride_dok,
                   stride_dkz, stride_dkh, stride_dkn, stride_dkk,
                   stride_dvz, stride_dvh, stride_dvn, stride_dvk,
                   H, GROUP, N_CTX_Q, N_CTX_K, WIN_LEFT, WIN_RIGHT,
                   LEN_BUCKET_Q, LEN_BUCKET_K,  # autotune key only: length buckets
                   Q_NUM, Q_IDX, FULL_Q_NUM, FULL_Q_IDX, Q_MASK_ID, PM,
                   stride_bz, stride_bh, stride_bn,  # block-mask counts (Z, H, NKB)
                   stride_iz, stride_ih, stride_in,  # partial lists (Z, H, NKB, QMAX)
                   stride_fz, stride_fh, stride_fn,  # full lists (Z, H, NKB, QMAXF)
                   cap_in, cap_out, Slopes, seed_lo, seed_hi, drop_thresh, drop_scale,  # score mods
                   HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              MASK_BM: tl.constexpr, MASK_BN: tl.constexpr,
                   WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
                   SPARSE: tl.constexpr, BITMASK: tl.constexpr, EVEN_N: tl.constexpr,
                   DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   PART: tl.constexpr,
                   SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr):
    # One program per (key block, batch, kv head). The GROUP query heads that share this kv
    # head are summed here in a fixed order: GQA without atomics, bitwise deterministic.
    # PART: 0 = dK and dV; 1 = dV only; 2 = dK only. Head dim 256 launches 1 then 2: each
    # holds one fp32 accumulator (recomputing k.qT once more) instead of spilling two.
    start_n = tl.program_id(0)
    off_zk = tl.program_id(1)
    HKV = H // GROUP
    off_z = off_zk // HKV
    off_hk = off_zk % HKV
    n0 = start_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < N_CTX_K
    kmask = col_ok[:, None]
    if HEAD_DIM != BLOCK_D:
        kmask = kmask & (offs_d[None, :] < HEAD_DIM)
    vmask = col_ok[:, None]
    if HEAD_DIM_V != BLOCK_DV:
        vmask = vmask & (offs_dv[None, :] < HEAD_DIM_V)
    k = tl.load(K + off_z.to(tl.int64) * stride_kz + off_hk.to(tl.int64) * stride_kh
                + _off2(offs_n, offs_d, stride_kn, stride_kk), mask=kmask, other=0.0)
    v = tl.load(V + off_z.to(tl.int64) * stride_vz + off_hk.to(tl.int64) * stride_vh
                + _off2(offs_n, offs_dv, stride_vn, stride_vk), mask=vmask, other=0.0)
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_DV], 0.0, tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    dhash = 0  # dropout: the column half of the hash of this program's keys
    if DROPOUT:
        dhash = offs_n.to(tl.uint32) * 0x85EBCA77 + seed_hi.to(tl.uint32, bitcast=True)

    for g in range(0, GROUP):
        off_h = off_hk * GROUP + g
        off_hz = off_z * H + off_h
        Qh = Q + off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
        DOh = DO + off_z.to(tl.int64) * stride_doz + off_h.to(tl.int64) * stride_doh
        Lh = Lse + off_hz.to(tl.int64) * N_CTX_Q
        Dh = Delta + off_hz.to(tl.int64) * N_CTX_Q
        mods = _mods_tuple(cap_in, cap_out, Slopes, off_hz, N_CTX_Q, seed_lo, seed_hi,
                           drop_thresh, drop_scale, ALIBI)
        if SPARSE:
            kb = n0 // MASK_BN  # this program: columns [mcol0, mcol0 + BLOCK_N) of block kb
            mcol0 = n0 - kb * MASK_BN
            lay = off_z * stride_bz + off_h * stride_bh + kb * stride_bn
            lay_i = off_z * stride_iz + off_h * stride_ih + kb * stride_in
            lay_f = off_z * stride_fz + off_h * stride_fh + kb * stride_fn
            for j in range(0, tl.load(FULL_Q_NUM + lay) * (MASK_BM // BLOCK_M)):
                i = j // (MASK_BM // BLOCK_M)  # the i-th listed block
                sub = (j % (MASK_BM // BLOCK_M)) * BLOCK_M
                qb_ = tl.load(FULL_Q_IDX + lay_f + i)
                start_m = qb_ * MASK_BM + sub
                dk, dv = _attn_bwd_dkdv_inner(
                    dk, dv, k, v, Qh, DOh, Lh, Dh, start_m, offs_n, offs_d, offs_dv,
                    stride_qm, stride_qk, stride_dom, stride_dok, qk_scale,
                    N_CTX_Q, N_CTX_K, WIN_LEFT, WIN_RIGHT, PM, -1, 0, 0,
                    HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_BM, MASK_BN, False, False, False, False,
                    DOT_UPCAST, DOT_PRECISION, PART,
                    mods, dhash, SOFTCAP, ALIBI, DROPOUT)
            for j in range(0, tl.load(Q_NUM + lay) * (MASK_BM // BLOCK_M)):
                i = j // (MASK_BM // BLOCK_M)  # the i-th listed block
                sub = (j % (MASK_BM // BLOCK_M)) * BLOCK_M
                qb_ = tl.load(Q_IDX + lay_i + i)
                mask_id = -1
                if BITMASK:
                    mask_id = tl.load(Q_MASK_ID + lay_i + i)
                start_m = qb_ * MASK_BM + sub
                dk, dv = _attn_bwd_dkdv_inner(
                    dk, dv, k, v, Qh, DOh, Lh, Dh, start_m, offs_n, offs_d, offs_dv,
                    stride_qm, stride_qk, stride_dom, stride_dok, qk_scale,
                    N_CTX_Q, N_CTX_K, WIN_LEFT, WIN_RIGHT, PM, mask_id, sub, mcol0,
                    HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_BM, MASK_BN, True, WINDOW_LEFT, WINDOW_RIGHT,
                    BITMASK, DOT_UPCAST, DOT_PRECISION, PART,
                    mods, dhash, SOFTCAP, ALIBI, DROPOUT)
        else:
            lo, full_lo, full_hi, hi = _q_range(n0, N_CTX_Q, N_CTX_K, WIN_LEFT, WIN_RIGHT,
                                                BLOCK_M, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT)
            for start_m in range(lo, full_lo, BLOCK_M):
                dk, dv = _attn_bwd_dkdv_inner(
                    dk, dv, k, v, Qh, DOh, Lh, Dh, start_m, offs_n, offs_d, offs_dv,
                    stride_qm, stride_qk, stride_dom, stride_dok, qk_scale,
                    N_CTX_Q, N_CTX_K, WIN_LEFT, WIN_RIGHT, PM, -1, 0, 0,
                    HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_BM, MASK_BN, True, WINDOW_LEFT, WINDOW_RIGHT,
                    False, DOT_UPCAST, DOT_PRECISION, PART,
                    mods, dhash, SOFTCAP, ALIBI, DROPOUT)
            for start_m in range(full_lo, full_hi, BLOCK_M):
                dk, dv = _attn_bwd_dkdv_inner(
                    dk, dv, k, v, Qh, DOh, Lh, Dh, start_m, offs_n, offs_d, offs_dv,
                    stride_qm, stride_qk, stride_dom, stride_dok, qk_scale,
                    N_CTX_Q, N_CTX_K, WIN_LEFT, WIN_RIGHT, PM, -1, 0, 0,
                    HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_BM, MASK_BN, False, False, False, False,
                    DOT_UPCAST, DOT_PRECISION, PART,
                    mods, dhash, SOFTCAP, ALIBI, DROPOUT)
            for start_m in range(full_hi, hi, BLOCK_M):
                dk, dv = _attn_bwd_dkdv_inner(
                    dk, dv, k, v, Qh, DOh, Lh, Dh, start_m, offs_n, offs_d, offs_dv,
                    stride_qm, stride_qk, stride_dom, stride_dok, qk_scale,
                    N_CTX_Q, N_CTX_K, WIN_LEFT, WIN_RIGHT, PM, -1, 0, 0,
                    HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_BM, MASK_BN, True, WINDOW_LEFT, WINDOW_RIGHT,
                    False, DOT_UPCAST, DOT_PRECISION, PART,
                    mods, dhash, SOFTCAP, ALIBI, DROPOUT)

    if PART != 1:
        dk *= sm_scale  # dS carries no scale; dK = scale * dS^T Q
        tl.store(DK + off_z.to(tl.int64) * stride_dkz + off_hk.to(tl.int64) * stride_dkh
                 + _off2(offs_n, offs_d, stride_dkn, stride_dkk),
                 dk.to(DK.dtype.element_ty), mask=kmask)
    if PART != 2:
        if DROPOUT:
            dv *= drop_scale
        tl.store(DV + off_z.to(tl.int64) * stride_dvz + off_hk.to(tl.int64) * stride_dvh
                 + _off2(offs_n, offs_dv, stride_dvn, stride_dvk),
                 dv.to(DV.dtype.element_ty), mask=vmask)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, K, V, start_n, offs_m, offs_d, offs_dv,
                       stride_kn, stride_kk, stride_vn, stride_vk, qk_scale,
                       N_CTX_Q, N_CTX_K, WIN_LEFT, WIN_RIGHT, PM, mask_id, mrow0, mcol0,
                       HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    MASK_BM: tl.constexpr, MASK_BN: tl.constexpr,
                       MASKED: tl.constexpr, WINDOW_LEFT: tl.constexpr,
                       WINDOW_RIGHT: tl.constexpr, BITMASK: tl.constexpr,
                       DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       mods, dhash, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr):
    # One key block against this program's query block: dQ += dS . k
    # (dP scaled by keep/(1-p) under dropout; dS *= 1 - tanh^2 under softcap)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kmask = offs_n[:, None] < N_CTX_K
    if HEAD_DIM != offs_d.shape[0]:
        kmask = kmask & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + _off2(offs_n, offs_d, stride_kn, stride_kk), mask=kmask, other=0.0)
    vmask = offs_n[:, None] < N_CTX_K
    if HEAD_DIM_V != offs_dv.shape[0]:
        vmask = vmask & (offs_dv[None, :] < HEAD_DIM_V)
    v = tl.load(V + _off2(offs_n, offs_dv, stride_vn, stride_vk), mask=vmask, other=0.0)
    qk = _dot(q, tl.trans(k), tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32),
              DOT_UPCAST, DOT_PRECISION)
    s, t = _score_mods(qk, offs_m[:, None], offs_n[None, :], N_CTX_K - N_CTX_Q, qk_scale, mods,
                       SOFTCAP, ALIBI)
    p = tl.math.exp2(s - lse2[:, None])
    if MASKED:
        vis = _visible(offs_m[:, None], offs_n[None, :], N_CTX_K - N_CTX_Q, N_CTX_K,
                       WIN_LEFT, WIN_RIGHT, WINDOW_LEFT, WINDOW_RIGHT)
        if BITMASK:
            vis = vis & _bitmask(PM, mask_id, mrow0 + tl.arange(0, BLOCK_M)[:, None],
                                 mcol0 + tl.arange(0, BLOCK_N)[None, :], MASK_BM, MASK_BN)
        p = tl.where(vis, p, 0.0)
    if SOFTCAP:  # dS = P (dP - Delta) (1 - t^2): fold the softcap factor in now (fewer live tiles)
        p = p * (1.0 - t * t)
    dp = _dot(do, tl.trans(v), tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32),
              DOT_UPCAST, DOT_PRECISION)
    if DROPOUT:
        keep = _dropout_keep(dhash[:, None], _col_hash(offs_n, mods)[None, :], mods)
        dp = tl.where(keep, dp * mods[3], 0.0)
    ds = p * (dp - delta[:, None])
    dq = _dot(ds.to(k.dtype), k, dq, DOT_UPCAST, DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=_SEED_ARGS)
def _attn_bwd_dq(Q, K, V, DO, Lse, Delta, DQ, sm_scale,
                 stride_qz, stride_qh, stride_qm, stride_qk,
                 stride_kz, stride_kh, stride_kn, stride_kk,
                 stride_vz, stride_vh, stride_vn, stride_vk,
                 stride_doz, stride_doh, stride_dom, stride_dok,
                 stride_dqz, stride_dqh, stride_dqm, stride_dqk,
                 H, GROUP, N_CTX_Q, N_CTX_K, WIN_LEFT, WIN_RIGHT,
                 LEN_BUCKET_Q, LEN_BUCKET_K,  # autotune key only: length buckets
                 KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX, KV_MASK_ID, PM,
                 stride_bz, stride_bh, stride_bm,
                 stride_iz, stride_ih, stride_im,
                 stride_fz, stride_fh, stride_fm,
                 cap_in, cap_out, Slopes, seed_lo, seed_hi, drop_thresh, drop_scale,  # score mods
                 HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              MASK_BM: tl.constexpr, MASK_BN: tl.constexpr,
                 WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
                 SPARSE: tl.constexpr, BITMASK: tl.constexpr, EVEN_N: tl.constexpr,
                 DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr):
    # One program per (query block, batch, query head); walks the forward's key blocks.
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_z = off_hz // H
    off_h = off_hz % H
    off_hk = off_h // GROUP
    K += off_z.to(tl.int64) * stride_kz + off_hk.to(tl.int64) * stride_kh
    V += off_z.to(tl.int64) * stride_vz + off_hk.to(tl.int64) * stride_vh
    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < N_CTX_Q
    qmask = row_ok[:, None]
    if HEAD_DIM != BLOCK_D:
        qmask = qmask & (offs_d[None, :] < HEAD_DIM)
    domask = row_ok[:, None]
    if HEAD_DIM_V != BLOCK_DV:
        domask = domask & (offs_dv[None, :] < HEAD_DIM_V)
    q = tl.load(Q + off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
                + _off2(offs_m, offs_d, stride_qm, stride_qk), mask=qmask, other=0.0)
    do = tl.load(DO + off_z.to(tl.int64) * stride_doz + off_h.to(tl.int64) * stride_doh
                 + _off2(offs_m, offs_dv, stride_dom, stride_dok),
                 mask=domask, other=0.0)
    row = off_hz.to(tl.int64) * N_CTX_Q + offs_m
    lse2 = _load_lse2(Lse, row, row_ok)
    delta = tl.load(Delta + row, mask=row_ok, other=0.0)
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    mods = _mods_tuple(cap_in, cap_out, Slopes, off_hz, N_CTX_Q, seed_lo, seed_hi, drop_thresh,
                       drop_scale, ALIBI)
    dhash = 0  # dropout: the row half of the hash of this program's queries
    if DROPOUT:
        dhash = _row_hash(offs_m, mods)

    if SPARSE:
        # kernel tiles divide the mask's blocks: this program is rows [mrow0, mrow0 + BLOCK_M)
        # of mask block qb, and each listed key block is walked in BLOCK_N sub-tiles, in one
        # flat loop per list over (listed block, sub-tile) pairs as FlexAttention does: every
        # step derives its key offset from the list, so the software pipeline runs across
        # block boundaries instead of restarting at each block
        qb = m0 // MASK_BM
        mrow0 = m0 - qb * MASK_BM
        lay = off_z * stride_bz + off_h * stride_bh + qb * stride_bm
        lay_i = off_z * stride_iz + off_h * stride_ih + qb * stride_im
        lay_f = off_z * stride_fz + off_h * stride_fh + qb * stride_fm
        for j in range(0, tl.load(FULL_KV_NUM + lay) * (MASK_BN // BLOCK_N)):
            i = j // (MASK_BN // BLOCK_N)  # the i-th listed block
            sub = (j % (MASK_BN // BLOCK_N)) * BLOCK_N
            kb_ = tl.load(FULL_KV_IDX + lay_f + i)
            start_n = kb_ * MASK_BN + sub
            dq = _attn_bwd_dq_inner(
                dq, q, do, lse2, delta, K, V, start_n, offs_m, offs_d, offs_dv,
                stride_kn, stride_kk, stride_vn, stride_vk, qk_scale,
                N_CTX_Q, N_CTX_K, WIN_LEFT, WIN_RIGHT, PM, -1, 0, 0,
                HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_BM, MASK_BN, not EVEN_N, False, False, False,
                DOT_UPCAST, DOT_PRECISION,
                mods, dhash, SOFTCAP, ALIBI, DROPOUT)
        for j in range(0, tl.load(KV_NUM + lay) * (MASK_BN // BLOCK_N)):
            i = j // (MASK_BN // BLOCK_N)  # the i-th listed block
            sub = (j % (MASK_BN // BLOCK_N)) * BLOCK_N
            kb_ = tl.load(KV_IDX + lay_i + i)
            mask_id = -1
            if BITMASK:
                mask_id = tl.load(KV_MASK_ID + lay_i + i)
            start_n = kb_ * MASK_BN + sub
            dq = _attn_bwd_dq_inner(
                dq, q, do, lse2, delta, K, V, start_n, offs_m, offs_d, offs_dv,
                stride_kn, stride_kk, stride_vn, stride_vk, qk_scale,
                N_CTX_Q, N_CTX_K, WIN_LEFT, WIN_RIGHT, PM, mask_id, mrow0, sub,
                HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_BM, MASK_BN, True, WINDOW_LEFT, WINDOW_RIGHT, BITMASK,
                DOT_UPCAST, DOT_PRECISION,
                mods, dhash, SOFTCAP, ALIBI, DROPOUT)
    else:
        lo, full_lo, full_hi, hi = _kv_range(m0, N_CTX_Q, N_CTX_K, WIN_LEFT, WIN_RIGHT,
                                             BLOCK_M, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT)
        for start_n in range(lo, full_lo, BLOCK_N):
            dq = _attn_bwd_dq_inner(
                dq, q, do, lse2, delta, K, V, start_n, offs_m, offs_d, offs_dv,
                stride_kn, stride_kk, stride_vn, stride_vk, qk_scale,
                N_CTX_Q, N_CTX_K, WIN_LEFT, WIN_RIGHT, PM, -1, 0, 0,
                HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_BM, MASK_BN, True, WINDOW_LEFT, WINDOW_RIGHT, False,
                DOT_UPCAST, DOT_PRECISION,
                mods, dhash, SOFTCAP, ALIBI, DROPOUT)
        for start_n in range(full_lo, full_hi, BLOCK_N):
            dq = _attn_bwd_dq_inner(
                dq, q, do, lse2, delta, K, V, start_n, offs_m, offs_d, offs_dv,
                stride_kn, stride_kk, stride_vn, stride_vk, qk_scale,
                N_CTX_Q, N_CTX_K, WIN_LEFT, WIN_RIGHT, PM, -1, 0, 0,
                HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_BM, MASK_BN, False, False, False, False,
                DOT_UPCAST, DOT_PRECISION,
                mods, dhash, SOFTCAP, ALIBI, DROPOUT)
        for start_n in range(full_hi, hi, BLOCK_N):
            dq = _attn_bwd_dq_inner(
                dq, q, do, lse2, delta, K, V, start_n, offs_m, offs_d, offs_dv,
                stride_kn, stride_kk, stride_vn, stride_vk, qk_scale,
                N_CTX_Q, N_CTX_K, WIN_LEFT, WIN_RIGHT, PM, -1, 0, 0,
                HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_BM, MASK_BN, True, WINDOW_LEFT, WINDOW_RIGHT, False,
                DOT_UPCAST, DOT_PRECISION,
                mods, dhash, SOFTCAP, ALIBI, DROPOUT)

    dq *= sm_scale
    tl.store(DQ + off_z.to(tl.int64) * stride_dqz + off_h.to(tl.int64) * stride_dqh
             + _off2(offs_m, offs_d, stride_dqm, stride_dqk),
             dq.to(DQ.dtype.element_ty), mask=qmask)


# --------------------------------------------------------------------------- tuned entry points
# Dense/window calls tune among the table's tiles for the head dim; block-sparse calls among
# the same tiles clipped to the mask's blocks. Under the interpreter the launcher calls the
# raw kernels with INTERPRET_TILE instead (nothing to tune on a CPU).

if not triton.knobs.runtime.interpret:
    def _tuned(fn, kernel, sparse):
        key = {"fwd": _KEY_FWD, "dkdv": _KEY + ["PART"]}.get(kernel, _KEY)
        return triton.autotune(_configs(kernel), key=key,
                               prune_configs_by={"early_config_prune": _make_prune(kernel, sparse)})(fn)

    attn_fwd_dense = _tuned(_attn_fwd, "fwd", False)
    attn_fwd_sparse = _tuned(_attn_fwd, "fwd", True)
    attn_bwd_dkdv_dense = _tuned(_attn_bwd_dkdv, "dkdv", False)
    attn_bwd_dkdv_sparse = _tuned(_attn_bwd_dkdv, "dkdv", True)
    attn_bwd_dq_dense = _tuned(_attn_bwd_dq, "dq", False)
    attn_bwd_dq_sparse = _tuned(_attn_bwd_dq, "dq", True)
