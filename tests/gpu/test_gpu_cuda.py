"""The cuda backend (csrc/cuda, the fastattn._cuda extension) on a real GPU against the
float64 oracle (cases: gpu_cases.py; the ones it does not serve, e.g. head dim 256 with
deterministic=True, skip with its reason), with both backwards (deterministic=True: the wmma one; False: the FA2 class one). Run by `make gpu-check` after it builds the extension; skipped without a GPU."""

import pytest

from gpu_cases import first_tile_without_autotuning  # noqa: F401  (autouse fixture)
from gpu_cases import CASES, DECODE_CASES, check_attention, check_decode, requires_gpu

pytestmark = requires_gpu


@pytest.mark.parametrize("name", list(CASES))
def test_attention(name):
    check_attention("cuda", name)


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode(name):
    check_decode("cuda", name)


@pytest.mark.parametrize("name", list(CASES))
def test_attention_atomic_backward(name):
    # deterministic=False: the FlashAttention-2 class backward (fa2_bwd_kernel.h, atomic dQ)
    check_attention("cuda", name, deterministic=False)
