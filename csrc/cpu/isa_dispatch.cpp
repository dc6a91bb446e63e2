// Runtime choice of the CPU kernel variant (isa/kernels_*.cpp), from what the running CPU
// supports and the FASTATTN_CPU_ISA environment variable (read on every call).
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "cpu/isa/kernel_tables.h"

namespace fastattn::cpu {

namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool cpu_has_avx512bf16() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

struct Variant {
  const char* name;
  const KernelTable* (*table)();
  bool (*runnable)();
};

bool always() { return true; }

// Best last.
const Variant kVariants[] = {
    {"generic", &kernels_generic, &always},
    {"avx2", &kernels_avx2, &cpu_has_avx2},
    {"avx512", &kernels_avx512, &cpu_has_avx512},
    {"avx512bf16", &kernels_avx512bf16, &cpu_has_avx512bf16},
};

}  // namespace

std::vector<std::string> runnable_isas() {
  std::vector<std::string> out;
  for (const auto& v : kVariants)
    if (v.table() != nullptr && v.runnable()) out.emplace_back(v.name);
  return out;
}

const KernelTable& active_kernels() {
  const char* env = std::getenv("FASTATTN_CPU_ISA");
  const std::string want = env ? env : "";
  if (want.empty() || want == "auto") {
    const KernelTable* best = nullptr;
    for (const auto& v : kVariants)
      if (v.table() != nullptr && v.runnable()) best = v.table();
    return *best;  // generic always runs
  }
  std::string names;
  for (const auto& v : kVariants) {
    names += names.empty() ? "" : ", ";
    names += v.name;
    if (want != v.name) continue;
    TORCH_CHECK_VALUE(v.table() != nullptr, "FASTATTN_CPU_ISA=", want,
                      ": this build of fastattn has no such kernel variant (not an x86-64 build); unset it or "
                      "use generic");
    TORCH_CHECK_VALUE(v.runnable(), "FASTATTN_CPU_ISA=", want,
                      ": this CPU cannot run that kernel variant (it lacks the instructions); variants it can "
                      "run: ",
                      [] {
                        std::string s;
                        for (const auto& n : runnable_isas()) s += (s.empty() ? "" : ", ") + n;
                        return s;
                      }());
    return *v.table();
  }
  TORCH_CHECK_VALUE(false, "FASTATTN_CPU_ISA must be one of auto, ", names, "; got '", want, "'");
}

std::string isa_report() {
  std::string s = "cpu features:";
  s += cpu_has_avx2() ? " avx2+fma" : "";
  s += cpu_has_avx512() ? " avx512(f,bw,vl,dq)" : "";
  s += cpu_has_avx512bf16() ? " avx512_bf16" : "";
  s += "; kernel variants runnable: ";
  std::string r;
  for (const auto& n : runnable_isas()) r += (r.empty() ? "" : ", ") + n;
  return s + r;
}

}  // namespace fastattn::cpu
