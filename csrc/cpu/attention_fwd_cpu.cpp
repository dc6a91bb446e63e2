// Fused attention forward on the CPU (FlashAttention-2 schedule, one query tile per task).
//
// For each (batch, query head, query tile of TM rows), in parallel (at::parallel_for); TM = BM,
// or 64-row slices of taller block-mask blocks:
//   m = -inf, l = 0, acc = 0                                  // (TM), (TM), (TM, Dv) float32
//   for each visited key tile (BN keys):                      // see tiles.h
//     (partial tile: keys outside every row's window/causal range are dropped first)
//     S = (Q * scale*log2e) K^T   (TM, BN)  brgemm on K^T pre-transposed per head
//     S softcapped / ALiBi-biased when asked (score_mods.h), masked to -inf on partial tiles
//     m' = max(m, rowmax S); P = exp2(S - m'); l = l*2^(m-m') + rowsum P
//     acc = acc*2^(m-m') + P V   (TM, Dv)   brgemm (P * keep / (1 - p) with dropout)
//   out = acc / l, lse = (m + log2 l) * ln2   (rows with l == 0: out 0, lse -inf)
// Extra memory is O(N * D) (float32 K^T / V copies) plus O(BM * BN) per thread: never N^2.
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <vector>

#include "attention_cpu.h"
#include "kernel_math.h"
#include "score_mods.h"
#include "sparse_lists.h"
#include "tiles.h"

namespace fastattn::cpu {

namespace {

// Default dense tile sizes: BM query rows share every K/V tile load; BN keys per step keep
// the (BM, BN) float32 score tile (64 KiB) and the K^T/V tiles in L2.
constexpr int64_t kDenseBM = 64;
constexpr int64_t kDenseBN = 256;

// Applies the token rule of a partial tile to scores s (rows [i0, i0+m), cols [j0, j0+n)).
inline void mask_partial_tile(float* s, int64_t ld, int64_t i0, int64_t m, int64_t j0, int64_t n,
                              const WindowRule& w, const uint8_t* bits, int64_t bits_ld) {
  for (int64_t r = 0; r < m; ++r) {
    float* row = s + r * ld;
    int64_t a, b;
    w.row_range(i0 + r, j0, j0 + n, a, b);
    a -= j0;
    b -= j0;
    if (a >= b) {
      for (int64_t c = 0; c < n; ++c) row[c] = kNegInf;
      continue;
    }
    for (int64_t c = 0; c < a; ++c) row[c] = kNegInf;
    for (int64_t c = b; c < n; ++c) row[c] = kNegInf;
    if (bits != nullptr) {
      const uint8_t* br = bits + r * bits_ld;
      for (int64_t c = a; c < b; ++c) row[c] = br[c] ? row[c] : kNegInf;
    }
  }
}

// Zigzag order of query tiles so contiguous task ranges mix light and heavy causal tiles.
inline int64_t zigzag(int64_t k, int64_t n) { return (k & 1) ? n - 1 - (k >> 1) : (k >> 1); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& v_in, double scale, int64_t window_left,
                                                 int64_t window_right, const std::vector<at::Tensor>& block_mask,
                                                 const ScoreMods& mods) {
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Nq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), Nk = k_in.size(2), Dv = v_in.size(3);
  const int64_t group = Hq / Hkv;

  // float32 operands: q rows are copied per tile; K^T (B, Hkv, D, Nk) and V (B, Hkv, Nk, Dv)
  // are laid out once so every tile product is one brgemm call with unit-stride rows.
  const auto f32 = at::kFloat;
  at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  at::Tensor kT = k_in.to(f32).transpose(2, 3).contiguous();
  at::Tensor v = (v_in.scalar_type() == f32 && v_in.stride(3) == 1) ? v_in : v_in.to(f32).contiguous();

  at::Tensor out = at::empty({B, Hq, Nq, Dv}, q_in.options());
  at::Tensor lse = at::empty({B, Hq, Nq}, q_in.options().dtype(f32));

  int64_t BM = kDenseBM, BN = kDenseBN;
  const SparseLists sl = sparse_lists_from(block_mask, BM, BN);
  const WindowRule w(Nq, Nk, window_left, window_right);
  // A task owns TM query rows. Under a causal/window rule, block-mask blocks taller than
  // kSliceM rows (and a multiple of it) are split into kSliceM-row slices, so partial tiles
  // can drop the keys none of the slice's rows sees (narrow_keys); without a rule, whole
  // blocks keep each K/V tile load shared by more rows.
  const int64_t TM = (!w.trivial() && BM > kSliceM && BM % kSliceM == 0) ? kSliceM : BM;
  const int64_t NQT = (Nq + TM - 1) / TM;
  const float scale_log2 = static_cast<float>(scale) * kLog2e;
  const bool has_mods = mods.softcap > 0.f || mods.slopes != nullptr;  // score changes

  const int64_t sq_b = q.stride(0), sq_h = q.stride(1), sq_n = q.stride(2);
  const int64_t sv_b = v.stride(0), sv_h = v.stride(1), sv_n = v.stride(2);
  const float* kT_ptr = kT.data_ptr<float>();
  const float* v_ptr = v.data_ptr<float>();
  float* lse_ptr = lse.data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fastattn_cpu_fwd", [&] {
    const scalar_t* q_ptr = q.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * Hq * NQT, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> q_tile(TM * D), s(TM * BN), acc(TM * Dv), m_i(TM), l_i(TM);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / NQT, i0 = zigzag(task % NQT, NQT) * TM;
        const int64_t qt = i0 / BM, sub = i0 - qt * BM;  // query tile of the lists, row offset in it
        const int64_t b = bh / Hq, h = bh % Hq, hk = h / group;
        const int64_t m = std::min(TM, Nq - i0);
        const scalar_t* qp = q_ptr + b * sq_b + h * sq_h + i0 * sq_n;
        for (int64_t r = 0; r < m; ++r)
          for (int64_t d = 0; d < D; ++d) q_tile[r * D + d] = static_cast<float>(qp[r * sq_n + d]) * scale_log2;
        std::fill(m_i.begin(), m_i.begin() + m, kNegInf);
        std::fill(l_i.begin(), l_i.begin() + m, 0.f);
        std::fill(acc.begin(), acc.begin() + m * Dv, 0.f);
        const float* kT_h = kT_ptr + (b * Hkv + hk) * D * Nk;
        const float* v_h = v_ptr + b * sv_b + hk * sv_h;

        for_each_kv_tile(w, sl, b, h, qt, BM, BN, [&](const Visit& vis) {
          int64_t j0 = vis.t * BN, n = std::min(BN, Nk - j0);
          // partial tile: only the keys some row of this slice sees
          const int64_t skip = vis.full ? 0 : narrow_keys(w, i0, i0 + m, j0, n);
          if (skip < 0) return;
          // S = Q K^T: (m, D) x (D, n), already in log2 units
          at::native::cpublas::brgemm(m, n, D, D, Nk, BN, false, q_tile.data(), kT_h + j0, s.data());
          if (has_mods) apply_score_mods_rows(s.data(), BN, i0, m, j0, n, Nk - Nq, mods, b, h);
          if (!vis.full) {
            const uint8_t* bits = vis.mask_id >= 0
                ? sl.masks + (static_cast<int64_t>(vis.mask_id) * BM + sub) * BN + skip : nullptr;
            mask_partial_tile(s.data(), BN, i0, m, j0, n, w, bits, BN);
          }
          for (int64_t r = 0; r < m; ++r) {
            float* row = s.data() + r * BN;
            const float mx = row_max(row, n);
            const float m_new = mx != mx ? mx : std::max(m_i[r], mx);  // NaN propagates
            if (m_new == kNegInf) {  // nothing visible yet in this row: P = 0
              std::fill(row, row + n, 0.f);
              continue;
            }
            const float alpha = exp2_fast(m_i[r] - m_new);
            l_i[r] = l_i[r] * alpha + exp2_affine_sum(row, n, 1.f, m_new);
            m_i[r] = m_new;
            if (alpha != 1.f) scale_inplace(acc.data() + r * Dv, Dv, alpha);
          }
          if (mods.dropout()) apply_dropout_rows(s.data(), BN, i0, m, j0, n, mods, bh, Nq);
          // acc += P V: (m, n) x (n, Dv)
          at::native::cpublas::brgemm(m, Dv, n, BN, sv_n, Dv, true, s.data(), v_h + j0 * sv_n, acc.data());
        });

        scalar_t* op = out_ptr + ((b * Hq + h) * Nq + i0) * Dv;
        float* lp = lse_ptr + (b * Hq + h) * Nq + i0;
        for (int64_t r = 0; r < m; ++r) {
          const float l = l_i[r];  // 0: no visible key; NaN: NaN inputs (propagate)
          const float inv = l == 0.f ? 0.f : 1.f / l;
          for (int64_t d = 0; d < Dv; ++d) op[r * Dv + d] = static_cast<scalar_t>(acc[r * Dv + d] * inv);
          lp[r] = l == 0.f ? kNegInf : (m_i[r] + std::log2(l)) * kLn2;
        }
      }
      at::native::cpublas::brgemm_release(false);
    });
  });
  return {out, lse};
}

}  // namespace fastattn::cpu
