// Launchers: grid, block and shared-memory size of each kernel for one configuration.
// Launches go through FA_LAUNCH (cuda_compat.h), so this compiles under nvcc and the emulator.
#pragma once

#include "fa2_fwd_kernel.h"
#include "flash_bwd_kernel.h"
#include "flash_fwd_kernel.h"
#include "flash_launch.h"

namespace fastattn::cuda {

inline unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

// Above 48 KiB of dynamic shared memory a kernel must opt in.
template <typename Kernel>
void allow_smem(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024)
    FA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

template <typename T, int kHeadDim, bool kSparse>
void run_fwd_(FlashParams& p, cudaStream_t stream) {
  using Kt = typename FwdConfig<kHeadDim, T>::type;
  auto kernel = &flash_fwd_kernel<Kt, kSparse>;
  allow_smem(kernel, Kt::kSmemBytes);
  const dim3 grid(ceil_div(p.nq, Kt::kBlockM), static_cast<unsigned>(p.b * p.hq));
  FA_LAUNCH(kernel, grid, dim3(Kt::kNThreads), Kt::kSmemBytes, stream, p);
  FA_CUDA_CHECK(cudaGetLastError());
}

template <typename T, int kHeadDim, bool kSparse>
void run_fa2_fwd_(FlashParams& p, cudaStream_t stream) {
  using Kt = typename Fa2FwdConfig<kHeadDim, T>::type;
  static_assert(Kt::kBlockM == (kHeadDim <= 128 ? kFa2FwdBlockM : kFa2FwdBlockMWide),
                "flash_launch.h names the query tile");
  auto kernel = &fa2_fwd_kernel<Kt, kSparse>;
  allow_smem(kernel, Kt::kSmemBytes);
  const dim3 grid(ceil_div(p.nq, Kt::kBlockM), static_cast<unsigned>(p.b * p.hq));
  FA_LAUNCH(kernel, grid, dim3(Kt::kNThreads), Kt::kSmemBytes, stream, p);
  FA_CUDA_CHECK(cudaGetLastError());
}

template <typename T, int kHeadDim, bool kSparse>
void run_bwd_(FlashParams& p, cudaStream_t stream) {
  constexpr int kPreWarps = 4;
  auto pre = &flash_bwd_preprocess_kernel<T, kPreWarps>;
  const dim3 grid_pre(ceil_div(p.nq, kPreWarps), static_cast<unsigned>(p.b * p.hq));
  FA_LAUNCH(pre, grid_pre, dim3(kPreWarps * 32), 0, stream, p);
  FA_CUDA_CHECK(cudaGetLastError());

  using KtKV = typename BwdDkdvConfig<kHeadDim, T>::type;
  auto dkdv = &flash_bwd_dkdv_kernel<KtKV, kSparse>;
  allow_smem(dkdv, KtKV::kSmemBytes);
  const dim3 grid_kv(ceil_div(p.nk, KtKV::kBlockN), static_cast<unsigned>(p.b * p.hkv));
  FA_LAUNCH(dkdv, grid_kv, dim3(KtKV::kNThreads), KtKV::kSmemBytes, stream, p);
  FA_CUDA_CHECK(cudaGetLastError());

  using KtQ = typename BwdDqConfig<kHeadDim, T>::type;
  auto dq = &flash_bwd_dq_kernel<KtQ, kSparse>;
  allow_smem(dq, KtQ::kSmemBytes);
  const dim3 grid_q(ceil_div(p.nq, KtQ::kBlockM), static_cast<unsigned>(p.b * p.hq));
  FA_LAUNCH(dq, grid_q, dim3(KtQ::kNThreads), KtQ::kSmemBytes, stream, p);
  FA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace fastattn::cuda
