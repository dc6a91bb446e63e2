"""The triton backend on a real GPU against the float64 oracle (cases: gpu_cases.py). Run by
`make gpu-check`; skipped without a CUDA GPU."""

import pytest

from gpu_cases import first_tile_without_autotuning  # noqa: F401  (autouse fixture)
from gpu_cases import CASES, DECODE_CASES, check_attention, check_decode, requires_gpu

pytestmark = requires_gpu


@pytest.mark.parametrize("name", list(CASES))
def test_attention(name):
    check_attention("triton", name)


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode(name):
    check_decode("triton", name)
