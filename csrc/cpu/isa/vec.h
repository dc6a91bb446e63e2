// Float vectors for the per-ISA kernels, written once with GCC/Clang vector extensions.
//
// The width comes from the translation unit that includes this header:
//   kernels_generic.cpp  16 bytes (SSE on x86-64-v2, NEON on aarch64, scalar elsewhere)
//   kernels_avx2.cpp     32 bytes under target("avx2,fma")
//   kernels_avx512.cpp   64 bytes under target("avx512f,...")
// so the same source becomes each ISA's code; `a * b + c` contracts to FMA where the
// target has it (-ffp-contract=fast). Everything sits in the ISA's inline namespace.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu/isa_namespace.h"

#ifndef FASTATTN_VEC_BYTES
#define FASTATTN_VEC_BYTES 16
#endif

namespace fastattn::cpu {
inline namespace FASTATTN_ISA_VISIBILITY FASTATTN_ISA {

constexpr int kW = FASTATTN_VEC_BYTES / 4;  // float lanes

typedef float vf __attribute__((vector_size(FASTATTN_VEC_BYTES)));
typedef int32_t vi __attribute__((vector_size(FASTATTN_VEC_BYTES)));
typedef uint32_t vu __attribute__((vector_size(FASTATTN_VEC_BYTES)));
// unaligned, aliasing view used for every load/store
typedef float vf_mem __attribute__((vector_size(FASTATTN_VEC_BYTES), aligned(4), may_alias));

inline vf vload(const float* p) { return *reinterpret_cast<const vf_mem*>(p); }
inline void vstore(float* p, vf x) { *reinterpret_cast<vf_mem*>(p) = x; }
// x - 0 is x for every x (also -0 and NaN), so this folds to one broadcast (0 + x would not).
inline vf vsplat(float x) { return x - vf{}; }
inline vf vsel(vi mask, vf a, vf b) { return mask ? a : b; }

// Horizontal sum / maximum as a pairwise tree (depth log2(kW), not a kW-long chain of
// dependent adds: the softmax does one per row and span).
inline float hsum(vf x) {
  float t[kW];
  std::memcpy(t, &x, sizeof(t));
#pragma GCC unroll 16
  for (int w = kW / 2; w >= 1; w /= 2)
#pragma GCC unroll 16
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}
inline float hmax(vf x) {
  float t[kW];
  std::memcpy(t, &x, sizeof(t));
#pragma GCC unroll 16
  for (int w = kW / 2; w >= 1; w /= 2)
#pragma GCC unroll 16
    for (int i = 0; i < w; ++i) t[i] = t[i + w] > t[i] ? t[i + w] : t[i];
  return t[0];
}

// 2^f for |f| <= 0.5: the degree-6 polynomial of kernel_math.h's exp2_fast.
inline vf vexp2_poly(vf f) {
  vf p = vsplat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  return p * f + 1.0f;
}

// 2^x per lane; the same method and constants as kernel_math.h's exp2_fast: ~2 ulp on
// [-126, 128], exactly 0 below -126 (and for -inf), +inf above 128, NaN -> NaN.
inline vf vexp2(vf x) {
  const vf lo = vsplat(-126.f), hi = vsplat(128.f);
  vf xc = vsel(x > hi, hi, x);
  xc = vsel(xc < lo, lo, xc);
  const vf magic = vsplat(12582912.f);  // 1.5 * 2^23: adding and subtracting rounds to nearest
  const vf n = (xc + magic) - magic;
  const vf f = xc - n;
  const vf p = vexp2_poly(f);
  vi e = __builtin_convertvector(n, vi) + 127;
  e = e > 254 ? vi{} + 254 : e;
  vf r = p * (vf)(e << 23);
  r = vsel(n >= hi, vsplat(std::numeric_limits<float>::infinity()), r);
  r = vsel(x < lo, vf{}, r);
  return vsel(x != x, x, r);
}

// 2^x for x <= 0 or -inf, never NaN (the softmax's exponents: scores minus the row
// maximum). Same polynomial as vexp2 without the overflow and NaN selects: 0 below -127.
inline vf vexp2_nonpos(vf x) {
  const vf lo = vsplat(-127.f);
  const vf xc = x > lo ? x : lo;  // one vmaxps; -inf -> -127
  const vf magic = vsplat(12582912.f);
  const vf n = (xc + magic) - magic;
  const vf f = xc - n;
  const vf p = vexp2_poly(f);
  const vi e = __builtin_convertvector(n, vi) + 127;  // 0 .. 127; 0 gives the factor 0
  return p * (vf)(e << 23);
}

}  // inline namespace FASTATTN_ISA
}  // namespace fastattn::cpu
