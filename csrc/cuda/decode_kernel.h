// Split-KV decoding kernels (flash-decoding; decode.h has the layouts and the masking rule).
//
//   flash_decode_split_kernel<T, kHeadDim, kRows>   grid (S, B * Hkv, row tiles), 128 threads
//   flash_decode_combine_kernel<T>                  grid (B * Hq * Nq), 128 threads (S > 1 only)
//
// Why warp-level fp32 and not mma.sync: a decode CTA holds R = G * Nq query rows, typically 1-8
// (GQA group x a few new tokens). m16n8k16 pads the row side to 16, so at R <= 8 half or more of
// every tensor-core product is padding, and it needs K/V staged through shared memory for
// ldmatrix. The work is bound by reading K and V once (each cache element is used R times, R
// FMAs per 2 bytes), so the kernel streams K/V rows straight from global memory into registers
// and does the products as fp32 FMAs:
//   - each warp takes kKeys = 4 consecutive keys per step (warps interleave: a CTA covers 16
//     keys per step); lane l holds dims [l * kPer, l * kPer + kPer) of each K/V row (kPer =
//     kHeadDim / 32), so a warp's loads of one row are contiguous;
//   - q . k for every (row, key): kPer FMAs per lane, then a 5-step xor-shuffle butterfly, after
//     which every lane holds the full score (the 4 keys' reductions are independent: ILP);
//   - online softmax per (warp, row) in registers (max, sum, kPer accumulator dims per lane);
//   - at the end the 4 warps' states merge through shared memory (every access via ptx::lds/sts,
//     which the emulator's hazard detector checks), giving the CTA's partial (o, lse2).
// Registers per lane grow with kRows * (2 kPer q/acc + 4 scores + stats, row position, slope):
// kRows = 16 at kHeadDim 64 and 8 at 128 (decode_rows_per_cta in decode.h) compile to 184-218
// registers with 0 spills on sm_80/sm_90 (benchmarks/results/cuda_compile_report.md), i.e. two
// 4-warp CTAs per SM. Bigger groups take more row tiles (grid z), each re-reading its chunk.
// The 5 shuffles per (row, key) are the price of the simple reduction; a transposed reduction
// (reduce-scatter over rows) would cut them and is future work, to be measured on a GPU.
// Keys past L_b are never read (NaN there is ignored); a key a row does not see is skipped in
// that row's P V (not multiplied by p = 0), so its NaN/inf V never reaches that row, and a row
// that sees a NaN/inf v gets it per element, as the float64 math does (DESIGN.md).
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda_compat.h"
#include "decode.h"
#include "kernel_utils.h"
#include "ptx_ops.h"

namespace fastattn::cuda {

constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = kDecodeWarps * 32;
constexpr int kDecodeKeys = 4;  // keys per warp step
static_assert(kDecodeWarps * kDecodeKeys == kDecodeKeyStep, "decode.h's key step");

template <typename T, int kHeadDim, int kRows>
__global__ void __launch_bounds__(kDecodeThreads) flash_decode_split_kernel(const DecodeParams p) {
  constexpr int kPer = kHeadDim / 32;
  static_assert(kHeadDim % 32 == 0, "head dim is a multiple of 32");
  // merge buffers of the 4 warps' softmax states: stats (m, l) and accumulators
  __shared__ float s_m[kDecodeWarps][kRows];
  __shared__ float s_l[kDecodeWarps][kRows];
  __shared__ float s_acc[kDecodeWarps][kRows][kHeadDim];

  const int64_t split = blockIdx.x;
  const int64_t bh = blockIdx.y;  // b * Hkv + kv head
  const int64_t row0 = static_cast<int64_t>(blockIdx.z) * kRows;
  const int64_t b = bh / p.hkv, hk = bh % p.hkv;
  const int64_t G = p.hq / p.hkv, R = G * p.nq;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t L = p.cache_seqlens ? static_cast<int64_t>(p.cache_seqlens[b]) : p.ncache;
  const int64_t c0 = split * p.chunk;
  const int64_t c1 = c0 + p.chunk < L ? c0 + p.chunk : L;  // this CTA's keys [c0, c1)

  const bool softcap = p.softcap > 0.f;
  // q is pre-scaled so that a row's logit (log2 units) is dot * 1 (no softcap) or
  // tanh(dot) * cap_out (softcap: dot = q.k * scale / softcap)
  const float q_mul = softcap ? p.scale / p.softcap : p.scale * kLog2e;
  const float cap_out = p.softcap * kLog2e;

  float q[kRows][kPer], acc[kRows][kPer], m[kRows], l[kRows], slope2[kRows];
  int64_t diag[kRows];  // each row's own cache position L - Nq + i
  bool row_ok[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = row0 + r;
    row_ok[r] = row < R;
    const int64_t h = hk * G + (row_ok[r] ? row / p.nq : 0), i = row_ok[r] ? row % p.nq : 0;
    diag[r] = L - p.nq + i;
    slope2[r] = (p.alibi_slopes && row_ok[r]) ? p.alibi_slopes[b * p.hq + h] * kLog2e : 0.f;
    const T* qrow = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                    i * p.q_row_stride;
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      const int dim = lane * kPer + e;
      q[r][e] = (row_ok[r] && dim < p.d) ? Cvt<T>::to_float(qrow[dim]) * q_mul : 0.f;
      acc[r][e] = 0.f;
    }
    m[r] = neg_inf();
    l[r] = 0.f;
  }

  const T* kbase = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* vbase = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  // warp-uniform trip count: every lane runs every shuffle
  for (int64_t j0 = c0 + warp * kDecodeKeys; j0 < c1; j0 += kDecodeKeyStep) {
    float kf[kDecodeKeys][kPer], vf[kDecodeKeys][kPer];
#pragma unroll
    for (int kk = 0; kk < kDecodeKeys; ++kk) {
      const int64_t j = j0 + kk;
      const bool ok = j < c1;  // never read past this chunk (nor past L)
#pragma unroll
      for (int e = 0; e < kPer; ++e) {
        const int dim = lane * kPer + e;
        kf[kk][e] = (ok && dim < p.d) ? Cvt<T>::to_float(kbase[j * p.k_row_stride + dim]) : 0.f;
        vf[kk][e] = (ok && dim < p.dv) ? Cvt<T>::to_float(vbase[j * p.v_row_stride + dim]) : 0.f;
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float s[kDecodeKeys];
#pragma unroll
      for (int kk = 0; kk < kDecodeKeys; ++kk) {
        float x = 0.f;
#pragma unroll
        for (int e = 0; e < kPer; ++e) x = fmaf(q[r][e], kf[kk][e], x);
        s[kk] = x;
      }
#pragma unroll
      for (int off = 16; off >= 1; off >>= 1) {
#pragma unroll
        for (int kk = 0; kk < kDecodeKeys; ++kk) s[kk] += ptx::shfl_xor(s[kk], off);
      }
      // logits (log2 units) and visibility; the same in every lane, so branches are uniform
      bool vis[kDecodeKeys];
      float mx = neg_inf();
#pragma unroll
      for (int kk = 0; kk < kDecodeKeys; ++kk) {
        const int64_t j = j0 + kk;
        vis[kk] = row_ok[r] && j < c1 &&
                  (p.window_right < 0 || j <= diag[r] + p.window_right) &&
                  (p.window_left < 0 || j >= diag[r] - p.window_left);
        float x = softcap ? fa_tanhf(s[kk]) * cap_out : s[kk];
        x -= slope2[r] * fabsf(static_cast<float>(diag[r] - j));
        s[kk] = x;
        if (vis[kk]) mx = fmaxf(mx, x);
      }
      const float m_new = fmaxf(m[r], mx);
      if (m_new == neg_inf()) continue;  // nothing visible to this row yet
      const float alpha = exp2f(m[r] - m_new);  // m = -inf: 0 (acc, l are 0 then)
      float psum = 0.f, pk[kDecodeKeys];
#pragma unroll
      for (int kk = 0; kk < kDecodeKeys; ++kk) {
        pk[kk] = vis[kk] ? exp2f(s[kk] - m_new) : 0.f;
        psum += pk[kk];
      }
      l[r] = l[r] * alpha + psum;
      m[r] = m_new;
#pragma unroll
      for (int e = 0; e < kPer; ++e) {
        float a = acc[r][e] * alpha;
#pragma unroll
        for (int kk = 0; kk < kDecodeKeys; ++kk)
          if (vis[kk]) a = fmaf(pk[kk], vf[kk][e], a);  // unseen keys: never 0 * NaN
        acc[r][e] = a;
      }
    }
  }

  // Merge the warps: every lane holds the same (m, l); lane 0 publishes them, each lane its dims.
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (lane == 0) {
      ptx::sts(&s_m[warp][r], m[r]);
      ptx::sts(&s_l[warp][r], l[r]);
    }
#pragma unroll
    for (int e = 0; e < kPer; ++e) ptx::sts(&s_acc[warp][r][lane * kPer + e], acc[r][e]);
  }
  __syncthreads();
  const bool single = p.num_splits == 1;
  for (int idx = threadIdx.x; idx < kRows * kHeadDim; idx += kDecodeThreads) {
    const int r = idx / kHeadDim, dim = idx % kHeadDim;
    const int64_t row = row0 + r;
    if (row >= R || dim >= p.dv) continue;
    float mw[kDecodeWarps], M = neg_inf();
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      mw[w] = ptx::lds(&s_m[w][r]);
      M = fmaxf(M, mw[w]);
    }
    const float M_safe = M == neg_inf() ? 0.f : M;
    float wsum = 0.f, o = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      const float c = exp2f(mw[w] - M_safe);  // a warp that saw nothing weighs 0 (its acc is 0)
      wsum += ptx::lds(&s_l[w][r]) * c;
      o += ptx::lds(&s_acc[w][r][dim]) * c;
    }
    o = wsum == 0.f ? 0.f : o / wsum;
    const float lse2 = wsum == 0.f ? neg_inf() : M_safe + log2f(wsum);
    if (single) {
      const int64_t h = hk * G + row / p.nq, i = row % p.nq;
      T* orow = static_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride +
                i * p.o_row_stride;
      orow[dim] = Cvt<T>::from_float(o);
      if (dim == 0) p.lse[(b * p.hq + h) * p.nq + i] = lse2 == neg_inf() ? lse2 : lse2 * kLn2;
    } else {
      const int64_t base = (bh * p.num_splits + split) * R + row;
      p.o_part[base * p.dv + dim] = o;
      if (dim == 0) p.lse_part[base] = lse2;
    }
  }
}

// Merges the S partials of one query row (b, h, i) by their log2-sum-exp:
//   lse2 = log2 sum_s 2^lse2_s,  o = sum_s 2^(lse2_s - lse2) o_s
// One CTA per row; threads over the dims (every thread recomputes the S weights: S is small).
template <typename T>
__global__ void __launch_bounds__(kDecodeThreads) flash_decode_combine_kernel(const DecodeParams p) {
  const int64_t row = blockIdx.x;  // (b * Hq + h) * Nq + i, lse's layout
  const int64_t i = row % p.nq, bhq = row / p.nq;
  const int64_t b = bhq / p.hq, h = bhq % p.hq;
  const int64_t G = p.hq / p.hkv, R = G * p.nq, S = p.num_splits;
  const int64_t base = (b * p.hkv + h / G) * S * R + (h % G) * p.nq + i;  // split 0's entry
  float M = neg_inf();
  for (int64_t s = 0; s < S; ++s) M = fmaxf(M, p.lse_part[base + s * R]);
  const float M_safe = M == neg_inf() ? 0.f : M;
  float wsum = 0.f;
  for (int64_t s = 0; s < S; ++s) wsum += exp2f(p.lse_part[base + s * R] - M_safe);
  T* orow = static_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride + i * p.o_row_stride;
  for (int64_t dim = threadIdx.x; dim < p.dv; dim += kDecodeThreads) {
    float o = 0.f;
    for (int64_t s = 0; s < S; ++s) {
      const float w = exp2f(p.lse_part[base + s * R] - M_safe);
      o = fmaf(w, p.o_part[(base + s * R) * p.dv + dim], o);  // empty splits: w = 0, o_s = 0
    }
    orow[dim] = Cvt<T>::from_float(wsum == 0.f ? 0.f : o / wsum);
  }
  if (threadIdx.x == 0) p.lse[row] = wsum == 0.f ? neg_inf() : (M_safe + log2f(wsum)) * kLn2;
}

}  // namespace fastattn::cuda
