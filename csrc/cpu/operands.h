// Float32 operand layouts the CPU drivers build for the kernels (kernel_args.h lists them).
// Baseline code only: uses ATen's own (runtime-dispatched) copies and conversions.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>

#include "cpu/kernel_args.h"

namespace fastattn::cpu {

inline int64_t pad_to(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Operand buffers the drivers reuse across calls: one set per calling thread, each slot kept
// while it is at most kWorkspaceCap bytes and the thread's slots together at most
// kWorkspaceTotalCap (release_workspace() frees the calling thread's set). A fresh multi-MB tensor pays a page fault per
// 4 KiB on first touch (about 0.4 ms per MB on the development host): at N=16384, H=8 the
// float32 K^T panels alone (32 MB) cost as much as a sliding-window forward's arithmetic.
// A slot's tensor is only used within one call on its thread (the kernels finish before the
// driver returns, and nothing returned to the caller lives in a slot). Larger operands are
// allocated per call as before.
constexpr int64_t kWorkspaceCap = int64_t{64} << 20;
constexpr int64_t kWorkspaceTotalCap = int64_t{128} << 20;
enum Slot : int { kSlotKt = 0, kSlotK, kSlotV, kSlotVt, kSlotQ, kSlotQs, kSlotDo, kSlotDoT, kNumSlots };

inline std::array<at::Tensor, kNumSlots>& workspace_slots() {
  thread_local std::array<at::Tensor, kNumSlots> slots;
  return slots;
}

inline void release_workspace() {
  for (auto& t : workspace_slots()) t.reset();
}

inline at::Tensor workspace(int slot, at::IntArrayRef shape, const at::TensorOptions& opt) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(opt.dtype().toScalarType()));
  if (slot < 0 || bytes > kWorkspaceCap) return at::empty(shape, opt);
  auto& slots = workspace_slots();
  at::Tensor& w = slots[slot];
  if (!w.defined() || w.numel() < bytes) {
    int64_t others = 0;
    for (int s = 0; s < kNumSlots; ++s)
      if (s != slot && slots[s].defined()) others += slots[s].numel();
    w.reset();
    if (others + bytes > kWorkspaceTotalCap) return at::empty(shape, opt);  // over the total: not kept
    w = at::empty({std::max<int64_t>(bytes, 64)}, opt.dtype(at::kByte));
  }
  return w.narrow(0, 0, bytes).view(opt.dtype().toScalarType()).view(shape);
}

// Zeroes out[..., rows_used:, :] and out[..., :, cols_used:] of a (B, H, rows, cols) tensor.
inline void zero_pad(at::Tensor& out, int64_t rows_used, int64_t cols_used) {
  if (out.size(2) > rows_used) out.narrow(2, rows_used, out.size(2) - rows_used).zero_();
  if (out.size(3) > cols_used) out.narrow(3, cols_used, out.size(3) - cols_used).zero_();
}

// x (B, H, N, C) any float dtype/strides -> dtype (B, H, rows, cols), zero-padded; in
// workspace slot `slot` (or a fresh tensor for slot -1).
inline at::Tensor padded_as(const at::Tensor& x, int64_t rows, int64_t cols, at::ScalarType dt, int slot = -1,
                            double mul = 1.0) {
  at::Tensor out = workspace(slot, {x.size(0), x.size(1), rows, cols}, x.options().dtype(dt));
  auto dst = out.narrow(2, 0, x.size(2)).narrow(3, 0, x.size(3));
  if (mul == 1.0) dst.copy_(x);
  else dst.copy_(x.to(at::kFloat).mul(mul));
  zero_pad(out, x.size(2), x.size(3));
  return out;
}

inline at::Tensor padded_f32(const at::Tensor& x, int64_t rows, int64_t cols, double mul = 1.0, int slot = -1) {
  return padded_as(x, rows, cols, at::kFloat, slot, mul);
}

// x (B, H, N, C) -> per key tile transposed panels (B, H, NKB, C, BNp), zero-padded:
// panel t holds x[t*BN : (t+1)*BN]^T, so S = Q K^T reads unit-stride rows of keys.
// One pass over x (converting to float32 on the way); only padding is zeroed.
inline at::Tensor key_panels(const at::Tensor& x, int64_t NKB, int64_t BN, int64_t BNp, int slot = -1) {
  const int64_t B = x.size(0), H = x.size(1), N = x.size(2), C = x.size(3);
  at::Tensor out = workspace(slot, {B, H, NKB, C, BNp}, x.options().dtype(at::kFloat));
  const int64_t full = N / BN, rem = N - full * BN;
  if (full > 0)
    out.narrow(2, 0, full).narrow(4, 0, BN).copy_(x.narrow(2, 0, full * BN).reshape({B, H, full, BN, C}).transpose(3, 4));
  if (BNp > BN) out.narrow(4, BN, BNp - BN).zero_();
  if (rem > 0) {
    at::Tensor last = out.select(2, NKB - 1);  // (B, H, C, BNp)
    last.zero_();
    last.narrow(3, 0, rem).copy_(x.narrow(2, full * BN, rem).transpose(2, 3));
  }
  return out;
}

// ---- bfloat16 paired layouts (kernel_args.h) for the bf16 dot-product kernels

// x (B, H, N, C) -> (B, H, rows/2, cols, 2) bfloat16: pairs of consecutive rows (rows even).
inline at::Tensor row_pairs_bf16(const at::Tensor& x, int64_t rows, int64_t cols, int slot = -1) {
  const int64_t B = x.size(0), H = x.size(1);
  at::Tensor out = workspace(slot, {B, H, rows / 2, cols, 2}, x.options().dtype(at::kBFloat16));
  out.copy_(padded_as(x, rows, cols, at::kBFloat16).view({B, H, rows / 2, 2, cols}).transpose(3, 4));
  return out;
}

// x (B, H, N, C) -> (B, H, NKB, Cp/2, BNp, 2) bfloat16: per key tile, x^T with pairs of C.
inline at::Tensor key_panels_paired_bf16(const at::Tensor& x, int64_t NKB, int64_t BN, int64_t BNp, int64_t Cp,
                                         int slot = -1) {
  const int64_t B = x.size(0), H = x.size(1);
  at::Tensor t = at::zeros({B, H, NKB, BNp, Cp}, x.options().dtype(at::kBFloat16));
  t.narrow(3, 0, BN).copy_(padded_as(x, NKB * BN, Cp, at::kBFloat16).view({B, H, NKB, BN, Cp}));
  at::Tensor out = workspace(slot, {B, H, NKB, Cp / 2, BNp, 2}, x.options().dtype(at::kBFloat16));
  out.copy_(t.view({B, H, NKB, BNp, Cp / 2, 2}).permute({0, 1, 2, 4, 3, 5}));
  return out;
}

// x (B, H, N, C) -> (B, H, Cp, round_up(N, 2)) bfloat16: x^T rows, zero-padded.
inline at::Tensor transposed_bf16(const at::Tensor& x, int64_t Cp, int slot = -1) {
  const int64_t NE = pad_to(x.size(2), 2);
  at::Tensor out = workspace(slot, {x.size(0), x.size(1), Cp, NE}, x.options().dtype(at::kBFloat16));
  out.copy_(padded_as(x, NE, Cp, at::kBFloat16).transpose(2, 3));
  return out;
}

inline const uint16_t* u16(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }

// The bfloat16 dot-product kernels serve a call when the variant has them, q, k and v are
// all bfloat16 and tiles have even sizes (a key or query pair never straddles two tiles or
// slices; a tile's odd last key pairs with zero padding). Forward and backward decide alike,
// so both compute the same S.
inline bool use_bf16_dot(const KernelTable& kern, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         int64_t BM, int64_t BN) {
  return kern.bf16_dot && q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
         v.scalar_type() == at::kBFloat16 && BM % 2 == 0 && BN % 2 == 0;
}

inline Elem elem_of(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? Elem::kF32 : (t.scalar_type() == at::kBFloat16 ? Elem::kBF16 : Elem::kF16);
}

inline Shape make_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t BM, int64_t BN,
                        int64_t left, int64_t right) {
  Shape s;
  s.B = q.size(0);
  s.Hq = q.size(1);
  s.Nq = q.size(2);
  s.D = q.size(3);
  s.Hkv = k.size(1);
  s.Nk = k.size(2);
  s.Dv = v.size(3);
  s.Dp = pad_to(s.D, kPad);
  s.Dvp = pad_to(s.Dv, kPad);
  s.BM = BM;
  s.BN = BN;
  s.BNp = pad_to(BN, kPad);
  s.NKB = (s.Nk + BN - 1) / BN;
  s.left = left;
  s.right = right;
  return s;
}

// 64-byte aligned per-thread scratch.
struct Scratch {
  std::vector<float> buf;
  float* ptr;
  explicit Scratch(int64_t floats) : buf(floats + 16) {
    auto p = reinterpret_cast<uintptr_t>(buf.data());
    ptr = reinterpret_cast<float*>((p + 63) & ~uintptr_t(63));
  }
};

}  // namespace fastattn::cpu
