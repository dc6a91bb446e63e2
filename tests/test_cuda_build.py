"""The real CUDA extension builds, links and imports against the CUDA build of torch, and its
ops fail clearly on CPU tensors (benchmarks/cuda_build_check.sh, `make cuda-build-check`).
Takes minutes (a separate venv with torch 2.14.1 + CUDA wheels, then nvcc for sm_80 and sm_90),
so it carries the cuda_build marker and is deselected by default: run with -m cuda_build."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.cuda_build
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found on PATH")
def test_cuda_extension_builds_imports_and_rejects_cpu_tensors():
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "cuda_build_check.sh")],
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-6000:]
    assert "BUILD CHECK OK" in r.stdout
    assert "on CPU tensors -> RuntimeError" in r.stdout
