// TORCH_LIBRARY bindings of the CUDA kernels (csrc/cuda), built only into fastattn._cuda when
// torch has CUDA and nvcc exists (setup.py). Python side: fastattn/backends/cuda.py (fake
// implementations and the autograd formula).
//
//   fastattn::cuda_fwd(q, k, v, scale, window_left, window_right, block_mask[],
//                      softcap=0, alibi_slopes=None, dropout_p=0, dropout_seed=0) -> (out, lse)
//   fastattn::cuda_bwd(dout, q, k, v, out, lse, scale, window_left, window_right, block_mask[],
//                      softcap=0, alibi_slopes=None, dropout_p=0, dropout_seed=0, dlse=None)
//                      -> (dq, dk, dv)
//
// block_mask[] is empty (dense / window) or BlockMask.kernel_tensors() (11 tensors), with
// (window_left, window_right) then the mask's own token rule for its partial blocks.
// Score modifiers as fastattn.score_mods defines them: softcap (0 = off), alibi_slopes (Hq,) or
// (B, Hq) float32, dropout_p with a 64-bit dropout_seed (the bits of a signed int64); the
// backward must get the same values as the forward (it regenerates the dropout keep bits).
// dlse (optional, (B, Hq, Nq)) is the gradient of the returned lse.
//
//   fastattn::cuda_decode(q, k_cache, v_cache, cache_seqlens?, scale, window_left, window_right,
//                         softcap, alibi_slopes?, num_splits, max_len) -> (out, lse)
//
// Split-KV decoding (csrc/cuda/decode.h): q (B, Hq, Nq, D) against caches (B, Hkv, Ncache, D|Dv)
// whose row b holds cache_seqlens[b] tokens (int32/int64, or None = all); num_splits chunks over
// the first max_len (>= max cache_seqlens) keys, merged by a combine kernel. Inference only.
// The same functions are registered for CPU tensors only to fail with a clear message.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/block_mask_fields.h"
#include "cuda/decode.h"
#include "cuda/flash.h"

namespace fastattn::cuda {
namespace {

// name: how the message calls x (the op's argument name)
#define CHECK_DEVICE_AS(x, name, ref)                                                         \
  TORCH_CHECK((x).is_cuda(), "fastattn::cuda ops run on CUDA tensors, but " name " is on ",   \
              (x).device(), "; use backend='cpu' (or move the inputs with .cuda())");         \
  TORCH_CHECK((x).device() == (ref).device(), "fastattn::cuda: " name " is on ", (x).device(), \
              " but q is on ", (ref).device())
#define CHECK_DEVICE(x, ref) CHECK_DEVICE_AS(x, #x, ref)
#define CHECK_SHAPE_AS(x, name, ...)                                                           \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), "fastattn::cuda: " name " must have " \
              "shape (" #__VA_ARGS__ "), got ", (x).sizes())
#define CHECK_SHAPE(x, ...) CHECK_SHAPE_AS(x, #x, __VA_ARGS__)

// Last dim contiguous, other strides multiples of 8 elements, 16-byte aligned; else a copy.
at::Tensor kernel_layout(const at::Tensor& t) {
  bool ok = t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int i = 0; i < t.dim() - 1 && ok; ++i) ok = t.stride(i) % 8 == 0;
  return ok ? t : t.contiguous();
}

void set_strides(const at::Tensor& t, int64_t& bs, int64_t& hs, int64_t& rs) {
  bs = t.stride(0);
  hs = t.stride(1);
  rs = t.stride(2);
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  CHECK_DEVICE(q, q);
  CHECK_DEVICE(k, q);
  CHECK_DEVICE(v, q);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "fastattn::cuda supports float16 and bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "fastattn::cuda: q, k, v must share a dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "fastattn::cuda: q, k, v must be 4-D (B, H, N, D)");
  const int64_t B = q.size(0), Hkv = k.size(1), Nk = k.size(2), D = q.size(3);
  CHECK_SHAPE(k, B, Hkv, Nk, D);
  CHECK_SHAPE(v, B, Hkv, Nk, D);
  TORCH_CHECK(Hkv > 0 && q.size(1) % Hkv == 0, "fastattn::cuda: query heads (", q.size(1),
              ") must be a multiple of kv heads (", Hkv, ")");
}

// The score modifiers of one call; `slopes` keeps the (B, Hq) float32 copy alive.
struct Mods {
  double softcap = 0, dropout_p = 0;
  int64_t dropout_seed = 0;
  at::Tensor slopes;
};

Mods make_mods(const at::Tensor& q, double softcap, const std::optional<at::Tensor>& alibi,
               double dropout_p, int64_t dropout_seed) {
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0,
              "fastattn::cuda: softcap must be a finite float >= 0 (0 = off), got ", softcap);
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1,
              "fastattn::cuda: dropout_p must lie in [0, 1), got ", dropout_p);
  Mods m;
  m.softcap = softcap;
  m.dropout_p = dropout_p;
  m.dropout_seed = dropout_seed;
  if (alibi.has_value() && alibi->defined()) {
    const at::Tensor& a = *alibi;
    CHECK_DEVICE_AS(a, "alibi_slopes", q);
    const int64_t B = q.size(0), Hq = q.size(1);
    TORCH_CHECK((a.dim() == 1 && a.size(0) == Hq) || (a.dim() == 2 && a.size(0) == B &&
                                                      a.size(1) == Hq),
                "fastattn::cuda: alibi_slopes must have shape (", Hq, ",) or (", B, ", ", Hq,
                "), got ", a.sizes());
    m.slopes = a.to(at::kFloat).expand({B, Hq}).contiguous();
  }
  return m;
}

FlashParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        double scale, int64_t wl, int64_t wr,
                        const std::vector<at::Tensor>& bm, const Mods& mods) {
  FlashParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  set_strides(q, p.q_batch_stride, p.q_head_stride, p.q_row_stride);
  set_strides(k, p.k_batch_stride, p.k_head_stride, p.k_row_stride);
  set_strides(v, p.v_batch_stride, p.v_head_stride, p.v_row_stride);
  p.b = q.size(0);
  p.hq = q.size(1);
  p.hkv = k.size(1);
  p.nq = q.size(2);
  p.nk = k.size(2);
  p.d = q.size(3);
  p.is_bf16 = q.scalar_type() == at::kBFloat16;
  p.window_left = wl;
  p.window_right = wr;
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(mods.softcap);
  p.alibi_slopes = mods.slopes.defined() ? mods.slopes.data_ptr<float>() : nullptr;
  p.dropout_p = static_cast<float>(mods.dropout_p);
  p.dropout_threshold = mods.dropout_p > 0 ? dropout_threshold_24(mods.dropout_p) : 0u;
  p.dropout_seed = static_cast<uint64_t>(mods.dropout_seed);
  p.block_sparse = 0;
  if (!bm.empty()) {
    using namespace fastattn;  // named hand-off: common/block_mask_fields.h
    TORCH_CHECK(bm.size() == kBlockMaskFieldCount, "fastattn::cuda: block_mask must be the ",
                int(kBlockMaskFieldCount), " tensors of BlockMask.kernel_mask().lists, got ", bm.size());
    for (int f = 0; f < kBlockMaskFieldCount; ++f) {
      CHECK_DEVICE_AS(bm[f], "block_mask", q);
      const auto want = f == kPartialMasks ? at::kByte : at::kInt;
      TORCH_CHECK(bm[f].scalar_type() == want && bm[f].is_contiguous() && bm[f].dim() == block_mask_field_rank(f),
                  "fastattn::cuda: block_mask.", kBlockMaskFieldNames[f], " must be a contiguous ",
                  block_mask_field_rank(f), "-D ", want, " tensor");
    }
    p.block_sparse = 1;
    p.kv_num_blocks = bm[kKvNumBlocks].data_ptr<int32_t>();
    p.kv_indices = bm[kKvIndices].data_ptr<int32_t>();
    p.full_kv_num_blocks = bm[kFullKvNumBlocks].data_ptr<int32_t>();
    p.full_kv_indices = bm[kFullKvIndices].data_ptr<int32_t>();
    p.kv_mask_ids = bm[kKvMaskIds].data_ptr<int32_t>();
    p.q_num_blocks = bm[kQNumBlocks].data_ptr<int32_t>();
    p.q_indices = bm[kQIndices].data_ptr<int32_t>();
    p.full_q_num_blocks = bm[kFullQNumBlocks].data_ptr<int32_t>();
    p.full_q_indices = bm[kFullQIndices].data_ptr<int32_t>();
    p.q_mask_ids = bm[kQMaskIds].data_ptr<int32_t>();
    p.partial_masks = bm[kPartialMasks].numel() ? bm[kPartialMasks].data_ptr<uint8_t>() : nullptr;
    p.mask_b = bm[kKvNumBlocks].size(0);
    p.mask_h = bm[kKvNumBlocks].size(1);
    p.nqb = bm[kKvNumBlocks].size(2);
    p.nkb = bm[kQNumBlocks].size(2);
    p.kmax = bm[kKvIndices].size(3);
    p.kmax_full = bm[kFullKvIndices].size(3);
    p.qmax = bm[kQIndices].size(3);
    p.qmax_full = bm[kFullQIndices].size(3);
    p.mask_block_m = bm[kPartialMasks].size(1);
    p.mask_block_n = bm[kPartialMasks].size(2);
  }
  return p;
}

std::tuple<at::Tensor, at::Tensor> cuda_fwd(const at::Tensor& q_, const at::Tensor& k_,
                                            const at::Tensor& v_, double scale, int64_t wl,
                                            int64_t wr, std::vector<at::Tensor> bm,
                                            double softcap,
                                            const std::optional<at::Tensor>& alibi_slopes,
                                            double dropout_p, int64_t dropout_seed,
                                            bool deterministic) {
  (void)deterministic;  // a backward option: in the schema so that autograd sees it
  check_qkv(q_, k_, v_);
  const Mods mods = make_mods(q_, softcap, alibi_slopes, dropout_p, dropout_seed);
  const at::Tensor q = kernel_layout(q_), k = kernel_layout(k_), v = kernel_layout(v_);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0 || k.size(2) == 0) {
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  FlashParams p = make_params(q, k, v, scale, wl, wr, bm, mods);
  p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  set_strides(out, p.o_batch_stride, p.o_head_stride, p.o_row_stride);
  const char* why = check_params(p, false);
  TORCH_CHECK(why == nullptr, "fastattn::cuda_fwd: ", why);
  run_fwd(p, c10::cuda::getCurrentCUDAStream().stream());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_bwd(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, double scale, int64_t wl, int64_t wr,
    std::vector<at::Tensor> bm, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    double dropout_p, int64_t dropout_seed, const std::optional<at::Tensor>& dlse_,
    bool deterministic) {
  check_qkv(q_, k_, v_);
  const Mods mods = make_mods(q_, softcap, alibi_slopes, dropout_p, dropout_seed);
  CHECK_DEVICE_AS(dout_, "dout", q_);
  CHECK_DEVICE_AS(out_, "out", q_);
  CHECK_DEVICE_AS(lse_, "lse", q_);
  CHECK_SHAPE_AS(out_, "out", q_.size(0), q_.size(1), q_.size(2), q_.size(3));
  CHECK_SHAPE_AS(dout_, "dout", q_.size(0), q_.size(1), q_.size(2), q_.size(3));
  CHECK_SHAPE_AS(lse_, "lse", q_.size(0), q_.size(1), q_.size(2));
  const at::Tensor q = kernel_layout(q_), k = kernel_layout(k_), v = kernel_layout(v_);
  const at::Tensor out = kernel_layout(out_), dout = kernel_layout(dout_.to(q.scalar_type()));
  const at::Tensor lse = lse_.to(at::kFloat).contiguous();
  at::Tensor dlse;
  if (dlse_.has_value() && dlse_->defined()) {
    CHECK_DEVICE_AS(*dlse_, "dlse", q_);
    CHECK_SHAPE_AS(*dlse_, "dlse", q_.size(0), q_.size(1), q_.size(2));
    dlse = dlse_->to(at::kFloat).contiguous();
  }
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  FlashParams p = make_params(q, k, v, scale, wl, wr, bm, mods);
  p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.dout = dout.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.delta = delta.data_ptr<float>();
  p.dlse = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  // deterministic=False: the FlashAttention-2 class backward, dQ accumulated in float32 with
  // atomics (zeroed by its preprocess kernel).
  at::Tensor dq_accum;
  if (!deterministic) {
    dq_accum = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options().dtype(at::kFloat));
    p.dq_accum = dq_accum.data_ptr<float>();
    p.atomic_dq = 1;
  }
  set_strides(out, p.o_batch_stride, p.o_head_stride, p.o_row_stride);
  set_strides(dout, p.do_batch_stride, p.do_head_stride, p.do_row_stride);
  set_strides(dq, p.dq_batch_stride, p.dq_head_stride, p.dq_row_stride);
  set_strides(dk, p.dk_batch_stride, p.dk_head_stride, p.dk_row_stride);
  set_strides(dv, p.dv_batch_stride, p.dv_head_stride, p.dv_row_stride);
  const char* why = check_params(p, true);
  TORCH_CHECK(why == nullptr, "fastattn::cuda_bwd: ", why);
  run_bwd(p, c10::cuda::getCurrentCUDAStream().stream());
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> cuda_decode(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const std::optional<at::Tensor>& cache_seqlens, double scale, int64_t wl, int64_t wr,
    double softcap, const std::optional<at::Tensor>& alibi_slopes, int64_t num_splits,
    int64_t max_len) {
  CHECK_DEVICE_AS(q_, "q", q_);
  CHECK_DEVICE_AS(k_, "k_cache", q_);
  CHECK_DEVICE_AS(v_, "v_cache", q_);
  TORCH_CHECK(q_.scalar_type() == at::kHalf || q_.scalar_type() == at::kBFloat16,
              "fastattn::cuda_decode supports float16 and bfloat16, got ", q_.scalar_type());
  TORCH_CHECK(k_.scalar_type() == q_.scalar_type() && v_.scalar_type() == q_.scalar_type(),
              "fastattn::cuda_decode: q, k_cache, v_cache must share a dtype");
  TORCH_CHECK(q_.dim() == 4 && k_.dim() == 4 && v_.dim() == 4,
              "fastattn::cuda_decode: q, k_cache, v_cache must be 4-D (B, H, N, D)");
  const int64_t B = q_.size(0), Hq = q_.size(1), Nq = q_.size(2), D = q_.size(3);
  const int64_t Hkv = k_.size(1), Ncache = k_.size(2), Dv = v_.size(3);
  CHECK_SHAPE_AS(k_, "k_cache", B, Hkv, Ncache, D);
  CHECK_SHAPE_AS(v_, "v_cache", B, Hkv, Ncache, Dv);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "fastattn::cuda_decode: query heads (", Hq,
              ") must be a multiple of kv heads (", Hkv, ")");
  const Mods mods = make_mods(q_, softcap, alibi_slopes, 0.0, 0);
  // the kernels index the last dim directly: make it contiguous, other strides are free
  const at::Tensor q = q_.stride(3) == 1 ? q_ : q_.contiguous();
  const at::Tensor k = k_.stride(3) == 1 ? k_ : k_.contiguous();
  const at::Tensor v = v_.stride(3) == 1 ? v_ : v_.contiguous();
  at::Tensor seqlens;
  if (cache_seqlens.has_value() && cache_seqlens->defined()) {
    CHECK_DEVICE_AS(*cache_seqlens, "cache_seqlens", q_);
    CHECK_SHAPE_AS(*cache_seqlens, "cache_seqlens", B);
    seqlens = cache_seqlens->to(at::kInt).contiguous();
  }
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({B, Hq, Nq, Dv}, q.options());
  at::Tensor lse = at::empty({B, Hq, Nq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 || Ncache == 0 || max_len <= 0) {
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  DecodeParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.cache_seqlens = seqlens.defined() ? seqlens.data_ptr<int32_t>() : nullptr;
  p.alibi_slopes = mods.slopes.defined() ? mods.slopes.data_ptr<float>() : nullptr;
  set_strides(q, p.q_batch_stride, p.q_head_stride, p.q_row_stride);
  set_strides(k, p.k_batch_stride, p.k_head_stride, p.k_row_stride);
  set_strides(v, p.v_batch_stride, p.v_head_stride, p.v_row_stride);
  set_strides(out, p.o_batch_stride, p.o_head_stride, p.o_row_stride);
  p.b = B;
  p.hq = Hq;
  p.hkv = Hkv;
  p.nq = Nq;
  p.ncache = Ncache;
  p.d = D;
  p.dv = Dv;
  p.is_bf16 = q.scalar_type() == at::kBFloat16;
  p.window_left = wl;
  p.window_right = wr;
  p.num_splits = num_splits < 1 ? 1 : num_splits;
  p.max_len = max_len < Ncache ? max_len : Ncache;
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(mods.softcap);
  at::Tensor o_part, lse_part;
  if (p.num_splits > 1) {  // float32 partials (B * Hkv, S, R, Dv) and their log2-sum-exp
    const int64_t R = (Hq / Hkv) * Nq;
    o_part = at::empty({B * Hkv, p.num_splits, R, Dv}, q.options().dtype(at::kFloat));
    lse_part = at::empty({B * Hkv, p.num_splits, R}, q.options().dtype(at::kFloat));
    p.o_part = o_part.data_ptr<float>();
    p.lse_part = lse_part.data_ptr<float>();
  }
  const char* why = check_decode_params(p);
  TORCH_CHECK(why == nullptr, "fastattn::cuda_decode: ", why);
  run_decode(p, c10::cuda::getCurrentCUDAStream().stream());
  return {out, lse};
}

}  // namespace
}  // namespace fastattn::cuda

// FRAGMENT: several extensions (fastattn._C, fastattn._cuda) add ops to the fastattn namespace.
TORCH_LIBRARY_FRAGMENT(fastattn, m) {
  m.def("cuda_fwd(Tensor q, Tensor k, Tensor v, float scale, int window_left, int window_right, "
        "Tensor[] block_mask, float softcap=0., Tensor? alibi_slopes=None, float dropout_p=0., "
        "int dropout_seed=0, bool deterministic=True) -> (Tensor, Tensor)");
  m.def("cuda_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "float scale, int window_left, int window_right, Tensor[] block_mask, "
        "float softcap=0., Tensor? alibi_slopes=None, float dropout_p=0., int dropout_seed=0, "
        "Tensor? dlse=None, bool deterministic=True) -> (Tensor, Tensor, Tensor)");
  m.def("cuda_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? cache_seqlens, "
        "float scale, int window_left, int window_right, float softcap, Tensor? alibi_slopes, "
        "int num_splits, int max_len) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("cuda_fwd", &fastattn::cuda::cuda_fwd);
  m.impl("cuda_bwd", &fastattn::cuda::cuda_bwd);
  m.impl("cuda_decode", &fastattn::cuda::cuda_decode);
}

// On CPU tensors the same functions run only their device checks, which fail with a message
// naming the CPU backend (rather than the dispatcher's "could not run ... with 'CPU' backend").
TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("cuda_fwd", &fastattn::cuda::cuda_fwd);
  m.impl("cuda_bwd", &fastattn::cuda::cuda_bwd);
  m.impl("cuda_decode", &fastattn::cuda::cuda_decode);
}

// A Python module named fastattn._cuda; importing it runs the registrations above.
static struct PyModuleDef fastattn_cuda_module = {PyModuleDef_HEAD_INIT, "_cuda",
                                                  "fastattn CUDA kernels (torch.ops.fastattn.cuda_*)",
                                                  -1, nullptr};
PyMODINIT_FUNC PyInit__cuda(void) { return PyModule_Create(&fastattn_cuda_module); }
