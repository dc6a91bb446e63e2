"""Score modifiers (softcap, ALiBi, dropout) inside the CUDA kernels (csrc/cuda), run on the CPU
through the emulation layer (tests/cuda_emu), against the float64 reference
(fastattn.backends.reference with fastattn.score_mods' definitions) by the rule of
tests/oracle.py: |kernel - oracle| <= 2 * |torch in the kernel's precision - oracle| + floor,
for out, lse, dq, dk and dv. Dropout keep bits are read back from the kernels and compared
bit for bit with score_mods.dropout_keep_mask (same seed, same 24-bit threshold).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_emu import emu  # noqa: E402
from fastattn import score_mods  # noqa: E402
from fastattn.backends.reference import reference_attention  # noqa: E402
from oracle import assert_by_rule  # noqa: E402

try:
    import fastattn.sparse as fs
except ImportError:  # pragma: no cover - fastattn.sparse is part of the package
    fs = None

DTYPES = [torch.float16, torch.bfloat16]
DT_IDS = ["fp16", "bf16"]
needs_sparse = pytest.mark.skipif(fs is None, reason="fastattn.sparse is not importable")


def alibi_slopes(B, Hq, per_batch):
    """ALiBi's geometric slopes 2^(-8 h / Hq), optionally varied per batch row."""
    s = torch.tensor([2.0 ** (-8.0 * (h + 1) / Hq) for h in range(Hq)])
    return (s[None] * torch.linspace(1.0, 0.5, B)[:, None]).contiguous() if per_batch else s


def run_case(B, Hq, Hkv, Nq, Nk, D, dtype, *, window=(-1, -1), block_mask=None, seed=0,
             q_scale=1.0, backward=True, with_dlse=False, **mods):
    """Kernel vs float64 oracle (and torch in dtype) for out, lse and, if backward, dq/dk/dv
    (of a loss that also depends on lse if with_dlse)."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, Nq, D, generator=g) * q_scale).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    dout = torch.randn(B, Hq, Nq, D, generator=g).to(dtype)
    dlse = torch.randn(B, Hq, Nq, generator=g) if with_dlse else None
    scale = D ** -0.5
    kt, kwindow, mask = None, window, None
    if block_mask is not None:  # what the backend does: the mask carries its own token rule
        assert window == (-1, -1)
        kt, kwindow, mask = block_mask.kernel_tensors(), block_mask.window, block_mask.to_dense()

    out, lse = emu.forward(q, k, v, scale=scale, window=kwindow, block_mask=kt, **mods)
    assert out.dtype == dtype and lse.dtype == torch.float32

    def ref(compute_dtype):
        def fn(q_, k_, v_):
            if compute_dtype is None:
                q_, k_, v_ = q_.double(), k_.double(), v_.double()
            return reference_attention(q_, k_, v_, scale=scale, window=window, mask=mask,
                                       compute_dtype=compute_dtype, **mods)
        qq, kk, vv = (t.detach().clone().requires_grad_(backward) for t in (q, k, v))
        o, l_ = fn(qq, kk, vv)
        if not backward:
            return o.detach(), l_, None, None, None
        outs, grads_in = (o, l_), (dout.to(o.dtype), dlse)
        if dlse is None:
            outs, grads_in = outs[:1], grads_in[:1]
        dq_, dk_, dv_ = torch.autograd.grad(outs, (qq, kk, vv), grads_in)
        return o.detach(), l_.detach(), dq_, dk_, dv_

    r64, low = ref(None), ref(dtype)
    assert_by_rule("out", out, r64[0].double(), low[0], dtype)
    inf_g, inf_r = torch.isinf(lse), torch.isinf(r64[1])
    assert torch.equal(inf_g, inf_r), "lse: -inf rows differ from the oracle's"
    if (~inf_r).any():
        assert_by_rule("lse", lse[~inf_g], r64[1].double()[~inf_r], low[1][~inf_r], dtype)
    if not backward:
        return out, lse, None
    grads = emu.backward(dout, q, k, v, out, lse, scale=scale, window=kwindow, block_mask=kt,
                         dlse=dlse, **mods)
    for name, got, r, lo in zip(("dq", "dk", "dv"), grads, r64[2:], low[2:], strict=True):
        assert got.dtype == dtype
        assert_by_rule(name, got, r.double(), lo, dtype)
    return out, lse, grads


# ---- softcap ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("softcap", [50.0, 5.0])
def test_softcap_causal(dtype, softcap):
    # q scaled up so that the cap bends the logits (|s| up to ~10)
    run_case(1, 2, 2, 70, 70, 64, dtype, window=(-1, 0), softcap=softcap, q_scale=3.0)


def test_softcap_gqa_window_d128():
    run_case(1, 4, 2, 45, 77, 128, torch.bfloat16, window=(20, 3), softcap=5.0, q_scale=3.0,
             seed=1)


# ---- ALiBi ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("per_batch", [False, True], ids=["(Hq,)", "(B,Hq)"])
def test_alibi(dtype, per_batch):
    B, Hq = 2, 4
    run_case(B, Hq, 2, 33, 65, 64, dtype, window=(-1, 0),
             alibi_slopes=alibi_slopes(B, Hq, per_batch), seed=2)


def test_alibi_window_nq_gt_nk():
    # Nq > Nk: negative offset; the first rows see no key (0 out, -inf lse, zero grads)
    run_case(1, 2, 1, 80, 19, 64, torch.float16, window=(-1, 0),
             alibi_slopes=alibi_slopes(1, 2, False), seed=3)


# ---- dropout ----------------------------------------------------------------------------------

def kernel_keep_bits(B, Hq, Nq, Nk, D, dtype, p, seed, window=(-1, -1)):
    """The forward kernel's keep bits, read out exactly: with q = 0 every visible key gets the
    same probability, and V = I (Nk <= D) puts key j's weight in output column j."""
    q = torch.zeros(B, Hq, Nq, D, dtype=dtype)
    k = torch.randn(B, Hq, Nk, D).to(dtype)
    v = torch.eye(Nk, D, dtype=dtype).expand(B, Hq, Nk, D).contiguous()
    out, _ = emu.forward(q, k, v, window=window, dropout_p=p, dropout_seed=seed)
    return out[..., :Nk] != 0


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("seed", [0, 12345, (7 << 40) + 99, 2 ** 64 - 3],
                         ids=["0", "small", "high-bits", "top"])
def test_dropout_keep_bits_bit_identical(dtype, seed):
    # D = 128: 32-key tiles, so Nk = 100 spans 4 tiles; B * Hq * Nq rows exercise
    # row = (b * Hq + h) * Nq + i
    B, Hq, Nq, Nk, p = 2, 3, 37, 100, 0.3
    got = kernel_keep_bits(B, Hq, Nq, Nk, 128, dtype, p, seed)
    want = score_mods.dropout_keep_mask(seed, p, B, Hq, Nq, Nk)
    assert torch.equal(got, want), f"{(got != want).sum().item()} keep bits differ"


def test_dropout_keep_bits_with_causal_mask():
    B, Hq, Nq, Nk, p, seed = 1, 2, 50, 60, 0.5, 77
    got = kernel_keep_bits(B, Hq, Nq, Nk, 64, torch.float16, p, seed, window=(-1, 0))
    vis = torch.ones(Nq, Nk, dtype=torch.bool).tril(Nk - Nq)
    want = score_mods.dropout_keep_mask(seed, p, B, Hq, Nq, Nk) & vis
    assert torch.equal(got, want)


def test_dropout_backward_keep_bits_bit_identical():
    # dV = P_drop^T dO: with q = 0, V = I and dO = I (Nq <= D), dv[b, h, j, i] = P_drop[i, j].
    B, H, Nq, Nk, D, p, seed = 1, 2, 40, 56, 64, 0.25, 2024
    q = torch.zeros(B, H, Nq, D, dtype=torch.float16)
    k = torch.randn(B, H, Nk, D).half()
    v = torch.eye(Nk, D, dtype=torch.float16).expand(B, H, Nk, D).contiguous()
    dout = torch.eye(Nq, D, dtype=torch.float16).expand(B, H, Nq, D).contiguous()
    mods = dict(dropout_p=p, dropout_seed=seed)
    out, lse = emu.forward(q, k, v, **mods)
    _, _, dv = emu.backward(dout, q, k, v, out, lse, **mods)
    got = dv[..., :Nq].transpose(-1, -2) != 0
    assert torch.equal(got, score_mods.dropout_keep_mask(seed, p, B, H, Nq, Nk))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_dropout_gradients_causal_gqa(dtype):
    run_case(1, 4, 2, 45, 70, 64, dtype, window=(-1, 0), dropout_p=0.2, dropout_seed=31,
             seed=4)


def test_dropout_window_odd_lengths_d128():
    run_case(1, 2, 2, 17, 97, 128, torch.float16, window=(8, 8), dropout_p=0.5,
             dropout_seed=(3 << 33) + 5, seed=5)


def test_same_seed_bitwise_identical_other_seed_differs():
    g = torch.Generator().manual_seed(6)
    q, k, v, dout = (torch.randn(1, 2, 50, 64, generator=g).bfloat16() for _ in range(4))
    mods = dict(dropout_p=0.3, dropout_seed=99, softcap=5.0,
                alibi_slopes=alibi_slopes(1, 2, False))
    runs = []
    for schedule in ("forward", "random"):  # also independent of the thread schedule
        emu.set_schedule(schedule, seed=3)
        try:
            out, lse = emu.forward(q, k, v, window=(-1, 0), **mods)
            runs.append((out, lse, *emu.backward(dout, q, k, v, out, lse, window=(-1, 0),
                                                 **mods)))
        finally:
            emu.set_schedule("forward")
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    other, _ = emu.forward(q, k, v, window=(-1, 0), **{**mods, "dropout_seed": 100})
    assert not torch.equal(other, runs[0][0])


@pytest.mark.parametrize("dtype,D", [(torch.float16, 192), (torch.bfloat16, 256)],
                         ids=["fp16-d192", "bf16-d256"])
def test_wide_head_dims_forward_all_mods(dtype, D):
    # forward-only head dims (the FA2 class forward, 64-row tiles): softcap, ALiBi, dropout
    run_case(1, 2, 1, 40, 70, D, dtype, window=(-1, 0), softcap=5.0, q_scale=3.0,
             alibi_slopes=alibi_slopes(1, 2, False), dropout_p=0.2, dropout_seed=3, seed=14,
             backward=False)


# ---- gradients through lse -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("Nq,Nk", [(40, 70), (80, 19)])
def test_lse_gradient(dtype, Nq, Nk):
    # loss = <out, dout> + <lse, dlse>: dlse enters as delta -= dlse. (80, 19) causal: the first
    # 61 rows see no key (lse -inf, zero gradients whatever dlse is)
    run_case(1, 4, 2, Nq, Nk, 64, dtype, window=(-1, 0), with_dlse=True, seed=12)


@needs_sparse
def test_lse_gradient_with_mods_block_sparse():
    Nq, Nk = 90, 130
    bm = fs.causal(Nq, Nk, block_size=64).with_window(50, 0)
    run_case(1, 2, 1, Nq, Nk, 128, torch.bfloat16, block_mask=bm, with_dlse=True, softcap=5.0,
             q_scale=3.0, alibi_slopes=alibi_slopes(1, 2, True), dropout_p=0.2, dropout_seed=13,
             seed=13)


# ---- all three, block-sparse ------------------------------------------------------------------

@needs_sparse
@pytest.mark.parametrize("dtype,D", [(torch.float16, 64), (torch.bfloat16, 128)],
                         ids=["fp16-d64", "bf16-d128"])
def test_all_mods_block_sparse(dtype, D):
    Nq = Nk = 130
    H = 2
    rand = torch.rand(H, Nq, Nk, generator=torch.Generator().manual_seed(0)) < 0.5
    bm = fs.from_mask_fn(lambda b, h, i, j: rand[h, i, j], Nq, Nk, H=H, block_size=64)
    run_case(1, H, 1, Nq, Nk, D, dtype, block_mask=bm, softcap=5.0, q_scale=3.0,
             alibi_slopes=alibi_slopes(1, H, True), dropout_p=0.2, dropout_seed=8, seed=7)


@needs_sparse
def test_all_mods_block_sparse_causal_window():
    Nq, Nk = 97, 150
    bm = fs.causal(Nq, Nk, block_size=64).with_window(40, 0)
    run_case(2, 2, 2, Nq, Nk, 64, torch.bfloat16, block_mask=bm, softcap=50.0,
             alibi_slopes=alibi_slopes(2, 2, False), dropout_p=0.1, dropout_seed=9, seed=8)


# BLOCK_M = 128 masks run the FlashAttention-2 class forward (fa2_fwd_kernel.h) with the mask's
# partial-block bitmasks; 64-row masks the wmma forward (both are tested).
@needs_sparse
@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 64), (torch.float16, 128)],
                         ids=["bf16-d64", "fp16-d128"])
def test_all_mods_block_sparse_fa2_blocks(dtype, D):
    Nq, Nk = 200, 230
    H = 2
    rand = torch.rand(H, Nq, Nk, generator=torch.Generator().manual_seed(1)) < 0.5
    bm = fs.from_mask_fn(lambda b, h, i, j: rand[h, i, j] & (j <= i + Nk - Nq), Nq, Nk, H=H,
                         block_size=(128, 64))
    run_case(1, H, 1, Nq, Nk, D, dtype, block_mask=bm, softcap=5.0, q_scale=3.0,
             alibi_slopes=alibi_slopes(1, H, True), dropout_p=0.2, dropout_seed=8, seed=7)


def test_check_params_rejects_bad_mods():
    q = torch.randn(1, 1, 10, 64).half()
    assert "softcap" in emu.check_params_reason(q, q, q, softcap=float("inf"))
    with pytest.raises(emu.EmulatedKernelError, match="dropout_p"):
        emu.forward(q, q, q, dropout_p=1.0)


def test_threshold_matches_score_mods():
    for p in (1e-9, 0.1, 0.3, 0.5, 2 ** -25, 3 * 2 ** -25, 0.999999):
        assert emu.dropout_threshold(p) == score_mods.dropout_threshold(p), p


# ---- wider sweep (slow) -----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Nq,Nk", [(1, 65), (97, 17), (129, 129)])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (31, 7)], ids=["full", "causal", "win"])
def test_sweep_all_mods(dtype, D, Nq, Nk, window):
    run_case(1, 4, 2, Nq, Nk, D, dtype, window=window, softcap=5.0, q_scale=2.0,
             alibi_slopes=alibi_slopes(1, 4, True), dropout_p=0.25, dropout_seed=Nq * Nk,
             seed=Nq + Nk)


@pytest.mark.slow
@needs_sparse
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("pattern", ["document", "streaming", "strided"])
def test_sweep_sparse_all_mods(dtype, pattern):
    Nq = Nk = 200
    bm = {"document": lambda: fs.document([50, 90, 60], causal=True, block_size=64),
          "streaming": lambda: fs.streaming(Nq, Nk, sink_size=4, window_size=48, block_size=64),
          "strided": lambda: fs.strided(Nq, Nk, stride=16, block_size=64)}[pattern]()
    run_case(1, 2, 1, Nq, Nk, 64, dtype, block_mask=bm, softcap=20.0,
             alibi_slopes=alibi_slopes(1, 2, False), dropout_p=0.3, dropout_seed=11, seed=9)


# ---- the backend's Python glue (autograd, argument passing), through the emulator -------------

_GLUE_SCRIPT = r'''
import dataclasses, re, sys
import torch
sys.path.insert(0, sys.argv[1])
from cuda_emu import emu
src = open(sys.argv[2]).read()
# The schemas exactly as csrc/bindings/cuda_ops.cpp defines them, implemented on CPU tensors by
# the emulated kernels (what the real binding does on a GPU): then cuda.py's fake functions and
# autograd formula run unchanged.
lib = torch.library.Library("fastattn", "FRAGMENT")
for body in re.findall(r'm\.def\(((?:\s*"[^"]*")+)\s*\);', src):
    lib.define("".join(re.findall(r'"([^"]*)"', body)))
def fwd(q, k, v, scale, wl, wr, bm, softcap=0.0, alibi=None, p=0.0, seed=0, deterministic=True):
    return emu.forward(q, k, v, scale=scale, window=(wl, wr), block_mask=bm or None,
                       softcap=softcap, alibi_slopes=alibi, dropout_p=p, dropout_seed=seed)
def bwd(dout, q, k, v, out, lse, scale, wl, wr, bm, softcap=0.0, alibi=None, p=0.0, seed=0,
        dlse=None, deterministic=True):
    SEEN_DETERMINISTIC.append(deterministic)
    return emu.backward(dout, q, k, v, out, lse, scale=scale, window=(wl, wr),
                        block_mask=bm or None, softcap=softcap, alibi_slopes=alibi,
                        dropout_p=p, dropout_seed=seed, dlse=dlse, deterministic=deterministic)
SEEN_DETERMINISTIC = []
lib.impl("cuda_fwd", fwd, "CPU")
lib.impl("cuda_bwd", bwd, "CPU")
from fastattn.backends import cuda
from fastattn.backends.base import Problem
cuda._register()
import fastattn.sparse as fs

B, Hq, Hkv, Nq, Nk, D = 1, 4, 2, 37, 70, 64
g = torch.Generator().manual_seed(0)
q, k, v, dout = (torch.randn(B, h, n, D, generator=g).half() for h, n in
                 ((Hq, Nq), (Hkv, Nk), (Hkv, Nk), (Hq, Nq)))
dlse = torch.randn(B, Hq, Nq, generator=g)
slopes = torch.tensor([[0.5, 0.25, 0.125, 0.0625]])
seed = 2 ** 64 - 12345  # >= 2^63: must reach the kernel as the same 64 bits
for bm in (None, fs.causal(Nq, Nk, block_size=64)):
    window = (-1, 0) if bm is None else (-1, -1)
    prob = Problem(device=q.device, dtype=q.dtype, B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, Dv=D,
                   window=window, block_mask=bm, scale=D ** -0.5, needs_grad=True,
                   return_lse=True, softcap=5.0, alibi_slopes=slopes, dropout_p=0.3,
                   dropout_seed=seed)
    assert not [r for r in cuda.CUDABackend().why_not(prob) if "softcap" in r or "alibi" in r
                or "dropout" in r]
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = cuda.CUDABackend().forward(qq, kk, vv, prob)
    torch.autograd.backward((out, lse), (dout, dlse))  # the loss depends on lse too
    kw = dict(scale=D ** -0.5, softcap=5.0, alibi_slopes=slopes, dropout_p=0.3, dropout_seed=seed)
    if bm is None:
        kw["window"] = (-1, 0)
    else:
        kw.update(window=bm.window, block_mask=bm.kernel_tensors())
    o2, l2 = emu.forward(q, k, v, **kw)
    grads = emu.backward(dout, q, k, v, o2, l2, dlse=dlse, **kw)
    assert torch.equal(out, o2) and torch.equal(lse, l2)
    for a, b in zip((qq.grad, kk.grad, vv.grad), grads):
        assert torch.equal(a, b)
    # deterministic=False (Problem.deterministic) reaches the backward op, which runs the FA2
    # atomic backward (bitwise equal here only because the emulator runs blocks in one order)
    prob_nd = dataclasses.replace(prob, deterministic=False)
    qn, kn, vn = (t.clone().requires_grad_() for t in (q, k, v))
    del SEEN_DETERMINISTIC[:]
    on, ln = cuda.CUDABackend().forward(qn, kn, vn, prob_nd)
    torch.autograd.backward((on, ln), (dout, dlse))
    assert SEEN_DETERMINISTIC == [False], SEEN_DETERMINISTIC
    grads_nd = emu.backward(dout, q, k, v, o2, l2, dlse=dlse, deterministic=False, **kw)
    for a, b in zip((qn.grad, kn.grad, vn.grad), grads_nd):
        assert torch.equal(a, b)
    del SEEN_DETERMINISTIC[:]
    qd = q.clone().requires_grad_()
    od, ld = cuda.CUDABackend().forward(qd, k, v, prob)  # Problem's default: True
    torch.autograd.backward((od, ld), (dout, dlse))
    assert SEEN_DETERMINISTIC == [True], SEEN_DETERMINISTIC
    # and the same keep bits as the reference: out with p > 0 equals the reference's to the rule
    from fastattn.backends.reference import reference_attention
    mask = None if bm is None else bm.to_dense()
    ref, _ = reference_attention(q.double(), k.double(), v.double(), scale=D ** -0.5,
                                 window=window, mask=mask, softcap=5.0, alibi_slopes=slopes,
                                 dropout_p=0.3, dropout_seed=seed)
    assert (out.double() - ref).abs().max() < 2e-2

# torch.library.opcheck: schema, fake impls, autograd registration, AOT dispatch (which also
# backpropagates through lse) -- with every modifier set, and with all of them at their defaults
# (the dispatcher then drops those arguments: backward must still return one grad per input).
qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
bm = fs.causal(Nq, Nk, block_size=64)
for args in [(qg, kg, vg, 0.125, -1, 0, [], 5.0, slopes, 0.3, -7),
             (qg, kg, vg, 0.125, *bm.window, bm.kernel_tensors())]:
    torch.library.opcheck(torch.ops.fastattn.cuda_fwd.default, args)
out, lse = torch.ops.fastattn.cuda_fwd(q, k, v, 0.125, -1, 0, [], 5.0, slopes, 0.3, -7)
torch.library.opcheck(torch.ops.fastattn.cuda_bwd.default,
                      (dout, q, k, v, out, lse, 0.125, -1, 0, [], 5.0, slopes, 0.3, -7, dlse))
print("GLUE OK")
'''


def test_backend_glue_through_emulated_ops():
    """cuda.py (fake impls, setup_context/backward, seed and dlse passing, opcheck) on ops with the
    binding's exact schemas, implemented by the emulator: what runs on a GPU, minus the GPU. In a
    subprocess, so the ops it defines do not leak into other tests."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    r = subprocess.run([sys.executable, "-c", _GLUE_SCRIPT, here,
                        os.path.join(root, "csrc", "bindings", "cuda_ops.cpp")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "GLUE OK" in r.stdout, r.stdout[-3000:] + r.stderr[-6000:]
