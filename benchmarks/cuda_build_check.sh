#!/usr/bin/env bash
# Build check of the real CUDA extension: builds fastattn._cuda (csrc/cuda kernels +
# csrc/bindings/cuda_ops.cpp) against the CUDA build of torch, imports it, and checks that
# calling its ops on CPU tensors fails with a clear error. No GPU needed.
#
#   bash benchmarks/cuda_build_check.sh          (make cuda-build-check)
#
# Uses a SEPARATE venv ($FASTATTN_CUDA_VENV, default /tmp/fastattn-cuda-venv) holding
# torch==$FASTATTN_CUDA_TORCH (default 2.14.1, a CUDA wheel installed by pip from the local
# package index; ~5 GB with its nvidia-* wheels) — never the project's .venv, which stays on the
# CPU build. Builds out of tree (build dir $FASTATTN_CUDA_BUILD, default /tmp/fastattn-cuda-build)
# so nothing built against the CUDA torch lands in python_pkg/. Prints the time of each step.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${FASTATTN_CUDA_VENV:-/tmp/fastattn-cuda-venv}
TORCH_REQ=torch==${FASTATTN_CUDA_TORCH:-2.14.1}
BUILD=${FASTATTN_CUDA_BUILD:-/tmp/fastattn-cuda-build}
PY=$VENV/bin/python
t0=$(date +%s)
step() { echo "== [$(( $(date +%s) - t0 )) s] $*"; }

command -v nvcc >/dev/null || { echo "nvcc not found on PATH: cannot build the CUDA extension"; exit 2; }
if [ -z "${CUDA_HOME:-}" ]; then
  # nvcc may be a wrapper script; take the toolkit from the path it execs, else its own dir.
  NVCC_REAL=$(sed -n 's|^exec \([^ ]*/bin/nvcc\).*|\1|p' "$(command -v nvcc)" 2>/dev/null | head -1)
  [ -n "$NVCC_REAL" ] || NVCC_REAL=$(readlink -f "$(command -v nvcc)")
  export CUDA_HOME=$(dirname "$(dirname "$NVCC_REAL")")
fi
step "CUDA_HOME=$CUDA_HOME ($(nvcc --version | tail -2 | head -1))"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('${TORCH_REQ#torch==}') and torch.version.cuda else 1)" 2>/dev/null; then
  step "creating $VENV with $TORCH_REQ (CUDA build)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH_REQ" numpy ninja setuptools wheel
fi
step "torch $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')"

rm -rf "$BUILD/pkg"
mkdir -p "$BUILD/lib" "$BUILD/tmp" "$BUILD/pkg"
step "building fastattn._C and fastattn._cuda (FASTATTN_BUILD_CUDA=1, MAX_JOBS=${MAX_JOBS:-auto})"
if ! FASTATTN_BUILD_CUDA=1 FASTATTN_NATIVE=${FASTATTN_NATIVE:-0} PATH="$VENV/bin:$PATH" \
  "$PY" setup.py build_ext --build-lib "$BUILD/lib" --build-temp "$BUILD/tmp" \
  > "$BUILD/build.log" 2>&1; then
  grep -n -E "error|FAILED" "$BUILD/build.log" | head -40
  echo "BUILD FAILED (full log: $BUILD/build.log)"
  exit 1
fi
echo "   $(grep -c -E '^\[[0-9]+/[0-9]+\]' "$BUILD/build.log") compile steps (log: $BUILD/build.log)"
so=$(ls "$BUILD"/lib/fastattn/_cuda*.so)
step "built $(basename "$so") ($(du -h "$so" | cut -f1))"

# A throwaway copy of the package with the freshly built extensions next to it.
cp -r python_pkg/fastattn "$BUILD/pkg/fastattn"
find "$BUILD/pkg/fastattn" -name '*.so' -delete
cp "$BUILD"/lib/fastattn/*.so "$BUILD/pkg/fastattn/"
step "import and CPU-tensor checks"
PYTHONPATH="$BUILD/pkg" "$PY" - <<'PYEOF'
import torch
import fastattn._cuda  # noqa: F401  registers torch.ops.fastattn.cuda_fwd / cuda_bwd / cuda_decode
from fastattn.backends.cuda import CUDABackend

ops = torch.ops.fastattn
print("ops:", ops.cuda_fwd, ops.cuda_bwd, ops.cuda_decode)
q = torch.randn(1, 2, 8, 64, dtype=torch.float16)
for name, call in [
    ("cuda_fwd", lambda: ops.cuda_fwd(q, q, q, 0.125, -1, -1, [])),
    ("cuda_bwd", lambda: ops.cuda_bwd(q, q, q, q, q, q[..., 0].float(), 0.125, -1, -1, [])),
    ("cuda_bwd (deterministic=False)", lambda: ops.cuda_bwd(q, q, q, q, q, q[..., 0].float(), 0.125, -1, -1, [],
                                                            deterministic=False)),
    ("cuda_decode", lambda: ops.cuda_decode(q[:, :, :1], q, q, None, 0.125, -1, -1, 0.0, None, 1, 8)),
]:
    try:
        call()
    except RuntimeError as e:
        msg = str(e).splitlines()[0]
        assert "CUDA tensors" in msg and "backend='cpu'" in msg and "but q is on" in msg, msg
        print(f"{name} on CPU tensors -> RuntimeError: {msg}")
    else:
        raise SystemExit(f"{name} on CPU tensors did not raise")
ok, why = CUDABackend().available()
print("CUDABackend().available():", ok, "-", why)
assert not ok and "GPU" in why, why
print("BUILD CHECK OK")
PYEOF
step "done"
