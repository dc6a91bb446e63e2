// Backward kernels, FlashAttention-2 style, recomputing P from the saved log-sum-exp:
//
//   1. flash_bwd_preprocess_kernel   delta_i = sum_c dO[i, c] * O[i, c] - dlse_i  (fp32; dlse_i,
//                                    the gradient of lse_i, is 0 unless given); with atomic_dq
//                                    it also zeroes dq_accum (shared with fa2_bwd_kernel.h)
//   2. flash_bwd_dkdv_kernel         per key tile: dV = sum P^T dO, dK = scale * sum dS^T Q,
//                                    over every visiting query chunk of every query head of
//                                    the kv head's group (GQA: no atomics, deterministic)
//   3. flash_bwd_dq_kernel           per query tile: dQ = scale * sum dS K over visited key tiles
// with P = exp(S * scale - lse) (0 where masked or where lse = -inf: a row that saw no key gets
// zero gradients) and dS = P * (dP - delta), dP = dO V^T. P and dS are rounded to the input type
// before their matrix products, as in the forward.
// Score modifiers (flash.h): the logits get softcap / ALiBi exactly as in the forward; dropout
// regenerates the keep bits from the seed: dV = P_drop^T dO with P_drop = P * keep / (1 - p),
// dP = (dO V^T) * keep / (1 - p); and softcap multiplies dS by 1 - tanh^2 (chain rule).
#pragma once

#include "kernel_traits.h"
#include "kernel_utils.h"

namespace fastattn::cuda {

namespace wmma = nvcuda::wmma;

// delta = rowsum(dO * O) - dlse: one warp per row, lanes over the columns.
template <typename T, int kNWarps>
__global__ void __launch_bounds__(kNWarps * 32) flash_bwd_preprocess_kernel(const FlashParams params) {
  const FlashParams& p = params;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.y / p.hq, h = blockIdx.y % p.hq;
  const T* gO = static_cast<const T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
  const T* gdO = static_cast<const T*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride;
  for (int64_t i = int64_t(blockIdx.x) * kNWarps + warp; i < p.nq; i += int64_t(gridDim.x) * kNWarps) {
    float acc = 0.f;
    for (int64_t c = lane; c < p.d; c += 32)
      acc += Cvt<T>::to_float(gO[i * p.o_row_stride + c]) *
             Cvt<T>::to_float(gdO[i * p.do_row_stride + c]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    const int64_t idx = (b * p.hq + h) * p.nq + i;
    if (lane == 0) p.delta[idx] = p.dlse != nullptr ? acc - p.dlse[idx] : acc;
    if (p.atomic_dq)  // the FA2 backward's fp32 dQ accumulator starts at 0
      for (int64_t c = lane; c < p.d; c += 32) p.dq_accum[idx * p.d + c] = 0.f;
  }
}

// acc[i] *= s on every element: legal on wmma fragments (same op for every element).
template <typename Frag>
__device__ __forceinline__ void scale_fragment(Frag& f, float s) {
#pragma unroll
  for (int i = 0; i < f.num_elements; ++i) f.x[i] *= s;
}

template <typename Kt, bool kSparse>
__global__ void __launch_bounds__(Kt::kNThreads) flash_bwd_dkdv_kernel(const FlashParams params) {
  using T = typename Kt::elem_type;
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kHeadDim = Kt::kHeadDim;
  constexpr int kSplitD = Kt::kSplitD, kRowGroups = Kt::kRowGroups;
  constexpr int kLdQK = Kt::kLdQK, kLdA = Kt::kLdA, kLdB = Kt::kLdB, kLdP = Kt::kLdP;
  constexpr int kColsD = kHeadDim / kSplitD;              // dK/dV columns of one warp
  constexpr int kColsM = kBlockM / kSplitD;               // S^T columns one warp computes
  constexpr int kThreadsPerRow = 2 * kSplitD;             // elementwise phase
  constexpr int kSegM = kBlockM / kThreadsPerRow, kSegD = kHeadDim / kThreadsPerRow;

  FA_DYNAMIC_SMEM(smem_);
  char* ptr = smem_;
  T* sK = reinterpret_cast<T*>(ptr);
  T* sV = sK + kBlockN * kLdQK;
  ptr += Kt::kSmemKV;
  T* sQ = reinterpret_cast<T*>(ptr);
  T* sdO = sQ + kBlockM * kLdQK;
  ptr += Kt::kSmemQdO;
  float* sA = reinterpret_cast<float*>(ptr);
  ptr += Kt::kSmemA;
  float* sB = reinterpret_cast<float*>(ptr);
  ptr += Kt::kSmemB;
  T* sPt = reinterpret_cast<T*>(ptr);
  T* sdSt = sPt + kRowGroups * 16 * kLdP;
  ptr += Kt::kSmemP;
  float* sLse = reinterpret_cast<float*>(ptr);
  float* sDelta = sLse + kBlockM;

  const FlashParams& p = params;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int rg = warp % kRowGroups, part = warp / kRowGroups;  // row group, column part
  const int64_t b = blockIdx.y / p.hkv, hk = blockIdx.y % p.hkv;
  const int64_t group = p.hq / p.hkv;
  const int64_t n0 = int64_t(blockIdx.x) * kBlockN;
  const WindowRule rule(p);
  const float scale_log2 = p.scale * kLog2e;
  const bool has_mods = p.softcap > 0.f || p.alibi_slopes != nullptr || p.dropout_p > 0.f;

  load_tile<kBlockN, kHeadDim, Kt::kNThreads>(
      sK, kLdQK, static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
                     n0 * p.k_row_stride, p.k_row_stride, p.nk - n0, p.d);
  load_tile<kBlockN, kHeadDim, Kt::kNThreads>(
      sV, kLdQK, static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
                     n0 * p.v_row_stride, p.v_row_stride, p.nk - n0, p.d);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dk_frag[kColsD / 16], dv_frag[kColsD / 16];
#pragma unroll
  for (int nn = 0; nn < kColsD / 16; ++nn) {
    wmma::fill_fragment(dk_frag[nn], 0.f);
    wmma::fill_fragment(dv_frag[nn], 0.f);
  }

  float* sAg = sA + rg * 16 * kLdA;
  float* sBg = sB + rg * 16 * kLdB;
  T* sPtg = sPt + rg * 16 * kLdP;
  T* sdStg = sdSt + rg * 16 * kLdP;
  const T* sKg = sK + rg * 16 * kLdQK;
  const T* sVg = sV + rg * 16 * kLdQK;
  // Elementwise phase: the kThreadsPerRow threads of a row group's row each take kSegM columns.
  const int tl = part * 32 + lane;
  const int r = tl / kThreadsPerRow, seg = tl % kThreadsPerRow;
  const int64_t key = n0 + rg * 16 + r;

  auto group_sync = [&] {
    if constexpr (kSplitD == 1) __syncwarp(); else __syncthreads();
  };

  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = hk * group + g;
    const T* gQ = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
    const T* gdO = static_cast<const T*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride;
    const float* gLse = p.lse + (b * p.hq + h) * p.nq;
    const float* gDelta = p.delta + (b * p.hq + h) * p.nq;

    auto visit = [&](int64_t m0, const TileMask& tm) {
      __syncthreads();  // previous chunk fully consumed (and K/V loaded, on the first visit)
      load_tile<kBlockM, kHeadDim, Kt::kNThreads>(sQ, kLdQK, gQ + m0 * p.q_row_stride,
                                                  p.q_row_stride, p.nq - m0, p.d);
      load_tile<kBlockM, kHeadDim, Kt::kNThreads>(sdO, kLdQK, gdO + m0 * p.do_row_stride,
                                                  p.do_row_stride, p.nq - m0, p.d);
      for (int i = tid; i < kBlockM; i += Kt::kNThreads) {
        const bool in = m0 + i < p.nq;
        sLse[i] = in ? gLse[m0 + i] * kLog2e : neg_inf();  // -inf: row saw no key (or padding)
        sDelta[i] = in ? gDelta[m0 + i] : 0.f;
      }
      __syncthreads();

      // S^T = K_g Q^T and dP^T = V_g dO^T for this warp's kColsM query columns.
#pragma unroll 1  // outer loop rolled: bounds the live fragments (registers)
      for (int mm = 0; mm < kColsM / 16; ++mm) {
        const int mcol = part * kColsM + mm * 16;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_frag, dp_frag;
        wmma::fill_fragment(s_frag, 0.f);
        wmma::fill_fragment(dp_frag, 0.f);
#pragma unroll
        for (int kk = 0; kk < kHeadDim / 16; ++kk) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a_frag;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b_frag;
          wmma::load_matrix_sync(a_frag, sKg + kk * 16, kLdQK);
          wmma::load_matrix_sync(b_frag, sQ + mcol * kLdQK + kk * 16, kLdQK);
          wmma::mma_sync(s_frag, a_frag, b_frag, s_frag);
          wmma::load_matrix_sync(a_frag, sVg + kk * 16, kLdQK);
          wmma::load_matrix_sync(b_frag, sdO + mcol * kLdQK + kk * 16, kLdQK);
          wmma::mma_sync(dp_frag, a_frag, b_frag, dp_frag);
        }
        wmma::store_matrix_sync(sAg + mcol, s_frag, kLdA, wmma::mem_row_major);
        wmma::store_matrix_sync(sBg + mcol, dp_frag, kLdB, wmma::mem_row_major);
      }
      group_sync();

      // P^T and dS^T for row `key`, columns seg * kSegM ...  With score modifiers the loop runs
      // rolled, so the plain path keeps its registers.
      // mods == nullptr: the plain path (a constant after inlining).
      auto elem = [&](int c, const ScoreMods* mods) {
        const int col = seg * kSegM + c;
        const float lse2 = sLse[col];
        float pv = 0.f, dtanh = 1.f;
        if (lse2 != neg_inf() && !(tm.on && !tm.visible(rule, m0 + col, key))) {
          const float x = mods && mods->any
                              ? mods->logit2(sAg[r * kLdA + col], m0 + col, key, dtanh)
                              : sAg[r * kLdA + col] * scale_log2;
          pv = exp2f(x - lse2);
        }
        float dp = sBg[r * kLdB + col], pd = pv;
        if (mods && mods->dropout) {
          const bool kept = mods->keep(mods->row_hash(m0 + col), key);
          dp = kept ? dp * mods->rescale : 0.f;
          pd = kept ? pv * mods->rescale : 0.f;
        }
        float ds = pv * (dp - sDelta[col]);
        if (mods && mods->softcap) ds *= dtanh;
        sPtg[r * kLdP + col] = Cvt<T>::from_float(pd);
        sdStg[r * kLdP + col] = Cvt<T>::from_float(ds);
      };
      if (has_mods) {
        const ScoreMods mods(p, b, h);  // built here: nothing of it stays live on the plain path
#pragma unroll 1
        for (int c = 0; c < kSegM; ++c) elem(c, &mods);
      } else {
#pragma unroll
        for (int c = 0; c < kSegM; ++c) elem(c, nullptr);
      }
      group_sync();

      // dV_g += P^T dO,  dK_g += dS^T Q  on this warp's kColsD columns.
#pragma unroll 1  // outer loop rolled: bounds the live fragments (registers)
      for (int kk = 0; kk < kBlockM / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pt_frag, dst_frag;
        wmma::load_matrix_sync(pt_frag, sPtg + kk * 16, kLdP);
        wmma::load_matrix_sync(dst_frag, sdStg + kk * 16, kLdP);
#pragma unroll
        for (int nn = 0; nn < kColsD / 16; ++nn) {
          const int dcol = part * kColsD + nn * 16;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b_frag;
          wmma::load_matrix_sync(b_frag, sdO + kk * 16 * kLdQK + dcol, kLdQK);
          wmma::mma_sync(dv_frag[nn], pt_frag, b_frag, dv_frag[nn]);
          wmma::load_matrix_sync(b_frag, sQ + kk * 16 * kLdQK + dcol, kLdQK);
          wmma::mma_sync(dk_frag[nn], dst_frag, b_frag, dk_frag[nn]);
        }
      }
    };
    for_each_query_tile<kSparse, kBlockM, kBlockN>(p, rule, b, h, n0, visit);
  }

  // Write dK (times scale) and dV through the row group's scratch.
#pragma unroll
  for (int nn = 0; nn < kColsD / 16; ++nn) scale_fragment(dk_frag[nn], p.scale);
  auto write_out = [&](const wmma::fragment<wmma::accumulator, 16, 16, 16, float>* frags,
                       T* gbase, int64_t row_stride) {
    group_sync();  // the scratch is free
#pragma unroll
    for (int nn = 0; nn < kColsD / 16; ++nn)
      wmma::store_matrix_sync(sAg + part * kColsD + nn * 16, frags[nn], kLdA, wmma::mem_row_major);
    group_sync();
    if (key < p.nk) {
      float vals[kSegD];
#pragma unroll
      for (int c = 0; c < kSegD; ++c) vals[c] = sAg[r * kLdA + seg * kSegD + c];
      store_row<kSegD>(gbase + key * row_stride, seg * kSegD, p.d, vals);
    }
  };
  __syncthreads();
  write_out(dk_frag, static_cast<T*>(p.dk) + b * p.dk_batch_stride + hk * p.dk_head_stride,
            p.dk_row_stride);
  write_out(dv_frag, static_cast<T*>(p.dv) + b * p.dv_batch_stride + hk * p.dv_head_stride,
            p.dv_row_stride);
}

template <typename Kt, bool kSparse>
__global__ void __launch_bounds__(Kt::kNThreads) flash_bwd_dq_kernel(const FlashParams params) {
  using T = typename Kt::elem_type;
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kHeadDim = Kt::kHeadDim;
  constexpr int kLdQK = Kt::kLdQK, kLdA = Kt::kLdA, kLdB = Kt::kLdB, kLdP = Kt::kLdP;
  constexpr int kColsS = kBlockN / 2, kColsO = kHeadDim / 2;

  FA_DYNAMIC_SMEM(smem_);
  char* ptr = smem_;
  T* sQ = reinterpret_cast<T*>(ptr);
  T* sdO = sQ + kBlockM * kLdQK;
  ptr += Kt::kSmemQdO;
  T* sK = reinterpret_cast<T*>(ptr);
  T* sV = sK + kBlockN * kLdQK;
  ptr += Kt::kSmemKV;
  float* sA = reinterpret_cast<float*>(ptr);
  ptr += Kt::kSmemA;
  float* sB = reinterpret_cast<float*>(ptr);
  ptr += Kt::kSmemB;
  T* sdS = reinterpret_cast<T*>(ptr);

  const FlashParams& p = params;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t b = blockIdx.y / p.hq, h = blockIdx.y % p.hq, hk = h / (p.hq / p.hkv);
  const int64_t m0 = int64_t(blockIdx.x) * kBlockM;
  const WindowRule rule(p);
  const float scale_log2 = p.scale * kLog2e;
  const bool has_mods = p.softcap > 0.f || p.alibi_slopes != nullptr || p.dropout_p > 0.f;

  load_tile<kBlockM, kHeadDim, Kt::kNThreads>(
      sQ, kLdQK, static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                     m0 * p.q_row_stride, p.q_row_stride, p.nq - m0, p.d);
  load_tile<kBlockM, kHeadDim, Kt::kNThreads>(
      sdO, kLdQK, static_cast<const T*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride +
                      m0 * p.do_row_stride, p.do_row_stride, p.nq - m0, p.d);
  const T* gK = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* gV = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;

  const int r = lane >> 1, half = lane & 1;
  const int64_t row = m0 + warp * 16 + r;
  const bool row_in = row < p.nq;
  const float lse2 = row_in ? p.lse[(b * p.hq + h) * p.nq + row] * kLog2e : neg_inf();
  const float delta = row_in ? p.delta[(b * p.hq + h) * p.nq + row] : 0.f;

  float* sAw = sA + warp * 16 * kLdA;
  float* sBw = sB + warp * 16 * kLdB;
  T* sdSw = sdS + warp * 16 * kLdP;
  const T* sQw = sQ + warp * 16 * kLdQK;
  const T* sdOw = sdO + warp * 16 * kLdQK;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dq_frag[kHeadDim / 16];
#pragma unroll
  for (int nn = 0; nn < kHeadDim / 16; ++nn) wmma::fill_fragment(dq_frag[nn], 0.f);

  auto visit = [&](int64_t n0, const TileMask& tm) {
    __syncthreads();  // previous K/V tile consumed (and Q/dO loaded, on the first visit)
    load_tile<kBlockN, kHeadDim, Kt::kNThreads>(sK, kLdQK, gK + n0 * p.k_row_stride,
                                                p.k_row_stride, p.nk - n0, p.d);
    load_tile<kBlockN, kHeadDim, Kt::kNThreads>(sV, kLdQK, gV + n0 * p.v_row_stride,
                                                p.v_row_stride, p.nk - n0, p.d);
    __syncthreads();

    // S = Q_w K^T and dP = dO_w V^T  (16 x kBlockN each)
#pragma unroll 1  // outer loop rolled: bounds the live fragments (registers)
    for (int nn = 0; nn < kBlockN / 16; ++nn) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_frag, dp_frag;
      wmma::fill_fragment(s_frag, 0.f);
      wmma::fill_fragment(dp_frag, 0.f);
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a_frag;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b_frag;
        wmma::load_matrix_sync(a_frag, sQw + kk * 16, kLdQK);
        wmma::load_matrix_sync(b_frag, sK + nn * 16 * kLdQK + kk * 16, kLdQK);
        wmma::mma_sync(s_frag, a_frag, b_frag, s_frag);
        wmma::load_matrix_sync(a_frag, sdOw + kk * 16, kLdQK);
        wmma::load_matrix_sync(b_frag, sV + nn * 16 * kLdQK + kk * 16, kLdQK);
        wmma::mma_sync(dp_frag, a_frag, b_frag, dp_frag);
      }
      wmma::store_matrix_sync(sAw + nn * 16, s_frag, kLdA, wmma::mem_row_major);
      wmma::store_matrix_sync(sBw + nn * 16, dp_frag, kLdB, wmma::mem_row_major);
    }
    __syncwarp();

    // dS for this thread's half row; rolled with score modifiers, as in the dK/dV kernel.
    auto elem = [&](int c, const ScoreMods* mods, uint32_t drop_row) {
      const int col = half * kColsS + c;
      float pv = 0.f, dtanh = 1.f;
      if (lse2 != neg_inf() && !(tm.on && !tm.visible(rule, row, n0 + col))) {
        const float x = mods && mods->any
                            ? mods->logit2(sAw[r * kLdA + col], row, n0 + col, dtanh)
                            : sAw[r * kLdA + col] * scale_log2;
        pv = exp2f(x - lse2);
      }
      float dp = sBw[r * kLdB + col];
      if (mods && mods->dropout) dp = mods->keep(drop_row, n0 + col) ? dp * mods->rescale : 0.f;
      float ds = pv * (dp - delta);
      if (mods && mods->softcap) ds *= dtanh;
      sdSw[r * kLdP + col] = Cvt<T>::from_float(ds);
    };
    if (has_mods) {
      const ScoreMods mods(p, b, h);
      const uint32_t drop_row = mods.dropout ? mods.row_hash(row) : 0u;
#pragma unroll 1
      for (int c = 0; c < kColsS; ++c) elem(c, &mods, drop_row);
    } else {
#pragma unroll
      for (int c = 0; c < kColsS; ++c) elem(c, nullptr, 0u);
    }
    __syncwarp();

    // dQ_w += dS_w K
#pragma unroll 1  // outer loop rolled: bounds the live fragments (registers)
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> ds_frag;
      wmma::load_matrix_sync(ds_frag, sdSw + kk * 16, kLdP);
#pragma unroll
      for (int nn = 0; nn < kHeadDim / 16; ++nn) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> k_frag;
        wmma::load_matrix_sync(k_frag, sK + kk * 16 * kLdQK + nn * 16, kLdQK);
        wmma::mma_sync(dq_frag[nn], ds_frag, k_frag, dq_frag[nn]);
      }
    }
    __syncwarp();  // sdSw is rewritten by the next tile
  };
  for_each_key_tile<kSparse, kBlockM, kBlockN>(p, rule, b, h, m0, visit);

#pragma unroll
  for (int nn = 0; nn < kHeadDim / 16; ++nn) {
    scale_fragment(dq_frag[nn], p.scale);
    wmma::store_matrix_sync(sAw + nn * 16, dq_frag[nn], kLdA, wmma::mem_row_major);
  }
  __syncwarp();
  if (row_in) {
    float vals[kColsO];
#pragma unroll
    for (int c = 0; c < kColsO; ++c) vals[c] = sAw[r * kLdA + half * kColsO + c];
    T* gdQ = static_cast<T*>(p.dq) + b * p.dq_batch_stride + h * p.dq_head_stride +
             row * p.dq_row_stride;
    store_row<kColsO>(gdQ, half * kColsO, p.d, vals);
  }
}

}  // namespace fastattn::cuda
