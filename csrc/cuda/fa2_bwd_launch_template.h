// Launcher of the FlashAttention-2 class backward (fa2_bwd_kernel.h), apart from
// flash_launch_template.h so that only the fa2_bwd_*.cu files depend on that kernel's header.
#pragma once

#include "fa2_bwd_kernel.h"
#include "flash_bwd_kernel.h"
#include "flash_launch_template.h"

namespace fastattn::cuda {

// preprocess (delta, dq_accum = 0) -> dK/dV kernel (atomic dQ) -> dQ convert.
template <typename T, int kHeadDim, bool kSparse>
void run_fa2_bwd_(FlashParams& p, cudaStream_t stream) {
  constexpr int kPreWarps = 4;
  auto pre = &flash_bwd_preprocess_kernel<T, kPreWarps>;  // delta, and dq_accum = 0
  const dim3 grid_pre(ceil_div(p.nq, kPreWarps), static_cast<unsigned>(p.b * p.hq));
  FA_LAUNCH(pre, grid_pre, dim3(kPreWarps * 32), 0, stream, p);
  FA_CUDA_CHECK(cudaGetLastError());

  using Kt = typename Fa2BwdConfig<kHeadDim, T>::type;
  auto dkdv = &fa2_bwd_dkdv_kernel<Kt, kSparse>;
  allow_smem(dkdv, Kt::kSmemBytes);
  const dim3 grid_kv(ceil_div(p.nk, Kt::kBlockN), static_cast<unsigned>(p.b * p.hkv));
  FA_LAUNCH(dkdv, grid_kv, dim3(Kt::kNThreads), Kt::kSmemBytes, stream, p);
  FA_CUDA_CHECK(cudaGetLastError());

  auto cvt = &fa2_bwd_convert_dq_kernel<T>;
  const int64_t chunks = p.b * p.hq * p.nq * (p.d / 8);
  const int64_t blocks = (chunks + 127) / 128;
  FA_LAUNCH(cvt, dim3(static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8)), dim3(128),
            0, stream, p);
  FA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace fastattn::cuda
