// Score modifiers of the CPU kernels: softcap, ALiBi and counter-based dropout, exactly as
// python_pkg/fastattn/score_mods.py defines them (that module is the reference).
//
// The kernels hold scores in log2 units (x = s * log2e, s = scale * q.k), so in those units
//   softcap:  x <- C * tanh(x / C),          C = softcap * log2e
//   ALiBi:    x <- x - slope * log2e * |i + Nk - Nq - j|
//   dropout:  keep(i, j) = hash(seed, (b * Hq + h) * Nq + i, j) >= threshold (24-bit)
// Everything is applied per tile after the Q K^T product and before masking; a call with no
// modifier never enters these functions.
#pragma once

#include <cmath>
#include <cstdint>

#include "isa_namespace.h"
#include "kernel_args.h"
#include "kernel_math.h"

namespace fastattn::cpu {
inline namespace FASTATTN_ISA_VISIBILITY FASTATTN_ISA {

inline bool has_dropout(const ScoreMods& m) { return m.dropout_p > 0.f; }
inline float cap_log2(const ScoreMods& m) { return m.softcap * kLog2e; }
inline float slope_log2(const ScoreMods& m, int64_t b, int64_t h) {
  return m.slopes ? m.slopes[b * m.Hq + h] * kLog2e : 0.f;
}
inline float keep_scale(const ScoreMods& m) { return 1.f / (1.f - m.dropout_p); }

inline uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

// First half of the hash: depends on the row only (hoisted out of the column loop).
inline uint32_t dropout_row_hash(const ScoreMods& m, uint64_t row) {
  return fmix32(static_cast<uint32_t>(row) * 0x9E3779B1u + m.seed_lo);
}

inline bool dropout_keep(const ScoreMods& m, uint32_t row_hash, uint64_t col) {
  const uint32_t h = fmix32(row_hash ^ (static_cast<uint32_t>(col) * 0x85EBCA77u + m.seed_hi));
  return (h >> 8) >= m.threshold;
}

// tanh through exp2_fast: tanh(y) = sign(y) (1 - e) / (1 + e), e = 2^(-2|y| log2e) in (0, 1].
// Absolute error ~1e-7 (what the logits need; relative accuracy near 0 is not).
inline float tanh_fast(float y) {
  const float a = y < 0.f ? -y : y;
  const float e = exp2_fast(-2.f * kLog2e * a);
  const float t = (1.f - e) / (1.f + e);
  return y < 0.f ? -t : t;
}

// Softcap + ALiBi on a score tile x (rows i0.., cols j0.., leading dim ld), log2 units.
// Row-major (forward: rows = queries). tanh_out (same layout, may be null) receives tanh
// values for the backward's chain rule.
inline void apply_score_mods_rows(float* x, int64_t ld, int64_t i0, int64_t m, int64_t j0, int64_t n,
                                  int64_t off, const ScoreMods& mods, int64_t b, int64_t h) {
  const float C = cap_log2(mods), invC = C > 0.f ? 1.f / C : 0.f;
  const float sl = slope_log2(mods, b, h);
  for (int64_t r = 0; r < m; ++r) {
    float* row = x + r * ld;
    if (C > 0.f)
      for (int64_t c = 0; c < n; ++c) row[c] = C * tanh_fast(row[c] * invC);
    if (sl != 0.f) {
      const int64_t d0 = i0 + r + off - j0;  // i + off - j at c = 0
      for (int64_t c = 0; c < n; ++c) {
        const float d = static_cast<float>(d0 - c);
        row[c] -= sl * (d < 0.f ? -d : d);
      }
    }
  }
}

// Multiplies probabilities p (rows i0.., cols j0..) by keep / (1 - p_drop), in place.
inline void apply_dropout_rows(float* p, int64_t ld, int64_t i0, int64_t m, int64_t j0, int64_t n,
                               const ScoreMods& mods, int64_t bh, int64_t Nq) {
  const float ks = keep_scale(mods);
  for (int64_t r = 0; r < m; ++r) {
    float* row = p + r * ld;
    const uint32_t rh = dropout_row_hash(mods, static_cast<uint64_t>(bh * Nq + i0 + r));
    for (int64_t c = 0; c < n; ++c) row[c] = dropout_keep(mods, rh, j0 + c) ? row[c] * ks : 0.f;
  }
}

}  // inline namespace FASTATTN_ISA
}  // namespace fastattn::cpu
