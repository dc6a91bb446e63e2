// bfloat16 tile products with float32 accumulation (AVX512-BF16 vdpbf16ps), and the
// conversions that feed them. Included only by isa/kernels_avx512bf16.cpp (FASTATTN_BF16_DOT),
// after <immintrin.h>; the fp32 products of gemm.h stay the reference structure.
//
//   gemm_bf16<ACC, SCALE, MAX>(M, N, K2, A, lda, B, ldb, C, ldc, alpha, rmax):
//     C (+)= alpha * A B,  A (M x 2*K2) bfloat16 row-major (lda in elements, even),
//     B "paired": word (k2, n) = (B[2 k2][n], B[2 k2 + 1][n]), row stride ldb words.
//   Each vdpbf16ps adds both products of a pair to the float32 accumulator; k2 runs in
//   order, so a C element's sum does not depend on the blocking (as in gemm.h).
//   N is rounded up to whole 16-word vectors (the drivers pad B and C rows to kPad).
//   Odd K: the caller zero-pads the last pair (A's column and B's row both 0).
#pragma once

#include "cpu/isa/gemm.h"
#include "cpu/isa/vec.h"

namespace fastattn::cpu {
inline namespace FASTATTN_ISA_VISIBILITY FASTATTN_ISA {

static_assert(kW == 16, "the bf16 dot products use 64-byte vectors");

// Broadcast of one 32-bit word (a bf16 pair) without float arithmetic on its bits.
inline vf vsplat_word(const uint16_t* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  return (vf)(vu{} + w);
}

inline vf dot2(vf c, vf a, vf b) { return (vf)_mm512_dpbf16_ps((__m512)c, (__m512bh)a, (__m512bh)b); }

template <int MR, int NV, bool ACC, bool SCALE, bool MAX>
inline void micro_bf16(int64_t K2, const uint16_t* __restrict A, int64_t lda, const uint16_t* __restrict B,
                       int64_t ldb, float* __restrict C, int64_t ldc, float alpha, float* __restrict rmax) {
  vf c[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) c[i][j] = ACC ? vload(C + i * ldc + j * kW) : vf{};
  for (int64_t k = 0; k < K2; ++k) {
    vf b[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) b[j] = vload(reinterpret_cast<const float*>(B + 2 * (k * ldb + j * kW)));
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const vf ai = vsplat_word(A + i * lda + 2 * k);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) c[i][j] = dot2(c[i][j], ai, b[j]);
    }
  }
  if constexpr (SCALE) {
    const vf al = vsplat(alpha);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) c[i][j] *= al;
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) vstore(C + i * ldc + j * kW, c[i][j]);
  if constexpr (MAX) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      vf mx = vload(rmax + i * kW);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) mx = vmax(c[i][j], mx);  // one maxps; NaN entries skipped
      vstore(rmax + i * kW, mx);
    }
  }
}

template <int NV, bool ACC, bool SCALE, bool MAX>
inline void micro_bf16_rows(int mr, int64_t K2, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb,
                            float* C, int64_t ldc, float alpha, float* rmax) {
  switch (mr) {
    case 6: micro_bf16<6, NV, ACC, SCALE, MAX>(K2, A, lda, B, ldb, C, ldc, alpha, rmax); break;
    case 5: micro_bf16<5, NV, ACC, SCALE, MAX>(K2, A, lda, B, ldb, C, ldc, alpha, rmax); break;
    case 4: micro_bf16<4, NV, ACC, SCALE, MAX>(K2, A, lda, B, ldb, C, ldc, alpha, rmax); break;
    case 3: micro_bf16<3, NV, ACC, SCALE, MAX>(K2, A, lda, B, ldb, C, ldc, alpha, rmax); break;
    case 2: micro_bf16<2, NV, ACC, SCALE, MAX>(K2, A, lda, B, ldb, C, ldc, alpha, rmax); break;
    default: micro_bf16<1, NV, ACC, SCALE, MAX>(K2, A, lda, B, ldb, C, ldc, alpha, rmax); break;
  }
}

// MAX: as gemm.h's (per-lane row maxima of the scaled C into rmax; N whole vectors).
template <bool ACC, bool SCALE = false, bool MAX = false>
inline void gemm_bf16(int64_t M, int64_t N, int64_t K2, const uint16_t* A, int64_t lda, const uint16_t* B,
                      int64_t ldb, float* C, int64_t ldc, float alpha = 1.f, float* rmax = nullptr) {
  constexpr int MR = 6, NVM = 4;  // 24 zmm accumulators + 4 B vectors + 1 broadcast
  const int64_t nvec = (N + kW - 1) / kW;
  for (int64_t j = 0; j < nvec; j += NVM) {
    const int64_t nv = nvec - j < NVM ? nvec - j : NVM;
    for (int64_t i = 0; i < M; i += MR) {
      const int mr = static_cast<int>(M - i < MR ? M - i : MR);
      const uint16_t* a = A + i * lda;
      const uint16_t* b = B + 2 * j * kW;
      float* c = C + i * ldc + j * kW;
      float* rm = MAX ? rmax + i * kW : nullptr;
      switch (nv) {
        case 4: micro_bf16_rows<4, ACC, SCALE, MAX>(mr, K2, a, lda, b, ldb, c, ldc, alpha, rm); break;
        case 3: micro_bf16_rows<3, ACC, SCALE, MAX>(mr, K2, a, lda, b, ldb, c, ldc, alpha, rm); break;
        case 2: micro_bf16_rows<2, ACC, SCALE, MAX>(mr, K2, a, lda, b, ldb, c, ldc, alpha, rm); break;
        default: micro_bf16_rows<1, ACC, SCALE, MAX>(mr, K2, a, lda, b, ldb, c, ldc, alpha, rm); break;
      }
    }
  }
}

// ----------------------------------------------------------------- conversions (round to nearest even)

// y[r][c] = bf16(x[r][c]) for r < m, c < round_up(n, 16): an A operand with pairs along c.
// x's rows must be readable (and hold zeros) up to round_up(n, 16).
inline void rows_to_bf16(const float* x, int64_t ldx, int64_t m, int64_t n, uint16_t* y, int64_t ldy) {
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < n; c += kW) {
      const __m256bh h = _mm512_cvtneps_pbh((__m512)vload(x + r * ldx + c));
      std::memcpy(y + r * ldy + c, &h, 32);
    }
}

// Paired B operand with pairs along rows: word (r2, c) of y = (bf16 x[2 r2][c], bf16 x[2 r2 + 1][c])
// for r2 < ceil(m / 2), c < round_up(n, 16); a missing last row reads as zeros. ldy in words.
inline void rows_to_bf16_pairs(const float* x, int64_t ldx, int64_t m, int64_t n, uint16_t* y, int64_t ldy) {
  // lane order after cvtne2ps(hi = row 1, lo = row 0): [r0 c0..c15, r1 c0..c15] -> interleave
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                       21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t r = 0; r < m; r += 2) {
    const float* x0 = x + r * ldx;
    const float* x1 = r + 1 < m ? x0 + ldx : nullptr;
    for (int64_t c = 0; c < n; c += kW) {
      const vf lo = vload(x0 + c), hi = x1 != nullptr ? vload(x1 + c) : vf{};
      const __m512i p = _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh((__m512)hi, (__m512)lo));
      std::memcpy(y + 2 * ((r / 2) * ldy + c), &p, 64);
    }
  }
}

}  // inline namespace FASTATTN_ISA
}  // namespace fastattn::cpu
