// The kernel variants the build holds (isa/kernels_*.cpp) and the runtime choice among them
// (isa_dispatch.cpp). A variant that this build or architecture lacks returns nullptr.
#pragma once

#include <string>
#include <vector>

#include "cpu/kernel_args.h"

namespace fastattn::cpu {

const KernelTable* kernels_generic();
const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();
const KernelTable* kernels_avx512bf16();

// The variant for this call: the best one the running CPU supports, or the one
// FASTATTN_CPU_ISA names (generic | avx2 | avx512 | avx512bf16 | auto). The variable is read on every
// call, so tests and A/B runs can switch paths inside one process. Forcing a variant the
// CPU cannot run raises (never an illegal instruction).
const KernelTable& active_kernels();

// Names of the variants this CPU can run, best last (e.g. {"generic", "avx2", "avx512"}).
std::vector<std::string> runnable_isas();

// One line for `fastattn info`: CPU features seen and the variant chosen.
std::string isa_report();

}  // namespace fastattn::cpu
