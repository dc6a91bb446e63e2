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

#include "cpu/isa/kernel_tables.h"
#include "cpu/kernel_math.h"
#include "cpu/operands.h"
#include "cpu/task_queue.h"

namespace fastattn::cpu {

namespace {

// Keys per inner step: the float32 K and V tiles (64 x D) stay in L1/L2.
constexpr int64_t kDecodeBN = 64;  // = kDecBN of isa/decode_kernels.h (chunks are whole tiles)
// Tasks the default split count aims for (decode_default_splits).
constexpr int64_t kDecodeTasks = 64;
// A split should hold at least this many keys, or merging costs more than it saves.
constexpr int64_t kMinKeysPerSplit = 256;

inline void axpy(float* y, const float* x, float a, int64_t n) {
  for (int64_t d = 0; d < n; ++d) y[d] += a * x[d];
}

}  // namespace

int64_t decode_default_splits(int64_t batch, int64_t kv_heads, int64_t max_len) {
  // Enough (batch, kv head, split) tasks to balance up to ~32 threads, fixed so the split
  // (and so the merge order and the result's bits) never follows the thread count.
  const int64_t tasks = std::max<int64_t>(1, batch * kv_heads);
  const int64_t want = (kDecodeTasks + tasks - 1) / tasks;
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

  int64_t S = num_splits > 0 ? num_splits : decode_default_splits(B, Hkv, Lmax);
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

  // ---- phase 1 (the kernel variant of this CPU): one (b, kv head, split) per task ----
  const KernelTable& kern = active_kernels();
  DecodeArgs a;
  a.B = B, a.Hq = Hq, a.Hkv = Hkv, a.Nq = Nq, a.D = D, a.Dv = Dv, a.Ncache = Ncache, a.S = S, a.chunk = chunk;
  a.Dp = (D + kPad - 1) / kPad * kPad;
  a.Dvp = (Dv + kPad - 1) / kPad * kPad;
  a.window_left = window_left;
  a.window_right = window_right;
  const auto dt = q.scalar_type();
  a.elem = dt == at::kFloat ? Elem::kF32 : (dt == at::kBFloat16 ? Elem::kBF16 : Elem::kF16);
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.sq_b = q.stride(0), a.sq_h = q.stride(1), a.sq_n = q.stride(2);
  a.sk_b = k.stride(0), a.sk_h = k.stride(1), a.sk_n = k.stride(2);
  a.sv_b = v.stride(0), a.sv_h = v.stride(1), a.sv_n = v.stride(2);
  a.lens = lens.data();
  a.scale_log2 = static_cast<float>(scale) * kLog2e;
  a.o_part = o_part.data_ptr<float>();
  a.l_part = lse_part.data_ptr<float>();
  a.mods = mods;
  const int64_t scratch = kern.decode_scratch_floats(a);
  run_task_queue(B * Hkv * S, scratch, nullptr,
                 [&](int64_t begin, int64_t end, float* buf) { kern.decode_tasks(a, begin, end, buf); });
  const float* op_ptr = o_part.data_ptr<float>();
  const float* lp_ptr = lse_part.data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fastattn_cpu_decode", [&] {
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
