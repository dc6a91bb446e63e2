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

// Head dims are padded up to the next compiled size (zero-filled columns): d <= 64 -> 64,
// d <= 128 -> 128. check_params() has rejected anything larger.
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
