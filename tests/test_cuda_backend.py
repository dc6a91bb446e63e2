"""The cuda backend's Python side: availability and every reason it gives, dispatch, and, on a
machine with a GPU and the built extension, the real kernels against the reference."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.backends.base import Problem
from fastattn.backends.cuda import CUDABackend


def _problem(**kw):
    base = dict(device=torch.device("cpu"), dtype=torch.float32, B=1, Hq=2, Hkv=1, Nq=8, Nk=8,
                D=72, Dv=64, window=(-1, -1), block_mask=None, scale=0.125, needs_grad=False,
                return_lse=False)
    base.update(kw)
    return Problem(**base)


def test_available_says_why_not():
    ok, why = CUDABackend().available()
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: nothing to explain")
    assert not ok
    assert ("not built" in why) or ("no GPU" in why) or ("CPU-only" in why)
    assert fastattn.available_backends()["cuda"][0] is False


def test_why_not_lists_every_reason():
    reasons = CUDABackend().why_not(_problem(D=140, Dv=128, needs_grad=True))
    text = "\n".join(reasons)
    assert "runs on cuda" in text
    assert "float16, bfloat16" in text
    assert "head dims up to 128 with gradients" in text
    assert "multiple of 8" in text
    assert "equal head dims" in text
    if not torch.cuda.is_available():
        assert "GPU" in text or "not built" in text


def test_why_not_head_dims_up_to_256():
    # 192 / 256: the FA2 class forward, and gradients through its atomic-dQ backward
    # (deterministic=False); the deterministic backward (wmma kernels) stops at 128
    fwd = "\n".join(CUDABackend().why_not(_problem(D=256, Dv=256, dtype=torch.float16)))
    assert "head dims" not in fwd
    grad = "\n".join(CUDABackend().why_not(_problem(D=192, Dv=192, dtype=torch.float16,
                                                     needs_grad=True)))
    assert "up to 128 with gradients when deterministic=True" in grad
    assert "deterministic=False" in grad
    for D in (192, 256):
        atomic = CUDABackend().why_not(_problem(D=D, Dv=D, dtype=torch.float16, needs_grad=True,
                                                deterministic=False))
        assert not any("head dim" in r for r in atomic), atomic
    wide = "\n".join(CUDABackend().why_not(_problem(D=264, Dv=264, dtype=torch.float16)))
    assert "head dims up to 256" in wide


def test_why_not_block_size():
    fs = pytest.importorskip("fastattn.sparse")
    bm = fs.causal(100, 100, block_size=32)
    reasons = CUDABackend().why_not(_problem(block_mask=bm, D=64))
    assert any("multiples of 64" in r for r in reasons)


def test_explicit_cuda_backend_raises_with_reasons():
    if torch.cuda.is_available() and CUDABackend().available()[0]:
        pytest.skip("the cuda backend can run here")
    q = torch.randn(1, 2, 8, 64)
    with pytest.raises(ValueError, match="backend 'cuda' cannot serve"):
        fastattn.attention(q, q, q, backend="cuda")


def test_decode_is_declared_and_explains():
    """cuda serves decode_attention (split-KV kernels; numerics: test_cuda_decode_emulated.py);
    without a GPU asking for it by name raises with the reasons."""
    b = CUDABackend()
    assert b.supports_decode and not b.supports_decode_backward
    if torch.cuda.is_available() and b.available()[0]:
        pytest.skip("the cuda backend can run here")
    q, kc = torch.randn(1, 2, 1, 64), torch.randn(1, 1, 16, 64)
    with pytest.raises(ValueError, match="backend 'cuda' cannot serve"):
        fastattn.decode_attention(q, kc, kc, backend="cuda")


def test_default_decode_splits():
    from fastattn.backends.cuda import default_decode_splits

    assert default_decode_splits(1, 8, 4, 128, 100_000, 132) == 33  # fills 2 CTAs per SM
    assert default_decode_splits(64, 8, 4, 128, 100_000, 132) == 1  # the batch fills the GPU
    assert default_decode_splits(1, 1, 1, 128, 300, 132) == 1  # short cache: one chunk
    assert 1 <= default_decode_splits(1, 1, 1, 64, 10**7, 132) <= 128


gpu = pytest.mark.skipif(not (torch.cuda.is_available() and CUDABackend().available()[0]),
                         reason="needs a GPU and the built fastattn._cuda extension")


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_matches_reference(dtype, causal):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 257, 128, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, 301, 128, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(2, 2, 301, 128, device="cuda", dtype=dtype, requires_grad=True)
    out = fastattn.attention(q, k, v, causal=causal, backend="cuda")
    ref = fastattn.attention(q.double(), k.double(), v.double(), causal=causal,
                             backend="reference")
    low = fastattn.attention(q, k, v, causal=causal, backend="sdpa")
    assert (out.double() - ref).abs().max() <= 2 * (low.double() - ref).abs().max() + 1e-3
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), g.double())
    lq, lk, lv = torch.autograd.grad(low, (q, k, v), g)
    for a, r, lo in ((dq, rq, lq), (dk, rk, lk), (dv, rv, lv)):
        assert (a.double() - r).abs().max() <= 2 * (lo.double() - r).abs().max() + 1e-3
