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

import datetime
import glob
import json
import os
import platform
import shutil
import subprocess

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


BUILD_INFO_FILE = "_build_info.json"  # read by python_pkg/fastattn/_extension.py


def _compiler_version(cmd: str) -> str:
    try:
        out = subprocess.run([cmd, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else cmd
    except (OSError, subprocess.SubprocessError):
        return cmd


def _build_record(exts, compiler_cmd: str) -> dict:
    """What the extensions were built with and against; fastattn reads it at import, before
    loading them, to refuse a torch they were not built for with a clear message."""
    import torch

    cxx = next((e.extra_compile_args.get("cxx", []) for e in exts if e.name == "fastattn._C"), [])
    cuda = next((e for e in exts if e.name == "fastattn._cuda"), None)
    return {
        "fastattn": _version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cxx11_abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "compiler": _compiler_version(compiler_cmd),
        "cxx_flags": cxx,
        "cpu_isa_variants": sorted(  # csrc/cpu/isa/kernels_<variant>.cpp
            os.path.basename(p)[len("kernels_"):-len(".cpp")]
            for p in glob.glob(os.path.join(ROOT, "csrc/cpu/isa/kernels_*.cpp"))),
        "native": os.environ.get("FASTATTN_NATIVE", "0") == "1",
        "extensions": sorted(e.name for e in exts),
        "cuda_archs": (os.environ.get("FASTATTN_CUDA_ARCHS", "80;90") if cuda is not None else None),
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _version() -> str:
    scope: dict = {}
    with open(os.path.join(ROOT, "python_pkg", "fastattn", "_version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def _cmdclass():
    import torch
    from torch.utils.cpp_extension import BuildExtension

    if "pip-build-env" in (torch.__file__ or ""):
        print(f"fastattn: WARNING: building in pip's isolated environment against torch "
              f"{torch.__version__}; the extension will load only under that exact torch. Build "
              f"with `pip install --no-build-isolation ...` to use the torch you run.")

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        def run(self):
            super().run()
            # next to the built extension: python_pkg/fastattn for in-place builds, the build
            # tree (and so the wheel) otherwise
            target = os.path.dirname(self.get_ext_fullpath("fastattn._C"))
            cmd = (getattr(self.compiler, "compiler_cxx", None) or ["c++"])[0]
            os.makedirs(target, exist_ok=True)
            with open(os.path.join(target, BUILD_INFO_FILE), "w") as f:
                json.dump(_build_record(self.extensions, cmd), f, indent=1)
                f.write("\n")

    return {"build_ext": BuildExt}


os.environ.setdefault("MAX_JOBS", _default_max_jobs())
if os.environ.get("FASTATTN_SKIP_EXT") == "1":
    setup()
else:
    setup(ext_modules=_extensions(), cmdclass=_cmdclass())
