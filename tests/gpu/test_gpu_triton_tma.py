"""The triton forward's tensor-descriptor (TMA) variant on a real sm_90+ GPU against the float64
oracle (the attention cases of gpu_cases.py; forward through TMA, backward as usual). Run by
`make gpu-check` with FASTATTN_TRITON_TMA=1 on sm_90+ GPUs, where its result becomes the
"triton-tma" validation entry; skipped without such a GPU."""

import os

import pytest
import torch

from gpu_cases import first_tile_without_autotuning  # noqa: F401  (autouse fixture)
from gpu_cases import CASES, check_attention, requires_gpu

pytestmark = requires_gpu


@pytest.fixture(autouse=True)
def tma_on(monkeypatch):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA (tensor descriptors) needs an sm_90+ GPU")
    monkeypatch.setenv("FASTATTN_TRITON_TMA", "1")


def test_tma_variant_is_taken():
    from fastattn.backends.triton import ops

    q, k, v, o = (torch.empty(1, 2, 128, 64, device="cuda", dtype=torch.float16)
                  for _ in range(4))
    assert os.environ["FASTATTN_TRITON_TMA"] == "1"
    assert ops._use_tma(q, k, v, o, interpret=False)


@pytest.mark.parametrize("name", list(CASES))
def test_attention(name):
    check_attention("triton", name)
