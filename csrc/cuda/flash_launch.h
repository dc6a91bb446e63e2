// Declarations of the per-configuration launchers. Each is defined (explicitly instantiated)
// in its own flash_{fwd,bwd}_hdim{64,128}_{fp16,bf16}[_sparse].cu, one template instantiation
// per file so builds parallelize; flash_api.cu picks one at run time.
#pragma once

#include "cuda_compat.h"
#include "flash.h"

namespace fastattn::cuda {

template <typename T, int kHeadDim, bool kSparse>
void run_fwd_(FlashParams& p, cudaStream_t stream);

template <typename T, int kHeadDim, bool kSparse>
void run_bwd_(FlashParams& p, cudaStream_t stream);

// The FlashAttention-2 class forward (fa2_fwd_kernel.h), in fa2_fwd_hdim*_*.cu. Its query tile
// is kFa2FwdBlockM rows for d <= 128: block-sparse calls use it when the mask's BLOCK_M is a
// multiple of that. Head dims 192 and 256 (forward only, 64-row tiles) always use it.
constexpr int64_t kFa2FwdBlockM = 128;
constexpr int64_t kFa2FwdBlockMWide = 64;  // d = 192, 256
template <typename T, int kHeadDim, bool kSparse>
void run_fa2_fwd_(FlashParams& p, cudaStream_t stream);

// The FlashAttention-2 class backward (fa2_bwd_kernel.h, atomic dQ), in fa2_bwd_hdim*_*.cu.
template <typename T, int kHeadDim, bool kSparse>
void run_fa2_bwd_(FlashParams& p, cudaStream_t stream);

}  // namespace fastattn::cuda
