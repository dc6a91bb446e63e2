"""The cpu kernels' output cache (csrc/cpu/output_cache.h): freed large outputs are reused by
the next call of the same size, never while alive, and never change a result."""

import os
import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn.backends.cpu import _C

pytestmark = pytest.mark.skipif(_C is None, reason="needs the compiled cpu extension")

# (1, 4, 1024, 64) float32 = 1 MiB: the smallest size the cache takes
SHAPE = (1, 4, 1024, 64)


@pytest.fixture(autouse=True)
def default_limit():
    before = fastattn.cpu_output_cache()["limit_bytes"]
    fastattn.cpu_output_cache(limit_mb=256)
    fastattn.empty_cpu_output_cache()
    yield
    fastattn.cpu_output_cache(limit_mb=before / (1 << 20))


def qkv(seed=0, dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g, dtype=dtype).requires_grad_(requires_grad) for _ in range(3)]


def test_freed_output_is_reused_and_results_do_not_change():
    q, k, v = qkv()
    out = fastattn.attention(q, k, v, causal=True, backend="cpu")
    ptr, first = out.data_ptr(), out.clone()
    del out
    hits = fastattn.cpu_output_cache()["hits"]
    again = fastattn.attention(q, k, v, causal=True, backend="cpu")
    assert again.data_ptr() == ptr
    assert fastattn.cpu_output_cache()["hits"] == hits + 1
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    ref = fastattn.attention(q, k, v, causal=True, backend="reference")
    torch.testing.assert_close(again, ref, rtol=2e-5, atol=2e-5)


def test_live_outputs_are_never_handed_out_twice():
    q, k, v = qkv()
    a = fastattn.attention(q, k, v, backend="cpu")
    a_copy = a.clone()
    b = fastattn.attention(q, k, v * 2, backend="cpu")
    assert a.data_ptr() != b.data_ptr()
    torch.testing.assert_close(a, a_copy, rtol=0, atol=0)  # b's call did not write into a
    torch.testing.assert_close(b, 2 * a, rtol=1e-6, atol=1e-6)


def test_gradients_match_with_the_cache_off():
    def grads():
        q, k, v = qkv(1, requires_grad=True)
        out = fastattn.attention(q, k, v, causal=True, window=(100, 0), backend="cpu")
        out.backward(torch.ones_like(out))
        return [t.grad.clone() for t in (q, k, v)]

    grads()  # fills the cache with this shape's blocks
    cached = grads()
    assert fastattn.cpu_output_cache()["hits"] > 0
    fastattn.cpu_output_cache(limit_mb=0)
    assert fastattn.cpu_output_cache()["kept_bytes"] == 0
    plain = grads()
    for a, b in zip(cached, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_limit_zero_keeps_nothing_and_empty_frees_everything():
    q, k, v = qkv()
    del_out = fastattn.attention(q, k, v, backend="cpu")
    del del_out
    assert fastattn.cpu_output_cache()["kept_bytes"] >= 1 << 20
    fastattn.empty_cpu_output_cache()
    st = fastattn.cpu_output_cache()
    assert st["kept_bytes"] == 0 and st["kept_blocks"] == 0 and st["limit_bytes"] == 256 << 20
    fastattn.cpu_output_cache(limit_mb=0)
    out = fastattn.attention(q, k, v, backend="cpu")
    del out
    assert fastattn.cpu_output_cache()["kept_bytes"] == 0


def test_small_limit_keeps_only_what_fits():
    q, k, v = qkv()
    fastattn.cpu_output_cache(limit_mb=1.5)  # room for one 1 MiB block
    outs = [fastattn.attention(q, k, v, backend="cpu") for _ in range(3)]
    del outs
    st = fastattn.cpu_output_cache()
    assert st["kept_blocks"] == 1 and st["kept_bytes"] == 1 << 20


def test_cached_outputs_are_ordinary_resizable_tensors():
    q, k, v = qkv()
    out = fastattn.attention(q, k, v, backend="cpu")
    out.resize_(2, *SHAPE[1:])
    out[1].fill_(3.0)
    assert out.shape == (2, *SHAPE[1:]) and bool((out[1] == 3.0).all())
    assert out.numpy().shape == out.shape  # shares memory with numpy like any CPU tensor


@pytest.mark.parametrize("bad", [-1, "64", True, float("nan"), float("inf")])
def test_bad_limit_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="limit_mb"):
        fastattn.cpu_output_cache(limit_mb=bad)


def test_environment_sets_the_limit_at_import():
    code = "import fastattn; print(fastattn.cpu_output_cache()['limit_bytes'])"
    for env, want in (("0", 0), ("16", 16 << 20)):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env=dict(os.environ, FASTATTN_CPU_CACHE_MB=env))
        assert int(res.stdout.strip().splitlines()[-1]) == want
