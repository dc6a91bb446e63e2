#!/usr/bin/env python
"""Run PyTorch's own SDPA tests (test/test_transformers.py) with fastattn.patch_sdpa() active.

    python tools/run_torch_sdpa_tests.py PATH [--sample N] [--seed S] [--max-len L]
                                        [--classes NAMES] [--with-transformers]
                                        [--keep] [-- PYTEST_ARGS...]

PATH is a copy of PyTorch's test/test_transformers.py (or the root of a pytorch checkout).
The file is copied, byte for byte, into a temporary directory next to a conftest.py written
by this script, and pytest runs it there; the user's copy is never modified. The conftest

  - calls fastattn.patch_sdpa() before the test file is imported, so both
    torch.nn.functional.scaled_dot_product_attention and the file's own
    `from torch.nn.functional import scaled_dot_product_attention` are fastattn's drop-in
    for the whole session (what a user who swaps it in gets);
  - keeps the CPU instantiations of the SDPA classes (--classes: TestSDPA, TestSDPACpuOnly,
    TestSDPAFailureModes, TestAttnBias) plus every TestTransformers test whose name says
    scaled_dot_product / sdp (--with-transformers: all of TestTransformers, whose
    MultiheadAttention / TransformerEncoder tests call the patched function through
    torch.nn); CUDA-only classes are never instantiated on a CPU-only machine, and
    TestSDPAPrivateUse1Only (compiles a C++ device extension from torch's test tree) is
    never selected;
  - drops parametrizations whose sequence lengths exceed --max-len (parameters named
    *seq_len*, and the (B, H, Lq, Lk, D) `shape` tuples of TestAttnBias), then runs a
    seeded random sample of --sample of them (0: all);
  - (--no-patch: the same selection without the patch, i.e. torch's own function: the
    baseline that tells fastattn's failures from the file's own failures on this torch)
  - counts, per test and in total, the calls of the patched function that fastattn's
    kernels served and those it handed to torch's original (fastattn.patching.stats), and
    tallies the fallbacks by the argument feature that sent them to torch, so that a pass
    is not silently a pass of torch's own code. The summary is printed at the end of the
    session and written to $FASTATTN_SDPA_STATS (JSON) when that is set.

The test file imports `test_cpp_extensions_open_device_registration`, a sibling in torch's
test/ directory. If PATH has that sibling it is copied too; otherwise a stand-in providing
its two names (used only by TestSDPAPrivateUse1Only.setUpClass, which never runs here) is
written, whose functions raise unittest.SkipTest.

PyTorch test file this was matched against: pytorch/pytorch test/test_transformers.py at
commit 00030eb8e81f911c48c4d7634fa6b8bb2fae1a1b (the newest full copy of the file that was
available; see benchmarks/results/torch_sdpa_conformance.md). It imports cleanly against
torch 2.13.0, whose wheel ships the torch.testing._internal modules the file uses; those
need expecttest (pip install expecttest).
Exit status: pytest's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TORCH_TEST_COMMIT = "00030eb8e81f911c48c4d7634fa6b8bb2fae1a1b"
DEFAULT_CLASSES = ("TestSDPA", "TestSDPACpuOnly", "TestSDPAFailureModes", "TestAttnBias")
SIBLING = "test_cpp_extensions_open_device_registration.py"

STAND_IN = '''"""Stand-in written by fastattn's tools/run_torch_sdpa_tests.py for a sibling module of
torch's test/ directory that the run does not include. Only TestSDPAPrivateUse1Only uses these
names (it compiles a C++ device extension from torch's test tree), and that class is never
selected by the runner."""
import unittest


def remove_build_path(*args, **kwargs):
    raise unittest.SkipTest("needs torch's test/cpp_extensions tree")


def generate_faked_module(*args, **kwargs):
    raise unittest.SkipTest("needs torch's test/cpp_extensions tree")
'''

CONFTEST = r'''
# Written by fastattn's tools/run_torch_sdpa_tests.py: runs PyTorch's test_transformers.py with
# fastattn.patch_sdpa() active. Not part of PyTorch.
import collections
import json
import os
import random

import pytest
import torch

import fastattn
import fastattn.api as _api
import fastattn.patching as _patching

# Patched before the test file is imported: its `from torch.nn.functional import
# scaled_dot_product_attention` binds fastattn's wrapper.
_BASELINE = os.environ.get("FASTATTN_SDPA_BASELINE") == "1"  # --no-patch: torch alone
_PATCH = None if _BASELINE else fastattn.patch_sdpa()
_STATS = _patching.stats
_totals = {"calls": 0, "fastattn": 0, "torch": 0}
_per_test = {}
_fallback_why = collections.Counter()
_served_what = collections.Counter()


def _features(*args, **kwargs):
    """Why a call goes where it goes, in words: its mask or shape kind, plus the dtype and
    dropout when those alone keep it from fastattn's kernels."""
    what = _kind(*args, **kwargs)
    query = args[0] if args else kwargs.get("query")
    extra = []
    if isinstance(query, torch.Tensor) and query.dtype not in (
            torch.float32, torch.float16, torch.bfloat16):
        extra.append(str(query.dtype).replace("torch.", ""))
    dropout_p = args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0)
    if dropout_p and what != "dropout_p > 0":
        extra.append("dropout")
    return ", ".join([what] + extra)


def _kind(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
          enable_gqa=False):
    """The call's mask or shape kind (first matching feature)."""
    ts = (query, key, value)
    if not all(isinstance(t, torch.Tensor) for t in ts):
        return "non-tensor input"
    if any(t.is_nested for t in ts):
        return "nested tensor"
    if attn_mask is not None:
        if type(attn_mask).__name__ == "CausalBias":
            return "attn_mask=CausalBias %s" % getattr(getattr(attn_mask, "variant", None), "name", "?")
        if isinstance(attn_mask, torch.Tensor):
            return "attn_mask %s %dD" % (str(attn_mask.dtype).replace("torch.", ""), attn_mask.ndim)
        return "attn_mask other"
    if dropout_p:
        return "dropout_p > 0"
    if any(t.ndim != 4 for t in ts):
        return "%dD inputs%s" % (query.ndim, ", is_causal" if is_causal else "")
    if len({t.dtype for t in ts}) > 1:
        return "mixed dtypes"
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return "dtype"
    if 0 in query.shape or 0 in key.shape:
        return "empty"
    if is_causal and query.shape[2] < key.shape[2]:
        return "is_causal with Nq < Nk"
    if is_causal:
        return "4D, is_causal"
    if query.shape[1] != key.shape[1]:
        return "4D, GQA"
    return "4D, plain"


_inner = _api.scaled_dot_product_attention


def _classifying(*args, **kwargs):
    before = _STATS.torch
    why = "?"
    try:
        why = _features(*args, **kwargs)
    except Exception:  # classification must never change behaviour
        pass
    try:
        return _inner(*args, **kwargs)
    finally:
        if _STATS.torch != before:
            _fallback_why[why] += 1
        else:
            _served_what[why] += 1


# The patched wrapper looks the API function up on the module at call time.
if not _BASELINE:
    _api.scaled_dot_product_attention = _classifying


@pytest.fixture(autouse=True)
def _count_calls(request):
    _STATS.reset()
    yield
    row = {"calls": _STATS.calls, "fastattn": _STATS.fastattn, "torch": _STATS.torch}
    _per_test[request.node.nodeid] = row
    for k in _totals:
        _totals[k] += row[k]


def _lengths(item):
    params = getattr(getattr(item, "callspec", None), "params", {})
    lens = [v for k, v in params.items() if "seq_len" in k and isinstance(v, int)]
    shape = params.get("shape")
    if isinstance(shape, tuple) and len(shape) == 5:
        lens += [shape[2], shape[3]]
    # unittest-style parametrized names carry the values in the test name instead
    name = item.name
    for key in ("seq_len_q_", "seq_len_k_", "seq_len_", "q_seq_len_", "kv_seq_len_",
                "max_seq_len_q_", "max_seq_len_kv_"):
        i = name.find(key)
        if i >= 0:
            digits = ""
            for ch in name[i + len(key):]:
                if not ch.isdigit():
                    break
                digits += ch
            if digits:
                lens.append(int(digits))
    for i in range(len(name)):
        if name.startswith("shape_", i):
            parts = name[i + 6:].split("_")
            nums = []
            for p in parts:
                if p.isdigit():
                    nums.append(int(p))
                else:
                    break
            if len(nums) >= 4:
                lens += [nums[2], nums[3]]
    return max(lens) if lens else 0


def _selected(item, classes, with_transformers):
    cls = item.cls.__name__ if getattr(item, "cls", None) else ""
    if not cls.endswith("CPU"):
        return False
    base = cls[:-3]
    if base in classes:
        return True
    if base == "TestTransformers":
        name = getattr(item, "originalname", item.name)
        return with_transformers or "scaled_dot_product" in name or "sdp" in name
    return False


def pytest_collection_modifyitems(config, items):
    classes = set(os.environ["FASTATTN_SDPA_CLASSES"].split(","))
    with_tf = os.environ.get("FASTATTN_SDPA_WITH_TRANSFORMERS") == "1"
    max_len = int(os.environ["FASTATTN_SDPA_MAX_LEN"])
    sample = int(os.environ["FASTATTN_SDPA_SAMPLE"])
    seed = int(os.environ["FASTATTN_SDPA_SEED"])
    chosen = [it for it in items if _selected(it, classes, with_tf)]
    n_selected = len(chosen)
    pool = [it for it in chosen if _lengths(it) <= max_len]
    pool_size = len(pool)
    if sample and sample < len(pool):
        keep = set(id(it) for it in random.Random(seed).sample(pool, sample))
        pool = [it for it in pool if id(it) in keep]
    keep = set(id(it) for it in pool)
    config.hook.pytest_deselected(items=[it for it in items if id(it) not in keep])
    config._fastattn_counts = (len(pool), pool_size, n_selected, len(items))
    items[:] = pool


def pytest_report_collectionfinish(config, start_path, items):
    chosen, size, selected, total = config._fastattn_counts
    return (f"fastattn: running {chosen} of {size} tests (SDPA classes: {selected} of the file's "
            f"{total} collected; {selected - size} over the length cap of "
            f"{os.environ['FASTATTN_SDPA_MAX_LEN']}); patched: {_patching.is_patched()}")


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    t = _totals
    tr.section("fastattn: calls of the patched scaled_dot_product_attention")
    share = (100.0 * t["fastattn"] / t["calls"]) if t["calls"] else 0.0
    tr.write_line(f"calls {t['calls']}: served by fastattn kernels {t['fastattn']} ({share:.1f}%), "
                  f"handed to torch's original {t['torch']}")
    tests_with_calls = sum(1 for r in _per_test.values() if r["calls"])
    tests_served = sum(1 for r in _per_test.values() if r["fastattn"])
    tr.write_line(f"tests that called it: {tests_with_calls}; of those, {tests_served} had at "
                  f"least one call served by fastattn")
    tr.write_line("served, by call feature: " + ", ".join(
        f"{k}: {v}" for k, v in _served_what.most_common()))
    tr.write_line("handed to torch, by call feature: " + ", ".join(
        f"{k}: {v}" for k, v in _fallback_why.most_common()))
    out = os.environ.get("FASTATTN_SDPA_STATS")
    if out:
        with open(out, "w") as f:
            json.dump({"totals": t, "served": dict(_served_what),
                       "fallback": dict(_fallback_why), "per_test": _per_test}, f, indent=1)
'''

PYTEST_INI = """[pytest]
# PyTorch's test_transformers.py, run by fastattn's tools/run_torch_sdpa_tests.py
addopts = -p no:cacheprovider
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("path", help="PyTorch's test/test_transformers.py, or a checkout root")
    ap.add_argument("--sample", type=int, default=0,
                    help="run a seeded random sample of this many tests (0: all)")
    ap.add_argument("--seed", type=int, default=0, help="the sample's seed")
    ap.add_argument("--max-len", type=int, default=1030,
                    help="keep parametrizations whose sequence lengths are all <= this")
    ap.add_argument("--classes", default=",".join(DEFAULT_CLASSES),
                    help="comma-separated test class names (without the CPU suffix)")
    ap.add_argument("--with-transformers", action="store_true",
                    help="also run all of TestTransformers (nn.MultiheadAttention etc.)")
    ap.add_argument("--no-patch", action="store_true",
                    help="baseline: run the same selection on torch's own function (no patch)")
    ap.add_argument("--stats", help="write the call counts (JSON) to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    # anything after `--` goes to pytest (e.g. -- -k causal -x)
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)

    src = Path(a.path)
    if src.is_dir():
        src = src / "test" / "test_transformers.py"
    if not src.is_file():
        ap.error(f"no such file: {src}")
    try:
        import expecttest  # noqa: F401  (torch.testing._internal.common_utils imports it)
    except ImportError:
        ap.error("PyTorch's test file needs expecttest: pip install expecttest")

    tmp = Path(tempfile.mkdtemp(prefix="fastattn_torch_sdpa_tests_"))
    try:
        shutil.copyfile(src, tmp / "test_transformers.py")
        sibling = src.parent / SIBLING
        if sibling.is_file():
            shutil.copyfile(sibling, tmp / SIBLING)
        else:
            (tmp / SIBLING).write_text(STAND_IN)
        (tmp / "conftest.py").write_text(CONFTEST)
        (tmp / "pytest.ini").write_text(PYTEST_INI)
        env = dict(os.environ, FASTATTN_SDPA_CLASSES=a.classes,
                   FASTATTN_SDPA_WITH_TRANSFORMERS="1" if a.with_transformers else "0",
                   FASTATTN_SDPA_MAX_LEN=str(a.max_len), FASTATTN_SDPA_SAMPLE=str(a.sample),
                   FASTATTN_SDPA_SEED=str(a.seed),
                   FASTATTN_SDPA_BASELINE="1" if a.no_patch else "0")
        if a.stats:
            env["FASTATTN_SDPA_STATS"] = str(Path(a.stats).resolve())
        cmd = [sys.executable, "-m", "pytest", "test_transformers.py", "-q", "-rfEs", *extra]
        print(f"# PyTorch SDPA tests from {src} (matched against pytorch/pytorch "
              f"{TORCH_TEST_COMMIT[:12]})\n# in {tmp}: {' '.join(cmd)}", flush=True)
        return subprocess.call(cmd, cwd=tmp, env=env)
    finally:
        if a.keep:
            print(f"# kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
