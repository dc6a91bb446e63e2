// Forward kernel of FlashAttention-2's structure, on the PTX of ptx_ops.h:
//
//   - one block per (128-row query tile, batch * query head); 4 warps, 32 query rows each
//     (two m16 row tiles per warp);
//   - shared memory: the Q tile and kStages stages of (K tile, V tile), rows of 16-byte chunks
//     XOR-swizzled (Swz below: chunk ^ (row % 8), or for rows of 4 / 12 chunks (d = 32, 96)
//     chunk ^ (row / 2 % 4) within groups of 4) so that cp.async writes and ldmatrix reads are
//     free of bank conflicts; every byte arrives by cp.async (zero-filled past the sequence / head dim);
//   - a kStages-deep cp.async pipeline over the key tiles with ONE __syncthreads per tile: wait
//     for tile i's group, barrier (tile i visible to all, stage of tile i-1 free), issue tile
//     i + kStages - 1 into that free stage, compute tile i;
//   - S = Q K^T with mma.sync m16n8k16 (Q by ldmatrix.x4, K by ldmatrix.x4), S in registers
//     (fp32 C fragments); online softmax on the fragments (row max / sum over the 4 lanes of a
//     row by two xor shuffles; the row sum stays lane-partial until the end, as in FA2);
//   - P converted to 16-bit in registers and reused as the A operand of P V (the C layout of
//     two n8 tiles is the A layout of one k16 step); V by ldmatrix.x4.trans; O in registers;
//   - tiles that need no token mask (dense interior tiles, full blocks of a block mask) run the
//     body instantiated with kMasked = false, tiles on a causal/window edge, the sequence end or
//     a partial block run the kMasked = true body: two compiled loop bodies;
//   - block-sparse calls walk the BlockMask's kv lists (partial blocks, then full blocks) once per
//     query tile; a partial block's bitmask is read once per tile, each bit by the one lane whose
//     S fragment holds that (query, key) entry.
// Score modifiers (softcap, ALiBi), dropout (the keep bits of kernel_utils.h's hash, as the other
// kernels), GQA and lse are as in flash.h. Non-finite V on masked tiles (DESIGN.md): the threads
// check the V chunks they copied, __syncthreads_or makes it block-uniform, and such a tile takes
// a scalar P V over the keys each row sees (rare: only with non-finite inputs).
#pragma once

#include "kernel_traits.h"
#include "kernel_utils.h"
#include "ptx_ops.h"

namespace fastattn::cuda {

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, int kStages_, typename T>
struct Fa2FwdTraits {
  using elem_type = T;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_, kNThreads = kNWarps * 32, kStages = kStages_;
  static constexpr int kMI = kBlockM / (16 * kNWarps);  // m16 row tiles per warp
  static constexpr int kNI = kBlockN / 8;               // n8 tiles of S per row tile
  static constexpr int kDI = kHeadDim / 8;              // n8 tiles of O per row tile
  static constexpr int kKQ = kHeadDim / 16;             // k16 steps of Q K^T
  static constexpr int kKP = kBlockN / 16;              // k16 steps of P V
  static constexpr int kChunks = kHeadDim / 8;          // 16-byte chunks per row
  static constexpr int kSmemQ = kBlockM * kHeadDim * 2;
  static constexpr int kSmemTileKV = kBlockN * kHeadDim * 2;  // one K (or V) tile
  static constexpr int kSmemBytes = kSmemQ + kStages * 2 * kSmemTileKV;
  // At most 2 blocks/SM promised to ptxas (255 registers per thread for 4 warps): the O and S
  // fragments of 32 rows per warp need them; shared memory alone would allow 3 at d=64 on sm_90.
  static constexpr int kMinBlocksPerSm =
      cmax(1, cmin(2, kSmemPerSm / (kSmemBytes + kSmemReservedPerBlock)));
  // Static counts per (query tile, key tile), all warps (the compile report prints them).
  static constexpr long kFlopsPerTile = 4L * kBlockM * kBlockN * kHeadDim;
  static constexpr long kSmemWriteBytesPerTile = 2L * kSmemTileKV;        // cp.async of K, V
  static constexpr long kSmemReadBytesPerTile =
      long(kNWarps) * (2L * kSmemTileKV + kMI * 16L * kHeadDim * 2);       // ldmatrix K, V, Q
  static_assert(kChunks % 4 == 0, "the swizzle needs head dims that are multiples of 32");
  static_assert(kMI >= 1 && kBlockM == kMI * 16 * kNWarps, "row tiles");
  static_assert(kNI % 2 == 0 && kDI % 2 == 0, "ldmatrix.x4 loads pairs of n8 tiles");
};

// Tile choices (d <= 128: 4 warps x 32 rows, 128-row query tiles):
//   d=64:  64-key tiles, 3 stages: 16 KB Q + 3 x 16 KB K/V = 64 KB.
//   d=128: 32-key tiles (the O fragments are 128 floats per thread, S stays at 32), 3 stages:
//          32 KB Q + 3 x 16 KB = 80 KB.
template <int kHeadDim, typename T>
struct Fa2FwdConfig;
template <typename T>
struct Fa2FwdConfig<64, T> {
  using type = Fa2FwdTraits<64, 128, 64, 4, 3, T>;
};
template <typename T>
struct Fa2FwdConfig<128, T> {
  using type = Fa2FwdTraits<128, 128, 32, 4, 3, T>;
};
// d=32 and d=96 (rows of 4 / 12 chunks: the 4-chunk swizzle span), 3 stages:
//   d=32: 64-key tiles (O is 32 floats per thread, S 64): 8 KB Q + 3 x 8 KB K/V = 32 KB.
//   d=96: 32-key tiles (O is 96 floats per thread; with 64-key tiles, S 64 more, ptxas spills
//         at 255 registers), 24 KB Q + 3 x 12 KB K/V = 60 KB.
template <typename T>
struct Fa2FwdConfig<32, T> {
  using type = Fa2FwdTraits<32, 128, 64, 4, 3, T>;
};
template <typename T>
struct Fa2FwdConfig<96, T> {
  using type = Fa2FwdTraits<96, 128, 32, 4, 3, T>;
};
// Head dims 192 and 256: one m16 row tile per warp (64-row
// query tiles) so that O fits in registers (d=256: 128 floats per thread), 32-key tiles, 2 stages:
//   d=192: 24 KB Q + 2 x 24 KB K/V = 72 KB;  d=256: 32 KB Q + 2 x 32 KB = 96 KB.
template <typename T>
struct Fa2FwdConfig<192, T> {
  using type = Fa2FwdTraits<192, 64, 32, 4, 2, T>;
};
template <typename T>
struct Fa2FwdConfig<256, T> {
  using type = Fa2FwdTraits<256, 64, 32, 4, 2, T>;
};

// Shared-memory swizzle of a tile whose rows are kChunks 16-byte chunks. An ldmatrix phase reads
// one chunk from each of 8 consecutive rows (== lane mod 8); a cp.async phase of 8 threads
// writes 8 consecutive chunks. Both are bank-conflict free iff those 8 chunks fall in 8 distinct
// 16-byte bank groups (address / 16 mod 8).
//   kChunks % 8 == 0 (d = 64, 128, 192, 256): chunk ^ (row % 8); a row starts at bank group 0,
//     so the 8 rows' chunks land in groups c ^ 0 .. c ^ 7.
//   kChunks % 8 == 4 (d = 32: 4 chunks, d = 96: 12 chunks): a row starts at bank group
//     4 (row % 2), so row % 8 already spreads over two half-lines; the chunk within its aligned
//     group of 4 is XORed with (row / 2) % 4: the 8 rows land in groups
//     4 (row % 2) + (c ^ (row / 2 % 4)) (+ the constant of c's group), all distinct. (The same
//     rule as FlashAttention-2's d96 layout, which tiles 32-element column blocks with a 2-bit
//     swizzle; here rows stay contiguous, one layout for every kChunks % 4 == 0.)
template <int kChunks>
struct Swz {
  static_assert(kChunks % 4 == 0, "rows must be a multiple of 4 16-byte chunks (d % 32 == 0)");
  static constexpr int kSpan = kChunks % 8 == 0 ? 8 : 4;  // chunks one XOR stays within
  static constexpr int kSteps = kSpan / 2;                // k16 steps (chunk pairs) per span
  // The XOR mask of a row (depends on row % 8 only: offsets by multiples of 8 rows keep it).
  __device__ __forceinline__ static int mask(int row) {
    return kSpan == 8 ? (row & 7) : ((row >> 1) & 3);
  }
  __device__ __forceinline__ static int chunk(int row, int c) { return c ^ mask(row); }
  // ldmatrix lane offsets of k16 step r (< kSteps) of a span, chunk bit c (elements), for a lane
  // whose row is == lane (mod 8): ((2 r + c) ^ m) = ((2 r) ^ (m & ~1)) | (c ^ (m & 1)). Step kk
  // of a row adds the immediate (kk / kSteps) * kSpan * 8 to lane_ofs(lane, kk % kSteps, c).
  __device__ __forceinline__ static int lane_ofs(int lane, int r, int c) {
    const int m = mask(lane);
    return ((((2 * r) ^ (m & ~1)) | (c ^ (m & 1))) * 8);
  }
  __host__ __device__ static constexpr int step_imm(int kk) { return (kk / kSteps) * kSpan * 8; }
};

// Element offset of (row, 16-byte chunk) in a swizzled tile of kChunks chunks per row.
template <int kChunks>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * kChunks * 8 + Swz<kChunks>::chunk(row, chunk) * 8;
}

// How one (query tile, key tile) is masked: on == false: not at all; else keys past the
// sequence, the window rule (if rule) and the bitmask (if bits: the byte of (m0, n0), rows at
// stride mask_block_n) decide.
struct Fa2TileMask {
  bool on, rule;
  const uint8_t* bits;
};

// The key tiles one query tile visits, indexable (the pipeline needs tile i + kStages - 1
// while it computes tile i). Block-uniform.
template <bool kSparse, int kBlockM, int kBlockN>
struct KeyTiles {
  int count = 0;
  // dense
  int64_t first = 0;
  // sparse (32-bit: registers are scarce in this kernel)
  int row = 0, sub = 1, n_part = 0;

  __device__ __forceinline__ KeyTiles(const FlashParams& p, const WindowRule& w, int64_t b,
                                      int64_t h, int64_t m0) {
    const int64_t m1 = (m0 + kBlockM < p.nq) ? m0 + kBlockM : p.nq;
    if constexpr (!kSparse) {
      const int64_t lo = w.key_lo(m0), hi = w.key_hi(m1);
      first = (lo / kBlockN) * kBlockN;
      count = hi > first ? static_cast<int>((hi - first + kBlockN - 1) / kBlockN) : 0;
    } else {
      row = static_cast<int>(mask_layout(p, b, h) * p.nqb + m0 / p.mask_block_m);
      sub = static_cast<int>(p.mask_block_n / kBlockN);
      n_part = p.kv_num_blocks[row];
      count = static_cast<int>((n_part + p.full_kv_num_blocks[row]) * sub);
    }
  }

  // Key tile t: its first key (>= nk: nothing to do) and its token mask.
  __device__ __forceinline__ int64_t n0(const FlashParams& p, int t) const {
    if constexpr (!kSparse) {
      return first + int64_t(t) * kBlockN;
    } else {
      const int blk = static_cast<int>(t / sub);
      const int64_t kb = blk < n_part
                             ? p.kv_indices[int64_t(row) * p.kmax + blk]
                             : p.full_kv_indices[int64_t(row) * p.kmax_full + (blk - n_part)];
      return kb * p.mask_block_n + (t % sub) * kBlockN;
    }
  }
  __device__ __forceinline__ Fa2TileMask mask(const FlashParams& p, const WindowRule& w, int t,
                                              int64_t m0, int64_t n0) const {
    const int64_t m1 = (m0 + kBlockM < p.nq) ? m0 + kBlockM : p.nq;
    const int64_t n1 = (n0 + kBlockN < p.nk) ? n0 + kBlockN : p.nk;
    if constexpr (!kSparse) {
      const bool full = n0 + kBlockN <= p.nk && w.full(m0, m1, n0, n1);
      return Fa2TileMask{!full, true, nullptr};
    } else {
      const int blk = static_cast<int>(t / sub);
      const bool partial = blk < n_part;
      const bool in_range = n0 + kBlockN <= p.nk && m0 + kBlockM <= p.nq;
      if (!partial && in_range) return Fa2TileMask{false, false, nullptr};
      const int64_t mid = partial ? p.kv_mask_ids[int64_t(row) * p.kmax + blk] : -1;
      // The bitmask's byte of (query m0, key n0): rows follow at stride mask_block_n.
      const uint8_t* bits =
          mid >= 0 ? p.partial_masks + mid * p.mask_block_m * p.mask_block_n +
                         (m0 % p.mask_block_m) * p.mask_block_n + n0 % p.mask_block_n
                   : nullptr;
      return Fa2TileMask{true, partial, bits};
    }
  }
};

// Which keys of a masked tile one query row sees, in tile-local coordinates: jl in [lo, hi) and,
// for a partial block with a bitmask, bits[jl] != 0 (bits: that row's bytes from key n0 on).
struct RowVis {
  int lo, hi;
  const uint8_t* bits;
};
template <int kBlockN>
__device__ __forceinline__ RowVis row_vis_(const FlashParams& p, const Fa2TileMask& tm,
                                           int64_t row, int64_t m0, int64_t n0) {
  RowVis v{0, kBlockN, nullptr};
  if (row >= p.nq) {
    v.hi = 0;
    return v;
  }
  const int64_t end = p.nk - n0;  // keys past the sequence
  if (end < v.hi) v.hi = static_cast<int>(end);
  if (tm.rule) {
    const int64_t at = row + (p.nk - p.nq) - n0;  // the diagonal key of the row, tile-local
    if (p.window_left >= 0 && at - p.window_left > v.lo)
      v.lo = static_cast<int>(at - p.window_left < kBlockN ? at - p.window_left : kBlockN);
    if (p.window_right >= 0 && at + p.window_right + 1 < v.hi)
      v.hi = static_cast<int>(at + p.window_right + 1 > 0 ? at + p.window_right + 1 : 0);
  }
  if (tm.bits) v.bits = tm.bits + (row - m0) * p.mask_block_n;
  return v;
}

template <typename Kt, bool kSparse>
__global__ void __launch_bounds__(Kt::kNThreads, Kt::kMinBlocksPerSm)
    fa2_fwd_kernel(const FlashParams params) {
  using T = typename Kt::elem_type;
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kHeadDim = Kt::kHeadDim;
  constexpr int kMI = Kt::kMI, kNI = Kt::kNI, kDI = Kt::kDI, kKQ = Kt::kKQ, kKP = Kt::kKP;
  constexpr int kChunks = Kt::kChunks, kStages = Kt::kStages, kNThreads = Kt::kNThreads;

  FA_DYNAMIC_SMEM(smem_);
  T* sQ = reinterpret_cast<T*>(smem_);
  T* sKV = reinterpret_cast<T*>(smem_ + Kt::kSmemQ);  // stage s: K at 2s, V at 2s + 1 tiles
  constexpr int kTileElems = kBlockN * kHeadDim;

  const FlashParams& p = params;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, t4 = lane & 3;
  const int64_t b = blockIdx.y / p.hq, h = blockIdx.y % p.hq, hk = h / (p.hq / p.hkv);
  const int64_t m0 = int64_t(blockIdx.x) * kBlockM;
  const WindowRule rule(p);
  const float scale_log2 = p.scale * kLog2e;
  const bool has_logit_mods = p.softcap > 0.f || p.alibi_slopes != nullptr;
  const bool has_dropout = p.dropout_p > 0.f;

  const T* gQ = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const T* gK = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* gV = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;

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

  const KeyTiles<kSparse, kBlockM, kBlockN> tiles(p, rule, b, h, m0);
  const int n_tiles = tiles.count;

  // Prologue: Q, then key tiles 0 .. kStages - 2, one commit group each.
  copy_tile(sQ, gQ, p.q_row_stride, m0, p.nq, kBlockM);
  ptx::cp_async_commit();
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) {
      const int64_t n0 = tiles.n0(p, s);
      if (n0 < p.nk) {
        copy_tile(sKV + (2 * s) * kTileElems, gK, p.k_row_stride, n0, p.nk, kBlockN);
        copy_tile(sKV + (2 * s + 1) * kTileElems, gV, p.v_row_stride, n0, p.nk, kBlockN);
      }
    }
    ptx::cp_async_commit();
  }

  float acc_o[kMI][kDI][4];
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
    for (int di = 0; di < kDI; ++di)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mi][di][e] = 0.f;
  float m_i[kMI][2], l_i[kMI][2];  // running max (log2 units) and lane-partial running sum
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi) {
    m_i[mi][0] = m_i[mi][1] = neg_inf();
    l_i[mi][0] = l_i[mi][1] = 0.f;
  }
  auto row_of = [&](int mi, int hh) -> int64_t {
    return m0 + warp * (kMI * 16) + mi * 16 + g + 8 * hh;
  };
  auto row_vis = [&](const Fa2TileMask& tm, int64_t row, int64_t n0) {
    return row_vis_<kBlockN>(p, tm, row, m0, n0);
  };

  // ldmatrix row addresses. Every operand's lane row is == lane (mod 8), so its swizzled chunk
  // for k step kk (c: the lane's chunk bit) splits into Swz::lane_ofs(lane, kk % kSteps, c) and
  // the immediate Swz::step_imm(kk) (for 8-chunk spans: 8 (kk / 4) + ((2 (kk % 4)) ^ (lane & 6)
  // | (c ^ lane & 1))): kSteps lane-dependent offsets per operand, the rest immediates (keeps the
  // unrolled loops from holding one address register per ldmatrix).
  using Sw = Swz<kChunks>;
  constexpr int kR = Sw::kSteps;  // lane offsets per operand (4, or 2 for 4-chunk spans)
  auto chunk_ofs = [&](int r, int c) { return Sw::lane_ofs(lane, r, c); };
  int q_ofs[kMI][kR], k_ofs[kR], v_ofs[kR];
#pragma unroll
  for (int r = 0; r < kR; ++r) {
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi)
      q_ofs[mi][r] = (warp * kMI * 16 + mi * 16 + (lane & 15)) * kHeadDim + chunk_ofs(r, lane >> 4);
    k_ofs[r] = ((lane >> 4) * 8 + (lane & 7)) * kHeadDim + chunk_ofs(r, (lane >> 3) & 1);
    v_ofs[r] = ((lane & 7) + ((lane >> 3) & 1) * 8) * kHeadDim + chunk_ofs(r, lane >> 4);
  }

  // One key tile, in stage st. kMasked: apply the token mask tm.
  auto tile_body = [&](auto masked_tag, int st, int64_t n0, const Fa2TileMask& tm, bool v_bad) {
    constexpr bool kMasked = decltype(masked_tag)::value;
    const T* sK = sKV + (2 * st) * kTileElems;
    const T* sV = sKV + (2 * st + 1) * kTileElems;

    // S = Q K^T
    float acc_s[kMI][kNI][4];
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
      for (int ni = 0; ni < kNI; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[mi][ni][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kKQ; ++kk) {
      uint32_t qa[kMI][4];
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi)
        ptx::ldmatrix_x4(qa[mi], sQ + q_ofs[mi][kk % kR] + Sw::step_imm(kk));
#pragma unroll
      for (int np = 0; np < kNI / 2; ++np) {
        uint32_t kb[4];
        ptx::ldmatrix_x4(kb, sK + k_ofs[kk % kR] + np * 16 * kHeadDim + Sw::step_imm(kk));
        const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
#pragma unroll
        for (int mi = 0; mi < kMI; ++mi) {
          ptx::mma_m16n8k16<T>(acc_s[mi][2 * np], qa[mi], b0);
          ptx::mma_m16n8k16<T>(acc_s[mi][2 * np + 1], qa[mi], b1);
        }
      }
    }

    // Logits (log2 units), mask, online softmax; P overwrites S in place. Fragment registers
    // are indexed statically only (every loop over them unrolled); per-element work is 32-bit,
    // in tile-local key coordinates jl = key - n0.
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int64_t row = row_of(mi, hh);
        if (has_logit_mods) {
          const bool softcap = p.softcap > 0.f;
          const float cap_in = softcap ? p.scale / p.softcap : 0.f, cap_out = p.softcap * kLog2e;
          const float slope = p.alibi_slopes ? p.alibi_slopes[b * p.hq + h] * kLog2e : 0.f;
          const int dist0 = static_cast<int>(row + (p.nk - p.nq) - n0);  // i + off - j at jl 0
#pragma unroll
          for (int ni = 0; ni < kNI; ++ni)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float& x = acc_s[mi][ni][2 * hh + e];
              x = softcap ? fa_tanhf(x * cap_in) * cap_out : x * scale_log2;
              x -= slope * fabsf(static_cast<float>(dist0 - (ni * 8 + 2 * t4 + e)));
            }
        } else {
#pragma unroll
          for (int ni = 0; ni < kNI; ++ni)
#pragma unroll
            for (int e = 0; e < 2; ++e) acc_s[mi][ni][2 * hh + e] *= scale_log2;
        }
        if constexpr (kMasked) {
          // This lane's 2 * kNI entries of the row as one bit mask: built in a rolled loop
          // (one 16-bit load of the partial block's bitmask per n8 tile, consumed at once).
          const RowVis vis = row_vis(tm, row, n0);
          uint32_t vm = 0;
#pragma unroll 1
          for (int ni = 0; ni < kNI; ++ni) {
            const int jl = ni * 8 + 2 * t4;
            const uint32_t pair = vis.bits ? *reinterpret_cast<const uint16_t*>(vis.bits + jl)
                                           : 0x0101u;
            const uint32_t two = (pair & 1u) | ((pair >> 7) & 2u);
            const uint32_t in = (jl >= vis.lo && jl < vis.hi ? 1u : 0u) |
                                (jl + 1 >= vis.lo && jl + 1 < vis.hi ? 2u : 0u);
            vm |= (two & in) << (2 * ni);
          }
#pragma unroll
          for (int ni = 0; ni < kNI; ++ni)
#pragma unroll
            for (int e = 0; e < 2; ++e)
              if (!((vm >> (2 * ni + e)) & 1u)) acc_s[mi][ni][2 * hh + e] = neg_inf();
        }
        float mx = neg_inf();
#pragma unroll
        for (int ni = 0; ni < kNI; ++ni)
          mx = fmaxf(mx, fmaxf(acc_s[mi][ni][2 * hh], acc_s[mi][ni][2 * hh + 1]));
        mx = fmaxf(mx, ptx::shfl_xor(mx, 1));
        mx = fmaxf(mx, ptx::shfl_xor(mx, 2));
        const float m_new = fmaxf(m_i[mi][hh], mx);
        const float m_use = m_new == neg_inf() ? 0.f : m_new;  // nothing seen yet: no NaN
        const float alpha = exp2f(m_i[mi][hh] - m_use);
        m_i[mi][hh] = m_new;
        float l = 0.f;
#pragma unroll
        for (int ni = 0; ni < kNI; ++ni)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pv = exp2f(acc_s[mi][ni][2 * hh + e] - m_use);
            l += pv;  // the softmax sums undropped probabilities
            acc_s[mi][ni][2 * hh + e] = pv;
          }
        l_i[mi][hh] = l_i[mi][hh] * alpha + l;
#pragma unroll
        for (int di = 0; di < kDI; ++di) {
          acc_o[mi][di][2 * hh] *= alpha;
          acc_o[mi][di][2 * hh + 1] *= alpha;
        }
        if (has_dropout) {  // P V sees P * keep; 1 / (1 - p) scales O at the end
          // keep (i, j) iff (fmix32(row_hash(i) ^ (j * col_mul + seed_hi)) >> 8) >= threshold
          const uint32_t rh = fmix32(static_cast<uint32_t>((b * p.hq + h) * p.nq + row) *
                                         kHashGolden +
                                     static_cast<uint32_t>(p.dropout_seed));
          const uint32_t cbase = static_cast<uint32_t>(n0) * kHashColMul +
                                 static_cast<uint32_t>(p.dropout_seed >> 32);
#pragma unroll
          for (int ni = 0; ni < kNI; ++ni)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const uint32_t jl = static_cast<uint32_t>(ni * 8 + 2 * t4 + e);
              if ((fmix32(rh ^ (cbase + jl * kHashColMul)) >> 8) < p.dropout_threshold)
                acc_s[mi][ni][2 * hh + e] = 0.f;
            }
        }
      }
    }

    if (!v_bad) {
      // P (registers, 16-bit) as the A operand of P V; V by ldmatrix.trans.
#pragma unroll
      for (int kk = 0; kk < kKP; ++kk) {
        uint32_t pa[kMI][4];
#pragma unroll
        for (int mi = 0; mi < kMI; ++mi) {
          pa[mi][0] = ptx::pack2<T>(acc_s[mi][2 * kk][0], acc_s[mi][2 * kk][1]);
          pa[mi][1] = ptx::pack2<T>(acc_s[mi][2 * kk][2], acc_s[mi][2 * kk][3]);
          pa[mi][2] = ptx::pack2<T>(acc_s[mi][2 * kk + 1][0], acc_s[mi][2 * kk + 1][1]);
          pa[mi][3] = ptx::pack2<T>(acc_s[mi][2 * kk + 1][2], acc_s[mi][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < kDI / 2; ++dp) {
          uint32_t vb[4];
          ptx::ldmatrix_x4_trans(vb, sV + v_ofs[dp % kR] + kk * 16 * kHeadDim + Sw::step_imm(dp));
          const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
#pragma unroll
          for (int mi = 0; mi < kMI; ++mi) {
            ptx::mma_m16n8k16<T>(acc_o[mi][2 * dp], pa[mi], b0);
            ptx::mma_m16n8k16<T>(acc_o[mi][2 * dp + 1], pa[mi], b1);
          }
        }
      }
    } else {
      // Non-finite V in a masked tile: P V over the keys each row sees only (0 * NaN would
      // reach rows that do not see the key). Per (row, 8-column group) of O (unrolled: static
      // register indices), a rolled loop over the keys; every lane runs the same shuffles
      // (v_bad is block-uniform), so nothing beyond a few scalars is live besides S and O.
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const RowVis vis = row_vis(tm, row_of(mi, hh), n0);
#pragma unroll
          for (int di = 0; di < kDI; ++di) {
            float o0 = 0.f, o1 = 0.f;
#pragma unroll 1
            for (int j = 0; j < kBlockN; ++j) {
              const int src = (lane & ~3) | ((j % 8) / 2);
              float pj = 0.f;
#pragma unroll
              for (int nn = 0; nn < kNI; ++nn)
#pragma unroll
                for (int ee = 0; ee < 2; ++ee) {
                  const float got = __shfl_sync(0xffffffffu, acc_s[mi][nn][2 * hh + ee], src);
                  if (nn == j / 8 && ee == j % 2) pj = got;
                }
              if (!(j >= vis.lo && j < vis.hi && (!vis.bits || vis.bits[j]))) continue;
              pj = Cvt<T>::to_float(Cvt<T>::from_float(pj));  // the 16-bit P of the mma path
              const T* vr = sV + swz<kChunks>(j, di) + 2 * t4;
              o0 += pj * Cvt<T>::to_float(ptx::lds(vr));
              o1 += pj * Cvt<T>::to_float(ptx::lds(vr + 1));
            }
            acc_o[mi][di][2 * hh] += o0;
            acc_o[mi][di][2 * hh + 1] += o1;
          }
        }
    }
  };

  for (int it = 0; it < n_tiles; ++it) {
    const int st = it % kStages;
    ptx::cp_async_wait<kStages - 2>();  // this thread's copies of tile it (and Q) landed
    const int64_t n0 = tiles.n0(p, it);
    const bool live = n0 < p.nk;
    const Fa2TileMask tm = live ? tiles.mask(p, rule, it, m0, n0) : Fa2TileMask{false, false, nullptr};
    // Masked tiles: did any V row this thread copied come in non-finite?
    int v_bad = 0;
    if (live && tm.on) {
      const T* sV = sKV + (2 * st + 1) * kTileElems;
      for (int c = tid; c < kBlockN * kChunks; c += kNThreads) {
        const int r = c / kChunks, ch = c % kChunks;
        const uint4 u = ptx::lds(reinterpret_cast<const uint4*>(sV + swz<kChunks>(r, ch)));
        const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float x = Cvt<T>::to_float(e[i]);
          v_bad |= !(x - x == 0.f);
        }
      }
    }
    // The one barrier of the tile: tile it is visible to every warp, and every warp is done
    // with tile it - 1, whose stage the next copy reuses.
    v_bad = __syncthreads_or(v_bad);
    const int nxt = it + kStages - 1;
    if (nxt < n_tiles) {
      const int64_t nn0 = tiles.n0(p, nxt);
      if (nn0 < p.nk) {
        const int sn = nxt % kStages;
        copy_tile(sKV + (2 * sn) * kTileElems, gK, p.k_row_stride, nn0, p.nk, kBlockN);
        copy_tile(sKV + (2 * sn + 1) * kTileElems, gV, p.v_row_stride, nn0, p.nk, kBlockN);
      }
    }
    ptx::cp_async_commit();  // (possibly empty: keeps the group count per tile)
    if (!live) continue;
    if (tm.on)
      tile_body(std::true_type{}, st, n0, tm, v_bad != 0);
    else
      tile_body(std::false_type{}, st, n0, tm, false);
  }
  ptx::cp_async_wait<0>();  // nothing outstanding at exit (only empty groups remain)

  // Epilogue: finish the row sums over the 4 lanes of a row, normalize, store O and lse.
  T* gO = static_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
  const float rescale = 1.f / (1.f - p.dropout_p);
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float l = l_i[mi][hh];
      l += ptx::shfl_xor(l, 1);
      l += ptx::shfl_xor(l, 2);
      const int64_t row = row_of(mi, hh);
      if (row >= p.nq) continue;
      // A row that saw no key has l == 0: output 0, lse -inf. NaN inputs stay NaN.
      const float inv_l = l == 0.f ? 0.f : rescale / l;
#pragma unroll
      for (int di = 0; di < kDI; ++di) {
        const int col = di * 8 + 2 * t4;
        if (col < p.d)
          *reinterpret_cast<uint32_t*>(gO + row * p.o_row_stride + col) = ptx::pack2<T>(
              acc_o[mi][di][2 * hh] * inv_l, acc_o[mi][di][2 * hh + 1] * inv_l);
      }
      if (t4 == 0)
        p.lse[(b * p.hq + h) * p.nq + row] =
            l == 0.f ? neg_inf() : (m_i[mi][hh] + log2f(l)) * kLn2;
    }
}

}  // namespace fastattn::cuda
