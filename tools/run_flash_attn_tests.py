#!/usr/bin/env python
"""Run FlashAttention's own test file against fastattn.flash_attn_compat, on the CPU.

    python tools/run_flash_attn_tests.py PATH [--sample N] [--seed S] [--max-len L]
                                         [--tests NAMES] [--keep] [-- PYTEST_ARGS...]

PATH is a copy of FlashAttention's tests/test_flash_attn.py (or the root of a
flash-attention checkout). The file is copied, byte for byte, into a temporary directory
next to a conftest.py written by this script, and pytest runs it there; the user's copy is
never modified. The conftest

  - binds the `flash_attn` modules the file imports to fastattn's mirror of them:
    flash_attn -> fastattn.flash_attn_compat, flash_attn.flash_attn_interface (including
    _get_block_size_n), flash_attn.bert_padding, flash_attn.layers.rotary
    (apply_rotary_emb);
  - answers torch.cuda.get_device_capability with (8, 0) (an A100: the kernel block
    sizes S_dmask is laid out in) and torch.cuda.get_device_properties with this host's
    physical memory as total_memory;
  - runs every test under a torch function mode that turns device="cuda" into "cpu"
    (the file creates all its tensors with device=device, device = "cuda");
  - keeps the four test functions the compat layer is held to (--tests), with every
    sequence length <= --max-len, and a seeded random sample of --sample of them
    (--sample 0: all). Whatever else the file holds is deselected.

FlashAttention release whose tests this was matched against: v2.8.3
(commit 060c9188beec3a8b62b33a3bfa6d5d2d44975fab; tests/test_flash_attn.py is unchanged
from v2.7.0 to v2.8.3). The file needs einops (pip install einops).
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

FA_RELEASE = "v2.8.3"
FA_COMMIT = "060c9188beec3a8b62b33a3bfa6d5d2d44975fab"
DEFAULT_TESTS = ("test_flash_attn_output", "test_flash_attn_qkvpacked",
                 "test_flash_attn_varlen_output", "test_flash_attn_kvcache")

CONFTEST = r'''
# Written by fastattn's tools/run_flash_attn_tests.py: runs FlashAttention's test file on
# the CPU against fastattn.flash_attn_compat. Not part of FlashAttention.
import os
import random
import sys
import types

import pytest
import torch
from torch.overrides import TorchFunctionMode

import fastattn.flash_attn_compat as _compat
import fastattn.flash_attn_compat.bert_padding as _bert_padding
import fastattn.flash_attn_compat.flash_attn_interface as _interface
import fastattn.flash_attn_compat.layers as _layers
import fastattn.flash_attn_compat.layers.rotary as _rotary

sys.modules.update({
    "flash_attn": _compat,
    "flash_attn.flash_attn_interface": _interface,
    "flash_attn.bert_padding": _bert_padding,
    "flash_attn.layers": _layers,
    "flash_attn.layers.rotary": _rotary,
})


def _capability(device=None):
    return (8, 0)


def _properties(device=None):
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return types.SimpleNamespace(name="cpu", major=8, minor=0, total_memory=mem,
                                 multi_processor_count=os.cpu_count())


torch.cuda.get_device_capability = _capability
torch.cuda.get_device_properties = _properties


def _is_cuda(dev):
    try:
        return torch.device(dev).type == "cuda"
    except (RuntimeError, TypeError):
        return False


class _CudaMeansCpu(TorchFunctionMode):
    """device="cuda" (keyword or a .to()/.cuda() target) becomes the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and kwargs["device"] is not None and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0].cpu()
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, torch.device)) \
                and _is_cuda(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


@pytest.fixture(autouse=True)
def _cpu_device():
    with _CudaMeansCpu():
        yield


def _max_len(item):
    params = getattr(getattr(item, "callspec", None), "params", {})
    lens = [v for k, v in params.items() if k in ("seqlen", "seqlen_q", "seqlen_k")]
    return max(lens) if lens else 0


def pytest_collection_modifyitems(config, items):
    names = os.environ["FASTATTN_FA_TESTS"].split(",")
    max_len = int(os.environ["FASTATTN_FA_MAX_LEN"])
    sample = int(os.environ["FASTATTN_FA_SAMPLE"])
    seed = int(os.environ["FASTATTN_FA_SEED"])
    pool = [it for it in items
            if getattr(it, "originalname", it.name) in names and _max_len(it) <= max_len]
    pool_size = len(pool)
    if sample and sample < len(pool):
        chosen = set(id(it) for it in random.Random(seed).sample(pool, sample))
        pool = [it for it in pool if id(it) in chosen]
    keep = set(id(it) for it in pool)
    config.hook.pytest_deselected(items=[it for it in items if id(it) not in keep])
    config._fastattn_counts = (len(pool), pool_size, {
        n: sum(getattr(it, "originalname", "") == n for it in pool) for n in names})
    items[:] = pool


def pytest_report_collectionfinish(config, start_path, items):
    chosen, size, per_test = config._fastattn_counts
    return (f"fastattn: running {chosen} of the {size} parametrizations of "
            f"{', '.join(per_test)} with lengths <= {os.environ['FASTATTN_FA_MAX_LEN']} "
            f"({', '.join(f'{n}: {c}' for n, c in per_test.items())})")
'''

PYTEST_INI = """[pytest]
# FlashAttention's test file, run by fastattn's tools/run_flash_attn_tests.py
addopts = -p no:cacheprovider
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("path", help="FlashAttention's tests/test_flash_attn.py, or a checkout root")
    ap.add_argument("--sample", type=int, default=200,
                    help="run a seeded random sample of this many parametrizations (0: all)")
    ap.add_argument("--seed", type=int, default=0, help="the sample's seed")
    ap.add_argument("--max-len", type=int, default=1025,
                    help="keep parametrizations whose sequence lengths are all <= this")
    ap.add_argument("--tests", default=",".join(DEFAULT_TESTS),
                    help="comma-separated test function names")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    # anything after `--` goes to pytest (e.g. -- -k kvcache -x)
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)

    src = Path(a.path)
    if src.is_dir():
        src = src / "tests" / "test_flash_attn.py"
    if not src.is_file():
        ap.error(f"no such file: {src}")
    try:
        import einops  # noqa: F401
    except ImportError:
        ap.error("FlashAttention's test file needs einops: pip install einops")

    tmp = Path(tempfile.mkdtemp(prefix="fastattn_fa_tests_"))
    try:
        shutil.copyfile(src, tmp / "test_flash_attn.py")
        (tmp / "conftest.py").write_text(CONFTEST)
        (tmp / "pytest.ini").write_text(PYTEST_INI)
        env = dict(os.environ, FASTATTN_FA_TESTS=a.tests, FASTATTN_FA_MAX_LEN=str(a.max_len),
                   FASTATTN_FA_SAMPLE=str(a.sample), FASTATTN_FA_SEED=str(a.seed))
        cmd = [sys.executable, "-m", "pytest", "test_flash_attn.py", "-q", "-rfEs",
               *extra]
        print(f"# FlashAttention tests from {src} (matched against {FA_RELEASE}, {FA_COMMIT[:12]})"
              f"\n# in {tmp}: {' '.join(cmd)}", flush=True)
        return subprocess.call(cmd, cwd=tmp, env=env)
    finally:
        if a.keep:
            print(f"# kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
