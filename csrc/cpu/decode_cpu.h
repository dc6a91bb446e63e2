// Split-KV decoding attention on the CPU (flash-decoding): a few new queries against a
// long KV cache, with per-sequence cache lengths.
//
// Shapes: q (B, Hq, Nq, D), k_cache (B, Hkv, Ncache, D), v_cache (B, Hkv, Ncache, Dv),
// Hq % Hkv == 0; cache_seqlens (B,) int32/int64 or empty = every row uses Ncache.
// Row b holds L_b = cache_seqlens[b] valid keys; the Nq queries are the LAST Nq tokens of
// those L_b (bottom-right aligned): with p = L_b - Nq + i, query i sees key j iff
//     j < L_b  and  (window_right == -1 or j <= p + window_right)
//              and  (window_left == -1 or j >= p - window_left)
// (window_right = 0 is causal). Scores take softcap and ALiBi (-slope * |p - j|) as in
// score_mods.h; ALiBi is relative to each row's own length L_b, as FlashAttention's KV cache.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "cpu/kernel_args.h"

namespace fastattn::cpu {

// Returns out (B, Hq, Nq, Dv) in q's dtype and lse (B, Hq, Nq) float32 (natural log;
// -inf and out = 0 for a query that sees no key). num_splits <= 0 picks a split count.
std::tuple<at::Tensor, at::Tensor> decode_fwd(const at::Tensor& q, const at::Tensor& k_cache,
                                              const at::Tensor& v_cache, const c10::optional<at::Tensor>& cache_seqlens,
                                              double scale, int64_t window_left, int64_t num_splits,
                                              int64_t window_right = 0, const ScoreMods& mods = ScoreMods());

// The split count decode_fwd uses for num_splits <= 0 (independent of the thread count).
int64_t decode_default_splits(int64_t batch, int64_t kv_heads, int64_t max_len);

}  // namespace fastattn::cpu
