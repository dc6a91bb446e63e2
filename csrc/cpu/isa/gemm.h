// Register-blocked float32 tile products for the attention kernels (one source, every ISA).
//
//   gemm<ACC, AT>(M, N, K, A, lda, B, ldb, C, ldc):   C (+)= op(A) B
//     C (M x N) row-major (ldc), B (K x N) row-major (ldb), op(A) (M x K) with
//     A[i * lda + k] (AT = false: A row-major) or A[k * lda + i] (AT = true: A^T stored,
//     so P^T dO and dS^T Q need no transpose).
//   N is rounded up to whole vectors: B's and C's rows must be readable/writable up to
//   ceil(N / kW) * kW (the drivers pad to kPad = 16 floats).
//
// Micro-kernel: MR rows x NV vectors of C stay in registers while k runs over K; each step
// loads NV vectors of B and broadcasts MR values of A (AVX2: 6 x 2 ymm = 12 accumulators of
// 16; AVX-512: 6 x 4 zmm = 24 of 32). Each C element sums over k in order 0..K-1, whatever
// the blocking: results do not depend on M, N or the tile position.
#pragma once

#include "cpu/isa/vec.h"

namespace fastattn::cpu {
inline namespace FASTATTN_ISA_VISIBILITY FASTATTN_ISA {

#ifndef FASTATTN_GEMM_MR
#define FASTATTN_GEMM_MR 6
#endif
#ifndef FASTATTN_GEMM_NV
#define FASTATTN_GEMM_NV (kW >= 16 ? 4 : 2)
#endif
constexpr int kMR = FASTATTN_GEMM_MR;
constexpr int kNV = FASTATTN_GEMM_NV;

// MAX: also folds the new C rows into rmax (MR x kW per-lane running maxima), so the
// softmax needs no separate pass for its row maxima. NaN entries are skipped (one maxps per
// vector): the softmax's exp2 then carries them into the row's sum and output (and a row
// whose maxima stay -inf is re-scanned), so a NaN score still makes its row NaN.
template <int MR, int NV, bool ACC, bool AT, bool MAX = false>
inline void micro(int64_t K, const float* __restrict A, int64_t lda, const float* __restrict B, int64_t ldb,
                  float* __restrict C, int64_t ldc, float* __restrict rmax = nullptr) {
  const int64_t a_rs = AT ? 1 : lda, a_ks = AT ? lda : 1;
  vf c[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) c[i][j] = ACC ? vload(C + i * ldc + j * kW) : vf{};
  for (int64_t k = 0; k < K; ++k) {
    vf b[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) b[j] = vload(B + k * ldb + j * kW);
    const float* a = A + k * a_ks;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const vf ai = vsplat(a[i * a_rs]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) c[i][j] += ai * b[j];
    }
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

template <int NV, bool ACC, bool AT, bool MAX>
inline void micro_rows(int mr, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                       int64_t ldc, float* rmax) {
  switch (mr) {
    case 8: if constexpr (kMR >= 8) micro<8, NV, ACC, AT, MAX>(K, A, lda, B, ldb, C, ldc, rmax); break;
    case 7: if constexpr (kMR >= 7) micro<7, NV, ACC, AT, MAX>(K, A, lda, B, ldb, C, ldc, rmax); break;
    case 6: micro<6, NV, ACC, AT, MAX>(K, A, lda, B, ldb, C, ldc, rmax); break;
    case 5: micro<5, NV, ACC, AT, MAX>(K, A, lda, B, ldb, C, ldc, rmax); break;
    case 4: micro<4, NV, ACC, AT, MAX>(K, A, lda, B, ldb, C, ldc, rmax); break;
    case 3: micro<3, NV, ACC, AT, MAX>(K, A, lda, B, ldb, C, ldc, rmax); break;
    case 2: micro<2, NV, ACC, AT, MAX>(K, A, lda, B, ldb, C, ldc, rmax); break;
    default: micro<1, NV, ACC, AT, MAX>(K, A, lda, B, ldb, C, ldc, rmax); break;
  }
}

// MAX: rmax (M x kW) accumulates per-lane row maxima of C (see micro); then N must be a
// whole number of vectors (no padded columns in the maxima).
template <bool ACC, bool AT, bool MAX = false>
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                 float* C, int64_t ldc, float* rmax = nullptr) {
  static_assert(kMR >= 1 && kMR <= 8 && kNV >= 1 && kNV <= 4, "micro_rows dispatches 1..8 rows, 1..4 vectors");
  const int64_t nvec = (N + kW - 1) / kW;
  const int64_t a_rs = AT ? 1 : lda;
  for (int64_t j = 0; j < nvec; j += kNV) {  // a column panel of B stays in L1 over all rows
    const int64_t nv = nvec - j < kNV ? nvec - j : kNV;
    for (int64_t i = 0; i < M; i += kMR) {
      const int mr = static_cast<int>(M - i < kMR ? M - i : kMR);
      const float* a = A + i * a_rs;
      const float* b = B + j * kW;
      float* c = C + i * ldc + j * kW;
      switch (nv) {
        case 4: if constexpr (kNV >= 4) micro_rows<4, ACC, AT, MAX>(mr, K, a, lda, b, ldb, c, ldc, MAX ? rmax + i * kW : nullptr); break;
        case 3: if constexpr (kNV >= 3) micro_rows<3, ACC, AT, MAX>(mr, K, a, lda, b, ldb, c, ldc, MAX ? rmax + i * kW : nullptr); break;
        case 2: if constexpr (kNV >= 2) micro_rows<2, ACC, AT, MAX>(mr, K, a, lda, b, ldb, c, ldc, MAX ? rmax + i * kW : nullptr); break;
        default: micro_rows<1, ACC, AT, MAX>(mr, K, a, lda, b, ldb, c, ldc, MAX ? rmax + i * kW : nullptr); break;
      }
    }
  }
}

}  // inline namespace FASTATTN_ISA
}  // namespace fastattn::cpu
