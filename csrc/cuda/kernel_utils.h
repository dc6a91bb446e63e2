// Device helpers shared by the forward and backward kernels: 16-bit conversions, tile copies
// global -> shared memory, the token rule, and the walk over the (query, key) tiles a block
// visits (analytic for dense/window calls, from the BlockMask lists for block-sparse calls).
#pragma once

#include <cstdint>

#include "cuda_compat.h"
#include "flash.h"

namespace fastattn::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T>
struct Cvt;
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) {
    return __float2bfloat16_rn(x);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
};

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

// Copy rows [0, rows_valid) x cols [0, d) of a (kRows, kCols) tile from global memory (row
// stride `stride`, contiguous columns) into shared memory (row stride ld), zero-filling the
// rest, in 16-byte vectors spread over kNThreads threads.
template <int kRows, int kCols, int kNThreads, typename T>
__device__ __forceinline__ void load_tile(T* smem, int ld, const T* gmem, int64_t stride,
                                          int64_t rows_valid, int64_t d) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kChunksPerRow = kCols / kVec;
  constexpr int kChunks = kRows * kChunksPerRow;
  for (int c = threadIdx.x; c < kChunks; c += kNThreads) {
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * kVec;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (r < rows_valid && col < d) v = *reinterpret_cast<const uint4*>(gmem + r * stride + col);
    *reinterpret_cast<uint4*>(smem + r * ld + col) = v;
  }
}

// Store kN floats of one row (already scaled) as T to global memory, columns [col0, col0+kN)
// clipped to d, in 16-byte vectors.
template <int kN, typename T>
__device__ __forceinline__ void store_row(T* grow, int col0, int64_t d, const float* vals) {
  constexpr int kVec = 16 / sizeof(T);
  static_assert(kN % kVec == 0, "row segment must be whole vectors");
#pragma unroll
  for (int c = 0; c < kN; c += kVec) {
    if (col0 + c >= d) break;
    union {
      uint4 u;
      T h[kVec];
    } pack;
#pragma unroll
    for (int e = 0; e < kVec; ++e) pack.h[e] = Cvt<T>::from_float(vals[c + e]);
    *reinterpret_cast<uint4*>(grow + col0 + c) = pack.u;
  }
}

// The token rule of fastattn/masking.py (bottom-right aligned, -1 = unbounded).
struct WindowRule {
  int64_t nq, nk, off, left, right;

  __device__ __forceinline__ WindowRule(const FlashParams& p)
      : nq(p.nq), nk(p.nk), off(p.nk - p.nq), left(p.window_left), right(p.window_right) {}

  __device__ __forceinline__ bool visible(int64_t i, int64_t j) const {
    return (left < 0 || j >= i + off - left) && (right < 0 || j <= i + off + right);
  }
  // Keys [lo, hi) seen by any of the rows [i0, i1) (lo/hi of a row grow with the row).
  __device__ __forceinline__ int64_t key_lo(int64_t i0) const {
    if (left < 0) return 0;
    const int64_t lo = i0 + off - left;
    return lo > 0 ? lo : 0;
  }
  __device__ __forceinline__ int64_t key_hi(int64_t i1) const {
    if (right < 0) return nk;
    const int64_t hi = i1 - 1 + off + right + 1;
    return hi < nk ? hi : nk;
  }
  // Queries [lo, hi) that see any of the keys [j0, j1).
  __device__ __forceinline__ int64_t query_lo(int64_t j0) const {
    if (right < 0) return 0;
    const int64_t lo = j0 - off - right;
    return lo > 0 ? lo : 0;
  }
  __device__ __forceinline__ int64_t query_hi(int64_t j1) const {
    if (left < 0) return nq;
    const int64_t hi = j1 - 1 - off + left + 1;
    return hi < nq ? hi : nq;
  }
  // Every token of rows [i0, i1) x keys [j0, j1) visible by the rule?
  __device__ __forceinline__ bool full(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    return (left < 0 || j0 >= i1 - 1 + off - left) && (right < 0 || j1 - 1 <= i0 + off + right);
  }
};

// Score modifiers of one (batch, query head), as flash.h and fastattn/score_mods.py define them.
// The kernels build one only inside their (block-uniform) "has score modifiers" branches, which
// run rolled loops: nothing of it is live on the plain path, whose registers stay as they were.
// Logits are in log2 units (natural logit * log2 e), as everywhere in these kernels.
constexpr uint32_t kHashGolden = 0x9E3779B1u, kHashColMul = 0x85EBCA77u;
constexpr uint32_t kHashFmix1 = 0x85EBCA6Bu, kHashFmix2 = 0xC2B2AE35u;

__device__ __forceinline__ uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= kHashFmix1;
  x ^= x >> 13;
  x *= kHashFmix2;
  x ^= x >> 16;
  return x;
}

struct ScoreMods {
  bool any, softcap, alibi, dropout;
  float scale_log2;       // no softcap: logit2 = s * scale_log2
  float cap_in, cap_out;  // softcap: logit2 = tanh(s * scale / softcap) * softcap * log2 e
  float slope_log2;       // ALiBi slope of (b, h) times log2 e
  int64_t off;            // Nk - Nq (bottom-right alignment)
  int64_t row_base;       // dropout row of query 0 of (b, h): (b * Hq + h) * Nq
  uint32_t seed_lo, seed_hi, threshold;
  float rescale;          // 1 / (1 - p)

  __device__ __forceinline__ ScoreMods(const FlashParams& p, int64_t b, int64_t h)
      : softcap(p.softcap > 0.f),
        alibi(p.alibi_slopes != nullptr),
        dropout(p.dropout_p > 0.f),
        scale_log2(p.scale * kLog2e),
        cap_in(p.softcap > 0.f ? p.scale / p.softcap : 0.f),
        cap_out(p.softcap * kLog2e),
        off(p.nk - p.nq),
        seed_lo(static_cast<uint32_t>(p.dropout_seed)),
        seed_hi(static_cast<uint32_t>(p.dropout_seed >> 32)),
        threshold(p.dropout_threshold),
        rescale(1.f / (1.f - p.dropout_p)) {
    any = softcap || alibi;
    slope_log2 = alibi ? p.alibi_slopes[b * p.hq + h] * kLog2e : 0.f;
    row_base = (b * p.hq + h) * p.nq;
  }

  // Logit (log2 units) of raw score s = q_i . k_j; dtanh = d softcap(x) / dx = 1 - tanh^2
  // (1 without softcap), the factor the backward applies to dS.
  __device__ __forceinline__ float logit2(float s, int64_t i, int64_t j, float& dtanh) const {
    float x;
    if (softcap) {
      const float t = fa_tanhf(s * cap_in);
      dtanh = 1.f - t * t;
      x = t * cap_out;
    } else {
      dtanh = 1.f;
      x = s * scale_log2;
    }
    if (alibi) x -= slope_log2 * fabsf(static_cast<float>(i + off - j));
    return x;
  }
  __device__ __forceinline__ float logit2(float s, int64_t i, int64_t j) const {
    float unused;
    return logit2(s, i, j, unused);
  }

  // Dropout: keep (i, j) iff (h >> 8) >= threshold with h = fmix32(fmix32(row * golden +
  // seed_lo) ^ (j * col_mul + seed_hi)), row = row_base + i, all uint32 (mod 2^32).
  __device__ __forceinline__ uint32_t row_hash(int64_t i) const {
    return fmix32(static_cast<uint32_t>(row_base + i) * kHashGolden + seed_lo);
  }
  __device__ __forceinline__ bool keep(uint32_t rh, int64_t j) const {
    return (fmix32(rh ^ (static_cast<uint32_t>(j) * kHashColMul + seed_hi)) >> 8) >= threshold;
  }
};

// How tokens of one (query tile, key tile) are masked. on == false: every token is visible
// (a full, in-range tile). Otherwise (i, j) is visible iff i < nq, j < nk, the window rule
// holds (if rule) and the bitmask bit is set (if bits).
struct TileMask {
  bool on;
  bool rule;
  const uint8_t* bits;  // partial_masks[mid], (mask_block_m, mask_block_n) row-major, or null
  int64_t bits_row0, bits_col0, bits_ld;

  __device__ __forceinline__ bool visible(const WindowRule& w, int64_t i, int64_t j) const {
    bool ok = i < w.nq && j < w.nk;
    if (rule) ok = ok && w.visible(i, j);
    if (bits != nullptr && ok) ok = bits[(i - bits_row0) * bits_ld + (j - bits_col0)] != 0;
    return ok;
  }
};

__device__ __forceinline__ TileMask no_mask() { return TileMask{false, false, nullptr, 0, 0, 0}; }

// Index of the (Bm, Hm) layout a (batch, query head) reads.
__device__ __forceinline__ int64_t mask_layout(const FlashParams& p, int64_t b, int64_t h) {
  return (p.mask_b > 1 ? b : 0) * p.mask_h + (p.mask_h > 1 ? h : 0);
}

// Calls f(n0, TileMask) for every key tile [n0, n0 + kBlockN) that query tile [m0, m0 + kBlockM)
// of (b, h) must visit. Block-uniform (every thread of the block sees the same sequence).
template <bool kSparse, int kBlockM, int kBlockN, typename F>
__device__ __forceinline__ void for_each_key_tile(const FlashParams& p, const WindowRule& w,
                                                  int64_t b, int64_t h, int64_t m0, F&& f) {
  const int64_t m1 = (m0 + kBlockM < p.nq) ? m0 + kBlockM : p.nq;
  if constexpr (!kSparse) {
    const int64_t lo = w.key_lo(m0), hi = w.key_hi(m1);
    for (int64_t n0 = (lo / kBlockN) * kBlockN; n0 < hi; n0 += kBlockN) {
      const int64_t n1 = (n0 + kBlockN < p.nk) ? n0 + kBlockN : p.nk;
      const bool full = n0 + kBlockN <= p.nk && w.full(m0, m1, n0, n1);
      f(n0, full ? no_mask() : TileMask{true, true, nullptr, 0, 0, 0});
    }
  } else {
    // Partial blocks first, then full ones, through one call site (keeps the kernel body
    // inlined once).
    const int64_t qb = m0 / p.mask_block_m;
    const int64_t row = mask_layout(p, b, h) * p.nqb + qb;
    const int64_t sub = p.mask_block_n / kBlockN;
    const int n_part = p.kv_num_blocks[row];
    const int n_all = n_part + p.full_kv_num_blocks[row];
    for (int t = 0; t < n_all; ++t) {
      const bool partial = t < n_part;
      const int64_t kb = partial ? p.kv_indices[row * p.kmax + t]
                                 : p.full_kv_indices[row * p.kmax_full + (t - n_part)];
      const int64_t mid = partial ? p.kv_mask_ids[row * p.kmax + t] : -1;
      const TileMask tm{true, partial,
                        mid >= 0 ? p.partial_masks + mid * p.mask_block_m * p.mask_block_n : nullptr,
                        qb * p.mask_block_m, kb * p.mask_block_n, p.mask_block_n};
      for (int64_t s = 0; s < sub; ++s) {
        const int64_t n0 = kb * p.mask_block_n + s * kBlockN;
        if (n0 >= p.nk) break;
        const bool in_range = n0 + kBlockN <= p.nk && m0 + kBlockM <= p.nq;
        f(n0, (partial || !in_range) ? tm : no_mask());
      }
    }
  }
}

// Calls f(m0, TileMask) for every query chunk [m0, m0 + kBlockM) that sees key tile
// [n0, n0 + kBlockN) through query head h of batch b (the transposed walk, for dK/dV).
template <bool kSparse, int kBlockM, int kBlockN, typename F>
__device__ __forceinline__ void for_each_query_tile(const FlashParams& p, const WindowRule& w,
                                                    int64_t b, int64_t h, int64_t n0, F&& f) {
  const int64_t n1 = (n0 + kBlockN < p.nk) ? n0 + kBlockN : p.nk;
  if constexpr (!kSparse) {
    const int64_t lo = w.query_lo(n0), hi = w.query_hi(n1);
    for (int64_t m0 = (lo / kBlockM) * kBlockM; m0 < hi; m0 += kBlockM) {
      const int64_t m1 = (m0 + kBlockM < p.nq) ? m0 + kBlockM : p.nq;
      const bool full = m0 + kBlockM <= p.nq && n0 + kBlockN <= p.nk && w.full(m0, m1, n0, n1);
      f(m0, full ? no_mask() : TileMask{true, true, nullptr, 0, 0, 0});
    }
  } else {
    const int64_t kb = n0 / p.mask_block_n;
    const int64_t row = mask_layout(p, b, h) * p.nkb + kb;
    const int64_t sub = p.mask_block_m / kBlockM;
    const int n_part = p.q_num_blocks[row];
    const int n_all = n_part + p.full_q_num_blocks[row];
    for (int t = 0; t < n_all; ++t) {
      const bool partial = t < n_part;
      const int64_t qb = partial ? p.q_indices[row * p.qmax + t]
                                 : p.full_q_indices[row * p.qmax_full + (t - n_part)];
      const int64_t mid = partial ? p.q_mask_ids[row * p.qmax + t] : -1;
      const TileMask tm{true, partial,
                        mid >= 0 ? p.partial_masks + mid * p.mask_block_m * p.mask_block_n : nullptr,
                        qb * p.mask_block_m, kb * p.mask_block_n, p.mask_block_n};
      for (int64_t s = 0; s < sub; ++s) {
        const int64_t m0 = qb * p.mask_block_m + s * kBlockM;
        if (m0 >= p.nq) break;
        const bool in_range = m0 + kBlockM <= p.nq && n0 + kBlockN <= p.nk;
        f(m0, (partial || !in_range) ? tm : no_mask());
      }
    }
  }
}

}  // namespace fastattn::cuda
