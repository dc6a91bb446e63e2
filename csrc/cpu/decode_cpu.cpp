// Split-KV decoding attention on the CPU (flash-decoding).
//
// Decoding asks a few queries (Nq, usually 1) about a long cache. One task per query tile
// would leave most cores idle at small batch, so the cache is cut into S chunks instead:
//
//   phase 1, in parallel over (b, kv head, split s):
//     for the G*Nq query rows of this kv head's group (GQA: K/V tiles are converted once
//     and reused by every query head of the group), run the online softmax over the
//     keys of chunk s only:   o_s = softmax-weighted V over chunk s,  lse_s (log2 units)
//   phase 2, in parallel over (b, query head, query):
//     lse = log2 sum_s 2^lse_s,   out = sum_s 2^(lse_s - lse) o_s
//
// Splits past a row's cache length, and rows whose visible keys miss a chunk, give
// lse_s = -inf and weigh nothing. Scratch is O(B * Hq * Nq * S * Dv) floats.
#include "decode_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "kernel_math.h"
#include "score_mods.h"

namespace fastattn::cpu {

namespace {

// Keys per inner step: the float32 K and V tiles (64 x D) stay in L1/L2.
constexpr int64_t kDecodeBN = 64;
// A split should hold at least this many keys, or merging costs more than it saves.
constexpr int64_t kMinKeysPerSplit = 256;

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

inline void axpy(float* y, const float* x, float a, int64_t n) {
  for (int64_t d = 0; d < n; ++d) y[d] += a * x[d];
}

}  // namespace

int64_t decode_default_splits(int64_t batch, int64_t kv_heads, int64_t max_len, int64_t threads) {
  const int64_t tasks = std::max<int64_t>(1, batch * kv_heads);
  const int64_t want = (2 * threads + tasks - 1) / tasks;  // two tasks per thread to balance
  const int64_t cap = std::max<int64_t>(1, max_len / kMinKeysPerSplit);
  return std::max<int64_t>(1, std::min(want, cap));
}

std::tuple<at::Tensor, at::Tensor> decode_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                              const at::Tensor& v_in, const c10::optional<at::Tensor>& cache_seqlens,
                                              double scale, int64_t window_left, int64_t num_splits,
                                              int64_t window_right, const ScoreMods& mods) {
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Nq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), Ncache = k_in.size(2), Dv = v_in.size(3);
  const int64_t G = Hq / Hkv, R = G * Nq;  // query rows served by one kv head

  // Cache lengths per row (int64), bounded by the cache capacity.
  std::vector<int64_t> lens(B, Ncache);
  if (cache_seqlens.has_value() && cache_seqlens->defined()) {
    const at::Tensor sl = cache_seqlens->to(at::kLong).contiguous();
    const int64_t* p = sl.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) lens[b] = p[b];
  }
  const int64_t Lmax = B > 0 ? *std::max_element(lens.begin(), lens.end()) : 0;

  int64_t S = num_splits > 0 ? num_splits : decode_default_splits(B, Hkv, Lmax, at::get_num_threads());
  // Chunks are whole tiles; never more splits than tiles.
  const int64_t n_tiles = std::max<int64_t>(1, (Lmax + kDecodeBN - 1) / kDecodeBN);
  S = std::max<int64_t>(1, std::min(S, n_tiles));
  const int64_t chunk = ((n_tiles + S - 1) / S) * kDecodeBN;

  at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  at::Tensor v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();

  auto f32 = q_in.options().dtype(at::kFloat);
  at::Tensor out = at::empty({B, Hq, Nq, Dv}, q_in.options());
  at::Tensor lse = at::empty({B, Hq, Nq}, f32);
  // Partial results per split: (B, Hkv, S, R, Dv) and (B, Hkv, S, R), lse in log2 units.
  at::Tensor o_part = at::empty({B, Hkv, S, R, Dv}, f32);
  at::Tensor lse_part = at::empty({B, Hkv, S, R}, f32);
  if (B == 0 || Hq == 0 || Nq == 0) return {out, lse};

  const float scale_log2 = static_cast<float>(scale) * kLog2e;
  const float cap_l2 = fastattn::cpu::cap_log2(mods), inv_cap = cap_l2 > 0.f ? 1.f / cap_l2 : 0.f;
  const int64_t sq_b = q.stride(0), sq_h = q.stride(1), sq_n = q.stride(2);
  const int64_t sk_b = k.stride(0), sk_h = k.stride(1), sk_n = k.stride(2);
  const int64_t sv_b = v.stride(0), sv_h = v.stride(1), sv_n = v.stride(2);
  float* op_ptr = o_part.data_ptr<float>();
  float* lp_ptr = lse_part.data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fastattn_cpu_decode", [&] {
    const scalar_t* q_ptr = q.data_ptr<scalar_t>();
    const scalar_t* k_ptr = k.data_ptr<scalar_t>();
    const scalar_t* v_ptr = v.data_ptr<scalar_t>();

    // ---- phase 1: one (b, kv head, split) per task ----
    at::parallel_for(0, B * Hkv * S, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qs(R * D), kt(kDecodeBN * D), vt(kDecodeBN * Dv), s(kDecodeBN);
      std::vector<float> acc(R * Dv), m_i(R), l_i(R);
      std::vector<int64_t> lo(R), hi(R);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t sp = task % S, bh = task / S, b = bh / Hkv, hk = bh % Hkv;
        const int64_t L = std::min(lens[b], Ncache);
        const int64_t c0 = sp * chunk, c1 = std::min(c0 + chunk, L);
        float* o_s = op_ptr + (bh * S + sp) * R * Dv;
        float* l_s = lp_ptr + (bh * S + sp) * R;
        // Visible keys of each row, clipped to this chunk: [lo, hi).
        int64_t tlo = c1, thi = c0;
        for (int64_t r = 0; r < R; ++r) {
          const int64_t i = r % Nq, diag = L - Nq + i;  // the query's own position
          int64_t a = window_left >= 0 ? diag - window_left : 0;
          int64_t e = window_right >= 0 ? diag + window_right + 1 : L;
          a = std::max(a, c0);
          e = std::min(e, c1);
          lo[r] = a;
          hi[r] = e;
          if (a < e) {
            tlo = std::min(tlo, a);
            thi = std::max(thi, e);
          }
        }
        std::fill(m_i.begin(), m_i.end(), kNegInf);
        std::fill(l_i.begin(), l_i.end(), 0.f);
        std::fill(acc.begin(), acc.end(), 0.f);
        if (tlo < thi) {
          for (int64_t r = 0; r < R; ++r) {
            const int64_t h = hk * G + r / Nq, i = r % Nq;
            const scalar_t* qp = q_ptr + b * sq_b + h * sq_h + i * sq_n;
            for (int64_t d = 0; d < D; ++d) qs[r * D + d] = static_cast<float>(qp[d]) * scale_log2;
          }
          const scalar_t* k_h = k_ptr + b * sk_b + hk * sk_h;
          const scalar_t* v_h = v_ptr + b * sv_b + hk * sv_h;
          // Tiles start on chunk-aligned multiples of kDecodeBN.
          for (int64_t j0 = tlo - (tlo - c0) % kDecodeBN; j0 < thi; j0 += kDecodeBN) {
            const int64_t n = std::min(kDecodeBN, thi - j0);
            for (int64_t j = 0; j < n; ++j) {
              const scalar_t* kr = k_h + (j0 + j) * sk_n;
              const scalar_t* vr = v_h + (j0 + j) * sv_n;
              for (int64_t d = 0; d < D; ++d) kt[j * D + d] = static_cast<float>(kr[d]);
              for (int64_t d = 0; d < Dv; ++d) vt[j * Dv + d] = static_cast<float>(vr[d]);
            }
            for (int64_t r = 0; r < R; ++r) {
              const int64_t a = std::max(lo[r], j0), e = std::min(hi[r], j0 + n);
              if (a >= e) continue;
              const float* qr = qs.data() + r * D;
              for (int64_t j = a; j < e; ++j) s[j - a] = dot(qr, kt.data() + (j - j0) * D, D);
              const int64_t cnt = e - a;
              if (cap_l2 > 0.f)
                for (int64_t j = 0; j < cnt; ++j) s[j] = cap_l2 * tanh_fast(s[j] * inv_cap);
              if (mods.slopes != nullptr) {  // -slope |p - j|, p = L - Nq + i
                const float sl2 = slope_log2(mods, b, hk * G + r / Nq);
                const int64_t diag = L - Nq + r % Nq;
                for (int64_t j = a; j < e; ++j) {
                  const float d = static_cast<float>(diag - j);
                  s[j - a] -= sl2 * (d < 0.f ? -d : d);
                }
              }
              const float mx = row_max(s.data(), cnt);
              const float m_new = mx != mx ? mx : std::max(m_i[r], mx);  // NaN propagates
              const float alpha = exp2_fast(m_i[r] - m_new);
              const float psum = exp2_affine_sum(s.data(), cnt, 1.f, m_new);
              float* ar = acc.data() + r * Dv;
              if (alpha != 1.f) scale_inplace(ar, Dv, alpha);
              for (int64_t j = a; j < e; ++j) axpy(ar, vt.data() + (j - j0) * Dv, s[j - a], Dv);
              l_i[r] = l_i[r] * alpha + psum;
              m_i[r] = m_new;
            }
          }
        }
        for (int64_t r = 0; r < R; ++r) {
          const float l = l_i[r];
          const float inv = l == 0.f ? 0.f : 1.f / l;
          for (int64_t d = 0; d < Dv; ++d) o_s[r * Dv + d] = acc[r * Dv + d] * inv;
          l_s[r] = l == 0.f ? kNegInf : m_i[r] + std::log2(l);
        }
      }
    });

    // ---- phase 2: merge the splits of each (b, query head, query) by log-sum-exp ----
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    float* lse_ptr = lse.data_ptr<float>();
    at::parallel_for(0, B * Hq * Nq, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> o(Dv);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t i = row % Nq, bh = row / Nq, b = bh / Hq, h = bh % Hq;
        const int64_t hk = h / G, r = (h % G) * Nq + i;
        const float* lp = lp_ptr + (b * Hkv + hk) * S * R + r;
        const float* opp = op_ptr + (b * Hkv + hk) * S * R * Dv + r * Dv;
        float M = kNegInf;
        bool nan = false;
        for (int64_t sp = 0; sp < S; ++sp) {
          M = std::max(M, lp[sp * R]);
          nan |= lp[sp * R] != lp[sp * R];
        }
        if (nan) M = std::numeric_limits<float>::quiet_NaN();
        std::fill(o.begin(), o.end(), 0.f);
        float wsum = 0.f;
        if (M != kNegInf) {
          for (int64_t sp = 0; sp < S; ++sp) {
            const float w = exp2_fast(lp[sp * R] - M);  // -inf splits weigh 0
            if (w == 0.f) continue;
            wsum += w;
            axpy(o.data(), opp + sp * R * Dv, w, Dv);
          }
        }
        const float inv = wsum == 0.f ? 0.f : 1.f / wsum;
        scalar_t* orow = out_ptr + row * Dv;
        for (int64_t d = 0; d < Dv; ++d) orow[d] = static_cast<scalar_t>(o[d] * inv);
        lse_ptr[row] = M == kNegInf ? kNegInf : (M + std::log2(wsum)) * kLn2;
      }
    });
  });
  return {out, lse};
}

}  // namespace fastattn::cpu
