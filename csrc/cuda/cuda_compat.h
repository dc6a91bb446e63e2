// What the kernels need from CUDA, and the two macros that let the same sources build with
// nvcc and, as plain C++, against the CPU emulation layer in tests/cuda_emu (which supplies
// its own cuda_runtime.h, cuda_fp16.h, cuda_bf16.h and mma.h and defines FASTATTN_CUDA_EMU).
//
//   FA_LAUNCH(kernel, grid, block, smem_bytes, stream, args...)   the one kernel-launch macro
//   FA_DYNAMIC_SMEM(name)                                         char* to the block's dynamic smem
//   fa_tanhf(x)                                                   tanhf as fast math builds it
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>

#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define FA_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#define FA_DYNAMIC_SMEM(name) extern __shared__ __align__(128) char name[]
#elif defined(FASTATTN_CUDA_EMU)
#define FA_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::cuda_emu::launch((kernel), (grid), (block), (smem), (stream), __VA_ARGS__)
#define FA_DYNAMIC_SMEM(name) char* name = ::cuda_emu::dynamic_smem()
#else
#error "csrc/cuda builds with nvcc, or as C++ with the emulation layer's headers (tests/cuda_emu)"
#endif

// tanh of the softcap. Under nvcc with --use_fast_math (setup.py, the compile report) tanhf
// compiles to the hardware's tanh.approx.f32 (relative error about 2^-11); the emulator models
// that error bound instead of using the exact C library tanh.
#if defined(__CUDACC__)
__device__ __forceinline__ float fa_tanhf(float x) { return tanhf(x); }
#else
inline float fa_tanhf(float x) { return ::cuda_emu::tanh_approx(x); }
#endif

#define FA_CUDA_CHECK(expr)                                                               \
  do {                                                                                    \
    cudaError_t fa_err_ = (expr);                                                         \
    if (fa_err_ != cudaSuccess)                                                           \
      throw std::runtime_error(std::string("fastattn CUDA error: ") +                     \
                               cudaGetErrorString(fa_err_) + " at " __FILE__ ":" +        \
                               std::to_string(__LINE__));                                 \
  } while (0)
