// TORCH_LIBRARY bindings of the CPU split-KV decode kernel (csrc/cpu/decode_cpu.cpp).
//
//   fastattn::cpu_decode(q, k_cache, v_cache, cache_seqlens?, scale, window_left, num_splits,
//                        window_right=0, softcap=0, alibi_slopes?=None) -> (out, lse)
//   fastattn::cpu_decode_splits(batch, kv_heads, max_len) -> int   (the default split count)
//
// The pybind11 module itself is defined in cpu_ops.cpp; this file only adds ops. The checks
// guard the kernel against calls that bypass fastattn.decode (which validates first).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "cpu/decode_cpu.h"

namespace {

#define FA_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "fastattn cpu_decode: ", __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> cpu_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const c10::optional<at::Tensor>& cache_seqlens, double scale,
                                              int64_t window_left, int64_t num_splits, int64_t window_right,
                                              double softcap, const c10::optional<at::Tensor>& alibi_slopes) {
  for (const auto* t : {&q, &k, &v}) {
    FA_CHECK(t->device().is_cpu(), "expected CPU tensors, got a tensor on ", t->device());
    FA_CHECK(t->dim() == 4, "expected 4-D (B, H, N, D) tensors, got ", t->dim(), "-D");
  }
  const auto dt = q.scalar_type();
  FA_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
           "supports float32, bfloat16 and float16, got ", dt);
  FA_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, "q, k_cache, v_cache must share one dtype");
  FA_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "batch sizes differ");
  FA_CHECK(k.size(1) == v.size(1) && k.size(2) == v.size(2), "k_cache and v_cache must have the same heads and length");
  FA_CHECK(k.size(3) == q.size(3), "q and k_cache must have the same head dim");
  FA_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "query heads (", q.size(1),
           ") must be a multiple of key/value heads (", k.size(1), ")");
  FA_CHECK(window_left >= -1, "window_left must be >= -1, got ", window_left);
  FA_CHECK(window_right >= -1, "window_right must be >= -1, got ", window_right);
  FA_CHECK(softcap >= 0.0 && softcap < INFINITY, "softcap must be a finite float >= 0, got ", softcap);
  fastattn::cpu::ScoreMods mods;
  mods.softcap = static_cast<float>(softcap);
  mods.Hq = q.size(1);
  if (alibi_slopes.has_value() && alibi_slopes->defined()) {
    const auto& a = *alibi_slopes;
    FA_CHECK(a.scalar_type() == at::kFloat && a.is_contiguous() && a.dim() == 2 && a.size(0) == q.size(0) &&
                 a.size(1) == q.size(1),
             "alibi_slopes must be a contiguous float32 (B, Hq) tensor");
    mods.slopes = a.data_ptr<float>();
  }
  if (cache_seqlens.has_value() && cache_seqlens->defined()) {
    const auto& sl = *cache_seqlens;
    FA_CHECK(sl.device().is_cpu() && sl.dim() == 1 && sl.size(0) == q.size(0) &&
                 (sl.scalar_type() == at::kInt || sl.scalar_type() == at::kLong),
             "cache_seqlens must be a 1-D int32/int64 CPU tensor of length B = ", q.size(0));
    if (sl.numel() > 0) {
      const at::Tensor l = sl.to(at::kLong);
      FA_CHECK(l.min().item<int64_t>() >= 0 && l.max().item<int64_t>() <= k.size(2),
               "cache_seqlens must lie in [0, ", k.size(2), "]");
    }
  }
  return fastattn::cpu::decode_fwd(q, k, v, cache_seqlens, scale, window_left, num_splits, window_right, mods);
}

int64_t cpu_decode_splits(int64_t batch, int64_t kv_heads, int64_t max_len) {
  return fastattn::cpu::decode_default_splits(batch, kv_heads, max_len);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastattn, m) {
  m.def("cpu_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? cache_seqlens, float scale, "
        "int window_left, int num_splits, int window_right=0, float softcap=0., "
        "Tensor? alibi_slopes=None) -> (Tensor, Tensor)");
  m.def("cpu_decode_splits(int batch, int kv_heads, int max_len) -> int");
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) { m.impl("cpu_decode", &cpu_decode); }

TORCH_LIBRARY_IMPL(fastattn, CompositeExplicitAutograd, m) { m.impl("cpu_decode_splits", &cpu_decode_splits); }
