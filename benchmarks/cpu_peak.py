"""This host's float32 FMA peak, measured: the clock under load and FMA throughput per ISA.

    python benchmarks/cpu_peak.py          # prints a JSON dict

peak = physical cores x FMA units x lanes x 2 x clock, each measured or read here:
- clock: a chain of dependent integer adds (one per cycle) run on every core at once, so the
  clock is the one the cores hold under full load (turbo and VM effects included);
- FMA units per core and ISA: independent FMAs per cycle measured on one core, on 256-bit
  (AVX2) and, where the CPU has it, 512-bit (AVX-512) registers (e.g. AMD Zen 4 runs 512-bit
  FMAs on its 256-bit pipes: 2 units at 8 lanes = 1 unit at 16 lanes);
- physical cores: os.sched_getaffinity (the cores this process may use).
The probe is a small C file compiled with the system compiler at run time (cc, -O2).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import tempfile
import threading
import time

_SRC = r"""
#include <stdint.h>
#include <immintrin.h>
uint64_t add_chain(uint64_t n) {             /* 8 dependent adds per iteration: 8n cycles */
  uint64_t x = 0;
  for (uint64_t i = 0; i < n; ++i) {
    __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\t"
                     "add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
  }
  return x;
}
#define ACC12(T, FMA, SET)                                                         \
  T a0 = SET(1.f), a1 = SET(1.1f), a2 = SET(1.2f), a3 = SET(1.3f), a4 = SET(1.4f), \
    a5 = SET(1.5f), a6 = SET(1.6f), a7 = SET(1.7f), a8 = SET(1.8f), a9 = SET(1.9f), \
    a10 = SET(2.f), a11 = SET(2.1f), b = SET(0.999999f), c = SET(1e-7f);           \
  for (long i = 0; i < n; ++i) {                                                   \
    a0 = FMA(a0, b, c); a1 = FMA(a1, b, c); a2 = FMA(a2, b, c); a3 = FMA(a3, b, c); \
    a4 = FMA(a4, b, c); a5 = FMA(a5, b, c); a6 = FMA(a6, b, c); a7 = FMA(a7, b, c); \
    a8 = FMA(a8, b, c); a9 = FMA(a9, b, c); a10 = FMA(a10, b, c); a11 = FMA(a11, b, c); \
  }
__attribute__((target("avx2,fma"))) float fma256(long n) {   /* 12 n FMAs */
  ACC12(__m256, _mm256_fmadd_ps, _mm256_set1_ps)
  __m256 s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
  return s[0];
}
__attribute__((target("avx512f"))) float fma512(long n) {
  ACC12(__m512, _mm512_fmadd_ps, _mm512_set1_ps)
  __m512 s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
  return s[0];
}
"""


def _lib():
    d = tempfile.mkdtemp(prefix="fastattn_peak_")
    src, so = os.path.join(d, "peak.c"), os.path.join(d, "peak.so")
    with open(src, "w") as f:
        f.write(_SRC)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", src, "-o", so], check=True)
    lib = ctypes.CDLL(so)
    lib.add_chain.argtypes, lib.add_chain.restype = [ctypes.c_uint64], ctypes.c_uint64
    for fn in (lib.fma256, lib.fma512):
        fn.argtypes, fn.restype = [ctypes.c_long], ctypes.c_float
    return lib


def _timed(fn, arg, threads):
    """Seconds each of `threads` concurrent calls fn(arg) took (ctypes releases the GIL)."""
    out = [0.0] * threads

    def run(i):
        t0 = time.perf_counter()
        fn(arg)
        out[i] = time.perf_counter() - t0

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


def _has(flag):
    try:
        with open("/proc/cpuinfo") as f:
            return any(flag in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False


def measure(reps=3) -> dict:
    lib = _lib()
    cores = len(os.sched_getaffinity(0))
    n_add = 50_000_000  # 4e8 cycles, ~0.1-0.2 s
    clocks = []
    for _ in range(reps):
        clocks += [8 * n_add / t for t in _timed(lib.add_chain, n_add, cores)]
    clock = sorted(clocks)[len(clocks) // 2]
    res = {"cores": cores, "clock_ghz": clock / 1e9, "isa": {}}
    n_fma = 20_000_000
    for name, fn, lanes, flag in (("avx2", lib.fma256, 8, "avx2"), ("avx512", lib.fma512, 16, "avx512f")):
        if not _has(flag):
            continue
        best = min(_timed(fn, n_fma, 1)[0] for _ in range(reps))
        per_cycle = 12 * n_fma / best / clock  # FMA instructions per cycle per core
        units = round(per_cycle * 2) / 2
        res["isa"][name] = {"lanes": lanes, "fma_per_cycle_measured": per_cycle, "fma_units": units,
                            "peak_gflops": cores * units * lanes * 2 * clock / 1e9}
    res["peak_gflops"] = max((v["peak_gflops"] for v in res["isa"].values()), default=None)
    return res


if __name__ == "__main__":
    print(json.dumps(measure(), indent=2))
