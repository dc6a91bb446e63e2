// The inline PTX of fastattn's FlashAttention-2 class kernels, in one place: tensor-core
// mma.sync m16n8k16 (fp16/bf16 -> fp32), ldmatrix x1/x2/x4 (+trans), cp.async 16 B with
// commit/wait groups, the ld/st.shared the kernels use, and warp shuffles.
//
// Under nvcc these are the PTX instructions. Under the CPU emulation layer (tests/cuda_emu,
// FASTATTN_CUDA_EMU) the same names run cuda_emu::ptx, which executes them warp-collectively
// with the PTX ISA's per-lane fragment layouts, lands cp.async copies only at the covering
// wait_group and checks every shared-memory access made here for races. Kernels make ALL their
// shared-memory accesses through these functions, so the hazard detector sees them all.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), g = lane / 4, t = lane % 4:
//   A 16x16 row-major, uint32_t a[4] (two 16-bit values each, lower column in the low half):
//     a[0] (g, 2t), a[1] (g+8, 2t), a[2] (g, 2t+8), a[3] (g+8, 2t+8)
//   B 16x8 "col" (k-major per column), uint32_t b[2]: b[0] (k=2t, n=g), b[1] (k=2t+8, n=g)
//   C/D 16x8 fp32, float d[4]: d[0..1] (g, 2t..2t+1), d[2..3] (g+8, 2t..2t+1)
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda_compat.h"

namespace fastattn::cuda::ptx {

#if defined(__CUDACC__)
#define FA_PTX_SITE
#define FA_PTX_SITE_ONLY
#else
// The emulator reports the kernel's source line of each op.
#define FA_PTX_SITE , const char *file_ = __builtin_FILE(), int line_ = __builtin_LINE()
#define FA_PTX_SITE_ONLY const char *file_ = __builtin_FILE(), int line_ = __builtin_LINE()
#define FA_PTX_SITE_PASS file_, line_
#endif

// Two floats rounded to T and packed (x in the low half), the register of an A/B fragment.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y) {
#if defined(__CUDACC__)
  if constexpr (std::is_same<T, __half>::value) {
    __half2 h = __floats2half2_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&h);
  }
#else
  T a, b;
  if constexpr (std::is_same<T, __half>::value) {
    a = __float2half_rn(x);
    b = __float2half_rn(y);
  } else {
    a = __float2bfloat16_rn(x);
    b = __float2bfloat16_rn(y);
  }
  return static_cast<uint32_t>(a.__x) | (static_cast<uint32_t>(b.__x) << 16);
#endif
}

// d += A * B, fp32 accumulate (mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32).
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2] FA_PTX_SITE) {
#if defined(__CUDACC__)
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  ::cuda_emu::ptx::mma_m16n8k16(d, a, b, std::is_same<T, __nv_bfloat16>::value, FA_PTX_SITE_PASS);
#endif
}

#if defined(__CUDACC__)
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the 8 row addresses of
// matrix i; r[i] is this lane's fragment of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p FA_PTX_SITE) {
#if defined(__CUDACC__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
#else
  ::cuda_emu::ptx::ldmatrix(4, false, r, p, FA_PTX_SITE_PASS);
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p FA_PTX_SITE) {
#if defined(__CUDACC__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
#else
  ::cuda_emu::ptx::ldmatrix(4, true, r, p, FA_PTX_SITE_PASS);
#endif
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* p FA_PTX_SITE) {
#if defined(__CUDACC__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(p)));
#else
  ::cuda_emu::ptx::ldmatrix(2, false, r, p, FA_PTX_SITE_PASS);
#endif
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p FA_PTX_SITE) {
#if defined(__CUDACC__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(p)));
#else
  ::cuda_emu::ptx::ldmatrix(2, true, r, p, FA_PTX_SITE_PASS);
#endif
}
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* p FA_PTX_SITE) {
#if defined(__CUDACC__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0])
               : "r"(smem_u32(p)));
#else
  ::cuda_emu::ptx::ldmatrix(1, false, r, p, FA_PTX_SITE_PASS);
#endif
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], const void* p FA_PTX_SITE) {
#if defined(__CUDACC__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0])
               : "r"(smem_u32(p)));
#else
  ::cuda_emu::ptx::ldmatrix(1, true, r, p, FA_PTX_SITE_PASS);
#endif
}

// cp.async.cg.shared.global: 16 bytes global -> shared, bypassing L1; !pred writes 16 zero bytes
// (src-size 0; src must still be a valid address).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool pred FA_PTX_SITE) {
#if defined(__CUDACC__)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)),
               "l"(gmem), "r"(pred ? 16 : 0));
#else
  ::cuda_emu::ptx::cp_async_16(smem, gmem, pred, FA_PTX_SITE_PASS);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDACC__)
  asm volatile("cp.async.commit_group;\n" ::);
#else
  ::cuda_emu::ptx::cp_async_commit();
#endif
}
// All committed groups but the newest N are complete (and visible to this thread).
template <int N>
__device__ __forceinline__ void cp_async_wait(FA_PTX_SITE_ONLY) {
#if defined(__CUDACC__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#else
  ::cuda_emu::ptx::cp_async_wait(N, FA_PTX_SITE_PASS);
#endif
}

// Shared-memory loads and stores (ld.shared / st.shared), visible to the emulator's detector.
template <typename V>
__device__ __forceinline__ V lds(const V* p FA_PTX_SITE) {
#if defined(__CUDACC__)
  return *p;
#else
  return ::cuda_emu::ptx::lds(p, FA_PTX_SITE_PASS);
#endif
}
template <typename V>
__device__ __forceinline__ void sts(V* p, V v FA_PTX_SITE) {
#if defined(__CUDACC__)
  *p = v;
#else
  ::cuda_emu::ptx::sts(p, v, FA_PTX_SITE_PASS);
#endif
}

// Butterfly shuffle within the warp (all lanes).
__device__ __forceinline__ float shfl_xor(float v, int m) {
  return __shfl_xor_sync(0xffffffffu, v, m);
}

}  // namespace fastattn::cuda::ptx
