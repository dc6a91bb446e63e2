// Float32 operand layouts the CPU drivers build for the kernels (kernel_args.h lists them).
// Baseline code only: uses ATen's own (runtime-dispatched) copies and conversions.
#pragma once

#include <ATen/ATen.h>

#include "cpu/kernel_args.h"

namespace fastattn::cpu {

inline int64_t pad_to(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// x (B, H, N, C) any float dtype/strides -> float32 (B, H, rows, cols), zero-padded.
inline at::Tensor padded_f32(const at::Tensor& x, int64_t rows, int64_t cols, double mul = 1.0) {
  at::Tensor out = at::zeros({x.size(0), x.size(1), rows, cols}, x.options().dtype(at::kFloat));
  auto dst = out.narrow(2, 0, x.size(2)).narrow(3, 0, x.size(3));
  if (mul == 1.0) dst.copy_(x);
  else dst.copy_(x.to(at::kFloat).mul(mul));
  return out;
}

// x (B, H, N, C) -> per key tile transposed panels (B, H, NKB, C, BNp), zero-padded:
// panel t holds x[t*BN : (t+1)*BN]^T, so S = Q K^T reads unit-stride rows of keys.
// One pass over x (converting to float32 on the way); only padding is zeroed.
inline at::Tensor key_panels(const at::Tensor& x, int64_t NKB, int64_t BN, int64_t BNp) {
  const int64_t B = x.size(0), H = x.size(1), N = x.size(2), C = x.size(3);
  at::Tensor out = at::empty({B, H, NKB, C, BNp}, x.options().dtype(at::kFloat));
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

// x (B, H, N, C) -> dtype (B, H, rows, cols), zero-padded.
inline at::Tensor padded_as(const at::Tensor& x, int64_t rows, int64_t cols, at::ScalarType dt) {
  at::Tensor out = at::zeros({x.size(0), x.size(1), rows, cols}, x.options().dtype(dt));
  out.narrow(2, 0, x.size(2)).narrow(3, 0, x.size(3)).copy_(x);
  return out;
}

// x (B, H, N, C) -> (B, H, rows/2, cols, 2) bfloat16: pairs of consecutive rows (rows even).
inline at::Tensor row_pairs_bf16(const at::Tensor& x, int64_t rows, int64_t cols) {
  const int64_t B = x.size(0), H = x.size(1);
  return padded_as(x, rows, cols, at::kBFloat16).view({B, H, rows / 2, 2, cols}).transpose(3, 4).contiguous();
}

// x (B, H, N, C) -> (B, H, NKB, Cp/2, BNp, 2) bfloat16: per key tile, x^T with pairs of C.
inline at::Tensor key_panels_paired_bf16(const at::Tensor& x, int64_t NKB, int64_t BN, int64_t BNp, int64_t Cp) {
  const int64_t B = x.size(0), H = x.size(1);
  at::Tensor t = at::zeros({B, H, NKB, BNp, Cp}, x.options().dtype(at::kBFloat16));
  t.narrow(3, 0, BN).copy_(padded_as(x, NKB * BN, Cp, at::kBFloat16).view({B, H, NKB, BN, Cp}));
  return t.view({B, H, NKB, BNp, Cp / 2, 2}).permute({0, 1, 2, 4, 3, 5}).contiguous();
}

// x (B, H, N, C) -> (B, H, Cp, round_up(N, 2)) bfloat16: x^T rows, zero-padded.
inline at::Tensor transposed_bf16(const at::Tensor& x, int64_t Cp) {
  return padded_as(x, pad_to(x.size(2), 2), Cp, at::kBFloat16).transpose(2, 3).contiguous();
}

// The bfloat16 dot-product kernels serve a call when the variant has them, q, k and v are
// all bfloat16 and tiles have even sizes (a key or query pair never straddles two tiles or
// slices; a tile's odd last key pairs with zero padding). Forward and backward decide alike,
// so both compute the same S.
inline bool use_bf16_dot(const KernelTable& kern, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         int64_t BM, int64_t BN) {
  return kern.bf16_dot && q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
         v.scalar_type() == at::kBFloat16 && BM % 2 == 0 && BN % 2 == 0;
}

inline const uint16_t* u16(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }

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
