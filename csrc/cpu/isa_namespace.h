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
