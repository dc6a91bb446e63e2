// TORCH_LIBRARY bindings of the CPU kernels (csrc/cpu) plus the pybind11 module fastattn._C.
//
//   fastattn::cpu_fwd(q, k, v, scale, window_left, window_right, block_mask[],
//                     softcap=0, alibi_slopes?=None, dropout_p=0, seed=0) -> (out, lse)
//   fastattn::cpu_bwd(dout, q, k, v, out, lse, dlse?, scale, window_left, window_right,
//                     block_mask[], softcap=0, alibi_slopes?=None, dropout_p=0, seed=0)
//                     -> (dq, dk, dv)
//
// The checks here guard the kernels against malformed calls that bypass the Python API
// (which validates first and gives friendlier messages).
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>

#include "common/block_mask_fields.h"
#include "cpu/attention_cpu.h"
#include "cpu/kernel_stats.h"
#include "cpu/operands.h"
#include "cpu/output_cache.h"
#include "cpu/isa/kernel_tables.h"

namespace {

#define FA_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "fastattn cpu: ", __VA_ARGS__)

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const auto* t : {&q, &k, &v}) {
    FA_CHECK(t->device().is_cpu(), "expected CPU tensors, got a tensor on ", t->device(),
             "; use backend='cuda' or 'triton' for GPU tensors");
    FA_CHECK(t->dim() == 4, "expected 4-D (B, H, N, D) tensors, got ", t->dim(), "-D");
  }
  const auto dt = q.scalar_type();
  FA_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
           "supports float32, bfloat16 and float16, got ", dt);
  FA_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, "q, k, v must share one dtype");
  FA_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "batch sizes differ");
  FA_CHECK(k.size(1) == v.size(1) && k.size(2) == v.size(2), "k and v must have the same heads and length");
  FA_CHECK(k.size(3) == q.size(3), "q and k must have the same head dim");
  FA_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "query heads (", q.size(1),
           ") must be a multiple of key/value heads (", k.size(1), ")");
  FA_CHECK(q.size(3) >= 1 && q.size(3) <= 256 && v.size(3) >= 1 && v.size(3) <= 256,
           "head dims must be in [1, 256], got ", q.size(3), " and ", v.size(3));
}

// Validates the named block-mask hand-off (csrc/common/block_mask_fields.h) by field name.
void check_block_mask(const std::vector<at::Tensor>& bm, const at::Tensor& q, const at::Tensor& k) {
  using namespace fastattn;
  if (bm.empty()) return;
  FA_CHECK(bm.size() == kBlockMaskFieldCount, "block_mask must be the ", int(kBlockMaskFieldCount),
           " tensors of BlockMask.kernel_mask().lists (", kBlockMaskFieldNames[0], ", ..., ",
           kBlockMaskFieldNames[kPartialMasks], "), got ", bm.size());
  for (int f = 0; f < kBlockMaskFieldCount; ++f) {
    const auto want = f == kPartialMasks ? at::kByte : at::kInt;
    FA_CHECK(bm[f].scalar_type() == want && bm[f].is_contiguous() && bm[f].device().is_cpu(),
             "block_mask.", kBlockMaskFieldNames[f], " must be a contiguous ", want, " CPU tensor, got ",
             bm[f].scalar_type(), " on ", bm[f].device());
    FA_CHECK(bm[f].dim() == block_mask_field_rank(f), "block_mask.", kBlockMaskFieldNames[f], " must be ",
             block_mask_field_rank(f), "-D, got ", bm[f].dim(), "-D");
  }
  const at::Tensor& masks = bm[kPartialMasks];
  const int64_t BM = masks.size(1), BN = masks.size(2);
  FA_CHECK(BM > 0 && BN > 0, "block sizes must be positive");
  const int64_t NQB = (q.size(2) + BM - 1) / BM, NKB = (k.size(2) + BN - 1) / BN;
  const int64_t Bm = bm[kKvNumBlocks].size(0), Hm = bm[kKvNumBlocks].size(1);
  FA_CHECK((Bm == 1 || Bm == q.size(0)) && (Hm == 1 || Hm == q.size(1)),
           "block_mask layout (", Bm, ", ", Hm, ") does not broadcast to (batch, heads) = (", q.size(0), ", ",
           q.size(1), ")");
  for (int f : {kKvNumBlocks, kKvIndices, kFullKvNumBlocks, kFullKvIndices, kKvMaskIds})
    FA_CHECK(bm[f].size(0) == Bm && bm[f].size(1) == Hm && bm[f].size(2) == NQB, "block_mask.",
             kBlockMaskFieldNames[f], " does not match Nq = ", q.size(2), " with BLOCK_M = ", BM);
  for (int f : {kQNumBlocks, kQIndices, kFullQNumBlocks, kFullQIndices, kQMaskIds})
    FA_CHECK(bm[f].size(0) == Bm && bm[f].size(1) == Hm && bm[f].size(2) == NKB, "block_mask.",
             kBlockMaskFieldNames[f], " does not match Nk = ", k.size(2), " with BLOCK_N = ", BN);
  FA_CHECK(bm[kKvMaskIds].sizes() == bm[kKvIndices].sizes() && bm[kQMaskIds].sizes() == bm[kQIndices].sizes(),
           "block_mask.kv_mask_ids / q_mask_ids must be shaped like kv_indices / q_indices");
  // Indices are trusted by the kernels only after this (cheap, O(#blocks)) scan.
  const int64_t P = masks.size(0);
  auto lists_ok = [P](const at::Tensor& num, const at::Tensor& idx, const at::Tensor* ids, int64_t hi) {
    const int32_t* np = num.data_ptr<int32_t>();
    const int32_t* ip = idx.data_ptr<int32_t>();
    const int32_t* dp = ids ? ids->data_ptr<int32_t>() : nullptr;
    const int64_t w = idx.size(3);
    for (int64_t row = 0; row < num.numel(); ++row) {
      const int32_t cnt = np[row];
      if (cnt < 0 || cnt > w) return false;
      for (int32_t e = 0; e < cnt; ++e) {
        if (ip[row * w + e] < 0 || ip[row * w + e] >= hi) return false;
        if (dp && (dp[row * w + e] < -1 || dp[row * w + e] >= P)) return false;
      }
    }
    return true;
  };
  FA_CHECK(lists_ok(bm[kKvNumBlocks], bm[kKvIndices], &bm[kKvMaskIds], NKB) &&
               lists_ok(bm[kFullKvNumBlocks], bm[kFullKvIndices], nullptr, NKB) &&
               lists_ok(bm[kQNumBlocks], bm[kQIndices], &bm[kQMaskIds], NQB) &&
               lists_ok(bm[kFullQNumBlocks], bm[kFullQIndices], nullptr, NQB),
           "block_mask holds out-of-range block indices, counts or mask ids (malformed layout)");
}

void check_window(int64_t l, int64_t r) {
  FA_CHECK(l >= -1 && r >= -1, "window entries must be >= -1 (-1 = unbounded), got (", l, ", ", r, ")");
}

// Score modifiers from the op arguments (see csrc/cpu/score_mods.h); seed is the 64-bit
// dropout seed as a signed int64 (Python passes it wrapped).
fastattn::cpu::ScoreMods make_mods(const at::Tensor& q, double softcap, const c10::optional<at::Tensor>& alibi,
                                   double dropout_p, int64_t seed) {
  fastattn::cpu::ScoreMods m;
  FA_CHECK(softcap >= 0.0 && std::isfinite(softcap), "softcap must be a finite float >= 0, got ", softcap);
  FA_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must lie in [0, 1), got ", dropout_p);
  m.softcap = static_cast<float>(softcap);
  m.Hq = q.size(1);
  if (alibi.has_value() && alibi->defined()) {
    FA_CHECK(alibi->scalar_type() == at::kFloat && alibi->is_contiguous() && alibi->dim() == 2 &&
                 alibi->size(0) == q.size(0) && alibi->size(1) == q.size(1),
             "alibi_slopes must be a contiguous float32 (B, Hq) tensor");
    m.slopes = alibi->data_ptr<float>();
  }
  if (dropout_p > 0.0) {
    const uint64_t s = static_cast<uint64_t>(seed);
    m.dropout_p = static_cast<float>(dropout_p);
    m.seed_lo = static_cast<uint32_t>(s & 0xFFFFFFFFu);
    m.seed_hi = static_cast<uint32_t>(s >> 32);
    m.threshold = static_cast<uint32_t>(std::llround(dropout_p * 16777216.0));  // p * 2^24
  }
  return m;
}

std::tuple<at::Tensor, at::Tensor> cpu_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           double scale, int64_t wl, int64_t wr,
                                           const std::vector<at::Tensor>& block_mask, double softcap,
                                           const c10::optional<at::Tensor>& alibi_slopes, double dropout_p,
                                           int64_t seed) {
  check_qkv(q, k, v);
  check_window(wl, wr);
  check_block_mask(block_mask, q, k);
  const auto mods = make_mods(q, softcap, alibi_slopes, dropout_p, seed);
  return fastattn::cpu::attention_fwd(q, k, v, scale, wl, wr, block_mask, mods);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                       const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& out, const at::Tensor& lse,
                                                       const c10::optional<at::Tensor>& dlse, double scale, int64_t wl,
                                                       int64_t wr, const std::vector<at::Tensor>& block_mask,
                                                       double softcap, const c10::optional<at::Tensor>& alibi_slopes,
                                                       double dropout_p, int64_t seed) {
  check_qkv(q, k, v);
  check_window(wl, wr);
  check_block_mask(block_mask, q, k);
  FA_CHECK(dout.sizes() == out.sizes(), "dout must have out's shape");
  FA_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
           "lse must be (B, Hq, Nq)");
  const auto mods = make_mods(q, softcap, alibi_slopes, dropout_p, seed);
  return fastattn::cpu::attention_bwd(dout, q, k, v, out, lse, dlse, scale, wl, wr, block_mask, mods);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastattn, m) {
  m.def("cpu_fwd(Tensor q, Tensor k, Tensor v, float scale, int window_left, int window_right, "
        "Tensor[] block_mask, float softcap=0., Tensor? alibi_slopes=None, float dropout_p=0., "
        "int seed=0) -> (Tensor, Tensor)");
  m.def("cpu_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, "
        "float scale, int window_left, int window_right, Tensor[] block_mask, float softcap=0., "
        "Tensor? alibi_slopes=None, float dropout_p=0., int seed=0) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("cpu_fwd", &cpu_fwd);
  m.impl("cpu_bwd", &cpu_bwd);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastattn CPU kernels; the ops live in torch.ops.fastattn";
  m.def("build_info", []() {
    std::string s = "compiler: ";
#if defined(__clang__)
    s += "clang " __clang_version__;
#elif defined(__GNUC__)
    s += "gcc " __VERSION__;
#endif
    // the baseline the whole extension was compiled for; kernels add their own variants
#if defined(__AVX512F__)
    s += ", baseline AVX-512 (-march=native build: runs only on CPUs like the build host)";
#elif defined(__AVX2__)
    s += ", baseline AVX2 (-march=native build: runs only on CPUs like the build host)";
#elif defined(__x86_64__)
    s += ", baseline x86-64-v2";
#else
    s += ", baseline generic";
#endif
    s += ", kernel variants built: generic";
    if (fastattn::cpu::kernels_avx2()) s += ", avx2";
    if (fastattn::cpu::kernels_avx512()) s += ", avx512";
    if (fastattn::cpu::kernels_avx512bf16()) s += ", avx512bf16";
    return s;
  });
  m.def("kernel_stats", []() {
    const auto& st = fastattn::cpu::kernel_stats();
    auto bits = [](uint64_t x) {
      std::vector<int64_t> t;
      for (int i = 0; i < 64; ++i)
        if (x >> i & 1) t.push_back(i);
      return t;
    };
    pybind11::dict d;
    d["fwd_visits"] = st.fwd_visits;
    d["bwd_visits"] = st.bwd_visits;
    d["fwd_threads"] = bits(st.fwd_threads);
    d["bwd_threads"] = bits(st.bwd_threads);
    d["fwd_bf16_dot"] = st.fwd_bf16_dot;
    d["bwd_bf16_dot"] = st.bwd_bf16_dot;
    return d;
  }, "block visits of the cpu forward/backward since the last reset, and the threads that "
     "ran the last call's tasks (csrc/cpu/kernel_stats.h)");
  m.def("reset_kernel_stats", []() { fastattn::cpu::kernel_stats() = fastattn::cpu::KernelStats(); });
  m.def("release_workspace", &fastattn::cpu::release_workspace,
        "Frees the operand buffers the cpu kernels keep for the calling thread between calls "
        "(csrc/cpu/operands.h: at most 128 MB per thread)");
  m.def("output_cache_stats", []() {
    const auto st = fastattn::cpu::output_cache_stats();
    pybind11::dict d;
    d["limit_bytes"] = st.limit_bytes;
    d["kept_bytes"] = st.kept_bytes;
    d["kept_blocks"] = st.kept_blocks;
    d["hits"] = st.hits;
    d["misses"] = st.misses;
    return d;
  }, "The cpu output cache's limit, kept blocks and hit/miss counts (csrc/cpu/output_cache.h)");
  m.def("set_output_cache_limit", &fastattn::cpu::set_output_cache_limit, pybind11::arg("bytes"),
        "Sets the cpu output cache's limit in bytes (0: off) and frees kept blocks beyond it");
  m.def("empty_output_cache", &fastattn::cpu::empty_output_cache,
        "Frees every block the cpu output cache keeps");
  m.def("native_build", []() {
#if defined(__AVX2__)
    return true;
#else
    return false;
#endif
  }, "True when the extension was built with -march=native (FASTATTN_NATIVE=1)");
  m.def("cpu_isa", []() { return std::string(fastattn::cpu::active_kernels().name); },
        "The kernel variant a call would run now (honours FASTATTN_CPU_ISA)");
  m.def("cpu_isas", &fastattn::cpu::runnable_isas, "Kernel variants this CPU can run, best last");
  m.def("cpu_features", &fastattn::cpu::isa_report, "CPU features the dispatcher sees");
}
