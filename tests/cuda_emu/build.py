"""Builds emulated CUDA code into shared libraries for ctypes, with a content-hash cache.

    lib = build.load("fastattn_cuda_emu")     # csrc/cuda/*.cu + emu_api.cpp
    lib = build.load("cuda_emu_selftest")     # selftest_kernels.cu + selftest_ptx.cu

Sources compile as C++ (g++ -x c++) with tests/cuda_emu/include first on the include path, so
<cuda_runtime.h>, <cuda_fp16.h>, <cuda_bf16.h> and <mma.h> resolve to the emulator. Objects
build in parallel (one job per core), each cached under
$FASTATTN_CUDA_EMU_CACHE (default /tmp/fastattn-cuda-emu-<uid>) by the hash of its source, the
headers it includes (transitively, found by a textual scan of its #include lines) and the flags:
editing one kernel header recompiles only the sources that include it; an unchanged tree links
nothing and compiles nothing.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import glob
import hashlib
import os
import re
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
CXX = os.environ.get("CXX", "g++")
FLAGS = ["-std=c++17", "-O2", "-fPIC", "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas",
         "-Wno-unused-variable", "-Wno-unused-but-set-variable"]

LIBS = {
    "fastattn_cuda_emu": lambda: sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    + [os.path.join(HERE, "emu_api.cpp")],
    "cuda_emu_selftest": lambda: [os.path.join(HERE, "selftest_kernels.cu"),
                                  os.path.join(HERE, "selftest_ptx.cu")],
}

_loaded: dict[str, ctypes.CDLL] = {}


def cache_dir() -> str:
    d = os.environ.get("FASTATTN_CUDA_EMU_CACHE") or os.path.join(
        tempfile.gettempdir(), f"fastattn-cuda-emu-{os.getuid()}")
    os.makedirs(d, exist_ok=True)
    return d


_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.M)


def _deps(src: str) -> list[str]:
    """Every header src includes, transitively, that resolves on the emulated build's include
    path (the file's own directory, tests/cuda_emu/include, tests/cuda_emu, csrc); system headers
    do not resolve and are left out. A textual scan (no preprocessor): an #include inside an
    #if counts either way, which can only add files to the hash."""
    seen, todo = set(), [src]
    while todo:
        path = todo.pop()
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        for name in _INCLUDE.findall(text):
            for base in (os.path.dirname(path), os.path.join(HERE, "include"), HERE, CSRC):
                cand = os.path.normpath(os.path.join(base, name))
                if os.path.isfile(cand):
                    if cand not in seen:
                        seen.add(cand)
                        todo.append(cand)
                    break
    return sorted(seen)


def _deps_hash(src: str) -> bytes:
    h = hashlib.sha256()
    for path in _deps(src):
        h.update(path.encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.digest()


def _compile(src: str, obj: str) -> None:
    lang = ["-x", "c++"] if src.endswith(".cu") else []
    cmd = [CXX, *FLAGS, "-I", os.path.join(HERE, "include"), "-I", HERE, "-I", CSRC, *lang,
           "-c", src, "-o", obj + ".tmp"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"emulated build of {src} failed:\n{' '.join(cmd)}\n{r.stderr[-8000:]}")
    os.replace(obj + ".tmp", obj)


def build(name: str, jobs: int | None = None) -> str:
    """Path of the up-to-date shared library `name`, compiling what changed."""
    sources = LIBS[name]()
    base = hashlib.sha256((CXX + " ".join(FLAGS)).encode())
    objs, todo = [], []
    for src in sources:
        with open(src, "rb") as f:
            key = hashlib.sha256(base.digest() + _deps_hash(src) + src.encode()
                                 + f.read()).hexdigest()[:20]
        obj = os.path.join(cache_dir(), f"{os.path.basename(src)}.{key}.o")
        objs.append(obj)
        if not os.path.exists(obj):
            todo.append((src, obj))
    with cf.ThreadPoolExecutor(jobs or os.cpu_count() or 1) as ex:
        for fut in [ex.submit(_compile, s, o) for s, o in todo]:
            fut.result()
    lib_key = hashlib.sha256("".join(objs).encode()).hexdigest()[:20]
    lib = os.path.join(cache_dir(), f"lib{name}.{lib_key}.so")
    if not os.path.exists(lib):
        tmp = lib + f".{os.getpid()}.tmp"
        r = subprocess.run([CXX, "-shared", "-o", tmp, *objs], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"linking {name} failed:\n{r.stderr[-4000:]}")
        os.replace(tmp, lib)
    return lib


def load(name: str) -> ctypes.CDLL:
    if name not in _loaded:
        _loaded[name] = ctypes.CDLL(build(name))
    return _loaded[name]
