// The generic variant of the CPU attention kernels: compiled with the build's baseline
// flags (x86-64-v2 on x86, the default elsewhere), 16-byte vectors. Runs on every CPU.
#if defined(__x86_64__)
#include <immintrin.h>  // SSE intrinsics (vec.h: vmax); baseline on x86-64
#endif

#define FASTATTN_ISA generic
#define FASTATTN_VEC_BYTES 16

#include "cpu/isa/attention_kernels.h"
#include "cpu/isa/decode_kernels.h"
#include "cpu/isa/kernel_tables.h"

namespace fastattn::cpu {

namespace {
const KernelTable kTable = {"generic", &generic::fwd_tasks, &generic::fwd_scratch_floats,
                            &generic::bwd_tasks, &generic::bwd_scratch_floats,
                            &generic::decode_tasks, &generic::decode_scratch_floats};
}  // namespace

const KernelTable* kernels_generic() { return &kTable; }

}  // namespace fastattn::cpu
