// Self-test kernels of the emulator's PTX layer (csrc/cuda/ptx_ops.h under tests/cuda_emu):
// mma.sync m16n8k16 fragments built by the PTX ISA's documented per-lane indexing, ldmatrix
// layouts (plain and .trans), a cp.async + ldmatrix + mma GEMM, and the bugs the emulator must
// catch (a missing cp.async.wait_group, shared-memory races). Plain CUDA: also compiles with nvcc.
#include <cstdint>
#include <exception>
#include <string>
#include <type_traits>

#include "cuda/cuda_compat.h"
#include "cuda/ptx_ops.h"

namespace ptx = fastattn::cuda::ptx;

namespace {
thread_local std::string g_err;

template <class F>
const char* guarded_ptx(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const std::exception& e) {
    g_err = e.what();
    return g_err.c_str();
  }
}

__device__ __forceinline__ uint32_t pack_raw(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// One warp: D (16x8 fp32) = A (16x16) B (16x8) + C, fragments gathered from global memory by the
// documented indexing (A, B as raw 16-bit words, row-major).
template <typename T>
__global__ void ptx_mma(const uint16_t* A, const uint16_t* B, const float* C, float* D) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  uint32_t a[4], b[2];
  float d[4];
  for (int r = 0; r < 4; ++r) {
    const int row = g + (r & 1) * 8, col = 2 * t + (r >> 1) * 8;
    a[r] = pack_raw(A[row * 16 + col], A[row * 16 + col + 1]);
  }
  for (int r = 0; r < 2; ++r) {
    const int k = 2 * t + r * 8;
    b[r] = pack_raw(B[k * 8 + g], B[(k + 1) * 8 + g]);
  }
  for (int r = 0; r < 4; ++r) d[r] = C[(g + (r >> 1) * 8) * 8 + 2 * t + (r & 1)];
  ptx::mma_m16n8k16<T>(d, a, b);
  for (int r = 0; r < 4; ++r) D[(g + (r >> 1) * 8) * 8 + 2 * t + (r & 1)] = d[r];
}

// One warp: four 8x8 matrices of 16-bit words (M[i] row-major at src + 64 i) go to shared
// memory by cp.async; lane l points at row l % 8 of matrix l / 8; out[lane * 4 + i] = reg i.
template <int kNum, bool kTrans>
__global__ void ptx_ldmatrix(const uint16_t* src, uint32_t* out) {
  FA_DYNAMIC_SMEM(smem_);
  uint16_t* s = reinterpret_cast<uint16_t*>(smem_);
  const int lane = threadIdx.x;
  ptx::cp_async_16(s + lane * 8, src + lane * 8, true);  // 32 rows of 16 B
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  __syncwarp();
  const uint16_t* row = s + ((lane / 8) % kNum) * 64 + (lane % 8) * 8;
  uint32_t r[kNum];
  if constexpr (kNum == 4) {
    if constexpr (kTrans) ptx::ldmatrix_x4_trans(r, row); else ptx::ldmatrix_x4(r, row);
  } else if constexpr (kNum == 2) {
    if constexpr (kTrans) ptx::ldmatrix_x2_trans(r, row); else ptx::ldmatrix_x2(r, row);
  } else {
    if constexpr (kTrans) ptx::ldmatrix_x1_trans(r, row); else ptx::ldmatrix_x1(r, row);
  }
  for (int i = 0; i < kNum; ++i) out[lane * 4 + i] = r[i];
}

// C (M x N fp32) = A (M x K, row-major) B (K x N, row-major); one block of 4 warps per 64x32
// tile of C (16 rows per warp); K in chunks of 32 through a 2-stage cp.async pipeline.
// A fragments by ldmatrix.x4, B fragments by ldmatrix.x4.trans (B is k-major in memory).
template <typename T>
__global__ void ptx_gemm(const T* A, const T* B, float* C, int M, int N, int K) {
  constexpr int BM = 64, BN = 32, BK = 32, kStages = 2;
  FA_DYNAMIC_SMEM(smem_);
  T* sA = reinterpret_cast<T*>(smem_);              // kStages x BM x BK
  T* sB = sA + kStages * BM * BK;                   // kStages x BK x BN
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  auto load = [&](int stage, int k0) {
    for (int c = tid; c < BM * BK / 8; c += 128) {
      const int r = c / (BK / 8), ch = c % (BK / 8);
      ptx::cp_async_16(sA + stage * BM * BK + r * BK + ch * 8, A + (m0 + r) * K + k0 + ch * 8,
                       true);
    }
    for (int c = tid; c < BK * BN / 8; c += 128) {
      const int r = c / (BN / 8), ch = c % (BN / 8);
      ptx::cp_async_16(sB + stage * BK * BN + r * BN + ch * 8, B + (k0 + r) * N + n0 + ch * 8,
                       true);
    }
  };
  float acc[BN / 8][4] = {};
  const int nk = K / BK;
  load(0, 0);
  ptx::cp_async_commit();
  for (int it = 0; it < nk; ++it) {
    ptx::cp_async_wait<0>();
    __syncthreads();  // stage it % 2 landed for everyone; stage (it + 1) % 2 is free
    if (it + 1 < nk) load((it + 1) % kStages, (it + 1) * BK);
    ptx::cp_async_commit();
    const T* a_s = sA + (it % kStages) * BM * BK;
    const T* b_s = sB + (it % kStages) * BK * BN;
    for (int kk = 0; kk < BK / 16; ++kk) {
      uint32_t a[4];
      ptx::ldmatrix_x4(a, a_s + (warp * 16 + lane % 16) * BK + kk * 16 + (lane / 16) * 8);
      for (int np = 0; np < BN / 16; ++np) {
        uint32_t b[4];
        ptx::ldmatrix_x4_trans(
            b, b_s + (kk * 16 + lane % 8 + ((lane / 8) & 1) * 8) * BN + np * 16 + (lane / 16) * 8);
        const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
        ptx::mma_m16n8k16<T>(acc[2 * np], a, b0);
        ptx::mma_m16n8k16<T>(acc[2 * np + 1], a, b1);
      }
    }
  }
  ptx::cp_async_wait<0>();
  const int g = lane >> 2, t = lane & 3;
  for (int ni = 0; ni < BN / 8; ++ni)
    for (int r = 0; r < 4; ++r)
      C[(m0 + warp * 16 + g + (r >> 1) * 8) * N + n0 + ni * 8 + 2 * t + (r & 1)] = acc[ni][r];
}

// ---- bugs ------------------------------------------------------------------------------------
// kWait = 1: cp.async, wait_group, barrier, read: correct. 0: the read comes before the
// wait_group (the copy has not landed: NaN-filled memory; its late landing then races with the
// other threads' reads). -1: no wait_group at all (the copy never lands).
template <int kWait>
__global__ void ptx_cp_async_wait(const float* src, float* out) {
  FA_DYNAMIC_SMEM(smem_);
  float* s = reinterpret_cast<float*>(smem_);
  const int tid = threadIdx.x;
  ptx::cp_async_16(s + tid * 4, src + tid * 4, true);
  ptx::cp_async_commit();
  if constexpr (kWait == 1) ptx::cp_async_wait<0>();
  __syncthreads();
  out[tid] = ptx::lds(s + (tid * 4 + 4) % 128);
  if constexpr (kWait == 0) ptx::cp_async_wait<0>();  // (lands here: too late)
}

// Thread t writes word t, then reads word t+1 (of another thread): with or without a barrier.
template <int kSync>  // 0 none, 1 __syncthreads, 2 __syncwarp (only orders within a warp)
__global__ void ptx_race_rw(float* out) {
  FA_DYNAMIC_SMEM(smem_);
  float* s = reinterpret_cast<float*>(smem_);
  const int tid = threadIdx.x, n = blockDim.x;
  ptx::sts(s + tid, static_cast<float>(tid));
  if constexpr (kSync == 1) __syncthreads();
  if constexpr (kSync == 2) __syncwarp();
  out[tid] = ptx::lds(s + (tid + 1) % n);
}

// Write-after-read: every thread reads its neighbour's word, then a cp.async overwrites its own
// word (the next tile of a pipeline) with or without the barrier between.
template <bool kSync>
__global__ void ptx_race_war(const float* src, float* out) {
  FA_DYNAMIC_SMEM(smem_);
  float* s = reinterpret_cast<float*>(smem_);
  const int tid = threadIdx.x;
  ptx::cp_async_16(s + tid * 4, src + tid * 4, true);
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  __syncthreads();
  out[tid] = ptx::lds(s + ((tid + 1) % 64) * 4);
  if constexpr (kSync) __syncthreads();
  ptx::cp_async_16(s + tid * 4, src + 256 + tid * 4, true);
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
}

// ldmatrix from a lane subset (diverged): must be reported.
__global__ void ptx_divergent_ldmatrix(float* out) {
  FA_DYNAMIC_SMEM(smem_);
  uint32_t r[1] = {0};
  if (threadIdx.x < 16) ptx::ldmatrix_x1(r, smem_ + (threadIdx.x % 8) * 16);
  else ptx::ldmatrix_x1(r, smem_ + (threadIdx.x % 8) * 16);
  out[threadIdx.x] = static_cast<float>(r[0]);
}

}  // namespace

extern "C" {

const char* st_ptx_mma(const void* A, const void* B, const float* C, float* D, int bf16) {
  return guarded_ptx([&] {
    auto k = bf16 ? &ptx_mma<__nv_bfloat16> : &ptx_mma<__half>;
    FA_LAUNCH(k, dim3(1), dim3(32), 0, nullptr, static_cast<const uint16_t*>(A),
              static_cast<const uint16_t*>(B), C, D);
  });
}

const char* st_ptx_ldmatrix(const void* src, uint32_t* out, int num, int trans) {
  return guarded_ptx([&] {
    void (*k)(const uint16_t*, uint32_t*) = nullptr;
    if (num == 4) k = trans ? &ptx_ldmatrix<4, true> : &ptx_ldmatrix<4, false>;
    if (num == 2) k = trans ? &ptx_ldmatrix<2, true> : &ptx_ldmatrix<2, false>;
    if (num == 1) k = trans ? &ptx_ldmatrix<1, true> : &ptx_ldmatrix<1, false>;
    FA_LAUNCH(k, dim3(1), dim3(32), 512, nullptr, static_cast<const uint16_t*>(src), out);
  });
}

const char* st_ptx_gemm(const void* A, const void* B, float* C, int M, int N, int K, int bf16) {
  return guarded_ptx([&] {
    const dim3 grid(M / 64, N / 32);
    const int smem = 2 * (64 * 32 + 32 * 32) * 2;
    if (bf16) {
      auto k = &ptx_gemm<__nv_bfloat16>;
      FA_LAUNCH(k, grid, dim3(128), smem, nullptr, static_cast<const __nv_bfloat16*>(A),
                static_cast<const __nv_bfloat16*>(B), C, M, N, K);
    } else {
      auto k = &ptx_gemm<__half>;
      FA_LAUNCH(k, grid, dim3(128), smem, nullptr, static_cast<const __half*>(A),
                static_cast<const __half*>(B), C, M, N, K);
    }
  });
}

// which: 0 wait too late, 9 no wait, 1 with wait, 2 race r/w, 3 __syncthreads, 4 __syncwarp within a warp
// (32 threads), 5 __syncwarp across warps (64 threads: race), 6 WAR race, 7 WAR with barrier,
// 8 divergent ldmatrix.
const char* st_ptx_bug(int which, const float* src, float* out) {
  return guarded_ptx([&] {
    switch (which) {
      case 9: { auto k = &ptx_cp_async_wait<-1>;
        FA_LAUNCH(k, dim3(1), dim3(32), 512, nullptr, src, out); break; }
      case 0: { auto k = &ptx_cp_async_wait<0>;
        FA_LAUNCH(k, dim3(1), dim3(32), 512, nullptr, src, out); break; }
      case 1: { auto k = &ptx_cp_async_wait<1>;
        FA_LAUNCH(k, dim3(1), dim3(32), 512, nullptr, src, out); break; }
      case 2: { auto k = &ptx_race_rw<0>;
        FA_LAUNCH(k, dim3(1), dim3(64), 256, nullptr, out); break; }
      case 3: { auto k = &ptx_race_rw<1>;
        FA_LAUNCH(k, dim3(1), dim3(64), 256, nullptr, out); break; }
      case 4: { auto k = &ptx_race_rw<2>;
        FA_LAUNCH(k, dim3(1), dim3(32), 256, nullptr, out); break; }
      case 5: { auto k = &ptx_race_rw<2>;
        FA_LAUNCH(k, dim3(1), dim3(64), 256, nullptr, out); break; }
      case 6: { auto k = &ptx_race_war<false>;
        FA_LAUNCH(k, dim3(1), dim3(64), 1024, nullptr, src, out); break; }
      case 7: { auto k = &ptx_race_war<true>;
        FA_LAUNCH(k, dim3(1), dim3(64), 1024, nullptr, src, out); break; }
      case 8: { auto k = &ptx_divergent_ldmatrix;
        FA_LAUNCH(k, dim3(1), dim3(32), 256, nullptr, out); break; }
    }
  });
}

}  // extern "C"
