// The avx512 variant of the CPU attention kernels: the one source (attention_kernels.h)
// compiled under target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c") with 64-byte vectors. Only
// isa_dispatch.cpp calls it, and only after checking that the running CPU has avx512.
// Standard headers come first, outside the target region, so nothing they define is
// compiled for avx512; the kernels' own helpers sit in namespace fastattn::cpu::avx512.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>

#include "cpu/isa/kernel_tables.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>  // intrinsics carry their own target attributes (vec.h: vmax)

#define FASTATTN_ISA avx512
#define FASTATTN_VEC_BYTES 64
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
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
const KernelTable kTable = {"avx512", &avx512::fwd_tasks, &avx512::fwd_scratch_floats,
                            &avx512::bwd_tasks, &avx512::bwd_scratch_floats,
                            &avx512::decode_tasks, &avx512::decode_scratch_floats};
}  // namespace
const KernelTable* kernels_avx512() { return &kTable; }
}  // namespace fastattn::cpu

#else  // not x86-64: this variant does not exist
namespace fastattn::cpu {
const KernelTable* kernels_avx512() { return nullptr; }
}  // namespace fastattn::cpu
#endif
