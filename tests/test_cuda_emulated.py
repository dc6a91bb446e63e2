"""The CUDA kernels (csrc/cuda), run on the CPU through the emulation layer (tests/cuda_emu),
against the float64 oracle (fastattn.backends.reference) by DESIGN.md's rule:

    max |kernel - oracle| <= 2 * max |torch_lowp - oracle| + floor(dtype)

where torch_lowp is torch's own attention in the kernel's precision (matmuls in float16 /
bfloat16, softmax in float32, as FlashAttention's tests do), for out, lse, dq, dk and dv.
Emulation runs every CUDA thread as a fiber, so shapes stay small; the wide sweep is slow.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_emu import emu  # noqa: E402

from fastattn.backends.reference import reference_attention  # noqa: E402
from fastattn.masking import window_mask  # noqa: E402

try:
    import fastattn.sparse as fs
except ImportError:  # pragma: no cover - fastattn.sparse is part of the package
    fs = None

FLOOR = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def _expand_kv(t, Hq):
    return t.repeat_interleave(Hq // t.shape[1], dim=1) if t.shape[1] != Hq else t


def torch_lowp(q, k, v, scale, mask):
    """Attention as torch computes it in q's precision: 16-bit matmuls, fp32 softmax."""
    Hq = q.shape[1]
    k, v = _expand_kv(k, Hq), _expand_kv(v, Hq)
    s = (q @ k.transpose(-1, -2) * scale).float()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with no visible key -> 0
    return p.to(q.dtype) @ v


def full_mask(Nq, Nk, window, block_mask):
    m = None
    if window != (-1, -1):
        m = window_mask(Nq, Nk, *window)
    if block_mask is not None:
        d = block_mask.to_dense()
        m = d if m is None else (d & m)
    return m


def grads(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def check(name, got, ref, lowp, dtype):
    got, ref, lowp = got.double(), ref.double(), lowp.double()
    both_inf = torch.isinf(ref) & (got == ref)
    err = (got - ref).abs().masked_fill(both_inf, 0).max().item() if got.numel() else 0.0
    base = (lowp - ref).abs().max().item() if got.numel() else 0.0
    bound = 2 * base + FLOOR[dtype]
    if not err <= bound:
        diff = (got - ref).abs().masked_fill(both_inf, 0)
        idx = (diff > bound).nonzero()[:5].tolist()
        rows = [f"  at {i}: kernel {got[tuple(i)].item():.6g} oracle {ref[tuple(i)].item():.6g} "
                f"torch {lowp[tuple(i)].item():.6g}" for i in idx]
        raise AssertionError(f"{name}: max err {err:.3e} > 2 * torch's {base:.3e} + floor "
                             f"{FLOOR[dtype]:.1e}; first mismatches:\n" + "\n".join(rows))


def run_case(B, Hq, Hkv, Nq, Nk, D, dtype, window=(-1, -1), block_mask=None, seed=0,
             layout="bhnd", backward=True):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        if layout == "bnhd":  # non-contiguous: (B, N, H, D) storage viewed as (B, H, N, D)
            b, h, n, d = shape
            return torch.randn(b, n, h, d, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(*shape, generator=g).to(dtype)

    q, k, v = rnd(B, Hq, Nq, D), rnd(B, Hkv, Nk, D), rnd(B, Hkv, Nk, D)
    dout = rnd(B, Hq, Nq, D)
    scale = D ** -0.5
    kt = None
    kwindow = window
    if block_mask is not None:
        kt = block_mask.kernel_tensors()
        kwindow = block_mask.window  # the mask's own token rule for its partial blocks
        assert window == (-1, -1)
    mask = full_mask(Nq, Nk, window, block_mask)

    out, lse = emu.forward(q, k, v, scale=scale, window=kwindow, block_mask=kt)
    ref_out, ref_lse = reference_attention(q.double(), k.double(), v.double(), scale=scale,
                                           mask=mask)
    low_out = torch_lowp(q, k, v, scale, mask)
    assert out.dtype == dtype and lse.dtype == torch.float32
    check("out", out, ref_out, low_out, dtype)
    # lse is float32 from fp32 statistics: compare with the fp32 reference's error budget.
    _, lse32 = reference_attention(q.float(), k.float(), v.float(), scale=scale, mask=mask)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "lse -inf pattern"
    fin = torch.isfinite(ref_lse)
    if fin.any():
        err = (lse.double() - ref_lse)[fin].abs().max().item()
        assert err <= 2 * (lse32.double() - ref_lse)[fin].abs().max().item() + 1e-5, err
    # rows that see no key: 0 output, -inf lse
    no_key = ~fin
    if no_key.any():
        assert (out.float()[no_key] == 0).all()
    if not backward:
        return
    dq, dk, dv = emu.backward(dout, q, k, v, out, lse, scale=scale, window=kwindow, block_mask=kt)
    _, rq, rk, rv = grads(lambda a, b, c: reference_attention(a, b, c, scale=scale, mask=mask)[0],
                          q.double(), k.double(), v.double(), dout.double())
    _, lq, lk, lv = grads(lambda a, b, c: torch_lowp(a, b, c, scale, mask), q, k, v, dout)
    for name, got, ref, low in (("dq", dq, rq, lq), ("dk", dk, rk, lk), ("dv", dv, rv, lv)):
        assert got.shape == ref.shape and got.dtype == dtype
        check(name, got, ref, low, dtype)
    if no_key.any():  # a row that sees no key gets zero gradients
        assert (dq.float()[no_key] == 0).all()


DTYPES = [torch.float16, torch.bfloat16]
DT_IDS = ["fp16", "bf16"]


# ---- dense / window ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0)], ids=["full", "causal"])
def test_dense_causal(dtype, D, window):
    run_case(1, 2, 2, 97, 97, D, dtype, window=window)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("Nq,Nk", [(70, 129), (97, 33)])
def test_causal_bottom_right_nq_ne_nk(dtype, Nq, Nk):
    # (97, 33): the first 64 queries see no key (0 output, -inf lse, zero gradients)
    run_case(1, 2, 1, Nq, Nk, 64, dtype, window=(-1, 0))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("window", [(16, 8), (0, 0), (-1, 5), (40, -1)])
def test_window(dtype, window):
    run_case(1, 1, 1, 130, 121, 64, dtype, window=window)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("Hq,Hkv", [(4, 1), (4, 2)])
def test_gqa(dtype, Hq, Hkv):
    run_case(2, Hq, Hkv, 33, 65, 128, dtype, window=(-1, 0), seed=1)


@pytest.mark.parametrize("Nq,Nk", [(1, 1), (1, 17), (17, 1), (257, 17)])
def test_odd_lengths(Nq, Nk):
    run_case(1, 1, 1, Nq, Nk, 64, torch.float16, seed=2)


@pytest.mark.parametrize("D", [16, 40, 96])
def test_padded_head_dims(D):
    run_case(1, 2, 1, 45, 77, D, torch.bfloat16, window=(-1, 0), seed=3)


def test_non_contiguous_inputs():
    run_case(2, 2, 2, 40, 50, 64, torch.float16, layout="bnhd", seed=4)


@pytest.mark.parametrize("schedule", ["reverse", "random"])
def test_other_thread_schedules(schedule):
    # The result must not depend on the order threads run between barriers.
    emu.set_schedule(schedule, seed=11)
    try:
        run_case(1, 2, 1, 50, 70, 64, torch.bfloat16, window=(-1, 0), seed=5)
    finally:
        emu.set_schedule("forward")


def test_nan_input_propagates_without_crash():
    q = torch.randn(1, 1, 20, 64).half()
    k = torch.randn(1, 1, 20, 64).half()
    v = torch.randn(1, 1, 20, 64).half()
    k[0, 0, 3, 5] = float("nan")
    out, _ = emu.forward(q, k, v)
    assert out.isnan().any()  # every row sees key 3, as in torch
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert torch.equal(out.isnan(), ref.isnan())


# ---- block-sparse -----------------------------------------------------------------------------

needs_sparse = pytest.mark.skipif(fs is None, reason="fastattn.sparse is not importable")


def sparse_patterns(Nq, Nk, H, bs=64):
    """name -> BlockMask with 64 x 64 blocks (the cuda kernels' requirement: multiples of 64;
    BLOCK_M a multiple of 128 selects the FlashAttention-2 class forward)."""
    g = torch.Generator().manual_seed(0)
    rand = torch.rand(H, Nq, Nk, generator=g) < 0.4
    return {
        "causal": lambda: fs.causal(Nq, Nk, block_size=bs),
        "sliding_window": lambda: fs.sliding_window(Nq, Nk, 37, 0, block_size=bs),
        "document": lambda: fs.document([50, 90, Nk - 140], causal=True, block_size=bs),
        "per_head_random_bitmask": lambda: fs.from_mask_fn(
            lambda b, h, i, j: rand[h, i, j], Nq, Nk, H=H, block_size=bs),
        "strided": lambda: fs.strided(Nq, Nk, stride=16, block_size=bs),
        "streaming": lambda: fs.streaming(Nq, Nk, sink_size=4, window_size=48, block_size=bs),
        "prefix_lm": lambda: fs.prefix_lm(Nq, Nk, prefix_length=70, block_size=bs),
        "causal_and_window": lambda: fs.causal(Nq, Nk, block_size=bs)
        & fs.sliding_window(Nq, Nk, 80, -1, block_size=bs),
    }


@needs_sparse
@pytest.mark.parametrize("dtype,D", [(torch.float16, 64), (torch.bfloat16, 128)],
                         ids=["fp16-d64", "bf16-d128"])
@pytest.mark.parametrize("pattern", ["causal", "sliding_window", "document",
                                     "per_head_random_bitmask"])
def test_block_sparse(pattern, dtype, D):
    Nq = Nk = 200
    bm = sparse_patterns(Nq, Nk, 2)[pattern]()
    run_case(1, 2, 1, Nq, Nk, D, dtype, block_mask=bm, seed=6)


# Masks with BLOCK_M = 128 (the default block size) run the FlashAttention-2 class forward
# (csrc/cuda/fa2_fwd_kernel.h: 128-row query tiles); BLOCK_M = 64 the wmma forward.
@needs_sparse
@pytest.mark.parametrize("dtype,D", [(torch.float16, 128), (torch.bfloat16, 64)],
                         ids=["fp16-d128", "bf16-d64"])
@pytest.mark.parametrize("pattern", ["causal", "document", "per_head_random_bitmask"])
def test_block_sparse_fa2_tiles(pattern, dtype, D):
    Nq, Nk = 261, 200
    g = torch.Generator().manual_seed(0)
    rand = torch.rand(2, Nq, Nk, generator=g) < 0.4
    bm = {"causal": lambda: fs.causal(Nq, Nk),
          "document": lambda: fs.document([50, 90, Nk - 140], causal=True, block_size=(128, 64)),
          "per_head_random_bitmask": lambda: fs.from_mask_fn(
              lambda b, h, i, j: rand[h, i, j], Nq, Nk, H=2, block_size=(128, 128))}[pattern]()
    # (document's lengths sum to Nk; Nq > Nk leaves the rows past it with no key)
    if pattern == "document":
        Nq = Nk
        bm = fs.document([50, 90, Nk - 140], causal=True, block_size=(128, 64))
    run_case(1, 2, 1, Nq, Nk, D, dtype, block_mask=bm, seed=9, backward=False)


@needs_sparse
def test_fa2_nonfinite_v_on_masked_tile_stays_in_its_rows():
    # A NaN / inf v row of a key that only later queries see: with the causal mask it sits in a
    # masked tile (tile-level 0 * NaN must not reach the rows that do not see the key).
    Nq = Nk = 150
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, Nq, 128, generator=g).half() for _ in range(3))
    for bad, j in ((float("nan"), 20), (float("inf"), 100)):
        vb = v.clone()
        vb[0, 1, j, 5] = bad
        for kw in ({"window": (-1, 0)},
                   {"window": fs.causal(Nq, Nk).window,
                    "block_mask": fs.causal(Nq, Nk).kernel_tensors()}):
            out, _ = emu.forward(q, k, vb, **kw)
            ref, _ = emu.forward(q, k, v, **kw)
            o = out[0, 1].float()
            # elsewhere the output of the finite input (the masked tile's scalar path sums in
            # another order than the mma: equal up to fp16 rounding)
            close = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=2e-3)
            assert o[:j].isfinite().all()
            close(out[0, 1, :j], ref[0, 1, :j])
            assert not o[j:, 5].isfinite().any()  # every row that sees key j, in column 5
            assert torch.equal(out[0, 0], ref[0, 0])
            other = torch.ones(128, dtype=torch.bool)
            other[5] = False
            close(out[0, 1, j:][:, other], ref[0, 1, j:][:, other])


@needs_sparse
def test_block_sparse_with_window_intersected():
    # What the public API hands a backend: mask.with_window(...) (window folded into the mask)
    Nq, Nk = 150, 190
    bm = fs.strided(Nq, Nk, stride=16, block_size=64).with_window(-1, 0)
    run_case(1, 2, 2, Nq, Nk, 64, torch.bfloat16, block_mask=bm, seed=7)


@needs_sparse
def test_block_sparse_block_size_requirement():
    q = torch.randn(1, 1, 100, 64).half()
    bm = fs.causal(100, 100, block_size=32)
    why = emu.check_params_reason(q, q, q, window=bm.window, block_mask=bm.kernel_tensors())
    assert why is not None and "multiples of 64" in why
    with pytest.raises(emu.EmulatedKernelError, match="multiples of 64"):
        emu.forward(q, q, q, window=bm.window, block_mask=bm.kernel_tensors())


def test_rejects_unsupported_head_dim():
    q = torch.randn(1, 1, 10, 264).half()
    with pytest.raises(emu.EmulatedKernelError, match="head dim"):
        emu.forward(q, q, q)
    q = torch.randn(1, 1, 10, 136).half()  # forward-only above 128
    out, lse = emu.forward(q, q, q)
    with pytest.raises(emu.EmulatedKernelError, match=r"head dim .*\(backward\)"):
        emu.backward(out, q, q, q, out, lse)


# ---- forward-only head dims 192 / 256 (the FA2 class forward, 64-row tiles) -------------------

@pytest.mark.parametrize("dtype,D", [(torch.float16, 256), (torch.bfloat16, 192),
                                     (torch.bfloat16, 160)], ids=["fp16-d256", "bf16-d192",
                                                                   "bf16-d160-padded"])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (20, 5)], ids=["full", "causal", "win"])
def test_wide_head_dims_forward(dtype, D, window):
    run_case(2, 2, 1, 77, 45, D, dtype, window=window, seed=12, backward=False)


@needs_sparse
@pytest.mark.parametrize("bs", [64, (128, 64)], ids=["64", "128x64"])
def test_wide_head_dims_block_sparse(bs):
    Nq = Nk = 150
    bm = sparse_patterns(Nq, Nk, 2, bs=bs)["per_head_random_bitmask"]()
    run_case(1, 2, 2, Nq, Nk, 256, torch.bfloat16, block_mask=bm, seed=13, backward=False)


# ---- wide sweep (slow) ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Nq,Nk", [(1, 257), (17, 97), (257, 257), (97, 17), (128, 64)])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (31, 7)], ids=["full", "causal", "win"])
def test_sweep_dense(dtype, D, Nq, Nk, window):
    run_case(1, 2, 1, Nq, Nk, D, dtype, window=window, seed=Nq + Nk)


@pytest.mark.slow
@needs_sparse
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("pattern", ["causal", "sliding_window", "document",
                                     "per_head_random_bitmask", "strided", "streaming",
                                     "prefix_lm", "causal_and_window"])
def test_sweep_sparse(dtype, D, pattern):
    Nq = Nk = 257
    bm = sparse_patterns(Nq, Nk, 2)[pattern]()
    run_case(1, 2, 2, Nq, Nk, D, dtype, block_mask=bm, seed=8)


@pytest.mark.slow
@needs_sparse
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("pattern", ["causal", "sliding_window", "document",
                                     "per_head_random_bitmask", "strided", "streaming",
                                     "prefix_lm", "causal_and_window"])
def test_sweep_sparse_fa2_tiles(dtype, D, pattern):
    # 128-row mask blocks: the FlashAttention-2 class forward (and the wmma backward)
    Nq = Nk = 300
    bm = sparse_patterns(Nq, Nk, 2, bs=(128, 64))[pattern]()
    run_case(1, 2, 2, Nq, Nk, D, dtype, block_mask=bm, seed=10)


# A fast sample of the sweeps for the default suite: patterns and shapes otherwise covered
# only under -m slow, one dtype/head-dim pair each.
@needs_sparse
@pytest.mark.parametrize("pattern,D,dtype", [
    ("document", 64, DTYPES[0]), ("strided", 128, DTYPES[-1]),
    ("per_head_random_bitmask", 64, DTYPES[-1]), ("prefix_lm", 128, DTYPES[0])])
def test_sweep_sparse_sample(pattern, D, dtype):
    test_sweep_sparse(dtype, D, pattern)


@pytest.mark.parametrize("Nq,Nk,window", [(1, 257, (-1, 0)), (97, 17, (31, 7))])
def test_sweep_dense_sample(Nq, Nk, window):
    test_sweep_dense(DTYPES[-1], 128, Nq, Nk, window)
