// Runtime options -> template parameters, in one place (flash_api.cu uses these).
// Each macro runs the lambda-like body with a constexpr bound to the chosen value.
#pragma once

#define BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()

// float16 / bfloat16 -> elem_type
#define FP16_SWITCH(IS_BF16, ...)         \
  [&] {                                   \
    if (IS_BF16) {                        \
      using elem_type = __nv_bfloat16;    \
      return __VA_ARGS__();               \
    } else {                              \
      using elem_type = __half;           \
      return __VA_ARGS__();               \
    }                                     \
  }()

// The wmma kernels: head dims are padded up to the next compiled size (zero-filled columns):
// d <= 64 -> 64, d <= 128 -> 128. Their callers have checked d <= 128.
#define HEADDIM_SWITCH(HEADDIM, ...)        \
  [&] {                                     \
    if ((HEADDIM) <= 64) {                  \
      constexpr static int kHeadDim = 64;   \
      return __VA_ARGS__();                 \
    } else {                                \
      constexpr static int kHeadDim = 128;  \
      return __VA_ARGS__();                 \
    }                                       \
  }()

// The FlashAttention-2 class kernels (fa2_fwd_kernel.h, fa2_bwd_kernel.h) are compiled for head
// dims 32, 64, 96, 128, 192 and 256; d pads up to the next one. check_params() has rejected
// anything above 256.
#define FA2_HEADDIM_SWITCH(HEADDIM, ...)    \
  [&] {                                     \
    if ((HEADDIM) <= 32) {                  \
      constexpr static int kHeadDim = 32;   \
      return __VA_ARGS__();                 \
    } else if ((HEADDIM) <= 64) {           \
      constexpr static int kHeadDim = 64;   \
      return __VA_ARGS__();                 \
    } else if ((HEADDIM) <= 96) {           \
      constexpr static int kHeadDim = 96;   \
      return __VA_ARGS__();                 \
    } else if ((HEADDIM) <= 128) {          \
      constexpr static int kHeadDim = 128;  \
      return __VA_ARGS__();                 \
    } else if ((HEADDIM) <= 192) {          \
      constexpr static int kHeadDim = 192;  \
      return __VA_ARGS__();                 \
    } else {                                \
      constexpr static int kHeadDim = 256;  \
      return __VA_ARGS__();                 \
    }                                       \
  }()
