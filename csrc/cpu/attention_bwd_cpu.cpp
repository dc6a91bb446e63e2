// Fused attention backward on the CPU (FlashAttention-2 schedule, one key tile per step).
//
// Probabilities are recomputed tile by tile from the saved lse; nothing N x N is stored.
// Tasks are (batch, kv head, split); a task owns the key tiles kt = split, split + S, ...
// of its kv head and loops over every query head of its GQA group and every query tile
// that visits the key tile (tiles.h). Everything is computed transposed, keys as rows:
//   S^T  = K (Q*scale*log2e)^T           (n, m)
//   P^T  = exp2(S^T - lse*log2e)         masked to 0 on partial tiles
//   dV  += P^T dO                        (n, Dv)
//   dP^T = V dO^T                        (n, m)
//   dS^T = P^T * (dP^T - delta) * scale, delta = rowsum(dO * O) - dlse
//   dK  += dS^T Q                        (n, D)
//   dQ  += dS K   into the split's own float32 dQ buffer (no atomics: deterministic)
// Score modifiers (score_mods.h): softcap keeps tanh per element for dS *= (1 - tanh^2);
// ALiBi shifts S^T; dropout regenerates keep bits, dV uses P * keep/(1-p) and
// dP^T is multiplied by keep/(1-p) before dS (Delta = rowsum(dO * O) stays exact).
// Block-mask blocks taller than kSliceM rows (tiles.h) are walked in kSliceM-row slices, so
// the per-thread S^T, dP^T, dS tiles (BN x kSliceM float32) stay the dense path's size, in L2.
// dK/dV of a key tile are complete when its task ends; the S split buffers of dQ are summed
// at the end (S = 1 whenever batch * kv heads alone keeps every thread busy).
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

constexpr int64_t kDenseBM = 64;   // query rows per tile
constexpr int64_t kDenseBN = 128;  // keys per tile

// Zeroes P^T (n, m; ld) outside the token rule of a partial tile.
inline void mask_partial_tile_t(float* pt, int64_t ld, int64_t i0, int64_t m, int64_t j0, int64_t n,
                                const WindowRule& w, const uint8_t* bits, int64_t bits_ld) {
  for (int64_t c = 0; c < n; ++c) {
    float* row = pt + c * ld;
    int64_t a, b;
    w.col_range(j0 + c, i0, i0 + m, a, b);
    a -= i0;
    b -= i0;
    if (a >= b) {
      for (int64_t r = 0; r < m; ++r) row[r] = 0.f;
      continue;
    }
    for (int64_t r = 0; r < a; ++r) row[r] = 0.f;
    for (int64_t r = b; r < m; ++r) row[r] = 0.f;
    if (bits != nullptr)
      for (int64_t r = a; r < b; ++r) row[r] = bits[r * bits_ld + c] ? row[r] : 0.f;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& dlse, double scale,
    int64_t window_left, int64_t window_right, const std::vector<at::Tensor>& block_mask,
    const ScoreMods& mods) {
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Nq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), Nk = k_in.size(2), Dv = v_in.size(3);
  const int64_t group = Hq / Hkv;
  const auto f32 = at::kFloat;
  const float scale_f = static_cast<float>(scale), scale_log2 = scale_f * kLog2e;

  // float32 operands, O(N * D) each: rows for the products' left/right sides, transposes
  // where a product needs the sequence dimension innermost.
  at::Tensor q32 = q_in.to(f32).contiguous();                                 // (B, Hq, Nq, D)
  at::Tensor qT = (q_in.to(f32) * scale_log2).transpose(2, 3).contiguous();   // (B, Hq, D, Nq)
  at::Tensor do32 = dout.to(f32).contiguous();                                // (B, Hq, Nq, Dv)
  at::Tensor doT = do32.transpose(2, 3).contiguous();                         // (B, Hq, Dv, Nq)
  at::Tensor k32 = k_in.to(f32).contiguous();                                 // (B, Hkv, Nk, D)
  at::Tensor v32 = v_in.to(f32).contiguous();                                 // (B, Hkv, Nk, Dv)
  at::Tensor delta = (do32 * out.to(f32)).sum(-1);                            // (B, Hq, Nq)
  if (dlse.has_value() && dlse->defined()) delta = delta - dlse->to(f32);
  delta = delta.contiguous();
  // lse in log2 units; rows that saw no key get +inf so exp2(S - lse) = 0 there.
  at::Tensor lse2 = at::where(at::isinf(lse) & (lse < 0), at::full({}, INFINITY, lse.options()), lse * kLog2e)
                        .to(f32).contiguous();

  int64_t BM = kDenseBM, BN = kDenseBN;
  const SparseLists sl = sparse_lists_from(block_mask, BM, BN);
  const int64_t TM = std::min(BM, kSliceM);  // rows per slice (the last may be shorter)
  const WindowRule w(Nq, Nk, window_left, window_right);
  const int64_t NKB = (Nk + BN - 1) / BN;

  const int64_t T = at::get_num_threads(), units = B * Hkv;
  const int64_t S = units >= 2 * T ? 1 : std::min<int64_t>(NKB, (2 * T + units - 1) / units);
  at::Tensor dq_acc = at::zeros({S, B, Hq, Nq, D}, q_in.options().dtype(f32));
  at::Tensor dk32 = at::empty({B, Hkv, Nk, D}, q_in.options().dtype(f32));
  at::Tensor dv32 = at::empty({B, Hkv, Nk, Dv}, q_in.options().dtype(f32));

  const float *q_p = q32.data_ptr<float>(), *qT_p = qT.data_ptr<float>(), *do_p = do32.data_ptr<float>();
  const float *doT_p = doT.data_ptr<float>(), *k_p = k32.data_ptr<float>(), *v_p = v32.data_ptr<float>();
  const float *delta_p = delta.data_ptr<float>(), *lse2_p = lse2.data_ptr<float>();
  float *dq_p = dq_acc.data_ptr<float>(), *dk_p = dk32.data_ptr<float>(), *dv_p = dv32.data_ptr<float>();

  const bool softcap = mods.softcap > 0.f, dropout = mods.dropout();
  const float capC = mods.cap_log2(), capInv = softcap ? 1.f / capC : 0.f, keep_s = mods.keep_scale();
  const int64_t off = Nk - Nq;

  at::parallel_for(0, units * S, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> st(BN * TM), dpt(BN * TM), ds(TM * BN), dk_acc(BN * D), dv_acc(BN * Dv);
    std::vector<float> th(softcap ? BN * TM : 0), pdrop(dropout ? BN * TM : 0);
    std::vector<uint32_t> rowh(dropout ? TM : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t split = task % S, bhk = task / S;
      const int64_t b = bhk / Hkv, hk = bhk % Hkv;
      const float* k_h = k_p + (b * Hkv + hk) * Nk * D;
      const float* v_h = v_p + (b * Hkv + hk) * Nk * Dv;
      float* dq_split = dq_p + split * B * Hq * Nq * D;
      for (int64_t kt = split; kt < NKB; kt += S) {
        const int64_t j0 = kt * BN, n = std::min(BN, Nk - j0);
        std::fill(dk_acc.begin(), dk_acc.begin() + n * D, 0.f);
        std::fill(dv_acc.begin(), dv_acc.begin() + n * Dv, 0.f);
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = hk * group + g, bh = b * Hq + h;
          for_each_q_tile(w, sl, b, h, kt, BM, BN, [&](const Visit& vis) {
           for (int64_t sub = 0; sub < BM; sub += TM) {  // TM-row slices of the visited tile
            const int64_t i0 = vis.t * BM + sub, m = std::min({TM, BM - sub, Nq - i0});
            if (m <= 0) break;
            // partial tile: only the keys some row of this slice sees (j0s, ns); dK/dV rows
            // of the tile shift by skip
            int64_t j0s = j0, ns = n;
            const int64_t skip = vis.full ? 0 : narrow_keys(w, i0, i0 + m, j0s, ns);
            if (skip < 0) continue;
            // S^T = K Q^T: (ns, D) x (D, m), log2 units
            at::native::cpublas::brgemm(ns, m, D, D, Nq, TM, false, k_h + j0s * D, qT_p + bh * D * Nq + i0, st.data());
            const float* l2 = lse2_p + bh * Nq + i0;
            if (softcap) {  // S^T <- C tanh(S^T / C), keeping tanh for the chain rule
              for (int64_t c = 0; c < ns; ++c) {
                float* row = st.data() + c * TM;
                float* t = th.data() + c * TM;
                for (int64_t r = 0; r < m; ++r) {
                  t[r] = tanh_fast(row[r] * capInv);
                  row[r] = capC * t[r];
                }
              }
            }
            if (mods.slopes != nullptr) {  // S^T -= slope |i + off - j|
              const float sl2 = mods.slope_log2(b, h);
              for (int64_t c = 0; c < ns; ++c) {
                float* row = st.data() + c * TM;
                const int64_t d0 = i0 + off - (j0s + c);
                for (int64_t r = 0; r < m; ++r) {
                  const float d = static_cast<float>(d0 + r);
                  row[r] -= sl2 * (d < 0.f ? -d : d);
                }
              }
            }
            for (int64_t c = 0; c < ns; ++c) {
              float* row = st.data() + c * TM;
              for (int64_t r = 0; r < m; ++r) row[r] = exp2_fast(row[r] - l2[r]);
            }
            if (!vis.full) {
              const uint8_t* bits =
                  vis.mask_id >= 0 ? sl.masks + (static_cast<int64_t>(vis.mask_id) * BM + sub) * BN + skip : nullptr;
              mask_partial_tile_t(st.data(), TM, i0, m, j0s, ns, w, bits, BN);
            }
            const float* pv = st.data();  // the P^T that multiplies dO: dropped when dropout
            if (dropout) {
              for (int64_t r = 0; r < m; ++r) rowh[r] = dropout_row_hash(mods, static_cast<uint64_t>(bh * Nq + i0 + r));
              for (int64_t c = 0; c < ns; ++c) {
                const float* p = st.data() + c * TM;
                float* pd = pdrop.data() + c * TM;
                for (int64_t r = 0; r < m; ++r) pd[r] = dropout_keep(mods, rowh[r], j0s + c) ? p[r] * keep_s : 0.f;
              }
              pv = pdrop.data();
            }
            // dV += P^T dO: (ns, m) x (m, Dv)
            at::native::cpublas::brgemm(ns, Dv, m, TM, Dv, Dv, true, pv, do_p + (bh * Nq + i0) * Dv,
                                        dv_acc.data() + skip * Dv);
            // dP^T = V dO^T: (ns, Dv) x (Dv, m)
            at::native::cpublas::brgemm(ns, m, Dv, Dv, Nq, TM, false, v_h + j0s * Dv, doT_p + bh * Dv * Nq + i0,
                                        dpt.data());
            const float* dl = delta_p + bh * Nq + i0;
            if (dropout) {  // dP = dP_dropped * keep / (1 - p); keep read off pdrop (where P = 0, dS = 0 anyway)
              for (int64_t c = 0; c < ns; ++c) {
                const float* pd = pdrop.data() + c * TM;
                float* dp = dpt.data() + c * TM;
                for (int64_t r = 0; r < m; ++r) dp[r] = pd[r] != 0.f ? dp[r] * keep_s : 0.f;
              }
            }
            for (int64_t c = 0; c < ns; ++c) {
              const float* p = st.data() + c * TM;
              float* dp = dpt.data() + c * TM;
              for (int64_t r = 0; r < m; ++r) dp[r] = p[r] * (dp[r] - dl[r]) * scale_f;  // dS^T
            }
            if (softcap) {  // d(C tanh(x / C)) / dx = 1 - tanh^2
              for (int64_t c = 0; c < ns; ++c) {
                const float* t = th.data() + c * TM;
                float* dp = dpt.data() + c * TM;
                for (int64_t r = 0; r < m; ++r) dp[r] *= 1.f - t[r] * t[r];
              }
            }
            // dK += dS^T Q: (ns, m) x (m, D)
            at::native::cpublas::brgemm(ns, D, m, TM, D, D, true, dpt.data(), q_p + (bh * Nq + i0) * D,
                                        dk_acc.data() + skip * D);
            // dQ += dS K: (m, ns) x (ns, D)
            for (int64_t c = 0; c < ns; ++c)
              for (int64_t r = 0; r < m; ++r) ds[r * BN + c] = dpt[c * TM + r];
            at::native::cpublas::brgemm(m, D, ns, BN, D, D, true, ds.data(), k_h + j0s * D,
                                        dq_split + (bh * Nq + i0) * D);
           }
          });
        }
        std::copy(dk_acc.begin(), dk_acc.begin() + n * D, dk_p + ((b * Hkv + hk) * Nk + j0) * D);
        std::copy(dv_acc.begin(), dv_acc.begin() + n * Dv, dv_p + ((b * Hkv + hk) * Nk + j0) * Dv);
      }
    }
    at::native::cpublas::brgemm_release(false);
  });

  at::Tensor dq = (S == 1 ? dq_acc.select(0, 0) : dq_acc.sum(0)).to(q_in.scalar_type());
  return {dq, dk32.to(k_in.scalar_type()), dv32.to(v_in.scalar_type())};
}

}  // namespace fastattn::cpu
