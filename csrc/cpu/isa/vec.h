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
#if defined(__x86_64__)
#include <immintrin.h>  // intrinsics carry their own target attributes (vmax, hsum/hmax)
#endif

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
// Per lane a > b ? a : b, and b where either is NaN: x86's maxps, one instruction (GCC does
// not turn the select above into it). vmax(c, m) skips NaN c; vmax(lo, x) propagates NaN x.
inline vf vmax(vf a, vf b) {
#if defined(__x86_64__) && FASTATTN_VEC_BYTES == 64
  // the all-lanes mask form: _mm512_max_ps trips GCC 12's -Wuninitialized (its undefined source)
  return (vf)_mm512_mask_max_ps((__m512)a, static_cast<__mmask16>(0xffff), (__m512)a, (__m512)b);
#elif defined(__x86_64__) && FASTATTN_VEC_BYTES == 32
  return (vf)_mm256_max_ps((__m256)a, (__m256)b);
#elif defined(__x86_64__) && FASTATTN_VEC_BYTES == 16
  return (vf)_mm_max_ps((__m128)a, (__m128)b);
#else
  return a > b ? a : b;  // NaN in a or b: the compare fails, b
#endif
}

// Horizontal sum / maximum as a pairwise tree (depth log2(kW), not a kW-long chain of
// dependent adds: the softmax does one per row and span): lane i with lane i + w for
// w = kW/2, ..., 1. On x86 the halves come from register extracts and shuffles; the
// element-wise loop below is the same tree, but GCC compiles it through a stack copy whose
// reload stalls on store forwarding (~5% of a sliding-window forward, Zen 5).
#if defined(__x86_64__) && FASTATTN_VEC_BYTES >= 16
#if FASTATTN_VEC_BYTES == 64
inline __m128 fold_to_128(__m512 x, bool is_max) {
  // the all-lanes masked extracts: the plain ones (and GCC 12's cast, built on one) trip
  // -Wmaybe-uninitialized with their undefined source, as in vmax
  const __m256 z = _mm256_setzero_ps();
  const __m256 lo = _mm512_mask_extractf32x8_ps(z, static_cast<__mmask8>(0xff), x, 0);
  const __m256 hi = _mm512_mask_extractf32x8_ps(z, static_cast<__mmask8>(0xff), x, 1);
  const __m256 y = is_max ? _mm256_max_ps(hi, lo) : _mm256_add_ps(lo, hi);
  const __m128 ylo = _mm256_castps256_ps128(y), yhi = _mm256_extractf128_ps(y, 1);
  return is_max ? _mm_max_ps(yhi, ylo) : _mm_add_ps(ylo, yhi);
}
#elif FASTATTN_VEC_BYTES == 32
inline __m128 fold_to_128(__m256 x, bool is_max) {
  const __m128 lo = _mm256_castps256_ps128(x), hi = _mm256_extractf128_ps(x, 1);
  return is_max ? _mm_max_ps(hi, lo) : _mm_add_ps(lo, hi);
}
#else
inline __m128 fold_to_128(__m128 x, bool) { return x; }
#endif
// t[i] (+|max)= t[i + 2], then t[0] (+|max)= t[1]; max(a, b) = a > b ? a : b (b on NaN), as
// in the loop form.
inline float hsum(vf x) {
  const __m128 t = fold_to_128(x, false);
  const __m128 u = _mm_add_ps(t, _mm_movehl_ps(t, t));
  return _mm_cvtss_f32(_mm_add_ss(u, _mm_shuffle_ps(u, u, 1)));
}
inline float hmax(vf x) {
  const __m128 t = fold_to_128(x, true);
  const __m128 u = _mm_max_ps(_mm_movehl_ps(t, t), t);
  return _mm_cvtss_f32(_mm_max_ss(_mm_shuffle_ps(u, u, 1), u));
}
#else
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
#endif

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

// 2^x for x <= 0 or -inf (the softmax's exponents: scores minus the row maximum); NaN stays
// NaN. The polynomial of vexp2 evaluated in Estrin form (depth 4 instead of Horner's 6: the
// softmax pass is latency-bound, ~20% faster on Zen 5 AVX2, ~1 ulp either way), and 2^n
// read from the rounding sum's low bits instead of a conversion. 0 below -127.
inline vf vexp2_nonpos(vf x) {
  const vf xc = vmax(vsplat(-127.f), x);  // -inf -> -127; NaN stays
  const vf magic = vsplat(12582912.f);     // 1.5 * 2^23: t's low mantissa bits hold n
  const vf t = xc + magic;
  const vf f = xc - (t - magic);           // |f| <= 0.5
  const vf f2 = f * f;
  const vf a = vsplat(6.931472028550421e-1f) * f + 1.0f;
  const vf b = vsplat(5.550332471162809e-2f) * f + 2.402264791363012e-1f;
  const vf c = vsplat(1.339887440266574e-3f) * f + 9.618437357674640e-3f;
  const vf p = ((vsplat(1.535336188319500e-4f) * f2 + c) * f2 + b) * f2 + a;
  // (bits(t) << 23) == n << 23 (the 1.5 * 2^23 part shifts out); + 127 << 23: the factor 2^n,
  // 0 for n = -127
  const vu e = ((vu)t << 23) + (127u << 23);
  return p * (vf)e;
}

}  // inline namespace FASTATTN_ISA
}  // namespace fastattn::cpu
