// Fused attention on the CPU: declarations shared by the kernels and the bindings.
//
// Shapes: q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), Hq % Hkv == 0.
// window = (left, right), bottom-right aligned, -1 = unbounded (causal = (-1, 0)).
// block_mask: empty (dense/window) or the named lists of common/block_mask_fields.h.
// mods: softcap / ALiBi / dropout (score_mods.h); default = none.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "cpu/kernel_args.h"
#include "cpu/tiles.h"

namespace fastattn::cpu {

// Returns out (B, Hq, Nq, Dv) in q's dtype and lse (B, Hq, Nq) float32 (natural log).
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 double scale, int64_t window_left, int64_t window_right,
                                                 const std::vector<at::Tensor>& block_mask,
                                                 const ScoreMods& mods = ScoreMods());

// Gradients of the forward above; dlse (optional) is the gradient flowing into lse.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& dlse, double scale, int64_t window_left,
    int64_t window_right, const std::vector<at::Tensor>& block_mask, const ScoreMods& mods = ScoreMods());

}  // namespace fastattn::cpu
