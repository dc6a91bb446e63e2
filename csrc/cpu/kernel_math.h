// Scalar numeric helpers shared by the CPU kernels (exp2, log2 constants); the vector
// versions are in isa/vec.h.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "isa_namespace.h"

namespace fastattn::cpu {
inline namespace FASTATTN_ISA_VISIBILITY FASTATTN_ISA {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 2^x for float x, ~2 ulp on [-126, 128]; exactly 0 below -126 (and for -inf); NaN -> NaN.
// Cephes-style: x = n + f with |f| <= 0.5, 2^f by a degree-6 polynomial, 2^n through the
// exponent bits.
inline float exp2_fast(float x) {
  const bool underflow = x < -126.0f;
  float xc = x > 128.0f ? 128.0f : x;  // inf stays large: 2^128 -> inf below
  xc = xc < -126.0f ? -126.0f : xc;
  const float n = std::nearbyint(xc);
  const float f = xc - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  int32_t e = static_cast<int32_t>(n) + 127;  // n in [-126, 128]
  e = e > 254 ? 254 : e;
  int32_t bits = e << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float r = p * scale;
  r = (n >= 128.0f) ? std::numeric_limits<float>::infinity() : r;
  r = underflow ? 0.0f : r;
  return (x != x) ? x : r;  // NaN propagates
}

}  // inline namespace FASTATTN_ISA
}  // namespace fastattn::cpu
