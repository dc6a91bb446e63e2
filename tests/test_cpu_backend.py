"""cpu backend (fused C++ kernels) and reference backend against the float64 oracle, by the
DESIGN.md rule: forward, lse and q/k/v gradients."""

import pytest
from conftest import requires_cpu_ext
import torch
from oracle import check_against_oracle, make_qkv

import fastattn
from fastattn import sparse

pytestmark = requires_cpu_ext

LENGTHS = [(1, 1), (17, 17), (97, 97), (257, 257), (1025, 1025),
           (1, 97), (17, 257), (97, 17), (257, 1025), (1025, 97)]


def _call(backend, **kw):
    return lambda q, k, v: fastattn.attention(q, k, v, backend=backend, return_lse=True, **kw)


# (Nq, Nk, D): every length pair with every head dim, except the largest products (those
# run in test_cpu_large_slow) to keep the default suite quick.
SHAPES = [(nq, nk, d) for nq, nk in LENGTHS for d in (16, 40, 64, 128)
          if nq * nk * d <= 1025 * 1025 * 64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk,D", SHAPES)
def test_cpu_dense_causal(Nq, Nk, D, causal, dtype):
    q, k, v = make_qkv(1, 2, 2, Nq, Nk, D, dtype)
    window = (-1, 0) if causal else (-1, -1)
    check_against_oracle(_call("cpu", causal=causal), q, k, v, window=window)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [128, 256])
def test_cpu_large_slow(D, causal, dtype):
    q, k, v = make_qkv(2, 4, 2, 1025, 1025, D, dtype)
    check_against_oracle(_call("cpu", causal=causal), q, k, v,
                         window=(-1, 0) if causal else (-1, -1))


# A fast sample of test_cpu_large_slow for the default suite: head dim 256 and float16
# without a window (otherwise covered only under -m slow), on shorter sequences.
@pytest.mark.parametrize("D,causal,dtype,N", [
    (256, False, torch.float16, 193), (256, True, torch.bfloat16, 130),
    (128, False, torch.float16, 257), (256, False, torch.float32, 97)])
def test_cpu_large_sample(D, causal, dtype, N):
    q, k, v = make_qkv(2, 4, 2, N, N + 5, D, dtype)
    check_against_oracle(_call("cpu", causal=causal), q, k, v,
                         window=(-1, 0) if causal else (-1, -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [(0, 0), (16, 0), (5, 9), (-1, 3), (40, -1), (100, 100)])
@pytest.mark.parametrize("Nq,Nk", [(97, 97), (61, 200), (200, 61), (257, 257)])
def test_cpu_window(Nq, Nk, window, dtype):
    q, k, v = make_qkv(1, 2, 1, Nq, Nk, 40, dtype)
    check_against_oracle(_call("cpu", window=window), q, k, v, window=window)


def test_cpu_window_with_causal_folds():
    q, k, v = make_qkv(1, 2, 2, 130, 130, 32, torch.float32)
    check_against_oracle(_call("cpu", window=(20, 7), causal=True), q, k, v, window=(20, 0))


@pytest.mark.parametrize("Hq,Hkv", [(8, 1), (8, 2), (6, 3), (4, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_gqa(Hq, Hkv, causal):
    q, k, v = make_qkv(2, Hq, Hkv, 77, 131, 64, torch.float32)
    check_against_oracle(_call("cpu", causal=causal), q, k, v,
                         window=(-1, 0) if causal else (-1, -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_value_head_dim_differs(dtype):
    q, k, v = make_qkv(1, 2, 2, 50, 70, 32, dtype, Dv=48)
    check_against_oracle(_call("cpu", causal=True), q, k, v, window=(-1, 0))


def test_cpu_fully_masked_rows_give_zero_and_zero_grads():
    # Nq > Nk with bottom-right causal: the first Nq - Nk queries see no key.
    q, k, v = make_qkv(1, 2, 2, 40, 10, 16, torch.float32)
    out, lse = fastattn.attention(q, k, v, causal=True, backend="cpu", return_lse=True)
    assert torch.equal(out[:, :, :30], torch.zeros_like(out[:, :, :30]))
    assert torch.isneginf(lse[:, :, :30]).all() and torch.isfinite(lse[:, :, 30:]).all()
    out.sum().backward()
    assert torch.equal(q.grad[:, :, :30], torch.zeros_like(q.grad[:, :, :30]))
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    check_against_oracle(_call("cpu", causal=True), q, k, v, window=(-1, 0))


def test_cpu_window_that_sees_nothing():
    """Rows that see no key: out 0, lse -inf and zero gradients (never NaN), next to rows
    that do. Causal with Nq = 24 > Nk = 8 (bottom-right): rows 0..15 sit before key 0."""
    q, k, v = make_qkv(1, 2, 1, 24, 8, 16, torch.float32)
    out, lse = fastattn.attention(q, k, v, causal=True, backend="cpu", return_lse=True)
    empty = torch.arange(24) < 16
    assert (out[:, :, empty] == 0).all() and torch.isneginf(lse[:, :, empty]).all()
    assert torch.isfinite(lse[:, :, ~empty]).all()
    check_against_oracle(_call("cpu", causal=True), q, k, v, window=(-1, 0))
    q.grad = None
    out.square().sum().backward()
    assert (q.grad[:, :, empty] == 0).all() and torch.isfinite(q.grad).all()
    # a block mask that lists nothing: every row is empty, nothing is computed
    from fastattn.backends.cpu import kernel_stats

    none = sparse.from_mask_fn(lambda b, h, i, j: i < 0, 24, 8, block_size=(8, 8))
    kernel_stats(reset=True)
    out, lse = fastattn.attention(q, k, v, block_mask=none, backend="cpu", return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
    assert kernel_stats()["fwd_visits"] == 0
    out2, lse2 = fastattn.attention(q[:, :, :0], k, v, backend="cpu", return_lse=True)
    assert out2.shape == (1, 2, 0, 16) and lse2.shape == (1, 2, 0)


def test_cpu_noncontiguous_inputs():
    base = torch.randn(2, 97, 4, 3, 40)  # (B, N, H, 3, D): q/k/v interleaved like a packed qkv
    q, k, v = (base[:, :, :, i].transpose(1, 2) for i in range(3))  # strided (B, H, N, D)
    assert not q.is_contiguous()
    check_against_oracle(_call("cpu", causal=True), q, k, v, window=(-1, 0))
    # last-dim stride != 1
    qt = torch.randn(1, 2, 40, 33).transpose(2, 3)  # (1, 2, 33, 40) with stride(-1) = 33
    kt = torch.randn(1, 2, 40, 33).transpose(2, 3)
    vt = torch.randn(1, 2, 33, 40)
    check_against_oracle(_call("cpu"), qt, kt, vt)


def test_cpu_custom_scale_and_negative_scale():
    q, k, v = make_qkv(1, 2, 2, 65, 65, 32, torch.float32)
    check_against_oracle(_call("cpu", scale=0.3), q, k, v, scale=0.3)
    check_against_oracle(_call("cpu", scale=-0.2, causal=True), q, k, v, scale=-0.2, window=(-1, 0))


def test_cpu_gradient_through_lse():
    # A loss on lse (as ring attention's merge has) gets the right gradients.
    q, k, v = make_qkv(1, 2, 1, 33, 47, 16, torch.float32)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = fastattn.attention(q, k, v, causal=True, backend="cpu", return_lse=True)
    (out.sum() + (lse * torch.linspace(0, 1, 33)).sum()).backward()
    o2, l2 = fastattn.attention(q64, k64, v64, causal=True, backend="reference", return_lse=True)
    (o2.sum() + (l2 * torch.linspace(0, 1, 33).double()).sum()).backward()
    for a, b in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=2e-5, rtol=1e-4)


def test_cpu_nan_input_propagates_without_crash():
    q, k, v = make_qkv(1, 1, 1, 20, 20, 16, torch.float32, requires_grad=False)
    q[0, 0, 3, 2] = float("nan")
    out = fastattn.attention(q, k, v, backend="cpu")
    assert torch.isnan(out[0, 0, 3]).all() and torch.isfinite(out[0, 0, :3]).all()


def test_cpu_deterministic_backward():
    q, k, v = make_qkv(1, 4, 2, 300, 300, 64, torch.float32)
    grads = []
    for _ in range(2):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        fastattn.attention(qq, kk, vv, causal=True, backend="cpu").square().sum().backward()
        grads.append((qq.grad, kk.grad, vv.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_cpu_respects_thread_count():
    """The kernels run on torch's intra-op threads: with 1 thread only thread 0 runs tasks,
    with 2 both do (the kernel counters record which threads ran the last call), and the
    result is bitwise the same."""
    from fastattn.backends.cpu import kernel_stats

    q, k, v = make_qkv(1, 4, 4, 200, 200, 32, torch.float32)
    n = torch.get_num_threads()
    runs = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            out = fastattn.attention(*xs, causal=True, backend="cpu")
            out.sum().backward()
            stats = kernel_stats(reset=True)
            runs[threads] = [out.detach()] + [t.grad for t in xs]
            assert stats["fwd_threads"] == stats["bwd_threads"] == list(range(threads)), stats
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(a, b) for a, b in zip(runs[1], runs[2]))


@pytest.mark.parametrize("causal", [False, True])
def test_reference_backend_matches_float64_oracle(causal):
    q, k, v = make_qkv(2, 4, 2, 33, 57, 16, torch.bfloat16)
    check_against_oracle(_call("reference", causal=causal), q, k, v,
                         window=(-1, 0) if causal else (-1, -1))


def test_auto_picks_cpu_on_cpu():
    from fastattn import dispatch
    from fastattn.backends.base import Problem

    p = Problem(device=torch.device("cpu"), dtype=torch.float32, B=1, Hq=2, Hkv=2, Nq=8, Nk=8,
                D=16, Dv=16, window=(-1, -1), block_mask=None, scale=0.25, needs_grad=True,
                return_lse=False)
    assert dispatch.select(p, "auto").name == "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (300, 7)], ids=["full", "causal", "window"])
def test_cpu_long_keys_use_tall_tiles(window, dtype):
    """From 12288 keys on the dense forward uses 128-row query tiles (attention_fwd_cpu.cpp):
    odd query and key counts, more than one query tile, Dv != D."""
    q, k, v = make_qkv(1, 2, 1, 261, 12301, 32, dtype, Dv=24)
    check_against_oracle(_call("cpu", window=window), q, k, v, window=window)


@pytest.mark.parametrize("D", [37, 64])
@pytest.mark.parametrize("mask", ["dense", "window", "bigbird"])
def test_cpu_lazy_key_panels_match_prebuilt(D, mask):
    """float32 K with unit-stride rows: the forward's tasks transpose each K^T panel on first
    use (attention_fwd_cpu.cpp); any other K gets all panels built before the tasks. Both
    hold the same panels, so the outputs are bitwise equal, on 1 and on 2 threads: D not a
    multiple of 4 (the transpose's scalar tail), a partial last key tile, a row stride != D,
    GQA (two query heads claim each kv head's panels)."""
    Nq, Nk = (1100, 1100) if mask == "bigbird" else (300, 1100)
    q = torch.randn(1, 4, Nq, D)
    k = torch.randn(1, 2, Nk, D + 3)[..., :D]            # unit stride, row stride D + 3: lazy
    k_pre = k.transpose(2, 3).contiguous().transpose(2, 3)  # stride(3) = Nk: prebuilt panels
    assert k.stride(3) == 1 and k_pre.stride(3) != 1
    v = torch.randn(1, 2, Nk, D)
    kw = {"dense": {}, "window": {"window": (200, 0)},
          "bigbird": {"block_mask": sparse.bigbird(Nk, bigbird_block_size=64)}}[mask]
    n = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for kk in (k, k_pre):
                outs.append(fastattn.attention(q, kk, v, backend="cpu", return_lse=True, **kw))
    finally:
        torch.set_num_threads(n)
    for o, l in outs[1:]:
        assert torch.equal(o, outs[0][0]) and torch.equal(l, outs[0][1])
    check_against_oracle(lambda a, b, c: fastattn.attention(a, b, c, backend="cpu", return_lse=True, **kw),
                         q.requires_grad_(), k.detach().requires_grad_(), v.requires_grad_(),
                         window=kw.get("window", (-1, -1)),
                         mask=kw["block_mask"].to_dense() if "block_mask" in kw else None)
