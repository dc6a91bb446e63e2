import os
import sys

import pytest
import torch

# Tests import the shared oracle helpers as a plain module.
sys.path.insert(0, os.path.dirname(__file__))

import fastattn  # noqa: E402

CPU_OK, CPU_WHY = fastattn.available_backends()["cpu"]


def pytest_report_header(config):
    return [f"torch {torch.__version__}, threads {torch.get_num_threads()}",
            "fastattn backends: " + ", ".join(
                f"{n}={'yes' if ok else 'no'}" for n, (ok, _) in fastattn.available_backends().items())]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


requires_cpu_ext = pytest.mark.skipif(not CPU_OK, reason=f"cpu backend unavailable: {CPU_WHY}")
