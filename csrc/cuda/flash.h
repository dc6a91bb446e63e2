// The plain parameter struct of fastattn's CUDA kernels and the two entry points.
// Pure C++ (no CUDA, no torch headers): the torch binding (csrc/bindings/cuda_ops.cpp) and the
// CPU emulation tests (tests/cuda_emu) both fill it.
//
// Layouts: q (B, Hq, Nq, d), k/v (B, Hkv, Nk, d), o/dout/dq like q, dk/dv like k; the last dim
// is contiguous, the other strides are free (in elements, multiples of 8, base pointers 16-byte
// aligned: the kernels move 16-byte vectors). lse and delta are contiguous (B, Hq, Nq) float32.
// GQA: query head h reads kv head h / (Hq / Hkv).
//
// Score modifiers (python_pkg/fastattn/score_mods.py defines them; the kernels implement the same
// formulas). For query i and key j, with s = scale * q_i . k_j:
//     s = softcap * tanh(s / softcap)               if softcap > 0
//     s = s - alibi_slopes[b, h] * |i + off - j|    if alibi_slopes != nullptr ((B, Hq) float32)
//     P = exp(s - lse) (lse of these undropped logits), out_i = sum_j P_ij keep_ij / (1-p) v_j
// with keep_ij = (hash(seed, (b * Hq + h) * Nq + i, j) >> 8) >= dropout_threshold when
// dropout_p > 0 (dropout_hash() in kernel_utils.h). The backward regenerates keep from the seed.
//
// Masking, bottom-right aligned with off = Nk - Nq (fastattn/masking.py): query i sees key j iff
//     (window_left  < 0 || j >= i + off - window_left) &&
//     (window_right < 0 || j <= i + off + window_right)
// Dense calls (block_sparse == 0) apply that rule everywhere. Block-sparse calls
// (block_sparse == 1) visit only the blocks a fastattn.sparse.BlockMask lists and apply the rule
// (and the mask's bitmasks) inside its PARTIAL blocks only; the window is then the mask's own
// token rule. List format: fastattn/sparse/block_mask.py.
#pragma once

#include <cmath>
#include <cstdint>

namespace fastattn::cuda {

struct FlashParams {
  // Tensors.
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;  // (B, Hq, Nq), natural log; -inf for rows that see no key
  const void* dout;
  void* dq;
  void* dk;
  void* dv;
  float* delta;  // (B, Hq, Nq) workspace of the backward pass: rowsum(dout * o)

  // Strides in elements (batch, head, row).
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t o_batch_stride, o_head_stride, o_row_stride;
  int64_t do_batch_stride, do_head_stride, do_row_stride;
  int64_t dq_batch_stride, dq_head_stride, dq_row_stride;
  int64_t dk_batch_stride, dk_head_stride, dk_row_stride;
  int64_t dv_batch_stride, dv_head_stride, dv_row_stride;

  // Sizes.
  int64_t b, hq, hkv, nq, nk, d;
  int64_t is_bf16;  // 0: float16, 1: bfloat16
  int64_t window_left, window_right;  // -1 = unbounded

  // Block-sparse lists (BlockMask.kernel_tensors(), int32 contiguous; unused when dense).
  int64_t block_sparse;
  const int32_t* kv_num_blocks;       // (Bm, Hm, NQB)
  const int32_t* kv_indices;          // (Bm, Hm, NQB, kmax)
  const int32_t* full_kv_num_blocks;  // (Bm, Hm, NQB)
  const int32_t* full_kv_indices;     // (Bm, Hm, NQB, kmax_full)
  const int32_t* kv_mask_ids;         // (Bm, Hm, NQB, kmax)
  const int32_t* q_num_blocks;        // (Bm, Hm, NKB)
  const int32_t* q_indices;           // (Bm, Hm, NKB, qmax)
  const int32_t* full_q_num_blocks;   // (Bm, Hm, NKB)
  const int32_t* full_q_indices;      // (Bm, Hm, NKB, qmax_full)
  const int32_t* q_mask_ids;          // (Bm, Hm, NKB, qmax)
  const uint8_t* partial_masks;       // (P, mask_block_m, mask_block_n), 0/1
  int64_t mask_b, mask_h;             // Bm in {1, B}, Hm in {1, Hq}
  int64_t nqb, nkb, kmax, kmax_full, qmax, qmax_full;
  int64_t mask_block_m, mask_block_n;

  // Softmax scale (usually d ** -0.5).
  float scale;
  // Score modifiers (see the top of this file); 0 / nullptr = off. No implicit padding in
  // this tail either: the struct is mirrored field by field by ctypes in the tests.
  float softcap;
  const float* alibi_slopes;   // (B, Hq) contiguous float32, or nullptr
  uint64_t dropout_seed;       // low 32 bits: seed_lo, high 32 bits: seed_hi
  uint32_t dropout_threshold;  // dropout_threshold_24(dropout_p)
  float dropout_p;             // in [0, 1); > 0 turns dropout on

  // Backward only: the gradient of lse, (B, Hq, Nq) contiguous float32, or nullptr (zero).
  // d lse_i / d s_ij = P_ij, so it enters as delta_i -= dlse_i (FlashAttention's trick).
  const float* dlse;

  // Backward only: 1 selects the FlashAttention-2 class backward (fa2_bwd_kernel.h), which adds
  // dQ into dq_accum ((B, Hq, Nq, d) contiguous float32 workspace) with floating-point atomics
  // (not bitwise reproducible: deterministic=False); 0 the atomic-free backward.
  float* dq_accum;
  int64_t atomic_dq;
};

// score_mods.dropout_threshold: round(p * 2^24), ties to even (Python's round) — nearbyint in
// the default rounding mode. A pair is dropped iff its 24-bit hash is below it.
inline uint32_t dropout_threshold_24(double p) {
  const double t = std::nearbyint(p * 16777216.0);
  return t <= 0 ? 0u : (t >= 16777216.0 ? 16777216u : static_cast<uint32_t>(t));
}

// Head dims the kernels are compiled for (d % 8 == 0, padded up to the next one): the FA2 class
// forward and atomic-dQ backward (atomic_dq = 1) for 32, 64, 96, 128, 192, 256; the wmma kernels
// (the deterministic backward, the forward of block masks with BLOCK_M = 64) for 64 and 128.
constexpr int64_t kMaxHeadDim = 128;     // wmma kernels: the deterministic backward stops here
constexpr int64_t kMaxHeadDimFwd = 256;  // FA2 class kernels, forward and atomic backward
// Block-sparse calls need mask blocks that are multiples of every kernel tile (see
// kernel_traits.h): BLOCK_M and BLOCK_N multiples of 64.
constexpr int64_t kMaskBlockMultiple = 64;

// Returns nullptr when the kernels can run p, else the reason (a static string).
const char* check_params(const FlashParams& p, bool backward);

// Forward: writes o and lse. Throws std::runtime_error on bad params or a launch error.
void run_fwd(FlashParams& p, void* stream);
// Backward: reads q, k, v, o, lse, dout (and dlse if set); writes delta, dq, dk, dv.
void run_bwd(FlashParams& p, void* stream);

}  // namespace fastattn::cuda
