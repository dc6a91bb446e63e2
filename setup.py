"""Builds fastattn's compiled extensions with torch.utils.cpp_extension + ninja.

- fastattn._C     CPU kernels (csrc/cpu) + their TORCH_LIBRARY bindings (csrc/bindings/cpu_ops.cpp).
                  Always built.
- fastattn._cuda  CUDA kernels (csrc/cuda) + bindings (csrc/bindings/cuda_ops.cpp). Built only when
                  torch has CUDA and nvcc is found; FASTATTN_BUILD_CUDA=0/1 forces it off/on.

Environment knobs:
  FASTATTN_BUILD_CUDA   0/1 (default: auto)
  FASTATTN_CUDA_ARCHS   e.g. "80;90" (default "80;90")
  FASTATTN_NATIVE       1 compiles everything with -march=native (opt-in: the extension then runs
                        only on CPUs like the build host). Default 0: a portable baseline
                        (x86-64-v2 on x86-64) plus the AVX2 and AVX-512 kernel variants
                        (csrc/cpu/isa), chosen at run time from the CPU's features
  MAX_JOBS              parallel compile jobs (default: from cores and free memory)
  FASTATTN_SKIP_EXT     1 installs the Python package only (the Makefile then builds the
                        extension in place with `setup.py build_ext --inplace`, incrementally)
"""

from __future__ import annotations

import glob
import os
import platform
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _default_max_jobs() -> str:
    # Each nvcc/g++ job on torch headers peaks near 2 GiB; keep a margin.
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            avail_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        by_mem = max(1, avail_kb // (2 * 1024 * 1024))
    except (OSError, StopIteration):
        by_mem = cores
    return str(max(1, min(cores, by_mem)))


def _want_cuda() -> bool:
    flag = os.environ.get("FASTATTN_BUILD_CUDA", "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    import torch

    return torch.version.cuda is not None and shutil.which("nvcc") is not None


def _cxx_std() -> str:
    # torch >= 2.14's headers require C++20 (ATen.h: "C++20 or later ... is required").
    import torch

    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17"


def _cpu_arch_flags() -> list[str]:
    """Baseline code generation. The per-ISA kernels add their own target() on top."""
    if os.environ.get("FASTATTN_NATIVE", "0") == "1":
        return ["-march=native"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        return ["-march=x86-64-v2", "-mtune=generic"]
    return []


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    std = _cxx_std()

    cxx = ["-O3", std, "-fopenmp", "-ffp-contract=fast"]
    cxx += _cpu_arch_flags()
    cpu_sources = (sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("csrc/cpu/isa/*.cpp"))
                   + sorted(glob.glob("csrc/bindings/cpu_*.cpp")))
    exts = [
        CppExtension(
            "fastattn._C",
            cpu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]
    cuda_binding = "csrc/bindings/cuda_ops.cpp"
    if _want_cuda() and os.path.exists(cuda_binding):
        archs = os.environ.get("FASTATTN_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
        exts.append(
            CUDAExtension(
                "fastattn._cuda",
                sorted(glob.glob("csrc/cuda/*.cu")) + [cuda_binding],
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args={
                    "cxx": ["-O3", std],
                    "nvcc": ["-O3", std, "--use_fast_math", "-lineinfo", *gencode],
                },
            )
        )
    return exts


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


os.environ.setdefault("MAX_JOBS", _default_max_jobs())
if os.environ.get("FASTATTN_SKIP_EXT") == "1":
    setup()
else:
    setup(ext_modules=_extensions(), cmdclass=_cmdclass())
