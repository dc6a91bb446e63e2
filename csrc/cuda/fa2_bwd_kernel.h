// Backward kernels of FlashAttention-2's structure, on the PTX of ptx_ops.h (selected when the
// caller allows a non-deterministic backward: FlashParams::atomic_dq = 1). Three launches:
//
//   1. flash_bwd_preprocess_kernel (flash_bwd_kernel.h)  delta = rowsum(dO * O) - dlse, and
//      zeroes the fp32 dQ accumulator (dq_accum, (B, Hq, Nq, d) contiguous);
//   2. fa2_bwd_dkdv_kernel: one block per (key tile, batch * kv head), two warps per 16 keys;
//      K and V stay in shared memory; the block walks every query tile that sees the key tile,
//      for every query head of the kv head's group (GQA: dK/dV reduced in registers), with a
//      2-stage cp.async pipeline of (Q tile, dO tile). Per query tile, 5 mma.sync GEMMs:
//        S^T  = K Q^T        (A: K rows by ldmatrix.x4, B: Q by ldmatrix.x4)
//        dP^T = V dO^T       (A: V rows, B: dO)
//        P^T = exp2(S^T - lse), dS^T = P^T * (dP^T - delta), on the C fragments (fp32)
//        dV  += P^T dO       (A: P^T from registers, the C -> A reuse of the forward's P V;
//                             B: dO by ldmatrix.x4.trans)
//        dK  += dS^T Q       (A: dS^T from registers, B: Q by ldmatrix.x4.trans)
//        dQ  += dS K         (A: dS by ldmatrix.x4.trans of the dS^T tile the warps wrote to
//                             shared memory; B: K by ldmatrix.x4.trans), added to dq_accum
//                             with atomicAdd (key tiles of other blocks add to the same rows:
//                             the order, hence the rounding, is not reproducible);
//   3. fa2_bwd_convert_dq_kernel: dq = scale * dq_accum, rounded to the input type.
// Q, dO, K and V tiles are XOR-swizzled as in the forward (Swz); the dS^T tile is
// row-padded by 16 bytes (its rows are kBlockM = 32 or 64 elements: too short to swizzle by 8).
// Masking, score modifiers (softcap, ALiBi), dropout keep bits, lse gradient (through delta)
// are as in flash.h / flash_bwd_kernel.h.
#pragma once

#include "fa2_fwd_kernel.h"
#include "kernel_traits.h"
#include "kernel_utils.h"
#include "ptx_ops.h"

namespace fastattn::cuda {

template <int kHeadDim_, int kBlockN_, int kBlockM_, int kSplit_, typename T>
struct Fa2BwdTraits {
  using elem_type = T;
  // kBlockN-key tiles: kKeyGroups key groups of 16 (one m16 tile), kSplit warps per key group.
  static constexpr int kHeadDim = kHeadDim_, kBlockN = kBlockN_, kBlockM = kBlockM_;
  static constexpr int kSplit = kSplit_, kKeyGroups = kBlockN / 16;
  static constexpr int kNWarps = kKeyGroups * kSplit, kNThreads = kNWarps * 32;
  static constexpr int kMW = kBlockM / kSplit;  // queries of S^T / dP^T per warp
  static constexpr int kNI = kMW / 8;           // their n8 tiles
  static constexpr int kDW = kHeadDim / kSplit; // dK / dV columns per warp
  static constexpr int kDI = kDW / 8;           // their n8 tiles
  static constexpr int kKD = kHeadDim / 16;     // k16 steps of K Q^T and V dO^T
  static constexpr int kKM = kBlockM / 16;      // k16 steps of P^T dO and dS^T Q
  static constexpr int kKN = kBlockN / 16;      // k16 steps of dS K
  static constexpr int kChunks = kHeadDim / 8;
  // dQ = dS K: warps split the kBlockM x d tile as kRowTiles (m16) x kColSplits (column parts).
  static constexpr int kRowTiles = kBlockM / 16;
  static constexpr int kColSplits = kNWarps / kRowTiles;
  static constexpr int kColsQ = kHeadDim / kColSplits;
  static constexpr int kLdS = kBlockM + 8;  // P^T / dS^T row stride (elements): 16 B of padding
  static constexpr int kSmemKV = 2 * kBlockN * kHeadDim * 2;       // K, V
  static constexpr int kSmemQdO = 2 * 2 * kBlockM * kHeadDim * 2;  // 2 stages of (Q, dO)
  static constexpr int kSmemPdS = 2 * kBlockN * kLdS * 2;          // P^T, dS^T
  static constexpr int kSmemBytes = kSmemKV + kSmemQdO + kSmemPdS;
  // One block of 8 warps per SM promised to ptxas (up to 255 registers a thread): at two
  // (128 registers) dK, dV, S^T, dP^T and the addresses spill.
  static constexpr int kMinBlocksPerSm = 1;
  // Static counts per (key tile, query tile), all warps (the compile report prints them): FLOPs
  // of the 5 GEMMs; shared-memory bytes written (cp.async of Q and dO, st.shared of P^T and
  // dS^T) and read by ldmatrix (K / V rows and Q / dO slices for S^T / dP^T; P^T / dS^T rows and
  // dO / Q columns for dV / dK; dS^T and K columns for dQ, dS^T re-read per 16-column group).
  static constexpr long kFlopsPerTile = 10L * kBlockN * kBlockM * kHeadDim;
  static constexpr long kSmemWriteBytesPerTile = 2L * kBlockM * kHeadDim * 2 +
                                                 2L * kBlockN * kBlockM * 2;
  static constexpr long kSmemReadBytesPerTile =
      long(kNWarps) * (2L * 16 * kHeadDim * 2 + 2L * kMW * kHeadDim * 2 +  // S^T, dP^T
                       2L * 16 * kBlockM * 2 + 2L * kBlockM * kDW * 2 +    // dV, dK
                       (kColsQ / 16) * (kBlockN * 16L * 2 + kBlockN * 16L * 2));  // dQ
  static_assert(kChunks % 4 == 0, "the swizzle needs head dims that are multiples of 32");
  static_assert(kBlockN % 16 == 0 && 64 % kBlockN == 0 && 64 % kBlockM == 0, "mask blocks");
  static_assert((kNI % 2 == 0 || kNI == 1) && kDI % 2 == 0 && kColsQ % 16 == 0,
                "ldmatrix.x4 pairs");
  static_assert(kNI % 2 == 0 || kKD % 2 == 0, "kNI == 1 loads two k16 steps per ldmatrix.x4");
  static_assert(kRowTiles * kColSplits == kNWarps, "dQ warp split");
};

// Tile choices (two warps per 16-key group, which split the queries of S^T / dP^T and the
// columns of dK / dV; mask blocks, multiples of 64, hold whole tiles):
//   d=32:  64 keys, 64-query tiles, 8 warps: dK, dV 2 x 8 floats/thread, S^T, dP^T 2 x 16.
//   d=64:  64 keys, 64-query tiles, 8 warps: dK, dV 2 x 16 floats/thread, S^T, dP^T 2 x 16;
//          66 KB smem.
//   d=96:  64 keys, 64-query tiles, 8 warps: dK, dV 2 x 24, S^T, dP^T 2 x 16 (32-query tiles
//          would leave dQ's 4 column parts 24 columns: not whole 16-column ldmatrix pairs).
//   d=128: 64 keys, 32-query tiles, 8 warps: dK, dV 2 x 32 floats/thread, S^T, dP^T 2 x 8;
//          74 KB smem.
//   d=192, 256: 32 keys (2 key groups), 32-query tiles, FOUR warps per key group (8 warps):
//          dK, dV 2 x 24 / 2 x 32 floats per thread; each warp's S^T / dP^T slice is 16 keys x
//          8 queries (kNI == 1: one n8 tile, B by one ldmatrix.x4 per two k16 steps), 2 x 4
//          floats. (Two warps per key group, 4 warps, hold 2 x 64 floats of dK / dV at d=256
//          and spill at 255 registers.) smem at d=256: 32 KB K/V + 2 stages x 32 KB (Q, dO) +
//          5 KB P^T / dS^T = 101 KB; 64-query tiles would need 169 KB (over sm_80's 163 KB).
template <int kHeadDim, typename T>
struct Fa2BwdConfig;
template <typename T>
struct Fa2BwdConfig<32, T> {
  using type = Fa2BwdTraits<32, 64, 64, 2, T>;
};
template <typename T>
struct Fa2BwdConfig<64, T> {
  using type = Fa2BwdTraits<64, 64, 64, 2, T>;
};
template <typename T>
struct Fa2BwdConfig<96, T> {
  using type = Fa2BwdTraits<96, 64, 64, 2, T>;
};
template <typename T>
struct Fa2BwdConfig<128, T> {
  using type = Fa2BwdTraits<128, 64, 32, 2, T>;
};
template <typename T>
struct Fa2BwdConfig<192, T> {
  using type = Fa2BwdTraits<192, 32, 32, 4, T>;
};
template <typename T>
struct Fa2BwdConfig<256, T> {
  using type = Fa2BwdTraits<256, 32, 32, 4, T>;
};

// The query tiles one key tile [n0, n0 + kBlockN) is seen by through query head h, indexable
// (the pipeline prefetches tile i + 1 while it computes tile i). Block-uniform.
template <bool kSparse, int kBlockM, int kBlockN>
struct QueryTiles {
  int count = 0;
  int64_t first = 0;                 // dense
  int64_t row = 0;                   // sparse: the mask's (layout, key block) row
  int sub = 1, n_part = 0;

  __device__ __forceinline__ QueryTiles(const FlashParams& p, const WindowRule& w, int64_t b,
                                        int64_t h, int64_t n0) {
    const int64_t n1 = (n0 + kBlockN < p.nk) ? n0 + kBlockN : p.nk;
    if constexpr (!kSparse) {
      const int64_t lo = w.query_lo(n0), hi = w.query_hi(n1);
      first = (lo / kBlockM) * kBlockM;
      count = hi > first ? static_cast<int>((hi - first + kBlockM - 1) / kBlockM) : 0;
    } else {
      row = mask_layout(p, b, h) * p.nkb + n0 / p.mask_block_n;
      sub = static_cast<int>(p.mask_block_m / kBlockM);
      n_part = p.q_num_blocks[row];
      count = (n_part + p.full_q_num_blocks[row]) * sub;
    }
  }
  // Query tile t: its first row (>= nq: nothing to do).
  __device__ __forceinline__ int64_t m0(const FlashParams& p, int t) const {
    if constexpr (!kSparse) {
      return first + int64_t(t) * kBlockM;
    } else {
      const int blk = t / sub;
      const int64_t qb = blk < n_part ? p.q_indices[row * p.qmax + blk]
                                      : p.full_q_indices[row * p.qmax_full + (blk - n_part)];
      return qb * p.mask_block_m + (t % sub) * kBlockM;
    }
  }
  __device__ __forceinline__ TileMask mask(const FlashParams& p, const WindowRule& w, int t,
                                           int64_t m0, int64_t n0) const {
    const int64_t m1 = (m0 + kBlockM < p.nq) ? m0 + kBlockM : p.nq;
    const int64_t n1 = (n0 + kBlockN < p.nk) ? n0 + kBlockN : p.nk;
    const bool in_range = m0 + kBlockM <= p.nq && n0 + kBlockN <= p.nk;
    if constexpr (!kSparse) {
      return in_range && w.full(m0, m1, n0, n1) ? no_mask() : TileMask{true, true, nullptr, 0, 0, 0};
    } else {
      const int blk = t / sub;
      const bool partial = blk < n_part;
      if (!partial) return in_range ? no_mask() : TileMask{true, false, nullptr, 0, 0, 0};
      const int64_t mid = p.q_mask_ids[row * p.qmax + blk];
      const int64_t qb = p.q_indices[row * p.qmax + blk];
      return TileMask{true, true,
                      mid >= 0 ? p.partial_masks + mid * p.mask_block_m * p.mask_block_n : nullptr,
                      qb * p.mask_block_m, (n0 / p.mask_block_n) * p.mask_block_n,
                      p.mask_block_n};
    }
  }
};

template <typename Kt, bool kSparse>
__global__ void __launch_bounds__(Kt::kNThreads, Kt::kMinBlocksPerSm)
    fa2_bwd_dkdv_kernel(const FlashParams params) {
  using T = typename Kt::elem_type;
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kHeadDim = Kt::kHeadDim;
  constexpr int kNI = Kt::kNI, kDI = Kt::kDI, kKD = Kt::kKD, kKM = Kt::kKM, kKN = Kt::kKN;
  constexpr int kChunks = Kt::kChunks, kNThreads = Kt::kNThreads, kLdS = Kt::kLdS;
  constexpr int kMW = Kt::kMW, kDW = Kt::kDW;
  constexpr int kRowTiles = Kt::kRowTiles, kColsQ = Kt::kColsQ;
  constexpr int kTileQ = kBlockM * kHeadDim;  // elements of one Q (or dO) tile

  FA_DYNAMIC_SMEM(smem_);
  T* sK = reinterpret_cast<T*>(smem_);
  T* sV = sK + kBlockN * kHeadDim;
  T* sQdO = sV + kBlockN * kHeadDim;  // stage s: Q at 2s, dO at 2s + 1 tiles
  T* sP = sQdO + 4 * kTileQ;          // P^T (dropped, rescaled), (kBlockN, kLdS)
  T* sdS = sP + kBlockN * kLdS;       // dS^T, (kBlockN, kLdS)

  const FlashParams& p = params;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, t4 = lane & 3;
  constexpr int kKeyGroups = Kt::kKeyGroups;
  const int kg = warp % kKeyGroups, part = warp / kKeyGroups;  // 16-key group; query / column part
  const int64_t b = blockIdx.y / p.hkv, hk = blockIdx.y % p.hkv;
  const int64_t group = p.hq / p.hkv;
  const int64_t n0 = int64_t(blockIdx.x) * kBlockN;
  const WindowRule rule(p);
  const float scale_log2 = p.scale * kLog2e;
  const bool has_logit_mods = p.softcap > 0.f || p.alibi_slopes != nullptr;
  const bool has_dropout = p.dropout_p > 0.f;
  const float drop_rescale = 1.f / (1.f - p.dropout_p);

  // rows [row0, row0 + rows) of a (.., d) tensor -> a swizzled smem tile, zero-filled outside.
  auto copy_tile = [&](T* dst, const T* src, int64_t stride, int64_t row0, int64_t nrows,
                       int rows) {
    for (int c = tid; c < rows * kChunks; c += kNThreads) {
      const int r = c / kChunks, ch = c % kChunks;
      const bool ok = row0 + r < nrows && ch * 8 < p.d;
      const T* s = ok ? src + (row0 + r) * stride + ch * 8 : src;
      ptx::cp_async_16(dst + swz<kChunks>(r, ch), s, ok);
    }
  };
  const T* gK = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* gV = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  copy_tile(sK, gK, p.k_row_stride, n0, p.nk, kBlockN);
  copy_tile(sV, gV, p.v_row_stride, n0, p.nk, kBlockN);
  ptx::cp_async_commit();

  // ldmatrix lane offsets, as in the forward (fa2_fwd_kernel.h): every operand's lane row is
  // == lane (mod 8), so the swizzled chunk of step kk splits into Swz::lane_ofs (a lane part)
  // and Swz::step_imm (immediates).
  //   a_ofs: A operand, the 16 K / V rows of this warp's key group, non-trans;
  //   b_ofs: B operand from a row-major [n][k] tile (Q, dO for S^T, dP^T), non-trans;
  //   t_ofs: B operand from a row-major [k][n] tile (dO, Q for dV, dK), trans, for this warp's
  //          kDW / 16 column groups (16 columns: chunks 2 cp, 2 cp + 1; cp = part * kPairs + i).
  constexpr int kPairs = kDW / 16;
  using Sw = Swz<kChunks>;
  constexpr int kR = Sw::kSteps;
  auto chunk_ofs = [&](int r, int c) { return Sw::lane_ofs(lane, r, c); };
  // t_ofs: when kPairs is a multiple of kR, the warp's first column (part * kPairs pairs) is a
  // whole number of swizzle spans, so kR lane offsets plus immediates cover every pair (d=128,
  // 256); otherwise one offset per pair.
  constexpr bool kTCompact = kPairs % kR == 0;
  constexpr int kT = kTCompact ? kR : kPairs;
  int a_ofs[kR], b_ofs[kR], t_ofs[kT];
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    a_ofs[r] = (kg * 16 + (lane & 15)) * kHeadDim + chunk_ofs(r, lane >> 4);
    b_ofs[r] = (part * kMW + (lane >> 4) * 8 + (lane & 7)) * kHeadDim +
               chunk_ofs(r, (lane >> 3) & 1);
  }
#pragma unroll
  for (int i = 0; i < kT; ++i)
    t_ofs[i] = ((lane & 7) + ((lane >> 3) & 1) * 8) * kHeadDim +
               (kTCompact ? part * kPairs * 16 + Sw::lane_ofs(lane, i, lane >> 4)
                          : Sw::chunk(lane, 2 * (part * kPairs + i) + (lane >> 4)) * 8);
  // kNI == 1 (8 queries per warp): B of two k16 steps per ldmatrix.x4: lanes 8 i .. 8 i + 7
  // address rows 0..7 at chunk 4 j + i of step pair j; kSpan / 4 lane offsets plus immediates.
  constexpr int kB1 = Sw::kSpan / 4;
  int b1_ofs[kB1];
#pragma unroll
  for (int r = 0; r < kB1; ++r)
    b1_ofs[r] = (part * kMW + (lane & 7)) * kHeadDim + Sw::chunk(lane, 4 * r + (lane >> 3)) * 8;
  auto t_at = [&](int i) { return kTCompact ? t_ofs[i % kR] + Sw::step_imm(i) : t_ofs[i]; };
  // P^T / dS^T as the A operand of dV / dK (rows: the key group, non-trans), and dS as the A
  // operand of dQ (this warp's m16 query rows: ldmatrix.trans of dS^T).
  const int pa_ofs = (kg * 16 + (lane & 15)) * kLdS + (lane >> 4) * 8;
  const int rt = warp % kRowTiles, cs = warp / kRowTiles;
  const int ds_ofs = ((lane >> 4) * 8 + (lane & 7)) * kLdS + rt * 16 + ((lane >> 3) & 1) * 8;

  float acc_dk[kDI][4], acc_dv[kDI][4];  // 16 keys x kDW columns (part * kDW ...)
#pragma unroll
  for (int di = 0; di < kDI; ++di)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[di][e] = acc_dv[di][e] = 0.f;

  for (int64_t gi = 0; gi < group; ++gi) {
    const int64_t h = hk * group + gi;
    const QueryTiles<kSparse, kBlockM, kBlockN> tiles(p, rule, b, h, n0);
    const int n_tiles = tiles.count;
    if (n_tiles == 0) continue;
    const T* gQ = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
    const T* gdO = static_cast<const T*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride;
    const float* gLse = p.lse + (b * p.hq + h) * p.nq;
    const float* gDelta = p.delta + (b * p.hq + h) * p.nq;
    float* gdQ = p.dq_accum + (b * p.hq + h) * p.nq * p.d;
    const float slope = p.alibi_slopes ? p.alibi_slopes[b * p.hq + h] * kLog2e : 0.f;

    auto issue = [&](int t) {  // Q and dO of query tile t into stage t % 2
      const int64_t m0 = tiles.m0(p, t);
      if (m0 < p.nq) {
        T* dst = sQdO + 2 * (t % 2) * kTileQ;
        copy_tile(dst, gQ, p.q_row_stride, m0, p.nq, kBlockM);
        copy_tile(dst + kTileQ, gdO, p.do_row_stride, m0, p.nq, kBlockM);
      }
    };
    // Every warp is done with the previous head's stages, P^T and dS^T before they are refilled.
    __syncthreads();
    issue(0);
    ptx::cp_async_commit();

    for (int it = 0; it < n_tiles; ++it) {
      ptx::cp_async_wait<0>();  // this thread's copies of tile it (and K, V) landed
      // Tile it visible to every warp; every warp done with tile it - 1 (its stage, P^T, dS^T).
      __syncthreads();
      if (it + 1 < n_tiles) issue(it + 1);
      ptx::cp_async_commit();
      const int64_t m0 = tiles.m0(p, it);
      if (m0 >= p.nq) continue;  // block-uniform
      const T* sQ = sQdO + 2 * (it % 2) * kTileQ;
      const T* sdO = sQ + kTileQ;
      const int mw = part * kMW;  // this warp's first query of S^T, tile-local

      // Which of this lane's S^T entries are visible (masked tiles only; before the GEMMs, so
      // the tile mask is dead while the fragments live). Lane element (ni, 2 hh + e): key
      // n0 + kg * 16 + g + 8 hh, query m0 + mw + ni * 8 + 2 t4 + e; bit 2 ni + e of vis[hh].
      uint32_t vis[2] = {~0u, ~0u};
      {
        const TileMask tm = tiles.mask(p, rule, it, m0, n0);
        if (tm.on) {
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int64_t key = n0 + kg * 16 + g + 8 * hh;
            uint32_t vm = 0;
#pragma unroll 1
            for (int j = 0; j < 2 * kNI; ++j)
              vm |= uint32_t(tm.visible(rule, m0 + mw + (j / 2) * 8 + 2 * t4 + (j % 2), key)) << j;
            vis[hh] = vm;
          }
        }
      }

      // S^T = K Q^T and dP^T = V dO^T: 16 keys x kMW queries per warp.
      float acc_s[kNI][4], acc_dp[kNI][4];
#pragma unroll
      for (int ni = 0; ni < kNI; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[ni][e] = acc_dp[ni][e] = 0.f;
      if constexpr (kNI == 1) {  // one n8 tile: B of steps 2j, 2j + 1 by one ldmatrix.x4
        auto gemm = [&](float (*acc)[4], const T* sA, const T* sB) {
#pragma unroll
          for (int j = 0; j < kKD / 2; ++j) {
            uint32_t a0[4], a1[4], bb[4];
            ptx::ldmatrix_x4(a0, sA + a_ofs[(2 * j) % kR] + Sw::step_imm(2 * j));
            ptx::ldmatrix_x4(a1, sA + a_ofs[(2 * j + 1) % kR] + Sw::step_imm(2 * j + 1));
            ptx::ldmatrix_x4(bb, sB + b1_ofs[j % kB1] + (4 * j / Sw::kSpan) * Sw::kSpan * 8);
            const uint32_t b0[2] = {bb[0], bb[1]}, b1[2] = {bb[2], bb[3]};
            ptx::mma_m16n8k16<T>(acc[0], a0, b0);
            ptx::mma_m16n8k16<T>(acc[0], a1, b1);
          }
        };
        gemm(acc_s, sK, sQ);
        gemm(acc_dp, sV, sdO);
      } else {
#pragma unroll
      for (int kk = 0; kk < kKD; ++kk) {
        uint32_t ka[4], va[4];
        ptx::ldmatrix_x4(ka, sK + a_ofs[kk % kR] + Sw::step_imm(kk));
        ptx::ldmatrix_x4(va, sV + a_ofs[kk % kR] + Sw::step_imm(kk));
#pragma unroll
        for (int np = 0; np < kNI / 2; ++np) {
          uint32_t qb[4], ob[4];
          ptx::ldmatrix_x4(qb, sQ + b_ofs[kk % kR] + np * 16 * kHeadDim + Sw::step_imm(kk));
          ptx::ldmatrix_x4(ob, sdO + b_ofs[kk % kR] + np * 16 * kHeadDim + Sw::step_imm(kk));
          const uint32_t q0[2] = {qb[0], qb[1]}, q1[2] = {qb[2], qb[3]};
          const uint32_t o0[2] = {ob[0], ob[1]}, o1[2] = {ob[2], ob[3]};
          ptx::mma_m16n8k16<T>(acc_s[2 * np], ka, q0);
          ptx::mma_m16n8k16<T>(acc_s[2 * np + 1], ka, q1);
          ptx::mma_m16n8k16<T>(acc_dp[2 * np], va, o0);
          ptx::mma_m16n8k16<T>(acc_dp[2 * np + 1], va, o1);
        }
      }
      }

      // P^T (dropped and rescaled: what dV needs) and dS^T, 16-bit, to shared memory, in 32-bit
      // tile-local coordinates (ql = query - m0).
      const int nq_left = static_cast<int>(p.nq - m0 < kBlockM ? p.nq - m0 : kBlockM);
      const int dist0 = static_cast<int>(m0 + (p.nk - p.nq) - n0) - (kg * 16 + g);  // i+off-j
      const uint32_t drow0 = static_cast<uint32_t>((b * p.hq + h) * p.nq + m0);
      const uint32_t dcol0 = static_cast<uint32_t>(n0 + kg * 16 + g) * kHashColMul +
                             static_cast<uint32_t>(p.dropout_seed >> 32);
#pragma unroll
      for (int ni = 0; ni < kNI; ++ni) {
        float lse2[2], dlt[2];
        uint32_t rh[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int ql = mw + ni * 8 + 2 * t4 + e;
          const bool q_in = ql < nq_left;
          lse2[e] = q_in ? gLse[m0 + ql] * kLog2e : neg_inf();
          dlt[e] = q_in ? gDelta[m0 + ql] : 0.f;
          rh[e] = has_dropout ? fmix32((drow0 + ql) * kHashGolden +
                                       static_cast<uint32_t>(p.dropout_seed))
                              : 0u;
        }
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          float pd2[2], ds2[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float s = acc_s[ni][2 * hh + e], dp = acc_dp[ni][2 * hh + e];
            float x, dtanh = 1.f;
            if (has_logit_mods) {
              if (p.softcap > 0.f) {
                const float th = fa_tanhf(s * (p.scale / p.softcap));
                dtanh = 1.f - th * th;
                x = th * (p.softcap * kLog2e);
              } else {
                x = s * scale_log2;
              }
              x -= slope * fabsf(static_cast<float>(dist0 + mw + ni * 8 + 2 * t4 + e - 8 * hh));
            } else {
              x = s * scale_log2;
            }
            const bool seen = ((vis[hh] >> (2 * ni + e)) & 1u) && lse2[e] != neg_inf();
            const float pv = seen ? exp2f(x - lse2[e]) : 0.f;
            float pd = pv, dpd = dp;
            if (has_dropout) {
              const bool kept = (fmix32(rh[e] ^ (dcol0 + uint32_t(8 * hh) * kHashColMul)) >> 8) >=
                                p.dropout_threshold;
              pd = kept ? pv * drop_rescale : 0.f;
              dpd = kept ? dp * drop_rescale : 0.f;
            }
            // dS = P (dP - delta) (times 1 - tanh^2 under softcap); 0 where masked, so a masked
            // key's non-finite V (dP) reaches no dQ row.
            pd2[e] = pd;
            ds2[e] = seen ? pv * (dpd - dlt[e]) * dtanh : 0.f;
          }
          const int at = (kg * 16 + g + 8 * hh) * kLdS + mw + ni * 8 + 2 * t4;
          ptx::sts(reinterpret_cast<uint32_t*>(sP + at), ptx::pack2<T>(pd2[0], pd2[1]));
          ptx::sts(reinterpret_cast<uint32_t*>(sdS + at), ptx::pack2<T>(ds2[0], ds2[1]));
        }
      }
      __syncthreads();  // P^T and dS^T complete (both query parts of every key group)

      // dV += P^T dO and dK += dS^T Q on this warp's 16 keys x kDW columns: A by ldmatrix.x4
      // of P^T / dS^T, B by ldmatrix.x4.trans of dO / Q. d > 128 (dK, dV 2 x 24 or 2 x 32
      // floats per thread, 12 / 16 n8 tiles): one GEMM after the other, so half the operand
      // registers are live.
      if constexpr (kHeadDim > 128) {
        auto gemm = [&](float (*acc)[4], const T* sA, const T* sB) {
#pragma unroll
          for (int kk = 0; kk < kKM; ++kk) {
            uint32_t a[4];
            ptx::ldmatrix_x4(a, sA + pa_ofs + kk * 16);
#pragma unroll
            for (int dp2 = 0; dp2 < kPairs; ++dp2) {
              uint32_t bb[4];
              ptx::ldmatrix_x4_trans(bb, sB + t_at(dp2) + kk * 16 * kHeadDim);
              const uint32_t b0[2] = {bb[0], bb[1]}, b1[2] = {bb[2], bb[3]};
              ptx::mma_m16n8k16<T>(acc[2 * dp2], a, b0);
              ptx::mma_m16n8k16<T>(acc[2 * dp2 + 1], a, b1);
            }
          }
        };
        gemm(acc_dv, sP, sdO);
        gemm(acc_dk, sdS, sQ);
      } else {
#pragma unroll
      for (int kk = 0; kk < kKM; ++kk) {
        uint32_t pa[4], da[4];
        ptx::ldmatrix_x4(pa, sP + pa_ofs + kk * 16);
        ptx::ldmatrix_x4(da, sdS + pa_ofs + kk * 16);
#pragma unroll
        for (int dp2 = 0; dp2 < kPairs; ++dp2) {
          uint32_t ob[4], qb[4];
          const int ofs = t_at(dp2) + kk * 16 * kHeadDim;
          ptx::ldmatrix_x4_trans(ob, sdO + ofs);
          ptx::ldmatrix_x4_trans(qb, sQ + ofs);
          const uint32_t o0[2] = {ob[0], ob[1]}, o1[2] = {ob[2], ob[3]};
          const uint32_t q0[2] = {qb[0], qb[1]}, q1[2] = {qb[2], qb[3]};
          ptx::mma_m16n8k16<T>(acc_dv[2 * dp2], pa, o0);
          ptx::mma_m16n8k16<T>(acc_dv[2 * dp2 + 1], pa, o1);
          ptx::mma_m16n8k16<T>(acc_dk[2 * dp2], da, q0);
          ptx::mma_m16n8k16<T>(acc_dk[2 * dp2 + 1], da, q1);
        }
      }
      }

      // dQ (this warp's 16 query rows x kColsQ columns) = dS K over the tile's kBlockN keys,
      // 16 columns at a time (rolled: 8 accumulator floats live next to dK / dV), added to
      // dq_accum unscaled (the convert kernel multiplies by scale).
      const int64_t qi0 = m0 + rt * 16 + g;
#pragma unroll 1
      for (int dp2 = 0; dp2 < kColsQ / 16; ++dp2) {
        const int cp = cs * (kColsQ / 16) + dp2;  // 16-column group of K / dQ
        // K by ldmatrix.x4.trans: rows kk * 16 + (lane & 7) + 8 ((lane >> 3) & 1), chunk
        // 2 cp + (lane >> 4), swizzled.
        const int k_ofs = ((lane & 7) + ((lane >> 3) & 1) * 8) * kHeadDim +
                          Sw::chunk(lane, 2 * cp + (lane >> 4)) * 8;
        float acc_dq[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int kk = 0; kk < kKN; ++kk) {
          uint32_t a[4], kb[4];
          ptx::ldmatrix_x4_trans(a, sdS + ds_ofs + kk * 16 * kLdS);
          ptx::ldmatrix_x4_trans(kb, sK + k_ofs + kk * 16 * kHeadDim);
          const uint32_t k0[2] = {kb[0], kb[1]}, k1[2] = {kb[2], kb[3]};
          ptx::mma_m16n8k16<T>(acc_dq[0], a, k0);
          ptx::mma_m16n8k16<T>(acc_dq[1], a, k1);
        }
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int64_t qi = qi0 + 8 * hh;
          if (qi >= p.nq) continue;
#pragma unroll
          for (int n8 = 0; n8 < 2; ++n8) {
            const int col = cp * 16 + n8 * 8 + 2 * t4;
            if (col < p.d) {
              atomicAdd(gdQ + qi * p.d + col, acc_dq[n8][2 * hh]);
              atomicAdd(gdQ + qi * p.d + col + 1, acc_dq[n8][2 * hh + 1]);
            }
          }
        }
      }
    }
  }
  ptx::cp_async_wait<0>();  // nothing outstanding at exit

  // dK (times scale) and dV of this warp's 16 keys x kDW columns, from the C fragments.
  T* gdK = static_cast<T*>(p.dk) + b * p.dk_batch_stride + hk * p.dk_head_stride;
  T* gdV = static_cast<T*>(p.dv) + b * p.dv_batch_stride + hk * p.dv_head_stride;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int64_t key = n0 + kg * 16 + g + 8 * hh;
    if (key >= p.nk) continue;
#pragma unroll
    for (int di = 0; di < kDI; ++di) {
      const int col = part * kDW + di * 8 + 2 * t4;
      if (col < p.d) {
        *reinterpret_cast<uint32_t*>(gdK + key * p.dk_row_stride + col) =
            ptx::pack2<T>(acc_dk[di][2 * hh] * p.scale, acc_dk[di][2 * hh + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(gdV + key * p.dv_row_stride + col) =
            ptx::pack2<T>(acc_dv[di][2 * hh], acc_dv[di][2 * hh + 1]);
      }
    }
  }
}

// dq = scale * dq_accum in the input type: one thread per 8 columns of a row.
template <typename T>
__global__ void __launch_bounds__(128) fa2_bwd_convert_dq_kernel(const FlashParams params) {
  const FlashParams& p = params;
  const int64_t chunks = p.d / 8;
  const int64_t total = p.b * p.hq * p.nq * chunks;
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < total;
       c += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = c / chunks, col = (c % chunks) * 8;  // row = (b * hq + h) * nq + i
    const int64_t i = row % p.nq, bh = row / p.nq, b = bh / p.hq, h = bh % p.hq;
    const float* src = p.dq_accum + row * p.d + col;
    float vals[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) vals[e] = src[e] * p.scale;
    T* dst = static_cast<T*>(p.dq) + b * p.dq_batch_stride + h * p.dq_head_stride +
             i * p.dq_row_stride;
    store_row<8>(dst, static_cast<int>(col), p.d, vals);
  }
}

}  // namespace fastattn::cuda
