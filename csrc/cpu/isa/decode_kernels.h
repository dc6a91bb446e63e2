// Split-KV decoding, phase 1 (see decode_cpu.cpp for the whole algorithm), one source for
// every ISA variant. A task = (batch b, kv head hk, split s) runs the online softmax of the
// R = G * Nq query rows of hk's group over the keys of chunk s, tile by tile:
//   K tile (n keys) -> float32 K^T panel (D, kDecBNp), V tile -> float32 rows (n, Dvp): once
//   S = Qs K^T                  (R, n)  gemm; rows outside their visible range -> -inf
//   softcap / ALiBi per row; m, l, acc updated as in the forward kernel
//   acc += P V                  (R, Dv) gemm
// and writes o_s = acc / l and lse_s = m + log2 l (log2 units) for the merge.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/isa/attention_kernels.h"

namespace fastattn::cpu {
inline namespace FASTATTN_ISA_VISIBILITY FASTATTN_ISA {

constexpr int64_t kDecBN = 64;              // keys per tile
constexpr int64_t kDecBNp = kDecBN + kPad;  // panel row stride (not a multiple of 1 KiB)

inline int64_t decode_scratch_floats(const DecodeArgs& a) {
  const int64_t R = a.Hq / a.Hkv * a.Nq, Rp = round_up(R, kPad);
  return R * a.Dp + a.D * kDecBNp + kDecBN * a.Dvp + R * kDecBNp + R * a.Dvp + 2 * Rp + round_up(a.D, kPad) +
         4 * Rp;
}

inline void decode_tasks(const DecodeArgs& a, int64_t begin, int64_t end, float* scratch) {
  const int64_t G = a.Hq / a.Hkv, R = G * a.Nq, Rp = round_up(R, kPad);
  const int64_t D = a.D, Dv = a.Dv, Dp = a.Dp, Dvp = a.Dvp;
  float* qs = scratch;              // (R, Dp) scaled queries, log2 units
  float* kt = qs + R * Dp;          // (D, kDecBNp) K^T panel of the tile
  float* vt = kt + D * kDecBNp;     // (kDecBN, Dvp) V rows of the tile
  float* st = vt + kDecBN * Dvp;    // (R, kDecBNp) scores, then probabilities
  float* acc = st + R * kDecBNp;    // (R, Dvp)
  float* m_i = acc + R * Dvp;       // (R)
  float* l_i = m_i + Rp;            // (R)
  float* row = l_i + Rp;            // (D) one converted key
  int64_t* lo = reinterpret_cast<int64_t*>(row + round_up(D, kPad));  // (R) visible keys [lo, hi)
  int64_t* hi = lo + Rp;
  const float cap = cap_log2(a.mods), inv_cap = cap > 0.f ? 1.f / cap : 0.f;
  std::fill(qs, qs + R * Dp, 0.f);
  std::fill(vt, vt + kDecBN * Dvp, 0.f);

  for (int64_t task = begin; task < end; ++task) {
    const int64_t sp = task % a.S, bh = task / a.S, b = bh / a.Hkv, hk = bh % a.Hkv;
    const int64_t L = std::min(a.lens[b], a.Ncache);
    const int64_t c0 = sp * a.chunk, c1 = std::min(c0 + a.chunk, L);
    float* o_s = a.o_part + (bh * a.S + sp) * R * Dv;
    float* l_s = a.l_part + (bh * a.S + sp) * R;
    int64_t tlo = c1, thi = c0;  // union of the rows' ranges within the chunk
    for (int64_t r = 0; r < R; ++r) {
      const int64_t diag = L - a.Nq + r % a.Nq;  // the query's own position
      lo[r] = std::max(a.window_left >= 0 ? diag - a.window_left : 0, c0);
      hi[r] = std::min(a.window_right >= 0 ? diag + a.window_right + 1 : L, c1);
      if (lo[r] < hi[r]) {
        tlo = std::min(tlo, lo[r]);
        thi = std::max(thi, hi[r]);
      }
      m_i[r] = kNegInf;
      l_i[r] = 0.f;
    }
    vzero(acc, R * Dvp);
    if (tlo < thi) {
      for (int64_t r = 0; r < R; ++r) {
        const int64_t h = hk * G + r / a.Nq, i = r % a.Nq;
        to_f32(qs + r * Dp, a.q, b * a.sq_b + h * a.sq_h + i * a.sq_n, D, a.elem);
        for (int64_t d = 0; d < D; ++d) qs[r * Dp + d] *= a.scale_log2;
      }
      // Tiles start on chunk-aligned multiples of kDecBN.
      for (int64_t j0 = tlo - (tlo - c0) % kDecBN; j0 < thi; j0 += kDecBN) {
        const int64_t n = std::min(kDecBN, thi - j0), nW = round_up(n, kW);
        for (int64_t j = 0; j < n; ++j) {
          to_f32(row, a.k, b * a.sk_b + hk * a.sk_h + (j0 + j) * a.sk_n, D, a.elem);
          for (int64_t d = 0; d < D; ++d) kt[d * kDecBNp + j] = row[d];
          to_f32(vt + j * Dvp, a.v, b * a.sv_b + hk * a.sv_h + (j0 + j) * a.sv_n, Dv, a.elem);
        }
        gemm<false, false>(R, n, D, qs, Dp, kt, kDecBNp, st, kDecBNp);  // S: (R, n)
        for (int64_t r = 0; r < R; ++r) {
          float* sr = st + r * kDecBNp;
          const int64_t ra = std::clamp(lo[r] - j0, int64_t(0), n), rb = std::clamp(hi[r] - j0, ra, n);
          if (cap > 0.f)
            for (int64_t c = ra; c < rb; ++c) sr[c] = cap * tanh_fast(sr[c] * inv_cap);
          if (a.mods.slopes != nullptr) {  // -slope |p - j|, p = L - Nq + i
            const float sl2 = slope_log2(a.mods, b, hk * G + r / a.Nq);
            const int64_t diag = L - a.Nq + r % a.Nq;
            for (int64_t c = ra; c < rb; ++c) {
              const float d = static_cast<float>(diag - (j0 + c));
              sr[c] -= sl2 * (d < 0.f ? -d : d);
            }
          }
          for (int64_t c = 0; c < ra; ++c) sr[c] = kNegInf;
          for (int64_t c = rb; c < nW; ++c) sr[c] = kNegInf;
          const float mx = vrow_max(sr, nW);
          online_softmax_row(sr, nW, mx, m_i[r], l_i[r], acc + r * Dvp, Dvp);
        }
        // Non-finite policy (DESIGN.md): a V row holding NaN/inf reaches only the rows that
        // see its key. Such rows are added to those rows here and zeroed for the product
        // (else 0 * NaN there would reach rows that do not see the key).
        for (int64_t j = 0; j < n; ++j) {
          float* vr = vt + j * Dvp;
          bool bad = false;
          for (int64_t d = 0; d < Dv; ++d) bad |= !(vr[d] - vr[d] == 0.f);
          if (!bad) continue;
          for (int64_t r = 0; r < R; ++r) {
            if (j0 + j < lo[r] || j0 + j >= hi[r]) continue;
            const float p = st[r * kDecBNp + j];
            for (int64_t d = 0; d < Dv; ++d) acc[r * Dvp + d] += p * vr[d];
          }
          std::fill(vr, vr + Dvp, 0.f);
        }
        gemm<true, false>(R, Dvp, n, st, kDecBNp, vt, Dvp, acc, Dvp);  // acc += P V
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      const float l = l_i[r];
      const float inv = l == 0.f ? 0.f : 1.f / l;
      for (int64_t d = 0; d < Dv; ++d) o_s[r * Dv + d] = acc[r * Dvp + d] * inv;
      l_s[r] = l == 0.f ? kNegInf : m_i[r] + std::log2(l);
    }
  }
}

}  // inline namespace FASTATTN_ISA
}  // namespace fastattn::cpu
