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

}  // namespace fastattn::cuda
