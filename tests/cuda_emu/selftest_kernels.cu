// Kernels that test the CUDA emulation layer itself (tests/test_cuda_emu_selftest.py), so that
// a failing fastattn kernel is never an emulator bug in disguise. Plain CUDA: this file also
// compiles with nvcc (the compile test checks that), launches go through FA_LAUNCH.
#include <cstdint>
#include <exception>
#include <string>
#include <type_traits>

#include "cuda/cuda_compat.h"

namespace wmma = nvcuda::wmma;

namespace {
thread_local std::string g_error;

template <class L>
struct Tag {  // carries a wmma layout (an incomplete type) through a generic lambda
  using type = L;
};

template <class F>
const char* guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const std::exception& e) {
    g_error = e.what();
    return g_error.c_str();
  }
}

// Tree reduction in static shared memory: out[block] = sum of the block's slice of `in`.
template <int kThreads>
__global__ void block_sum_static(const float* in, float* out, int n) {
  __shared__ float buf[kThreads];
  const int i = blockIdx.x * kThreads + threadIdx.x;
  buf[threadIdx.x] = i < n ? in[i] : 0.f;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = buf[0];
}

// Same with dynamic shared memory and a 2-D block (threadIdx.y, blockDim).
__global__ void block_sum_dynamic(const float* in, float* out, int n) {
  FA_DYNAMIC_SMEM(smem_);
  float* buf = reinterpret_cast<float*>(smem_);
  const int nt = blockDim.x * blockDim.y;
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  const int i = blockIdx.x * nt + t;
  buf[t] = i < n ? in[i] : 0.f;
  __syncthreads();
  for (int s = nt / 2; s > 0; s >>= 1) {
    if (t < s) buf[t] += buf[t + s];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = buf[0];
}

// Warp ops: per lane, xor-butterfly sum, broadcast of lane 5, shift down by 1, ballot of odd
// values, any/all.
__global__ void warp_ops(const float* in, float* sum, float* bcast, float* down, float* up,
                         unsigned* ballot, int* any_all) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const float x = in[i];
  float s = x;
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  sum[i] = s;
  bcast[i] = __shfl_sync(0xffffffffu, x, 5);
  down[i] = __shfl_down_sync(0xffffffffu, x, 1);
  up[i] = __shfl_up_sync(0xffffffffu, x, 3);
  const int odd = static_cast<int>(x) & 1;
  ballot[i] = __ballot_sync(0xffffffffu, odd);
  any_all[2 * i] = __any_sync(0xffffffffu, x > 40.f);
  any_all[2 * i + 1] = __all_sync(0xffffffffu, x >= 0.f);
}

__global__ void atomics(int* counter, float* fsum, int* imax) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(counter, 1);
  atomicAdd(fsum, 0.5f);
  atomicMax(imax, i);
}

// C (M x N, float) = A (M x K) * B (K x N) with wmma, one warp per 16x16 output tile.
// A is row-major (lda = K) or col-major (lda = M); B likewise (ldb = N or K).
template <class T, class LayoutA, class LayoutB>
__global__ void wmma_gemm(const T* A, const T* B, float* C, int M, int N, int K, int lda, int ldb,
                          int c_col_major) {
  const int warp = threadIdx.x / 32;
  const int tiles_n = N / 16;
  const int tile = blockIdx.x * (blockDim.x / 32) + warp;
  if (tile >= (M / 16) * tiles_n) return;  // whole warps only
  const int tm = tile / tiles_n, tn = tile % tiles_n;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.f);
  for (int k = 0; k < K; k += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> b;
    const bool a_row = std::is_same<LayoutA, wmma::row_major>::value;
    const bool b_row = std::is_same<LayoutB, wmma::row_major>::value;
    wmma::load_matrix_sync(a, a_row ? A + tm * 16 * lda + k : A + k * lda + tm * 16, lda);
    wmma::load_matrix_sync(b, b_row ? B + k * ldb + tn * 16 : B + tn * 16 * ldb + k, ldb);
    wmma::mma_sync(acc, a, b, acc);
  }
  // Elementwise ops on fragments are legal when they treat every element alike.
  for (int e = 0; e < acc.num_elements; ++e) acc.x[e] *= 2.f;
  if (c_col_major)
    wmma::store_matrix_sync(C + tn * 16 * M + tm * 16, acc, M, wmma::mem_col_major);
  else
    wmma::store_matrix_sync(C + tm * 16 * N + tn * 16, acc, N, wmma::mem_row_major);
}

// ---- kernels with bugs the emulator must catch -----------------------------------------------

__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

// Thread t reads what thread t+1 wrote, without a barrier in between.
__global__ void missing_barrier(float* out, float base) {
  __shared__ float buf[64];
  buf[threadIdx.x] = base + static_cast<float>(threadIdx.x);
  const int next = (threadIdx.x + 1) % 64;
  out[threadIdx.x] = buf[next];  // BUG: needs __syncthreads() before this read
}

__global__ void uninitialized_smem(float* out) {
  FA_DYNAMIC_SMEM(smem_);
  float* buf = reinterpret_cast<float*>(smem_);
  out[threadIdx.x] = buf[threadIdx.x];  // nobody wrote it
}

__global__ void misaligned_wmma(const __half* A, float* C) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  wmma::load_matrix_sync(a, A + 1, 16);  // 2-byte offset: not 256-bit aligned
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.f);
  wmma::store_matrix_sync(C, acc, 16, wmma::mem_row_major);
}

__global__ void nonuniform_wmma(const __half* A, float* C) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  // BUG: lanes pass different pointers to a warp-collective load.
  wmma::load_matrix_sync(a, A + (threadIdx.x % 2) * 256, 16);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.f);
  wmma::store_matrix_sync(C, acc, 16, wmma::mem_row_major);
}

__global__ void big_smem(float* out) {
  FA_DYNAMIC_SMEM(smem_);
  reinterpret_cast<float*>(smem_)[threadIdx.x] = 1.f;
  out[threadIdx.x] = reinterpret_cast<float*>(smem_)[threadIdx.x];
}

}  // namespace

extern "C" {

const char* st_block_sum_static(const float* in, float* out, int n) {
  return guarded([&] {
    auto k = &block_sum_static<128>;
    FA_LAUNCH(k, dim3((n + 127) / 128), dim3(128), 0, nullptr, in, out, n);
  });
}

const char* st_block_sum_dynamic(const float* in, float* out, int n, int bx, int by) {
  return guarded([&] {
    auto k = &block_sum_dynamic;
    const int nt = bx * by;
    FA_LAUNCH(k, dim3((n + nt - 1) / nt), dim3(bx, by), nt * sizeof(float), nullptr, in, out, n);
  });
}

const char* st_warp_ops(const float* in, float* sum, float* bcast, float* down, float* up,
                        unsigned* ballot, int* any_all, int nwarps) {
  return guarded([&] {
    auto k = &warp_ops;
    FA_LAUNCH(k, dim3(nwarps), dim3(32), 0, nullptr, in, sum, bcast, down, up, ballot, any_all);
  });
}

const char* st_atomics(int* counter, float* fsum, int* imax, int blocks, int threads) {
  return guarded([&] {
    auto k = &atomics;
    FA_LAUNCH(k, dim3(blocks), dim3(threads), 0, nullptr, counter, fsum, imax);
  });
}

// dtype: 0 half, 1 bfloat16; a_col/b_col: operand layouts; c_col: output layout.
const char* st_wmma_gemm(const void* A, const void* B, float* C, int M, int N, int K, int dtype,
                         int a_col, int b_col, int c_col) {
  return guarded([&] {
    const int tiles = (M / 16) * (N / 16);
    const dim3 grid((tiles + 3) / 4), block(128);
    const int lda = a_col ? M : K, ldb = b_col ? K : N;
    auto run = [&](auto* a, auto tag_a, auto tag_b) {
      using T = std::remove_const_t<std::remove_pointer_t<decltype(a)>>;
      auto k = &wmma_gemm<T, typename decltype(tag_a)::type, typename decltype(tag_b)::type>;
      FA_LAUNCH(k, grid, block, 0, nullptr, a, static_cast<const T*>(B), C, M, N, K, lda, ldb,
                c_col);
    };
    auto by_layout = [&](auto* a) {
      if (!a_col && !b_col) run(a, Tag<wmma::row_major>{}, Tag<wmma::row_major>{});
      if (!a_col && b_col) run(a, Tag<wmma::row_major>{}, Tag<wmma::col_major>{});
      if (a_col && !b_col) run(a, Tag<wmma::col_major>{}, Tag<wmma::row_major>{});
      if (a_col && b_col) run(a, Tag<wmma::col_major>{}, Tag<wmma::col_major>{});
    };
    if (dtype == 0)
      by_layout(static_cast<const __half*>(A));
    else
      by_layout(static_cast<const __nv_bfloat16*>(A));
  });
}

// Conversions float -> 16-bit -> float, to compare with torch's rounding.
const char* st_convert(const float* in, float* out_half, float* out_bf16, int n) {
  for (int i = 0; i < n; ++i) {
    out_half[i] = __half2float(__float2half_rn(in[i]));
    out_bf16[i] = __bfloat162float(__float2bfloat16_rn(in[i]));
  }
  return nullptr;
}

// Buggy kernels: each should make the launch fail (or, for missing_barrier, give a wrong result).
const char* st_bug(int which, float* out, const __half* A) {
  return guarded([&] {
    if (which == 0) {
      auto k = &divergent_barrier;
      FA_LAUNCH(k, dim3(1), dim3(32), 0, nullptr, out);
    } else if (which == 1) {
      static float base = 0.f;  // differs per call, so stale shared memory cannot look right
      base += 1000.f;
      auto k = &missing_barrier;
      FA_LAUNCH(k, dim3(1), dim3(64), 0, nullptr, out, base);
      out[64] = base;
    } else if (which == 2) {
      auto k = &uninitialized_smem;
      FA_LAUNCH(k, dim3(1), dim3(32), 32 * sizeof(float), nullptr, out);
    } else if (which == 3) {
      auto k = &misaligned_wmma;
      FA_LAUNCH(k, dim3(1), dim3(32), 0, nullptr, A, out);
    } else if (which == 4) {
      auto k = &nonuniform_wmma;
      FA_LAUNCH(k, dim3(1), dim3(32), 0, nullptr, A, out);
    } else if (which == 5) {  // 64 KiB without cudaFuncSetAttribute
      auto k = &big_smem;
      FA_LAUNCH(k, dim3(1), dim3(32), 64 * 1024, nullptr, out);
    } else if (which == 6) {  // the same after opting in: must work
      auto k = &big_smem;
      FA_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024));
      FA_LAUNCH(k, dim3(1), dim3(32), 64 * 1024, nullptr, out);
    }
  });
}

void st_set_schedule(int schedule, unsigned long long seed) {
#ifdef FASTATTN_CUDA_EMU
  cuda_emu::set_schedule(schedule, seed);
#endif
}
}
