// Forward kernel, FlashAttention-2 style: one block per (query tile, batch * query head);
// K/V tiles stream through shared memory; each warp keeps the online-softmax state (running
// max m, running sum l, output accumulator O) of its 16 query rows.
//
// Per key tile, warp w (rows 16w .. 16w+15):
//   S = Q_w K^T           wmma, fp32 accumulate -> per-warp smem scratch (16 x kBlockN)
//   softmax update        two lanes per row, each half of the columns, exp2 with the scale
//                         folded with log2(e) (softcap / ALiBi applied to the logits first);
//                         P rounded to the input type -> smem (dropped entries zeroed; the
//                         1 / (1 - p) of dropout scales O at the end)
//   O = O * alpha + P V   wmma into the scratch, then each thread updates its own O row-half
// The O accumulator lives in registers with an explicit layout (lane -> row lane/2, columns
// (lane&1) * d/2 ...) because wmma's fragment layout is unspecified, so rows of a fragment
// cannot be rescaled in place.
#pragma once

#include "kernel_traits.h"
#include "kernel_utils.h"

namespace fastattn::cuda {

namespace wmma = nvcuda::wmma;

// Min blocks per SM (kernel_traits.h): without it ptxas let the sparse variants grow past the
// register budget of the occupancy that shared memory allows on sm_90.
template <typename Kt, bool kSparse>
__global__ void __launch_bounds__(Kt::kNThreads, Kt::kMinBlocksPerSm)
    flash_fwd_kernel(const FlashParams params) {
  using T = typename Kt::elem_type;
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kHeadDim = Kt::kHeadDim;
  constexpr int kLdQK = Kt::kLdQK, kLdS = Kt::kLdS, kLdP = Kt::kLdP;
  constexpr int kColsS = kBlockN / 2, kColsO = kHeadDim / 2;  // per thread (half a row)

  FA_DYNAMIC_SMEM(smem_);
  T* sQ = reinterpret_cast<T*>(smem_);
  T* sK = reinterpret_cast<T*>(smem_ + Kt::kSmemQ);
  T* sV = sK + kBlockN * kLdQK;
  float* sS = reinterpret_cast<float*>(smem_ + Kt::kSmemQ + Kt::kSmemKV);
  T* sP = reinterpret_cast<T*>(smem_ + Kt::kSmemQ + Kt::kSmemKV + Kt::kSmemS);

  const FlashParams& p = params;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t b = blockIdx.y / p.hq, h = blockIdx.y % p.hq, hk = h / (p.hq / p.hkv);
  const int64_t m0 = int64_t(blockIdx.x) * kBlockM;
  const WindowRule rule(p);
  const float scale_log2 = p.scale * kLog2e;
  const bool has_logit_mods = p.softcap > 0.f || p.alibi_slopes != nullptr;

  const T* gQ = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                m0 * p.q_row_stride;
  const T* gK = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* gV = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;

  load_tile<kBlockM, kHeadDim, Kt::kNThreads>(sQ, kLdQK, gQ, p.q_row_stride, p.nq - m0, p.d);
  __syncthreads();

  // This warp's Q rows as matrix_a fragments, held for the whole loop.
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> q_frag[kHeadDim / 16];
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk)
    wmma::load_matrix_sync(q_frag[kk], sQ + warp * 16 * kLdQK + kk * 16, kLdQK);

  float* sSw = sS + warp * 16 * kLdS;
  T* sPw = sP + warp * 16 * kLdP;
  const int r = lane >> 1, half = lane & 1;
  const int64_t row = m0 + warp * 16 + r;

  float acc_o[kColsO];
#pragma unroll
  for (int c = 0; c < kColsO; ++c) acc_o[c] = 0.f;
  float m_i = neg_inf();  // running max of the row, in log2 units (score * scale * log2 e)
  float l_i = 0.f;        // running sum of exp2(score - m_i)

  auto visit = [&](int64_t n0, const TileMask& tm) {
    __syncthreads();  // every warp is done with the previous K/V tile
    load_tile<kBlockN, kHeadDim, Kt::kNThreads>(sK, kLdQK, gK + n0 * p.k_row_stride,
                                                p.k_row_stride, p.nk - n0, p.d);
    load_tile<kBlockN, kHeadDim, Kt::kNThreads>(sV, kLdQK, gV + n0 * p.v_row_stride,
                                                p.v_row_stride, p.nk - n0, p.d);
    __syncthreads();

    // S = Q_w K^T  (16 x kBlockN)
#pragma unroll 1  // outer loop rolled: bounds the live fragments (registers)
    for (int nn = 0; nn < kBlockN / 16; ++nn) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_frag;
      wmma::fill_fragment(s_frag, 0.f);
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> k_frag;
        wmma::load_matrix_sync(k_frag, sK + nn * 16 * kLdQK + kk * 16, kLdQK);
        wmma::mma_sync(s_frag, q_frag[kk], k_frag, s_frag);
      }
      wmma::store_matrix_sync(sSw + nn * 16, s_frag, kLdS, wmma::mem_row_major);
    }
    __syncwarp();

    // Softcap / ALiBi in a rolled loop of their own, so that the unrolled softmax below stays as
    // lean (in registers) as the plain path: this thread's half row of S becomes, in place,
    // logits in log2 units.
    if (has_logit_mods) {
      const ScoreMods mods(p, b, h);
#pragma unroll 1
      for (int c = 0; c < kColsS; ++c) {
        const int col = half * kColsS + c;
        sSw[r * kLdS + col] = mods.logit2(sSw[r * kLdS + col], row, n0 + col);
      }
    }
    const float to_log2 = has_logit_mods ? 1.f : scale_log2;

    // Online softmax on this thread's half row.
    float s[kColsS];
    float m_tile = neg_inf();
#pragma unroll
    for (int c = 0; c < kColsS; ++c) {
      const int col = half * kColsS + c;
      float x = sSw[r * kLdS + col] * to_log2;
      if (tm.on && !tm.visible(rule, row, n0 + col)) x = neg_inf();
      s[c] = x;
      m_tile = fmaxf(m_tile, x);
    }
    m_tile = fmaxf(m_tile, __shfl_xor_sync(0xffffffffu, m_tile, 1));
    const float m_new = fmaxf(m_i, m_tile);
    const float m_use = m_new == neg_inf() ? 0.f : m_new;  // fully masked so far: no NaN
    const float alpha = exp2f(m_i - m_use);
    float l_tile = 0.f;
#pragma unroll
    for (int c = 0; c < kColsS; ++c) {
      const float pv = exp2f(s[c] - m_use);
      l_tile += pv;  // the softmax sums undropped probabilities
      sPw[r * kLdP + half * kColsS + c] = Cvt<T>::from_float(pv);
    }
    // Dropout (rolled, same reason): P V sees P * keep; the 1 / (1 - p) is applied to O at the
    // end, in fp32.
    if (p.dropout_p > 0.f) {
      const ScoreMods mods(p, b, h);
      const uint32_t drop_row = mods.row_hash(row);
#pragma unroll 1
      for (int c = 0; c < kColsS; ++c) {
        const int col = half * kColsS + c;
        if (!mods.keep(drop_row, n0 + col)) sPw[r * kLdP + col] = Cvt<T>::from_float(0.f);
      }
    }
    l_tile += __shfl_xor_sync(0xffffffffu, l_tile, 1);
    l_i = l_i * alpha + l_tile;
    m_i = m_new;
    __syncwarp();

    // P V  (16 x kHeadDim) into the scratch, then O = O * alpha + P V.
#pragma unroll 1  // outer loop rolled: bounds the live fragments (registers)
    for (int nn = 0; nn < kHeadDim / 16; ++nn) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> o_frag;
      wmma::fill_fragment(o_frag, 0.f);
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> p_frag;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> v_frag;
        wmma::load_matrix_sync(p_frag, sPw + kk * 16, kLdP);
        wmma::load_matrix_sync(v_frag, sV + kk * 16 * kLdQK + nn * 16, kLdQK);
        wmma::mma_sync(o_frag, p_frag, v_frag, o_frag);
      }
      wmma::store_matrix_sync(sSw + nn * 16, o_frag, kLdS, wmma::mem_row_major);
    }
    __syncwarp();
    // Non-finite policy (DESIGN.md): on a masked tile, a NaN/inf in V reaches only the rows
    // that see its key, but the product above gives 0 * NaN = NaN to every row. A non-finite
    // entry of this thread's half row (rare: only with non-finite inputs) is recomputed, in
    // the scratch, over the keys the row sees. Rolled and apart from acc_o (registers).
    if (tm.on) {
#pragma unroll 1
      for (int c = 0; c < kColsO; ++c) {
        float* o = sSw + r * kLdS + half * kColsO + c;
        if (*o - *o == 0.f) continue;
        float e = 0.f;
#pragma unroll 1
        for (int j = 0; j < kBlockN; ++j)
          if (tm.visible(rule, row, n0 + j))
            e += Cvt<T>::to_float(sPw[r * kLdP + j]) *
                 Cvt<T>::to_float(sV[j * kLdQK + half * kColsO + c]);
        *o = e;
      }
    }
#pragma unroll
    for (int c = 0; c < kColsO; ++c)
      acc_o[c] = acc_o[c] * alpha + sSw[r * kLdS + half * kColsO + c];
    __syncwarp();  // the scratch is rewritten by the next tile
  };
  for_each_key_tile<kSparse, kBlockM, kBlockN>(p, rule, b, h, m0, visit);

  if (row < p.nq) {
    // A row that saw no key has l_i == 0: output 0, lse -inf. NaN inputs stay NaN.
    // (1 / (1 - p): dropout's rescale, exactly 1 without dropout.)
    const float inv_l = l_i == 0.f ? 0.f : (1.f / (1.f - p.dropout_p)) / l_i;
#pragma unroll
    for (int c = 0; c < kColsO; ++c) acc_o[c] *= inv_l;
    T* gO = static_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride +
            row * p.o_row_stride;
    store_row<kColsO>(gO, half * kColsO, p.d, acc_o);
    if (half == 0)
      p.lse[(b * p.hq + h) * p.nq + row] = l_i == 0.f ? neg_inf() : (m_i + log2f(l_i)) * kLn2;
  }
}

}  // namespace fastattn::cuda
