// Every inline helper that per-ISA kernels share (tiles.h, kernel_math.h, score_mods.h)
// lives in fastattn::cpu::FASTATTN_ISA, an inline namespace named for the ISA of the
// translation unit that includes it (isa/kernels_avx2.cpp defines FASTATTN_ISA avx2 ...;
// plain translation units get `base`). So an AVX-512 copy of a helper can never be linked
// in where the generic one was meant: each variant has its own symbols (as ATen does with
// CPU_CAPABILITY).
#pragma once

#ifndef FASTATTN_ISA
#define FASTATTN_ISA base
#endif

// The per-ISA helpers are internal to the extension: hidden symbols are called directly
// (no PLT) and can never be interposed by another library's copy.
#if defined(__GNUC__) || defined(__clang__)
#define FASTATTN_ISA_VISIBILITY __attribute__((visibility("hidden")))
#else
#define FASTATTN_ISA_VISIBILITY
#endif
