// The avx512bf16 variant of the CPU attention kernels: the one source (attention_kernels.h)
// compiled like the avx512 variant plus AVX512-BF16, with FASTATTN_BF16_DOT: bfloat16 inputs
// then run their tile products as vdpbf16ps dot products (isa/gemm_bf16.h; two bfloat16
// products per float32 lane and instruction, the rate torch's oneDNN bfloat16 GEMMs get on
// such CPUs); float32 and float16 inputs run the avx512 variant's float32 code. Only
// isa_dispatch.cpp calls it, after checking that the running CPU has avx512 and avx512_bf16.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>

#include "cpu/isa/kernel_tables.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>  // intrinsics carry their own target attributes; used only below

#define FASTATTN_ISA avx512bf16
#define FASTATTN_VEC_BYTES 64
#define FASTATTN_BF16_DOT 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#endif

#include "cpu/isa/attention_kernels.h"
#include "cpu/isa/decode_kernels.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace fastattn::cpu {
namespace {
const KernelTable kTable = {"avx512bf16", &avx512bf16::fwd_tasks, &avx512bf16::fwd_scratch_floats,
                            &avx512bf16::bwd_tasks, &avx512bf16::bwd_scratch_floats,
                            &avx512bf16::decode_tasks, &avx512bf16::decode_scratch_floats,
                            /*bf16_dot=*/true};
}  // namespace
const KernelTable* kernels_avx512bf16() { return &kTable; }
}  // namespace fastattn::cpu

#else  // not x86-64: this variant does not exist
namespace fastattn::cpu {
const KernelTable* kernels_avx512bf16() { return nullptr; }
}  // namespace fastattn::cpu
#endif
