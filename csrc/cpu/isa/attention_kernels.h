// The fused attention task bodies, forward and backward: one source of truth for the math,
// compiled once per ISA (isa/kernels_*.cpp). The drivers (attention_fwd_cpu.cpp,
// attention_bwd_cpu.cpp) lay out the float32 operands (kernel_args.h), split the tasks
// over threads with at::parallel_for and call these through the ISA's KernelTable.
//
// Forward, per task = (batch, query head, TM-row query slice), FlashAttention-2 schedule:
//   m = -inf, l = 0, acc = 0                                  // (TM), (TM), (TM, Dv) float32
//   for each visited key tile (tiles.h; partial tiles narrowed to the keys the slice sees;
//   successive full tiles, adjacent or not, share one pass as a span of up to 512 keys):
//     S = (Q * scale*log2e) K^T        (TM, n)   gemm on the tile's K^T panel
//     softcap / ALiBi (score_mods.h), token mask on partial tiles
//     m' = max(m, rowmax S); P = exp2(S - m'); l = l*2^(m-m') + rowsum P; acc *= 2^(m-m')
//     acc += P V                       (TM, Dv)  (P * keep / (1 - p) under dropout)
//   out = acc / l, lse = (m + log2 l) * ln2   (rows with l == 0: out 0, lse -inf)
//
// Backward, per task = (batch, kv head, split), key tiles kt = split, split + S, ...; for
// every query head of the GQA group and every query slice that visits the tile:
//   S = Qs K^T, P = exp2(S - lse2)      (m, n)  recomputed, exactly the forward's S
//   dV += P^T dO                        (n, Dv)
//   dP = dO V^T                         (m, n)
//   dS = P * (dP - delta) * scale       (softcap: * (1 - tanh^2); dropout: keep/(1-p))
//   dK += dS^T Q                        (n, D)
//   dQ += dS K                          into the split's own dQ buffer (no atomics)
// Every product sums in a fixed order, and no result depends on which thread ran a task:
// outputs are bitwise identical across runs and thread counts for a given ISA variant.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>

#include "cpu/isa/gemm.h"
#include "cpu/isa/vec.h"
#ifdef FASTATTN_BF16_DOT
#include "cpu/isa/gemm_bf16.h"  // the bfloat16 products (avx512bf16 variant only)
#endif
#include "cpu/kernel_args.h"
#include "cpu/kernel_math.h"
#include "cpu/score_mods.h"
#include "cpu/tiles.h"

namespace fastattn::cpu {
inline namespace FASTATTN_ISA_VISIBILITY FASTATTN_ISA {

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// True in variants built with the bfloat16 products (isa/gemm_bf16.h): with args.bf16 set,
// the tile products take bfloat16 operands (Q, K, V as given; P and dS rounded to bfloat16,
// as FlashAttention does for 16-bit inputs) and accumulate in float32. The softmax, masks,
// score modifiers and every accumulator stay float32, the same code as the float32 path.
#ifdef FASTATTN_BF16_DOT
constexpr bool kBf16Dot = true;
#else
constexpr bool kBf16Dot = false;
#endif

// Zigzag order of query tiles so each chunk of tasks a thread takes mixes light and heavy
// causal tiles.
inline int64_t zigzag(int64_t k, int64_t n) { return (k & 1) ? n - 1 - (k >> 1) : (k >> 1); }
// Under a window bounded on both sides every query tile costs about the same, and tiles in
// key order let each task find most of its K/V rows still in L2 from the task before (a
// window's tiles share all but one tile's keys); zigzag would alternate between both ends.
inline int64_t task_tile(int64_t k, int64_t n, const Shape& s) {
  return (s.left >= 0 && s.right >= 0) ? k : zigzag(k, n);
}

// Applies the token rule of a partial tile to row-major tile x (rows [i0, i0+m), cols
// [j0, j0+n)): entries outside a row's window/causal range or cleared in the bitmask become
// `fill` (-inf for scores, 0 for probabilities).
inline void mask_partial_rows(float* x, int64_t ld, int64_t i0, int64_t m, int64_t j0, int64_t n,
                              const WindowRule& w, const uint8_t* bits, int64_t bits_ld, float fill) {
  for (int64_t r = 0; r < m; ++r) {
    float* row = x + r * ld;
    int64_t a, b;
    w.row_range(i0 + r, j0, j0 + n, a, b);
    a = std::min<int64_t>(a - j0, n);  // row_range clips to [j0, j0 + n): a >= 0, b <= n
    b = std::max<int64_t>(b - j0, a);
    for (int64_t c = 0; c < a; ++c) row[c] = fill;
    for (int64_t c = b; c < n; ++c) row[c] = fill;
    if (bits != nullptr) {
      const uint8_t* br = bits + r * bits_ld;
      for (int64_t c = a; c < b; ++c) row[c] = br[c] ? row[c] : fill;
    }
  }
}

// Partial tiles whose V holds NaN/inf in some key rows (bad[c]): each such key's p * v is
// added to exactly the rows that see it by the token rule (p may be 0 there, from underflow
// or dropout: 0 * NaN is NaN, as in the reference), and the tile's own P V product then runs
// on a copy of V (vtmp, (n, Dvp)) with those rows zeroed. Without this, 0 * NaN in the
// product would spread a masked-out key's NaN to every row of the tile (the non-finite
// policy, DESIGN.md). Returns false (nothing done) when no key of the tile is bad. Only
// reached when the call's V has non-finite values.
inline bool pv_nonfinite_keys(const float* p, int64_t ld, int64_t i0, int64_t m, int64_t j0, int64_t n,
                              const WindowRule& w, const uint8_t* bits, int64_t bits_ld,
                              const uint8_t* bad, const float* v, int64_t ldv, float* acc, int64_t Dvp,
                              float* vtmp) {
  if (std::none_of(bad, bad + n, [](uint8_t x) { return x != 0; })) return false;
  for (int64_t c = 0; c < n; ++c) {
    const float* vr = v + c * ldv;
    if (!bad[c]) {
      std::copy(vr, vr + Dvp, vtmp + c * Dvp);
      continue;
    }
    std::fill(vtmp + c * Dvp, vtmp + (c + 1) * Dvp, 0.f);
    for (int64_t r = 0; r < m; ++r) {
      int64_t a, b;
      w.row_range(i0 + r, j0, j0 + n, a, b);
      if (j0 + c < a || j0 + c >= b || (bits != nullptr && !bits[r * bits_ld + c])) continue;
      const vf pv = vsplat(p[r * ld + c]);
      float* ar = acc + r * Dvp;
      for (int64_t d = 0; d < Dvp; d += kW) vstore(ar + d, vload(ar + d) + pv * vload(vr + d));
    }
  }
  return true;
}

// Columns [n, nW) of a row-major (m, ld) tile set to `fill` (the tail of the last vector).
inline void fill_tail(float* x, int64_t ld, int64_t m, int64_t n, int64_t nW, float fill) {
  if (n == nW) return;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = n; c < nW; ++c) x[r * ld + c] = fill;
}

// Maximum of x[0:n] (n a multiple of kW); NaN if any element is NaN.
inline float vrow_max(const float* x, int64_t n) {
  vf m = vsplat(kNegInf);
  vi nan = vi{};
  for (int64_t c = 0; c < n; c += kW) {
    const vf v = vload(x + c);
    m = vsel(v > m, v, m);
    nan |= v != v;
  }
  for (int i = 0; i < kW; ++i)
    if (nan[i]) return std::numeric_limits<float>::quiet_NaN();
  return hmax(m);
}

// x[c] = exp2(x[c] - b) for c < n (a multiple of kW); returns the sum. b is the row's
// maximum: when it is finite every exponent is <= 0, -inf or NaN (a NaN score the fused
// maxima skipped) and the short vexp2_nonpos does (NaN stays NaN, so the sum and the row's
// output become NaN as in torch); otherwise the general vexp2 handles inf and NaN maxima.
inline float vexp2_sub_sum(float* x, int64_t n, float b) {
  vf s = vf{};
  const vf bv = vsplat(b);
  if (b - b == 0.f) {  // finite
    for (int64_t c = 0; c < n; c += kW) {
      const vf e = vexp2_nonpos(vload(x + c) - bv);
      vstore(x + c, e);
      s += e;
    }
  } else {
    for (int64_t c = 0; c < n; c += kW) {
      const vf e = vexp2(vload(x + c) - bv);
      vstore(x + c, e);
      s += e;
    }
  }
  return hsum(s);
}

inline void vscale(float* x, int64_t n, float a) {
  const vf av = vsplat(a);
  for (int64_t c = 0; c < n; c += kW) vstore(x + c, vload(x + c) * av);
}

inline void vzero(float* x, int64_t n) {
  for (int64_t c = 0; c < n; c += kW) vstore(x + c, vf{});
}

// float16 bits -> float32, exact (normals, subnormals, inf, NaN).
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t bits;
  if (e == 0) {
    const float f = static_cast<float>(man) * 5.9604644775390625e-8f;  // man * 2^-24
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  } else if (e == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((e + 112) << 23) | (man << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// dst[0:n] = float(src[0:n]) for the element type of the call.
inline void to_f32(float* dst, const void* src, int64_t off, int64_t n, Elem e) {
  if (e == Elem::kF32) {
    std::memcpy(dst, static_cast<const float*>(src) + off, n * sizeof(float));
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(src) + off;
    if (e == Elem::kBF16)
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(p[i]);
    else
      for (int64_t i = 0; i < n; ++i) dst[i] = half_bits_to_float(p[i]);
  }
}

#ifdef FASTATTN_BF16_DOT
// pv_nonfinite_keys for the bfloat16 products: p is the tile's bfloat16 P (row stride ld), v2
// its paired V (pairs of keys from j0, Dvp words each). Bad keys get their p * v added in
// float32 to the rows that see them (the same bfloat16 p the product would use),
// and the product then runs on a copy (vtmp2) with those keys' lanes zeroed. Returns the
// paired V the tile's product should read (v2 itself when no key of the tile is bad).
inline const uint16_t* pv_nonfinite_keys_bf16(const uint16_t* p, int64_t ld, int64_t i0, int64_t m, int64_t j0,
                                              int64_t n, const WindowRule& w, const uint8_t* bits,
                                              int64_t bits_ld, const uint8_t* bad, const uint16_t* v2,
                                              float* acc, int64_t Dvp, uint16_t* vtmp2) {
  if (std::none_of(bad, bad + n, [](uint8_t x) { return x != 0; })) return v2;
  std::copy(v2, v2 + (n + 1) / 2 * Dvp * 2, vtmp2);
  for (int64_t c = 0; c < n; ++c) {
    if (!bad[c]) continue;
    const uint16_t* vc = v2 + (c / 2) * Dvp * 2 + (c & 1);  // element d at vc[2 d]
    for (int64_t d = 0; d < Dvp; ++d) vtmp2[(c / 2) * Dvp * 2 + 2 * d + (c & 1)] = 0;
    for (int64_t r = 0; r < m; ++r) {
      int64_t a, b;
      w.row_range(i0 + r, j0, j0 + n, a, b);
      if (j0 + c < a || j0 + c >= b || (bits != nullptr && !bits[r * bits_ld + c])) continue;
      const float pr = bf16_bits_to_float(p[r * ld + c]);
      float* ar = acc + r * Dvp;
      for (int64_t d = 0; d < Dvp; ++d) ar[d] += pr * bf16_bits_to_float(vc[2 * d]);
    }
  }
  return vtmp2;
}
#endif

// One online-softmax step of a score row (log2 units, nW columns, mx = its maximum): the
// running max m and sum l move on, the output row acc (dv floats) is rescaled, and the row
// becomes its probabilities exp2(S - m') (all 0 while the row has seen nothing visible).
inline void online_softmax_row(float* row, int64_t nW, float mx, float& m, float& l, float* acc, int64_t dv) {
  const float m_new = mx != mx ? mx : std::max(m, mx);  // NaN propagates
  if (m_new == kNegInf) {
    vzero(row, nW);
    return;
  }
  const float alpha = exp2_fast(m - m_new);
  l = l * alpha + vexp2_sub_sum(row, nW, m_new);
  m = m_new;
  if (alpha != 1.f) vscale(acc, dv, alpha);
}

// ----------------------------------------------------------------------------- forward

// Keys per forward span (a run of consecutive full tiles, see fwd_tasks): the S tile
// (TM x span) stays in L2. Tiles merge only when their width is a whole number of vectors.
constexpr int64_t kSpanKeys = 512;
inline bool span_merge(const Shape& s) { return s.BN % kPad == 0 && s.BN < kSpanKeys; }
// Row stride of the score tile: the span plus one pad, so the stride is never a multiple of
// 1 KiB. With a 2 KiB stride the 6 rows a micro-kernel broadcasts from share two L1 sets and
// alias each other (4 KiB apart): P V ran at 72% of the AVX2 FMA peak instead of 84%
// (single-thread gemm M=64 N=64 K=512, AMD EPYC Zen 4 class).
inline int64_t span_ld(const Shape& s) { return (span_merge(s) ? kSpanKeys : s.BNp) + kPad; }

inline int64_t fwd_scratch_floats(const FwdArgs& a) {
  return a.TM * span_ld(a.s) + a.TM * a.s.Dvp + 2 * round_up(a.TM, kPad) + a.TM * kW + a.TM * a.s.Dp +
         (a.vbad != nullptr ? a.s.BN * a.s.Dvp : 0) +  // V tile copy for non-finite V
         (a.bf16 ? a.TM * (a.s.Dp + span_ld(a.s)) / 2 + kPad : 0) +  // bfloat16 Q rows and P
         4 * (a.s.NKB + 1);  // + the visit list (16 bytes a visit)
}

// Row maximum from the per-lane maxima the S product folded in (gemm.h: NaN scores skipped).
// -inf means every score of the row was -inf or NaN: the row is scanned again, so NaN is
// still seen (vrow_max) and a NaN row does not pass for one that sees no key.
inline float lanes_max(const float* rm, const float* row, int64_t nW) {
  const float mx = hmax(vload(rm));
  return mx == kNegInf ? vrow_max(row, nW) : mx;
}

// Rows per sub-slice of a partial tile under a causal/window rule (two 6-row micro-kernel
// blocks): each sub-slice's S and P V products run only over the 16-key groups its own rows
// see, so the staircase of a diagonal or window-edge tile costs about half a tile instead of
// a whole one. The entries a sub-slice skips are outside all its rows' ranges, which the
// token mask then sets to -inf (so P = 0 there, exactly what the products would add).
constexpr int64_t kSubM = 12;

// Calls f(r0, mr, sk, nn) for each sub-slice of rows [r0, r0 + mr) of a partial tile whose
// rows see some key of [j0, j0 + n): sk, nn = its narrowed key range relative to j0.
// Without a rule (bitmask only) or when the slice is short, one call with the whole tile.
template <typename F>
inline void for_each_sub_slice(const WindowRule& w, int64_t i0, int64_t m, int64_t j0, int64_t n, F&& f) {
  if (w.trivial() || m <= kSubM) {
    f(int64_t{0}, m, int64_t{0}, n);
    return;
  }
  for (int64_t r0 = 0; r0 < m; r0 += kSubM) {
    const int64_t mr = std::min(kSubM, m - r0);
    int64_t js = j0, nn = n;
    const int64_t sk = narrow_keys(w, i0 + r0, i0 + r0 + mr, js, nn);
    if (sk >= 0) f(r0, mr, sk, nn);
  }
}

// dst (D x BNp, row stride BNp) = src^T for n keys (src rows of D floats, stride ld); the
// columns [n, BNp) zero. x86: 4 x 4 register transposes (SSE, present on every x86-64).
inline void transpose_keys(const float* src, int64_t ld, int64_t n, int64_t D, float* dst, int64_t BNp) {
  int64_t c0 = 0;
#if defined(__x86_64__)
  const int64_t D4 = D / 4 * 4;
  for (; c0 + 4 <= n; c0 += 4) {
    const float* r0 = src + c0 * ld;
    for (int64_t d = 0; d < D4; d += 4) {
      __m128 x0 = _mm_loadu_ps(r0 + d), x1 = _mm_loadu_ps(r0 + ld + d);
      __m128 x2 = _mm_loadu_ps(r0 + 2 * ld + d), x3 = _mm_loadu_ps(r0 + 3 * ld + d);
      _MM_TRANSPOSE4_PS(x0, x1, x2, x3);
      _mm_storeu_ps(dst + d * BNp + c0, x0);
      _mm_storeu_ps(dst + (d + 1) * BNp + c0, x1);
      _mm_storeu_ps(dst + (d + 2) * BNp + c0, x2);
      _mm_storeu_ps(dst + (d + 3) * BNp + c0, x3);
    }
    for (int64_t d = D4; d < D; ++d)
      for (int64_t c = c0; c < c0 + 4; ++c) dst[d * BNp + c] = src[c * ld + d];
  }
#endif
  for (int64_t c = c0; c < n; ++c)
    for (int64_t d = 0; d < D; ++d) dst[d * BNp + c] = src[c * ld + d];
  if (n < BNp)
    for (int64_t d = 0; d < D; ++d) std::fill(dst + d * BNp + n, dst + (d + 1) * BNp, 0.f);
}

// Makes K^T panel t of (b, hk) ready when the driver left the panels to the tasks
// (FwdArgs::kt_state): the first task to claim it transposes it, any other waits for that
// (a few microseconds). The panel's contents do not depend on who built it.
inline void ensure_panel(const FwdArgs& a, int64_t b, int64_t hk, int64_t t) {
  const Shape& s = a.s;
  uint32_t* st = a.kt_state + (b * s.Hkv + hk) * s.NKB + t;
  if (__atomic_load_n(st, __ATOMIC_ACQUIRE) == 2) return;
  uint32_t expect = 0;
  if (__atomic_compare_exchange_n(st, &expect, 1u, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
    const int64_t j0 = t * s.BN;
    transpose_keys(a.k + b * a.sk_b + hk * a.sk_h + j0 * a.sk_n, a.sk_n, std::min(s.BN, s.Nk - j0), s.D,
                   a.kt + ((b * s.Hkv + hk) * s.NKB + t) * s.D * s.BNp, s.BNp);
    __atomic_store_n(st, 2u, __ATOMIC_RELEASE);
    return;
  }
  for (int spins = 0; __atomic_load_n(st, __ATOMIC_ACQUIRE) != 2; ++spins) {
#if defined(__x86_64__)
    _mm_pause();
#endif
    if (spins >= 256) std::this_thread::yield();  // the builder may be descheduled
  }
}

// Rows of memory the next task will read first (its Q rows; the K rows of the next panel it
// may have to transpose), prefetched into L2 a few cache lines at a time while this task
// computes: read cold at the task's start, they stalled the loads for ~15% of the forward's
// non-product time (sliding window, N=16384, Zen 5).
struct RowPrefetch {
  const char* base[2] = {nullptr, nullptr};
  int64_t rows[2] = {0, 0}, stride[2] = {0, 0}, lines_per_row[2] = {0, 0};
  int i = 0;
  int64_t row = 0, line = 0;  // the next line to issue: range i, row, line in the row

  void add(int k, const void* p, int64_t nrows, int64_t row_stride_bytes, int64_t row_bytes) {
    base[k] = static_cast<const char*>(p);
    rows[k] = nrows;
    stride[k] = row_stride_bytes;
    lines_per_row[k] = (row_bytes + 63) / 64;
  }
  void step(int64_t lines) {  // issues the next `lines` cache lines
    for (; lines > 0 && i < 2; --lines) {
      if (row >= rows[i]) {  // this range done (or empty): the next one
        ++i, row = 0, line = 0;
        continue;
      }
      __builtin_prefetch(base[i] + row * stride[i] + line * 64, 0, 2);
      if (++line == lines_per_row[i]) line = 0, ++row;
    }
  }
};

inline void fwd_tasks(const FwdArgs& a, int64_t begin, int64_t end, float* scratch) {
  const Shape& s = a.s;
  const int64_t TM = a.TM, BNp = s.BNp, Dp = s.Dp, Dvp = s.Dvp, D = s.D;
  const int64_t group = s.Hq / s.Hkv;
  const bool merge = span_merge(s);
  const int64_t LS = span_ld(s);   // row stride of the score tile
  float* st = scratch;             // (TM, LS) scores, then probabilities
  float* acc = st + TM * LS;       // (TM, Dvp)
  float* m_i = acc + TM * Dvp;     // (TM) running max, log2 units
  float* l_i = m_i + round_up(TM, kPad);
  float* rmax = l_i + round_up(TM, kPad);  // (TM, kW) per-lane maxima of S
  float* qp = rmax + TM * kW;               // (TM, Dp) this task's scaled queries
  std::fill(qp, qp + TM * Dp, 0.f);
  float* vtmp = qp + TM * Dp;                // (BN, Dvp) V tile copy, only with a.vbad
  float* bfs = vtmp + (a.vbad != nullptr ? s.BN * Dvp : 0);
  const bool bf = kBf16Dot && a.bf16;       // bfloat16 products
  uint16_t* qb = reinterpret_cast<uint16_t*>(bfs);  // (TM, Dp) bfloat16 Q rows, unscaled
  [[maybe_unused]] uint16_t* pb = qb + TM * Dp;                       // (TM, LS) bfloat16 P
  if (bf) std::fill(qb, qb + TM * Dp, uint16_t{0});
  Visit* visits = reinterpret_cast<Visit*>(bfs + (bf ? TM * (Dp + LS) / 2 + kPad : 0));  // (NKB)
  const WindowRule w(s.Nq, s.Nk, s.left, s.right);
  const ScoreMods& mods = a.mods;
  const bool has_mods = mods.softcap > 0.f || mods.slopes != nullptr;  // score changes
  const bool dropout = has_dropout(mods);
  int64_t visited = 0;  // blocks computed, counted at each block's first slice

  for (int64_t task = begin; task < end; ++task) {
    const int64_t bh = task / a.NQT, i0 = task_tile(task % a.NQT, a.NQT, s) * TM;
    const int64_t qt = i0 / s.BM, sub = i0 - qt * s.BM;  // query tile of the lists, row offset in it
    const int64_t b = bh / s.Hq, h = bh % s.Hq, hk = h / group;
    const int64_t m = std::min(TM, s.Nq - i0);
    for (int64_t r = 0; r < m; ++r) {  // Q rows in log2 units: (Q * scale * log2e)
      const int64_t off = b * a.sq_b + h * a.sq_h + (i0 + r) * a.sq_n;
      if (bf) {  // bfloat16 path: rows as given; the S product scales its float32 result
        std::memcpy(qb + r * Dp, static_cast<const uint16_t*>(a.q) + off, D * sizeof(uint16_t));
        continue;
      }
      float* qr = qp + r * Dp;
      if (a.q_elem == Elem::kF32) {  // one pass: read and scale
        const float* src = static_cast<const float*>(a.q) + off;
        for (int64_t d = 0; d < D; ++d) qr[d] = src[d] * a.scale_log2;
        continue;
      }
      to_f32(qr, a.q, off, D, a.q_elem);
      for (int64_t d = 0; d < D; ++d) qr[d] *= a.scale_log2;
    }
    // float32 operands of this head (null on the bfloat16 path, which reads a.kt2 / a.v2)
    const float* kt_h = bf ? nullptr : a.kt + (b * s.Hkv + hk) * s.NKB * D * BNp;
    const float* v_h = bf ? nullptr : a.v + b * a.sv_b + hk * a.sv_h;
    for (int64_t r = 0; r < m; ++r) {
      m_i[r] = kNegInf;
      l_i[r] = 0.f;
    }
    vzero(acc, m * Dvp);

    // The slice's visits in key order. Full tiles that follow each other in the list form one
    // span of up to kSpanKeys keys, whether or not their keys are adjacent (block-sparse
    // masks scatter them: BigBird's global, window and random blocks): one softmax pass for
    // the span, its S columns u * BN.. from tile visits[e + u], and one P V product per run
    // of adjacent tiles (keys in order, so a run gives the same sums as one longer tile).
    int64_t nvis = 0;
    for_each_kv_tile(w, a.lists, b, h, qt, s.BM, s.BN, [&](const Visit& vis) { visits[nvis++] = vis; });
    if (!bf && a.kt_state != nullptr)
      for (int64_t e = 0; e < nvis; ++e) ensure_panel(a, b, hk, visits[e].t);
    if (sub == 0) visited += nvis;
    RowPrefetch pf;  // for the next task of this range
    if (task + 1 < end) {
      const int64_t nbh = (task + 1) / a.NQT, ni0 = task_tile((task + 1) % a.NQT, a.NQT, s) * TM;
      const int64_t esz = a.q_elem == Elem::kF32 ? 4 : 2;
      pf.add(0, static_cast<const char*>(a.q) + ((nbh / s.Hq) * a.sq_b + (nbh % s.Hq) * a.sq_h + ni0 * a.sq_n) * esz,
             std::min(TM, s.Nq - ni0), a.sq_n * esz, D * esz);
      const int64_t nt = nvis > 0 ? visits[nvis - 1].t + 1 : s.NKB;  // the panel after this slice's last
      if (!bf && a.kt_state != nullptr && nt < s.NKB && nbh == bh &&
          __atomic_load_n(a.kt_state + (b * s.Hkv + hk) * s.NKB + nt, __ATOMIC_RELAXED) == 0)
        pf.add(1, a.k + b * a.sk_b + hk * a.sk_h + nt * s.BN * a.sk_n, std::min(s.BN, s.Nk - nt * s.BN),
               a.sk_n * 4, D * 4);
    }
    for (int64_t e = 0; e < nvis;) {
      const Visit vis = visits[e];
      int64_t last = e;
      if (vis.full && merge)
        while (last + 1 < nvis && visits[last + 1].full && (last + 2 - e) * s.BN <= kSpanKeys) ++last;
      const Visit* span = visits + e;  // span[u].t: the key tile of S columns [u * BN, u * BN + width)
      const int64_t tiles = last - e + 1;
      e = last + 1;
      const auto width = [&](int64_t t) { return std::min(s.BN, s.Nk - t * s.BN); };
      // f(u0, t0, keys): each run of adjacent key tiles of the span (one run for a partial tile)
      const auto for_each_run = [&](auto&& f) {
        for (int64_t u0 = 0; u0 < tiles;) {
          int64_t u1 = u0 + 1;
          while (u1 < tiles && span[u1].t == span[u1 - 1].t + 1) ++u1;
          f(u0, span[u0].t, (u1 - 1 - u0) * s.BN + width(span[u1 - 1].t));
          u0 = u1;
        }
      };
      int64_t j0 = vis.t * s.BN, n = (tiles - 1) * s.BN + width(span[tiles - 1].t);
      // partial tile: only the keys some row of this slice sees
      const int64_t skip = vis.full ? 0 : narrow_keys(w, i0, i0 + m, j0, n);
      if (skip < 0) continue;
      const int64_t nW = round_up(n, kW);
      // S = Q K^T: (m, D) x (D, n), already in log2 units, one product per tile panel. On
      // full tiles without score modifiers S is final here, and the products also fold in
      // the row maxima.
      const bool fused_max = vis.full && !has_mods && n == nW;
      if (fused_max)
        for (int64_t r = 0; r < m; ++r) vstore(rmax + r * kW, vsplat(kNegInf));
      if (vis.full) {
        for (int64_t u = 0; u < tiles; ++u) {
          const int64_t nu = tiles == 1 ? n : width(span[u].t);
          if (bf) {
#ifdef FASTATTN_BF16_DOT
            const uint16_t* panel = a.kt2 + ((b * s.Hkv + hk) * s.NKB + span[u].t) * (Dp / 2) * BNp * 2;
            if (fused_max)
              gemm_bf16<false, true, true>(m, nu, Dp / 2, qb, Dp, panel, BNp, st + u * s.BN, LS, a.scale_log2, rmax);
            else gemm_bf16<false, true>(m, nu, Dp / 2, qb, Dp, panel, BNp, st + u * s.BN, LS, a.scale_log2);
#endif
            continue;
          }
          const float* panel = kt_h + span[u].t * D * BNp;
          if (fused_max) gemm<false, false, true>(m, nu, D, qp, Dp, panel, BNp, st + u * s.BN, LS, rmax);
          else gemm<false, false>(m, nu, D, qp, Dp, panel, BNp, st + u * s.BN, LS);
        }
      } else {  // a partial tile (never merged): per sub-slice, only the keys its rows see
        for_each_sub_slice(w, i0, m, j0, n, [&](int64_t r0, int64_t mr, int64_t sk, int64_t nn) {
          if (bf) {
#ifdef FASTATTN_BF16_DOT
            const uint16_t* panel = a.kt2 + (((b * s.Hkv + hk) * s.NKB + vis.t) * (Dp / 2) * BNp + skip + sk) * 2;
            gemm_bf16<false, true>(mr, nn, Dp / 2, qb + r0 * Dp, Dp, panel, BNp, st + r0 * LS + sk, LS,
                                   a.scale_log2);
#endif
            return;
          }
          const float* panel = kt_h + vis.t * D * BNp + skip + sk;
          gemm<false, false>(mr, nn, D, qp + r0 * Dp, Dp, panel, BNp, st + r0 * LS + sk, LS);
        });
      }
      if (has_mods && vis.full)  // ALiBi reads key positions: per run of adjacent tiles
        for_each_run([&](int64_t u0, int64_t t0, int64_t keys) {
          apply_score_mods_rows(st + u0 * s.BN, LS, i0, m, t0 * s.BN, keys, s.Nk - s.Nq, mods, b, h);
        });
      else if (has_mods) apply_score_mods_rows(st, LS, i0, m, j0, n, s.Nk - s.Nq, mods, b, h);
      const uint8_t* bits = !vis.full && vis.mask_id >= 0
          ? a.lists.masks + (static_cast<int64_t>(vis.mask_id) * s.BM + sub) * s.BN + skip : nullptr;
      if (!vis.full) mask_partial_rows(st, LS, i0, m, j0, n, w, bits, s.BN, kNegInf);
      fill_tail(st, LS, m, n, nW, kNegInf);
      for (int64_t r = 0; r < m; ++r) {
        float* row = st + r * LS;
        const float mx = fused_max ? lanes_max(rmax + r * kW, row, nW) : vrow_max(row, nW);
        online_softmax_row(row, nW, mx, m_i[r], l_i[r], acc + r * Dvp, Dvp);
        pf.step(4);
      }
      if (dropout && vis.full)  // the keep mask hashes key positions: per run of adjacent tiles
        for_each_run([&](int64_t u0, int64_t t0, int64_t keys) {
          apply_dropout_rows(st + u0 * s.BN, LS, i0, m, t0 * s.BN, keys, mods, bh, s.Nq);
        });
      else if (dropout) apply_dropout_rows(st, LS, i0, m, j0, n, mods, bh, s.Nq);
      if (bf) {
#ifdef FASTATTN_BF16_DOT
        // acc += P V with P rounded to bfloat16: (m, n) x (n, Dv), key pairs from j0 (even)
        rows_to_bf16(st, LS, m, n, pb, LS);
        const uint16_t* v2 = a.v2 + ((b * s.Hkv + hk) * (s.NKB * s.BN / 2) + j0 / 2) * Dvp * 2;
        if (!vis.full && a.vbad != nullptr)  // non-finite V rows: only to the rows that see them
          v2 = pv_nonfinite_keys_bf16(pb, LS, i0, m, j0, n, w, bits, s.BN, a.vbad + (b * s.Hkv + hk) * s.Nk + j0,
                                      v2, acc, Dvp, reinterpret_cast<uint16_t*>(vtmp));
        if (vis.full) {  // per run of adjacent tiles (BN is even: pairs never straddle runs)
          for_each_run([&](int64_t u0, int64_t t0, int64_t keys) {
            const uint16_t* vr = a.v2 + ((b * s.Hkv + hk) * (s.NKB * s.BN / 2) + t0 * s.BN / 2) * Dvp * 2;
            gemm_bf16<true>(m, Dvp, (keys + 1) / 2, pb + u0 * s.BN, LS, vr, Dvp, acc, Dvp);
          });
        } else {
          for_each_sub_slice(w, i0, m, j0, n, [&](int64_t r0, int64_t mr, int64_t sk, int64_t nn) {
            gemm_bf16<true>(mr, Dvp, (nn + 1) / 2, pb + r0 * LS + sk, LS, v2 + (sk / 2) * Dvp * 2, Dvp,
                            acc + r0 * Dvp, Dvp);
          });
        }
#endif
        continue;
      }
      const float* vj = v_h + j0 * a.ldv;
      int64_t ldv = a.ldv;
      if (!vis.full && a.vbad != nullptr &&  // non-finite V rows: only to the rows that see them
          pv_nonfinite_keys(st, LS, i0, m, j0, n, w, bits, s.BN, a.vbad + (b * s.Hkv + hk) * s.Nk + j0,
                            vj, ldv, acc, Dvp, vtmp)) {
        vj = vtmp;
        ldv = Dvp;
      }
      // acc += P V: (m, n) x (n, Dv)
      if (vis.full) {  // per run of adjacent tiles
        for_each_run([&](int64_t u0, int64_t t0, int64_t keys) {
          gemm<true, false>(m, Dvp, keys, st + u0 * s.BN, LS, v_h + t0 * s.BN * a.ldv, a.ldv, acc, Dvp);
        });
      } else {
        for_each_sub_slice(w, i0, m, j0, n, [&](int64_t r0, int64_t mr, int64_t sk, int64_t nn) {
          gemm<true, false>(mr, Dvp, nn, st + r0 * LS + sk, LS, vj + sk * ldv, ldv, acc + r0 * Dvp, Dvp);
        });
      }
    }

    float* op = a.out + b * a.so_b + h * a.so_h + i0 * a.ldo;
    float* lp = a.lse + bh * s.Nq + i0;
    for (int64_t r = 0; r < m; ++r) {
      const float l = l_i[r];  // 0: no visible key; NaN: NaN inputs (propagate)
      const float inv = l == 0.f ? 0.f : 1.f / l;
      const vf iv = vsplat(inv);
      for (int64_t d = 0; d < Dvp; d += kW) vstore(op + r * a.ldo + d, vload(acc + r * Dvp + d) * iv);
      lp[r] = l == 0.f ? kNegInf : (m_i[r] + std::log2(l)) * kLn2;
    }
  }
  if (a.visits != nullptr && visited != 0) __atomic_fetch_add(a.visits, visited, __ATOMIC_RELAXED);
}

// ----------------------------------------------------------------------------- backward

inline int64_t bwd_scratch_floats(const BwdArgs& a) {
  const Shape& s = a.s;
  const bool softcap = a.mods.softcap > 0.f, dropout = has_dropout(a.mods);
  return a.TM * s.BNp * (2 + softcap + dropout) + s.BN * (s.Dp + s.Dvp) + round_up(a.TM, kPad) +
         (a.bf16 ? (a.TM + 2) * s.BNp * 3 / 2 + (s.Dp + s.Dvp) * s.BNp + kPad : 0);  // bfloat16 path
}

inline void bwd_tasks(const BwdArgs& a, int64_t begin, int64_t end, float* scratch) {
  const Shape& s = a.s;
  const int64_t TM = a.TM, BNp = s.BNp, Dp = s.Dp, Dvp = s.Dvp, D = s.D, Dv = s.Dv, BN = s.BN;
  const int64_t group = s.Hq / s.Hkv, off = s.Nk - s.Nq;
  const ScoreMods& mods = a.mods;
  const bool softcap = mods.softcap > 0.f, dropout = has_dropout(mods);
  const float capC = cap_log2(mods), capInv = softcap ? 1.f / capC : 0.f, keep_s = keep_scale(mods);
  const WindowRule w(s.Nq, s.Nk, s.left, s.right);

  float* st = scratch;                           // (TM, BNp): S, then P
  float* dp = st + TM * BNp;                     // (TM, BNp): dP, then dS
  float* th = dp + TM * BNp;                     // (TM, BNp): tanh (softcap)
  float* pdrop = th + (softcap ? TM * BNp : 0);  // (TM, BNp): P * keep / (1 - p) (dropout)
  float* dk_acc = pdrop + (dropout ? TM * BNp : 0);  // (BN, Dp)
  float* dv_acc = dk_acc + BN * Dp;              // (BN, Dvp)
  uint32_t* rowh = reinterpret_cast<uint32_t*>(dv_acc + BN * Dvp);  // (TM) dropout row hashes
  // bfloat16 path: dK and dV accumulate transposed (dK^T += Q^T dS, dV^T += dO^T P), so
  // every A operand is a row-major bfloat16 array the driver made once, and only P and dS
  // are converted per tile (paired along rows, or plain rows for dQ += dS K)
  const bool bf = kBf16Dot && a.bf16;
  [[maybe_unused]] const int64_t NqE = round_up(s.Nq, 2), TME = round_up(TM, 2);
  float* dkT = reinterpret_cast<float*>(rowh) + round_up(TM, kPad);  // (Dp, BNp)
  float* dvT = dkT + Dp * BNp;                                         // (Dvp, BNp)
  uint16_t* pp = reinterpret_cast<uint16_t*>(dvT + Dvp * BNp);        // (TME/2, BNp, 2) P paired
  uint16_t* dsp = pp + TME * BNp;                                      // (TME/2, BNp, 2) dS paired
  [[maybe_unused]] uint16_t* dsb = dsp + TME * BNp;                                     // (TM, BNp) dS rows
  [[maybe_unused]] const float scale_log2 = a.scale * 1.4426950408889634f;  // the forward's float product
  int64_t visited = 0;  // blocks computed

  for (int64_t task = begin; task < end; ++task) {
    const int64_t split = task % a.S, bhk = task / a.S;
    const int64_t b = bhk / s.Hkv, hk = bhk % s.Hkv;
    // float32 operands of this kv head (null on the bfloat16 path)
    const float* kt_h = bf ? nullptr : a.kt + bhk * s.NKB * D * BNp;
    const float* vt_h = bf ? nullptr : a.vt + bhk * s.NKB * Dv * BNp;
    const float* k_h = bf ? nullptr : a.k + bhk * s.Nk * Dp;
    float* dq_split = a.dq + split * s.B * s.Hq * s.Nq * Dp;
    for (int64_t kt = split; kt < s.NKB; kt += a.S) {
      const int64_t j0 = kt * BN, n = std::min(BN, s.Nk - j0);
      if (bf) {
        vzero(dkT, Dp * BNp);
        vzero(dvT, Dvp * BNp);
      } else {
        vzero(dk_acc, n * Dp);
        vzero(dv_acc, n * Dvp);
      }
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hk * group + g, bh = b * s.Hq + h;
        for_each_q_tile(w, a.lists, b, h, kt, s.BM, BN, [&](const Visit& vis) {
          ++visited;
          for (int64_t sub = 0; sub < s.BM; sub += TM) {  // TM-row slices of the visited tile
            const int64_t i0 = vis.t * s.BM + sub, m = std::min({TM, s.BM - sub, s.Nq - i0});
            if (m <= 0) break;
            // partial tile: only the keys some row of this slice sees (j0s, ns); dK/dV rows
            // of the tile shift by skip
            int64_t j0s = j0, ns = n;
            const int64_t skip = vis.full ? 0 : narrow_keys(w, i0, i0 + m, j0s, ns);
            if (skip < 0) continue;
            const int64_t nW = round_up(ns, kW);
            const int64_t row0 = bh * s.Nq + i0;
            // S = Qs K^T: (m, D) x (D, ns), log2 units
            if (bf) {
#ifdef FASTATTN_BF16_DOT
              gemm_bf16<false, true>(m, ns, Dp / 2, a.qb + row0 * Dp, Dp,
                                     a.kt2 + ((bhk * s.NKB + kt) * (Dp / 2) * BNp + skip) * 2, BNp, st, BNp,
                                     scale_log2);
#endif
            } else {
              gemm<false, false>(m, ns, D, a.qs + row0 * Dp, Dp, kt_h + kt * D * BNp + skip, BNp, st, BNp);
            }
            if (softcap) {  // S <- C tanh(S / C), keeping tanh for the chain rule
              for (int64_t r = 0; r < m; ++r)
                for (int64_t c = 0; c < ns; ++c) {
                  const float t = tanh_fast(st[r * BNp + c] * capInv);
                  th[r * BNp + c] = t;
                  st[r * BNp + c] = capC * t;
                }
            }
            if (mods.slopes != nullptr) {  // S -= slope |i + off - j|
              const float sl2 = slope_log2(mods, b, h);
              for (int64_t r = 0; r < m; ++r) {
                const int64_t d0 = i0 + r + off - j0s;
                for (int64_t c = 0; c < ns; ++c) {
                  const float d = static_cast<float>(d0 - c);
                  st[r * BNp + c] -= sl2 * (d < 0.f ? -d : d);
                }
              }
            }
            const float* l2 = a.lse2 + row0;
            for (int64_t r = 0; r < m; ++r) {  // P = exp2(S - lse2)
              float* row = st + r * BNp;
              const vf lv = vsplat(l2[r]);
              if (l2[r] - l2[r] == 0.f) {  // finite lse: S <= lse2 up to rounding, exponents <= ~0
                for (int64_t c = 0; c < nW; c += kW) vstore(row + c, vexp2_nonpos(vload(row + c) - lv));
              } else {  // no key (+inf) or NaN/inf inputs: the general exp2 (0, or NaN as torch)
                for (int64_t c = 0; c < nW; c += kW) vstore(row + c, vexp2(vload(row + c) - lv));
              }
            }
            fill_tail(st, BNp, m, ns, nW, 0.f);
            if (!vis.full) {
              const uint8_t* bits = vis.mask_id >= 0
                  ? a.lists.masks + (static_cast<int64_t>(vis.mask_id) * s.BM + sub) * BN + skip : nullptr;
              mask_partial_rows(st, BNp, i0, m, j0s, ns, w, bits, BN, 0.f);
            }
            const float* pv = st;  // the P that multiplies dO: dropped when dropout
            if (dropout) {
              for (int64_t r = 0; r < m; ++r) {
                rowh[r] = dropout_row_hash(mods, static_cast<uint64_t>(row0 + r));
                for (int64_t c = 0; c < nW; ++c)
                  pdrop[r * BNp + c] =
                      c < ns && dropout_keep(mods, rowh[r], j0s + c) ? st[r * BNp + c] * keep_s : 0.f;
              }
              pv = pdrop;
            }
            if (bf) {
#ifdef FASTATTN_BF16_DOT
              // dV^T += dO^T P: (Dv, m) x (m, ns); rows i0.. of dO^T, i0 even (the driver
              // requires even block rows), a missing last row of P reads as zero
              rows_to_bf16_pairs(pv, BNp, m, ns, pp, BNp);
              gemm_bf16<true>(Dvp, ns, (m + 1) / 2, a.doT + bh * Dvp * NqE + i0, NqE, pp, BNp, dvT + skip, BNp);
              // dP = dO V^T: (m, Dv) x (Dv, ns)
              gemm_bf16<false>(m, ns, Dvp / 2, a.dob + row0 * Dvp, Dvp,
                               a.vt2 + ((bhk * s.NKB + kt) * (Dvp / 2) * BNp + skip) * 2, BNp, dp, BNp);
#endif
            } else {
              // dV += P^T dO: (ns, m) x (m, Dv)
              gemm<true, true>(ns, Dvp, m, pv, BNp, a.dout + row0 * Dvp, Dvp, dv_acc + skip * Dvp, Dvp);
              // dP = dO V^T: (m, Dv) x (Dv, ns)
              gemm<false, false>(m, ns, Dv, a.dout + row0 * Dvp, Dvp, vt_h + kt * Dv * BNp + skip, BNp, dp, BNp);
            }
            const float* dl = a.delta + row0;
            const vf sc = vsplat(a.scale);
            for (int64_t r = 0; r < m; ++r) {  // dS = P * (dP - delta) * scale
              float* dr = dp + r * BNp;
              const float* pr = st + r * BNp;
              const vf dlv = vsplat(dl[r]);
              if (dropout) {  // dP = dP_dropped * keep / (1 - p); keep read off pdrop
                const float* pd = pdrop + r * BNp;
                for (int64_t c = 0; c < nW; ++c) dr[c] = pd[c] != 0.f ? dr[c] * keep_s : 0.f;
              }
              for (int64_t c = 0; c < nW; c += kW)
                vstore(dr + c, vload(pr + c) * (vload(dr + c) - dlv) * sc);
              if (softcap) {  // d(C tanh(x / C)) / dx = 1 - tanh^2
                const float* t = th + r * BNp;
                for (int64_t c = 0; c < ns; ++c) dr[c] *= 1.f - t[c] * t[c];
              }
            }
            if (bf) {
#ifdef FASTATTN_BF16_DOT
              // dK^T += Q^T dS: (D, m) x (m, ns)
              rows_to_bf16_pairs(dp, BNp, m, ns, dsp, BNp);
              gemm_bf16<true>(Dp, ns, (m + 1) / 2, a.qT + bh * Dp * NqE + i0, NqE, dsp, BNp, dkT + skip, BNp);
              // dQ += dS K: (m, ns) x (ns, D); key pairs from j0s (even); dS is 0 past ns
              rows_to_bf16(dp, BNp, m, ns, dsb, BNp);
              gemm_bf16<true>(m, Dp, (ns + 1) / 2, dsb, BNp,
                              a.k2 + (bhk * (s.NKB * BN / 2) + j0s / 2) * Dp * 2, Dp, dq_split + row0 * Dp, Dp);
#endif
              continue;
            }
            // dK += dS^T Q: (ns, m) x (m, D)
            gemm<true, true>(ns, Dp, m, dp, BNp, a.q + row0 * Dp, Dp, dk_acc + skip * Dp, Dp);
            // dQ += dS K: (m, ns) x (ns, D)
            gemm<true, false>(m, Dp, ns, dp, BNp, k_h + j0s * Dp, Dp, dq_split + row0 * Dp, Dp);
          }
        });
      }
      if (bf) {  // transpose the tile's dK^T / dV^T into rows
        float* dk = a.dk + (bhk * s.Nk + j0) * Dp;
        float* dv = a.dv + (bhk * s.Nk + j0) * Dvp;
        for (int64_t c = 0; c < n; ++c) {
          for (int64_t d = 0; d < Dp; ++d) dk[c * Dp + d] = dkT[d * BNp + c];
          for (int64_t d = 0; d < Dvp; ++d) dv[c * Dvp + d] = dvT[d * BNp + c];
        }
        continue;
      }
      std::copy(dk_acc, dk_acc + n * Dp, a.dk + (bhk * s.Nk + j0) * Dp);
      std::copy(dv_acc, dv_acc + n * Dvp, a.dv + (bhk * s.Nk + j0) * Dvp);
    }
  }
  if (a.visits != nullptr && visited != 0) __atomic_fetch_add(a.visits, visited, __ATOMIC_RELAXED);
}

}  // inline namespace FASTATTN_ISA
}  // namespace fastattn::cpu
