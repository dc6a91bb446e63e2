# fastattn: the README's commands.
#   make bench   set everything up, then run the main job (a quick long-sequence benchmark)
#   make test    set everything up, then run the test suite
# Both create .venv when absent. Knobs: PYTHON (interpreter for the venv), TORCH (the torch
# requirement; 2.13.0 is the CPU build this project is developed against).

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

.PHONY: setup build bench test test-slow info compile-report cuda-build-check gpu-check sdist wheel clean

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=23"
	# torch first, then build tools; the extension builds against this torch (no isolation)
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q ninja numpy setuptools wheel pybind11
	# the package itself, editable; its extension is built by the rule below
	FASTATTN_SKIP_EXT=1 $(PIP) install -q --no-build-isolation -e ".[test,triton,transformers]"
	touch $@

# Rebuild the compiled extension when a C++/CUDA source changes (ninja: incremental).
$(VENV)/.built: $(VENV)/.deps $(CSRC) setup.py
	$(PY) setup.py -q build_ext --inplace
	touch $@

setup: $(VENV)/.built

build: $(VENV)/.built

info: setup
	$(VENV)/bin/fastattn info

bench: setup
	$(VENV)/bin/fastattn bench --quick

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# ptxas -v tables for the CUDA and Triton kernels (sm_80, sm_90; no GPU needed)
compile-report: setup
	$(PY) benchmarks/cuda_compile_report.py
	$(PY) benchmarks/triton_compile_report.py
	$(PY) benchmarks/triton_compile_report.py --tma-only --archs 90 --head-dims 64 128

# Builds the real CUDA extension against the CUDA build of torch in a separate venv
# (several minutes; not part of `make test`).
cuda-build-check:
	bash benchmarks/cuda_build_check.sh

# On a machine with a CUDA GPU: build the CUDA extension for its arch, run the GPU test suites,
# compute-sanitizer, the int64 probes and the benchmarks, each under its own time cap (about
# ten minutes in all); results in gpu_check_results/<time>_<gpu>/ (README: "Checking a GPU").
# Without a GPU: a dry run (collects the GPU tests, builds every command, marks steps skipped).
# GPU_CHECK_ARGS passes options, e.g. GPU_CHECK_ARGS="--budget-scale 1.5".
gpu-check: setup
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# Source distribution (all of csrc, see MANIFEST.in) and a wheel built against .venv's torch
sdist: $(VENV)/.deps
	$(PY) setup.py -q sdist -d dist

wheel: $(VENV)/.deps
	$(PIP) wheel --no-build-isolation --no-deps . -w dist

clean:
	rm -rf build dist $(VENV) python_pkg/fastattn/*.so python_pkg/fastattn/_build_info.json python_pkg/*.egg-info
