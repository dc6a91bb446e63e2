"""The FlashAttention-2 class backward (csrc/cuda/fa2_bwd_kernel.h: mma.sync / ldmatrix /
cp.async, atomic dQ; selected by deterministic=False), run on the CPU through the emulation layer
(tests/cuda_emu), against the float64 oracle by DESIGN.md's rule (tests/oracle.py):

    max |kernel - oracle| <= 2 * max |torch in the kernel's precision - oracle| + floor

for dq, dk and dv. The atomics make dq's summation order launch-dependent on a GPU, so results
are compared by that rule, never bitwise; the deterministic=True backward stays bitwise
reproducible (checked here too). Shapes stay small (the emulator runs every CUDA thread as a
fiber); the wider sweep is marked slow.

Negative controls (each made these tests fail, then was reverted): the cp.async wait of the
tile loop removed (race: a cp.async lands on bytes another thread read), the barrier between
writing P^T / dS^T and reading them removed (race at the ldmatrix), the per-head barrier before
refilling the (Q, dO) stages removed (race, GQA), dO's B fragment registers swapped in dV
(dv off the rule), dS read with ldmatrix.x4 instead of .x4.trans for dQ (dq off the rule).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_emu import emu  # noqa: E402
from fastattn.backends.reference import reference_attention  # noqa: E402
from oracle import assert_by_rule  # noqa: E402

import fastattn.sparse as fs  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16]
DT_IDS = ["fp16", "bf16"]


def alibi_slopes(B, Hq):
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / Hq) for h in range(Hq)])


def run_case(B, Hq, Hkv, Nq, Nk, D, dtype, *, window=(-1, -1), block_mask=None, seed=0,
             q_scale=1.0, with_dlse=False, **mods):
    """Forward in the emulator, then the atomic backward; dq/dk/dv vs the float64 oracle (and
    torch in dtype) of the same loss (out . dout, plus lse . dlse if with_dlse)."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, Nq, D, generator=g) * q_scale).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    dout = torch.randn(B, Hq, Nq, D, generator=g).to(dtype)
    dlse = torch.randn(B, Hq, Nq, generator=g) if with_dlse else None
    scale = D ** -0.5
    kt, kwindow, mask = None, window, None
    if block_mask is not None:  # as the backend hands it: the mask carries its own token rule
        assert window == (-1, -1)
        kt, kwindow, mask = block_mask.kernel_tensors(), block_mask.window, block_mask.to_dense()
    out, lse = emu.forward(q, k, v, scale=scale, window=kwindow, block_mask=kt, **mods)

    def ref(compute_dtype):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        a = (qq, kk, vv) if compute_dtype else (qq.double(), kk.double(), vv.double())
        o, l_ = reference_attention(*a, scale=scale, window=window, mask=mask,
                                    compute_dtype=compute_dtype, **mods)
        outs, gin = ((o, l_), (dout.to(o.dtype), dlse)) if dlse is not None else \
            ((o,), (dout.to(o.dtype),))
        return torch.autograd.grad(outs, (qq, kk, vv), gin)

    r64, low = ref(None), ref(dtype)
    got = emu.backward(dout, q, k, v, out, lse, scale=scale, window=kwindow, block_mask=kt,
                       dlse=dlse, deterministic=False, **mods)
    for name, x, r, lo in zip(("dq", "dk", "dv"), got, r64, low, strict=True):
        assert x.dtype == dtype and x.shape == r.shape
        assert x.isfinite().all(), name
        assert_by_rule(name, x, r.double(), lo, dtype)
    return q, k, v, out, lse, dout, got


# ---- dense / window / odd shapes ------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("D", [64, 128])
def test_dense_odd_lengths(dtype, D):
    # Nq != Nk, neither a multiple of the 64-key or 32/64-query tiles
    run_case(1, 2, 2, 77, 97, D, dtype, seed=1)


@pytest.mark.parametrize("dtype,D", [(torch.float16, 128), (torch.bfloat16, 64)],
                         ids=["fp16-d128", "bf16-d64"])
@pytest.mark.parametrize("Nq,Nk", [(70, 129), (97, 33)])
def test_causal_bottom_right(dtype, D, Nq, Nk):
    # (97, 33): the first 64 queries see no key: zero gradients from them
    run_case(1, 2, 1, Nq, Nk, D, dtype, window=(-1, 0), seed=2)


@pytest.mark.parametrize("window", [(16, 8), (40, -1), (-1, 5)])
def test_window(window):
    run_case(1, 1, 1, 130, 121, 64, torch.float16, window=window, seed=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("Hq,Hkv", [(4, 1), (4, 2)])
def test_gqa(dtype, Hq, Hkv):
    # dK / dV reduced over the group's query heads inside the block
    run_case(2, Hq, Hkv, 33, 65, 128 if dtype == torch.float16 else 64, dtype, window=(-1, 0),
             seed=4)


@pytest.mark.parametrize("D", [40, 96])
def test_padded_head_dims(D):
    run_case(1, 2, 1, 45, 77, D, torch.bfloat16, window=(-1, 0), seed=5)


def test_tiny():
    run_case(1, 1, 1, 1, 17, 64, torch.float16, seed=6)
    run_case(1, 1, 1, 17, 1, 64, torch.float16, seed=6)


# ---- block-sparse -----------------------------------------------------------------------------

def _patterns(Nq, Nk, H, bs):
    g = torch.Generator().manual_seed(0)
    rand = torch.rand(H, Nq, Nk, generator=g) < 0.4
    return {
        "causal": lambda: fs.causal(Nq, Nk, block_size=bs),
        "sliding_window": lambda: fs.sliding_window(Nq, Nk, 37, 0, block_size=bs),
        "per_head_random_bitmask": lambda: fs.from_mask_fn(
            lambda b, h, i, j: rand[h, i, j], Nq, Nk, H=H, block_size=bs),
        "strided": lambda: fs.strided(Nq, Nk, stride=16, block_size=bs),
        "document": lambda: fs.document([50, 90, Nk - 140], causal=True, block_size=bs),
    }


@pytest.mark.parametrize("pattern,dtype,D,bs", [
    ("causal", torch.float16, 64, 64),
    ("per_head_random_bitmask", torch.bfloat16, 64, 64),
    ("per_head_random_bitmask", torch.float16, 128, (128, 128)),
    ("sliding_window", torch.bfloat16, 128, (128, 64)),
    ("document", torch.float16, 64, (64, 128)),
], ids=["causal-fp16-d64", "bitmask-bf16-d64", "bitmask-fp16-d128-128", "window-bf16-d128",
        "document-fp16-d64-64x128"])
def test_block_sparse(pattern, dtype, D, bs):
    Nq = Nk = 200
    run_case(1, 2, 1, Nq, Nk, D, dtype, block_mask=_patterns(Nq, Nk, 2, bs)[pattern](), seed=7)


def test_block_sparse_with_window_gqa():
    Nq, Nk = 150, 190
    bm = fs.strided(Nq, Nk, stride=16, block_size=64).with_window(-1, 0)
    run_case(1, 2, 2, Nq, Nk, 64, torch.bfloat16, block_mask=bm, seed=8)


# ---- score modifiers, dropout, lse gradient --------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_softcap(dtype):
    run_case(1, 2, 2, 70, 70, 64, dtype, window=(-1, 0), softcap=5.0, q_scale=3.0, seed=9)


def test_softcap_alibi_gqa_d128():
    run_case(1, 4, 2, 45, 77, 128, torch.bfloat16, window=(20, 3), softcap=5.0, q_scale=3.0,
             alibi_slopes=alibi_slopes(1, 4), seed=10)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_alibi(dtype):
    run_case(2, 4, 2, 33, 65, 64, dtype, window=(-1, 0), alibi_slopes=alibi_slopes(2, 4), seed=11)


@pytest.mark.parametrize("dtype,D", [(torch.float16, 64), (torch.bfloat16, 128)],
                         ids=["fp16-d64", "bf16-d128"])
def test_dropout(dtype, D):
    run_case(1, 4, 2, 45, 70, D, dtype, window=(-1, 0), dropout_p=0.2,
             dropout_seed=(3 << 33) + 31, seed=12)


def test_dropout_keep_bits_match_forward():
    # dV = P_drop^T dO: with q = 0, V = I and dO = I (Nq <= D), dv[b, h, j, i] = P_drop[i, j]:
    # the backward's keep bits are the forward's (and score_mods') bit for bit.
    from fastattn import score_mods

    B, H, Nq, Nk, D, p, seed = 1, 2, 40, 56, 64, 0.25, 2024
    q = torch.zeros(B, H, Nq, D, dtype=torch.float16)
    k = torch.randn(B, H, Nk, D).half()
    v = torch.eye(Nk, D, dtype=torch.float16).expand(B, H, Nk, D).contiguous()
    dout = torch.eye(Nq, D, dtype=torch.float16).expand(B, H, Nq, D).contiguous()
    mods = dict(dropout_p=p, dropout_seed=seed)
    out, lse = emu.forward(q, k, v, **mods)
    _, _, dv = emu.backward(dout, q, k, v, out, lse, deterministic=False, **mods)
    got = dv[..., :Nq].transpose(-1, -2) != 0
    assert torch.equal(got, score_mods.dropout_keep_mask(seed, p, B, H, Nq, Nk))


@pytest.mark.parametrize("Nq,Nk", [(40, 70), (80, 19)])
def test_lse_gradient(Nq, Nk):
    run_case(1, 2, 1, Nq, Nk, 64, torch.bfloat16, window=(-1, 0), with_dlse=True, seed=13)


# ---- against the deterministic backward ------------------------------------------------------

def test_matches_deterministic_backward_and_that_stays_bitwise():
    g = torch.Generator().manual_seed(14)
    q, k, v, dout = (torch.randn(1, 4, 75, 64, generator=g).half() for _ in range(4))
    k, v = k[:, :2].contiguous(), v[:, :2].contiguous()
    out, lse = emu.forward(q, k, v, window=(-1, 0))
    det = [emu.backward(dout, q, k, v, out, lse, window=(-1, 0)) for _ in range(2)]
    emu.set_schedule("random", seed=5)
    try:
        det.append(emu.backward(dout, q, k, v, out, lse, window=(-1, 0)))
    finally:
        emu.set_schedule("forward")
    for other in det[1:]:
        for a, b in zip(det[0], other, strict=True):
            assert torch.equal(a, b)  # deterministic=True: bitwise, any schedule
    fa2 = emu.backward(dout, q, k, v, out, lse, window=(-1, 0), deterministic=False)
    for a, b in zip(det[0], fa2, strict=True):
        # two kernels, two summation orders: close (fp16 rounding of the gradients), not equal
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=2e-2)


def test_non_contiguous_inputs_and_gradients():
    # (B, N, H, D) storage viewed as (B, H, N, D): the kernels read q/k/v/dO and write dq (the
    # convert kernel), dk, dv through row strides of H * D; same bits as contiguous inputs.
    g = torch.Generator().manual_seed(17)
    B, Hq, Hkv, Nq, Nk, D = 2, 4, 2, 40, 70, 64
    q, dout = (torch.randn(B, Nq, Hq, D, generator=g).half().transpose(1, 2) for _ in range(2))
    k, v = (torch.randn(B, Nk, Hkv, D, generator=g).half().transpose(1, 2) for _ in range(2))
    out, lse = emu.forward(q, k, v, window=(-1, 0))
    nc = emu.backward(dout, q, k, v, out, lse, window=(-1, 0), deterministic=False)
    assert nc[0].stride(2) == Hq * D and nc[1].stride(2) == Hkv * D  # strided outputs
    c = emu.backward(dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out,
                     lse, window=(-1, 0), deterministic=False)
    for a, b in zip(nc, c, strict=True):
        assert torch.equal(a, b)


def test_thread_schedule_random():
    emu.set_schedule("random", seed=21)
    try:
        run_case(1, 2, 1, 50, 70, 64, torch.bfloat16, window=(-1, 0), seed=15)
    finally:
        emu.set_schedule("forward")


# ---- wider sweep (slow) -----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Nq,Nk", [(1, 257), (17, 97), (257, 257), (97, 17), (128, 64)])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (31, 7)], ids=["full", "causal", "win"])
def test_sweep_dense(dtype, D, Nq, Nk, window):
    run_case(1, 2, 1, Nq, Nk, D, dtype, window=window, seed=Nq + Nk)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("pattern", ["causal", "sliding_window", "document",
                                     "per_head_random_bitmask", "strided"])
@pytest.mark.parametrize("bs", [64, (128, 64), (128, 128)], ids=["64", "128x64", "128"])
def test_sweep_sparse(dtype, D, pattern, bs):
    Nq = Nk = 257
    run_case(1, 2, 2, Nq, Nk, D, dtype, block_mask=_patterns(Nq, Nk, 2, bs)[pattern](), seed=16)
