// Split-KV decoding attention (flash-decoding) of the CUDA family: the parameter struct and the
// entry point. Pure C++ (no CUDA, no torch headers): the torch binding (csrc/bindings/cuda_ops.cpp)
// and the CPU emulation tests (tests/cuda_emu) both fill it.
//
// Layouts: q (B, Hq, Nq, d), k_cache (B, Hkv, Ncache, d), v_cache (B, Hkv, Ncache, dv), out
// (B, Hq, Nq, dv); last dim contiguous, other strides free (elements). lse (B, Hq, Nq) float32
// contiguous, natural log. Row b of the caches holds L_b = cache_seqlens[b] valid tokens (all
// Ncache when cache_seqlens is null); rows >= L_b are never read. The Nq queries are the last Nq
// of those tokens (fastattn/decode.py): query i sits at position L_b - Nq + i and sees key j iff
//     j < L_b  &&  (window_right < 0 || j <= L_b - Nq + i + window_right)
//              &&  (window_left  < 0 || j >= L_b - Nq + i - window_left)
// Score modifiers as fastattn.score_mods: s = scale q.k; softcap > 0: s = softcap tanh(s / softcap);
// alibi_slopes (B, Hq) float32: s -= slope * |L_b - Nq + i - j|.
//
// Work split: the cache is cut into num_splits chunks of `chunk` keys; one CTA per (chunk, batch,
// kv head, row tile) runs the online softmax of up to kRows of the R = (Hq / Hkv) * Nq query rows
// of that kv head's GQA group (row r = (h % G) * Nq + i) and writes a partial output o_part
// (B * Hkv, S, R, dv) float32 and its log2-sum-exp lse_part (B * Hkv, S, R); a combine kernel
// merges the S partials of each row. With num_splits == 1 the split kernel writes out/lse itself
// and the workspace may be null.
#pragma once

#include <cstdint>

namespace fastattn::cuda {

struct DecodeParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;
  float* o_part;    // workspace (B * Hkv, S, R, dv) float32, null when num_splits == 1
  float* lse_part;  // workspace (B * Hkv, S, R) float32, log2 units
  const int32_t* cache_seqlens;  // (B,) or null (every row holds Ncache tokens)
  const float* alibi_slopes;     // (B, Hq) contiguous float32, or null

  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t o_batch_stride, o_head_stride, o_row_stride;

  int64_t b, hq, hkv, nq, ncache, d, dv;
  int64_t is_bf16;
  int64_t window_left, window_right;  // -1 = unbounded
  int64_t num_splits;                 // S >= 1
  int64_t max_len;                    // max_b L_b (<= ncache): the chunks cover [0, max_len)
  int64_t chunk;                      // keys per split; run_decode sets it

  float scale;
  float softcap;  // 0 = off
};

// Head dims the decode kernels are compiled for (d, dv padded up to 64 or 128).
constexpr int64_t kDecodeMaxHeadDim = 128;
// Keys a CTA consumes per step (4 warps x 4 keys): chunks are multiples of it.
constexpr int64_t kDecodeKeyStep = 16;

// Keys per split for a cache of max_len tokens cut into num_splits chunks.
inline int64_t decode_chunk(int64_t max_len, int64_t num_splits) {
  const int64_t steps = (max_len + kDecodeKeyStep - 1) / kDecodeKeyStep;
  const int64_t per = (steps + num_splits - 1) / num_splits;
  return (per < 1 ? 1 : per) * kDecodeKeyStep;
}

// Query rows one CTA holds (the row tile), per padded head dim: see decode_kernel.h.
inline int64_t decode_rows_per_cta(int64_t d, int64_t dv) {
  return (d > 64 || dv > 64) ? 8 : 16;
}

// nullptr when run_decode can run p, else the reason (a static string).
const char* check_decode_params(const DecodeParams& p);

// Writes o and lse (and the workspace when num_splits > 1). Throws std::invalid_argument on bad
// params, std::runtime_error on a launch error.
void run_decode(DecodeParams& p, void* stream);

}  // namespace fastattn::cuda
