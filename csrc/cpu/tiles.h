// Which (query tile, key tile) pairs a CPU kernel visits, and the token rule inside them.
//
// Two sources, one interface:
//  - dense / window: tiles derived analytically from (left, right) — see fastattn/masking.py:
//      query i sees key j iff (left == -1 || j >= i + off - left) && (right == -1 || j <= i + off + right),
//      off = Nk - Nq (bottom-right alignment);
//  - block-sparse: the lists of a fastattn.sparse.BlockMask (format in sparse/block_mask.py).
// A visited tile is FULL (no token mask) or PARTIAL (window rule, then the optional bitmask).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "isa_namespace.h"
#include "kernel_args.h"

namespace fastattn::cpu {
inline namespace FASTATTN_ISA_VISIBILITY FASTATTN_ISA {

struct WindowRule {
  int64_t Nq, Nk, off, left, right;  // -1 = unbounded

  WindowRule(int64_t nq, int64_t nk, int64_t l, int64_t r) : Nq(nq), Nk(nk), off(nk - nq), left(l), right(r) {}

  // Unclamped lowest / highest visible key of query row i.
  int64_t lo(int64_t i) const { return left < 0 ? std::numeric_limits<int32_t>::min() : i + off - left; }
  int64_t hi(int64_t i) const { return right < 0 ? std::numeric_limits<int32_t>::max() : i + off + right; }
  // Unclamped lowest / highest query row that sees key j.
  int64_t qlo(int64_t j) const { return right < 0 ? std::numeric_limits<int32_t>::min() : j - off - right; }
  int64_t qhi(int64_t j) const { return left < 0 ? std::numeric_limits<int32_t>::max() : j - off + left; }

  bool trivial() const { return left < 0 && right < 0; }
  // Every in-range token of rows [i0, i1) x cols [j0, j1) visible?
  bool full(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    return lo(i1 - 1) <= j0 && hi(i0) >= j1 - 1;
  }
  // Any token visible?  (lo/hi are monotone in i)
  bool any(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    for (int64_t i = i0; i < i1; ++i) {  // cheap: exits at the first row that overlaps
      if (std::max(lo(i), j0) <= std::min(hi(i), j1 - 1)) return true;
      if (lo(i) > j1 - 1) return false;
    }
    return false;
  }
  // Visible key range of row i clipped to [j0, j1): [a, b) (empty if a >= b).
  void row_range(int64_t i, int64_t j0, int64_t j1, int64_t& a, int64_t& b) const {
    a = std::max(lo(i), j0);
    b = std::min(hi(i) + 1, j1);
  }
  // Visible query range of key j clipped to [i0, i1).
  void col_range(int64_t j, int64_t i0, int64_t i1, int64_t& a, int64_t& b) const {
    a = std::max(qlo(j), i0);
    b = std::min(qhi(j) + 1, i1);
  }
};

// Query rows per slice when a block mask's blocks are taller: both kernels walk such blocks
// in slices of this many rows (smaller per-thread tiles, narrower partial tiles).
constexpr int64_t kSliceM = 64;

// Narrows a partial tile's keys [j0, j0 + n) to the span some query row of [i0, i1) may see
// under the rule (row ranges only move right as i grows, so the first and last rows bound
// it), rounded out to whole groups of 16 keys to keep the GEMM shapes few. Returns how many
// leading keys were dropped (j0, n updated), or -1 when the rule hides the tile from every row.
inline int64_t narrow_keys(const WindowRule& w, int64_t i0, int64_t i1, int64_t& j0, int64_t& n) {
  int64_t a0, b0, a1, b1;
  w.row_range(i0, j0, j0 + n, a0, b0);
  w.row_range(i1 - 1, j0, j0 + n, a1, b1);
  const int64_t lo = std::min(a0, a1), hi = std::max(b0, b1);
  if (lo >= hi) return -1;
  const int64_t skip = (lo - j0) / 16 * 16;
  n = std::min(n - skip, (hi - j0 - skip + 15) / 16 * 16);
  j0 += skip;
  return skip;
}

// Layout (b, h) of the block lists: they broadcast over batch and heads.
inline int64_t mask_layout(const SparseLists& s, int64_t b, int64_t h) {
  return (s.Bm > 1 ? b : 0) * s.Hm + (s.Hm > 1 ? h : 0);
}

// One visited tile: key tile (forward) or query tile (backward), full or partial, bitmask id.
struct Visit {
  int64_t t;
  bool full;
  int32_t mask_id;
};

// Calls f(Visit) for the key tiles query tile qt of layout (b, h) visits, ascending.
template <typename F>
inline void for_each_kv_tile(const WindowRule& w, const SparseLists& s, int64_t b, int64_t h, int64_t qt,
                             int64_t BM, int64_t BN, F&& f) {
  const int64_t i0 = qt * BM, i1 = std::min(i0 + BM, w.Nq);
  if (s.active) {
    const int64_t L = mask_layout(s, b, h);
    const int64_t row = L * s.NQB + qt;
    const int32_t nf = s.fkv_num[row], np = s.kv_num[row];
    const int32_t* fi = s.fkv_idx + row * s.kmaxf;
    const int32_t* pi = s.kv_idx + row * s.kmax;
    const int32_t* pm = s.kv_mid + row * s.kmax;
    int32_t a = 0, c = 0;  // merge the two ascending lists: keys in order, like the dense path
    while (a < nf || c < np) {
      if (c >= np || (a < nf && fi[a] < pi[c])) f(Visit{fi[a++], true, -1});
      else { f(Visit{pi[c], false, pm[c]}); ++c; }
    }
    return;
  }
  const int64_t NKB = (w.Nk + BN - 1) / BN;
  const int64_t jlo = std::max<int64_t>(w.lo(i0), 0), jhi = std::min<int64_t>(w.hi(i1 - 1), w.Nk - 1);
  if (jlo > jhi) return;
  for (int64_t kt = jlo / BN; kt <= std::min(jhi / BN, NKB - 1); ++kt) {
    const int64_t j0 = kt * BN, j1 = std::min(j0 + BN, w.Nk);
    if (w.full(i0, i1, j0, j1)) f(Visit{kt, true, -1});
    else if (w.any(i0, i1, j0, j1)) f(Visit{kt, false, -1});
  }
}

// Calls f(Visit) for the query tiles that visit key tile kt of layout (b, h), ascending.
template <typename F>
inline void for_each_q_tile(const WindowRule& w, const SparseLists& s, int64_t b, int64_t h, int64_t kt,
                            int64_t BM, int64_t BN, F&& f) {
  const int64_t j0 = kt * BN, j1 = std::min(j0 + BN, w.Nk);
  if (s.active) {
    const int64_t L = mask_layout(s, b, h);
    const int64_t row = L * s.NKB + kt;
    const int32_t nf = s.fq_num[row], np = s.q_num[row];
    const int32_t* fi = s.fq_idx + row * s.qmaxf;
    const int32_t* pi = s.q_idx + row * s.qmax;
    const int32_t* pm = s.q_mid + row * s.qmax;
    int32_t a = 0, c = 0;
    while (a < nf || c < np) {
      if (c >= np || (a < nf && fi[a] < pi[c])) f(Visit{fi[a++], true, -1});
      else { f(Visit{pi[c], false, pm[c]}); ++c; }
    }
    return;
  }
  const int64_t NQB = (w.Nq + BM - 1) / BM;
  const int64_t ilo = std::max<int64_t>(w.qlo(j0), 0), ihi = std::min<int64_t>(w.qhi(j1 - 1), w.Nq - 1);
  if (ilo > ihi) return;
  for (int64_t qt = ilo / BM; qt <= std::min(ihi / BM, NQB - 1); ++qt) {
    const int64_t i0 = qt * BM, i1 = std::min(i0 + BM, w.Nq);
    if (w.full(i0, i1, j0, j1)) f(Visit{qt, true, -1});
    else if (w.any(i0, i1, j0, j1)) f(Visit{qt, false, -1});
  }
}

}  // inline namespace FASTATTN_ISA
}  // namespace fastattn::cpu
