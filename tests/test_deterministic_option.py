"""fastattn.attention(..., deterministic=...) (issue 16): every backend accepts both values;
cpu (and reference) give bitwise identical gradients either way and across runs. The option
reaches the backends in Problem. (cuda with deterministic=False runs the atomic-dQ
FlashAttention-2 backward: tests/test_cuda_fa2_bwd_emulated.py checks it by the accuracy rule,
and that deterministic=True stays bitwise reproducible.)"""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn import api, dispatch
from fastattn.backends.base import Problem


def _grads(backend, deterministic, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 4, 37, 32, generator=g).requires_grad_() for _ in range(3))
    out = fastattn.attention(q, k[:, :2].detach().requires_grad_(), v[:, :2].detach()
                             .requires_grad_(), causal=True, backend=backend,
                             deterministic=deterministic)
    out.sum().backward()
    return out.detach(), q.grad


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_both_values_accepted_and_reproducible(backend):
    o1, g1 = _grads(backend, True)
    o2, g2 = _grads(backend, False)
    o3, g3 = _grads(backend, False)
    assert torch.equal(o1, o2) and torch.equal(g1, g2) and torch.equal(g2, g3)


def test_default_is_deterministic_and_reaches_problem(monkeypatch):
    assert api.check_options().deterministic is True
    assert api.check_options(deterministic=False).deterministic is False
    assert Problem.__dataclass_fields__["deterministic"].default is True
    seen = []
    real = dispatch.select

    def spy(p, *a, **kw):
        seen.append(p.deterministic)
        return real(p, *a, **kw)

    monkeypatch.setattr(dispatch, "select", spy)
    q = torch.randn(1, 1, 5, 16)
    fastattn.attention(q, q, q, backend="cpu")
    fastattn.attention(q, q, q, backend="cpu", deterministic=False)
    assert seen == [True, False]


def test_rejects_non_bool():
    q = torch.randn(1, 1, 5, 16)
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        fastattn.attention(q, q, q, deterministic="yes")
