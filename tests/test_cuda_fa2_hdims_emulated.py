"""The FlashAttention-2 class kernels at the head dims added by issue 16: the forward and the
atomic-dQ backward natively at d = 32 and 96 (rows of 4 / 12 16-byte chunks: the 4-chunk swizzle
span of fa2_fwd_kernel.h's Swz), and the atomic backward at d = 192 and 256 (32-key, 32-query
tiles, four warps per 16-key group, 8-query S^T slices). Run on the CPU through the emulation
layer (tests/cuda_emu, per-lane mma / ldmatrix fragments, deferred cp.async, shared-memory hazard
detector), against the float64 oracle by DESIGN.md's rule (tests/oracle.py):

    max |kernel - oracle| <= 2 * max |torch in the kernel's precision - oracle| + floor

for out, dq, dk, dv (lse: against the float32 reference's error). Every case also checks which
instantiation ran (emu.last_launches: threads and dynamic shared memory of the launch), so a
dispatch that pads 96 up to 128 again fails here. A representative sample runs by default; the
sweep over shapes, masks and dtypes is marked slow.

Negative controls (run by hand on a copy of the tree, each made tests here fail, then dropped):
  - the 8-chunk XOR (chunk ^ (row % 8)) on rows of 4 / 12 chunks: a shared-memory race (cp.async
    writes land in the next row) in the first d = 32 test (run with -x);
  - d = 96 only, the ldmatrix lane offset without its low XOR bit (readers address other chunks
    than swz() wrote): out / dq off the rule in every d = 96 and d = 80 test;
  - d = 192 only, the two k16 halves of the kNI == 1 B fragment swapped in S^T / dP^T: dq off
    the rule in every d = 192 and d = 160 test;
  - d = 256 only, the barrier between writing P^T / dS^T and the dV / dK ldmatrix removed:
    reported as a race (ldmatrix after another thread's write) in every d = 256 / 232 test;
  - d = 32 only, the forward's one barrier per key tile removed: a race at the Q K^T ldmatrix;
  - the 4-chunk swizzle mask (row / 2) % 4 replaced by row % 4 (still a permutation, numerics
    unchanged): the bank-conflict test fails at d = 32 and 96.
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


# ---- the instantiation each head dim runs (csrc/cuda/fa2_*_kernel.h tile choices) -------------

def fa2_fwd_launch(d):
    """(threads, dynamic smem bytes) of fa2_fwd_kernel at compiled head dim d."""
    bm, bn, stages = {32: (128, 64, 3), 64: (128, 64, 3), 96: (128, 32, 3), 128: (128, 32, 3),
                      192: (64, 32, 2), 256: (64, 32, 2)}[d]
    return 128, bm * d * 2 + stages * 2 * bn * d * 2


def fa2_bwd_launch(d):
    """(threads, dynamic smem bytes) of fa2_bwd_dkdv_kernel at compiled head dim d."""
    bn, bm, split = {32: (64, 64, 2), 64: (64, 64, 2), 96: (64, 64, 2), 128: (64, 32, 2),
                     192: (32, 32, 4), 256: (32, 32, 4)}[d]
    return (bn // 16) * split * 32, 2 * bn * d * 2 + 4 * bm * d * 2 + 2 * bn * (bm + 8) * 2


def compiled(d):
    return next(c for c in (32, 64, 96, 128, 192, 256) if d <= c)


def alibi_slopes(Hq):
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / Hq) for h in range(Hq)])


def run_case(B, Hq, Hkv, Nq, Nk, D, dtype, *, window=(-1, -1), block_mask=None, seed=0,
             q_scale=1.0, with_dlse=False, fwd_kernel="fa2", **mods):
    """Forward (out, lse) and the atomic backward (dq, dk, dv) in the emulator against the
    float64 oracle of the same loss (out . dout, plus lse . dlse if with_dlse)."""
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
    (fl,) = emu.last_launches()
    if fwd_kernel == "fa2":  # the native FA2 instantiation, not a padded one
        assert (fl["threads"], fl["smem"]) == fa2_fwd_launch(compiled(D)), fl

    def ref(compute_dtype, with_grad=True):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        if compute_dtype is None:
            a = (qq.double(), kk.double(), vv.double())
        elif compute_dtype == torch.float32:
            a = (qq.float(), kk.float(), vv.float())
        else:
            a = (qq, kk, vv)
        cd = compute_dtype if compute_dtype in DTYPES else None
        o, l_ = reference_attention(*a, scale=scale, window=window, mask=mask, compute_dtype=cd,
                                    **mods)
        if not with_grad:
            return o.detach(), l_.detach(), None
        outs, gin = ((o, l_), (dout.to(o.dtype), dlse)) if dlse is not None else \
            ((o,), (dout.to(o.dtype),))
        return o.detach(), l_.detach(), torch.autograd.grad(outs, (qq, kk, vv), gin)

    o64, l64, g64 = ref(None)
    olow, _, glow = ref(dtype)
    _, l32, _ = ref(torch.float32, with_grad=False)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_by_rule("out", out, o64.double(), olow, dtype)
    assert torch.equal(torch.isinf(lse), torch.isinf(l64)), "lse -inf pattern"
    fin = torch.isfinite(l64)
    if fin.any():
        err = (lse.double() - l64.double())[fin].abs().max().item()
        # softcap: the emulator's tanh.approx is the PTX bound's worst case, |tanh| (1 - 2^-11),
        # which shifts every logit (|logit| <= softcap) by up to softcap * 2^-11
        tanh_bound = (mods.get("softcap") or 0.0) * 2.0 ** -11
        assert err <= 2 * (l32.double() - l64.double())[fin].abs().max().item() + 1e-5 + \
            tanh_bound, err

    got = emu.backward(dout, q, k, v, out, lse, scale=scale, window=kwindow, block_mask=kt,
                       dlse=dlse, deterministic=False, **mods)
    launches = emu.last_launches()  # preprocess, dK/dV (atomic dQ), convert
    assert len(launches) == 3, launches
    assert (launches[1]["threads"], launches[1]["smem"]) == fa2_bwd_launch(compiled(D)), launches
    for name, x, r, lo in zip(("dq", "dk", "dv"), got, g64, glow, strict=True):
        assert x.dtype == dtype and x.shape == r.shape
        assert x.isfinite().all(), name
        assert_by_rule(name, x, r.double(), lo, dtype)
    return got


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


def _fwd_kernel(D, bs):
    """The forward of a block mask: the FA2 kernel when BLOCK_M is a multiple of its query tile
    (128 rows at d <= 128, 64 above), else the wmma kernel (head dims 64 / 128, padded)."""
    bm = bs if isinstance(bs, int) else bs[0]
    return "fa2" if bm % (128 if D <= 128 else 64) == 0 else "wmma"


# ---- the swizzle itself (csrc/cuda/fa2_fwd_kernel.h Swz, through the emulated library) ---------

@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 192, 256])
def test_swizzle_is_bank_conflict_free_and_matches_the_lane_offsets(head_dim):
    # A 16-byte chunk's bank group is (byte address / 16) mod 8. An ldmatrix phase (8 lanes) reads
    # one logical chunk from 8 consecutive rows; a cp.async phase of 8 threads writes 8
    # consecutive (row, chunk) pairs in row-major order: both must hit 8 distinct groups. The
    # lane offsets the kernels add (Swz::lane_ofs + step_imm) must address the chunk swz() wrote.
    import ctypes

    L = emu.lib()
    L.fa_emu_swz.restype = ctypes.c_long
    L.fa_emu_swz.argtypes = [ctypes.c_long] * 5
    kc = head_dim // 8

    def swz(row, chunk):
        return L.fa_emu_swz(kc, 0, row, chunk, 0)

    def group(row, chunk):
        return swz(row, chunk) // 8 % 8  # element offset -> 16-byte chunk -> bank group

    for row in range(16):  # a permutation of the row's chunks
        assert sorted(swz(row, c) - row * kc * 8 for c in range(kc)) == [8 * c for c in range(kc)]
    for r0 in range(0, 32, 8):
        for c in range(kc):
            assert len({group(r0 + i, c) for i in range(8)}) == 8, ("ldmatrix", r0, c)
    for t in range(0, 16 * kc, 8):
        assert len({group(*divmod(t + i, kc)) for i in range(8)}) == 8, ("cp.async", t)
    for lane in range(32):
        for kk in range(kc // 2):
            for bit in (0, 1):
                row = lane % 8 + 8 * (lane // 8)  # any row == lane (mod 8)
                want = swz(row, 2 * kk + bit) - row * kc * 8
                assert L.fa_emu_swz(kc, 1, lane, kk, bit) == want, (lane, kk, bit)


# ---- default sample ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("D", [32, 96])
def test_native_d32_d96_odd_lengths(dtype, D):
    # Nq != Nk, neither a multiple of any tile
    run_case(1, 2, 2, 77, 97, D, dtype, seed=1)


@pytest.mark.parametrize("D,dtype", [(192, torch.float16), (256, torch.bfloat16)],
                         ids=["d192-fp16", "d256-bf16"])
def test_backward_d192_d256_odd_lengths(D, dtype):
    run_case(1, 2, 2, 45, 77, D, dtype, seed=2)


@pytest.mark.parametrize("D,dtype,Nq,Nk", [(96, torch.bfloat16, 70, 129),
                                           (32, torch.float16, 97, 33),
                                           (256, torch.float16, 97, 33)],
                         ids=["d96-bf16", "d32-fp16", "d256-fp16"])
def test_causal_bottom_right(D, dtype, Nq, Nk):
    # (97, 33): the first 64 queries see no key: out 0, lse -inf, zero gradients
    run_case(1, 2, 1, Nq, Nk, D, dtype, window=(-1, 0), seed=3)


@pytest.mark.parametrize("D,window", [(96, (16, 8)), (192, (40, -1)), (32, (-1, 5))],
                         ids=["d96", "d192", "d32"])
def test_window(D, window):
    run_case(1, 1, 1, 130, 121, D, torch.float16, window=window, seed=4)


@pytest.mark.parametrize("D,dtype", [(32, torch.bfloat16), (96, torch.float16),
                                     (192, torch.bfloat16)], ids=["d32", "d96", "d192"])
def test_gqa(D, dtype):
    # dK / dV reduced over the group's query heads inside the block
    run_case(2, 4, 1, 33, 65, D, dtype, window=(-1, 0), seed=5)


@pytest.mark.parametrize("D", [24, 80, 160, 232])
def test_padded_to_new_head_dims(D):
    # 24 -> 32, 80 -> 96, 160 -> 192, 232 -> 256 (zero-filled columns)
    run_case(1, 2, 1, 45, 77, D, torch.bfloat16, window=(-1, 0), seed=6)


@pytest.mark.parametrize("pattern,D,bs", [
    ("per_head_random_bitmask", 96, (128, 128)),
    ("document", 32, (128, 64)),
    ("causal", 256, 64),
    ("per_head_random_bitmask", 192, (128, 64)),
], ids=["bitmask-d96-128", "document-d32-128x64", "causal-d256-64", "bitmask-d192-128x64"])
def test_block_sparse(pattern, D, bs):
    Nq = Nk = 200
    run_case(1, 2, 1, Nq, Nk, D, torch.float16 if D != 192 else torch.bfloat16,
             block_mask=_patterns(Nq, Nk, 2, bs)[pattern](), seed=7, fwd_kernel=_fwd_kernel(D, bs))


def test_block_sparse_64_blocks_d96_backward_native():
    # BLOCK_M = 64: the forward is the wmma kernel (padded to 128), the atomic backward d=96
    Nq = Nk = 150
    bm = fs.strided(Nq, Nk, stride=16, block_size=64).with_window(-1, 0)
    run_case(1, 2, 2, Nq, Nk, 96, torch.bfloat16, block_mask=bm, seed=8, fwd_kernel="wmma")


@pytest.mark.parametrize("D,dtype", [(96, torch.bfloat16), (256, torch.float16)],
                         ids=["d96", "d256"])
def test_softcap_alibi_gqa(D, dtype):
    run_case(1, 4, 2, 45, 77, D, dtype, window=(20, 3), softcap=5.0, q_scale=3.0,
             alibi_slopes=alibi_slopes(4), seed=9)


@pytest.mark.parametrize("D", [32, 192])
def test_dropout(D):
    run_case(1, 2, 1, 45, 70, D, torch.float16, window=(-1, 0), dropout_p=0.2,
             dropout_seed=(3 << 33) + 31, seed=10)


@pytest.mark.parametrize("D,Nq,Nk", [(32, 40, 70), (96, 80, 19), (256, 40, 70)])
def test_lse_gradient(D, Nq, Nk):
    run_case(1, 2, 1, Nq, Nk, D, torch.bfloat16, window=(-1, 0), with_dlse=True, seed=11)


@pytest.mark.parametrize("D", [96, 256])
def test_thread_schedule_random(D):
    emu.set_schedule("random", seed=21)
    try:
        run_case(1, 2, 1, 50, 70, D, torch.float16, window=(-1, 0), seed=12)
    finally:
        emu.set_schedule("forward")


def test_backward_above_128_needs_the_atomic_kernel():
    # deterministic=True (the wmma backward) stops at 128, with the reason; the atomic-dQ
    # backward serves 136 (padded to 192) and 256
    q = torch.randn(1, 1, 10, 136).half()
    out, lse = emu.forward(q, q, q)
    with pytest.raises(emu.EmulatedKernelError, match=r"\[8, 128\] \(backward\).*deterministic"):
        emu.backward(out, q, q, q, out, lse)
    dq, dk, dv = emu.backward(out, q, q, q, out, lse, deterministic=False)
    assert dq.isfinite().all() and dk.isfinite().all() and dv.isfinite().all()
    q = torch.randn(1, 1, 10, 264).half()
    with pytest.raises(emu.EmulatedKernelError, match=r"\[8, 256\] \(backward\)"):
        emu.backward(q, q, q, q, q, torch.zeros(1, 1, 10), deterministic=False)


# ---- sweep (slow) -----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("D", [32, 96, 192, 256])
@pytest.mark.parametrize("Nq,Nk", [(1, 257), (17, 97), (257, 257), (97, 17), (128, 64)])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (31, 7)], ids=["full", "causal", "win"])
def test_sweep_dense(dtype, D, Nq, Nk, window):
    run_case(1, 2, 1, Nq, Nk, D, dtype, window=window, seed=Nq + Nk)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("D", [32, 96, 192, 256])
@pytest.mark.parametrize("pattern", ["causal", "sliding_window", "document",
                                     "per_head_random_bitmask", "strided"])
@pytest.mark.parametrize("bs", [64, (128, 64), (128, 128)], ids=["64", "128x64", "128"])
def test_sweep_sparse(dtype, D, pattern, bs):
    Nq = Nk = 257
    run_case(1, 2, 2, Nq, Nk, D, dtype, block_mask=_patterns(Nq, Nk, 2, bs)[pattern](),
             seed=16, fwd_kernel=_fwd_kernel(D, bs))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("D", [32, 96, 192, 256])
@pytest.mark.parametrize("Hq,Hkv", [(4, 1), (4, 2)])
@pytest.mark.parametrize("mods", ["softcap", "alibi", "dropout", "dlse"])
def test_sweep_gqa_mods(dtype, D, Hq, Hkv, mods):
    kw = {"softcap": dict(softcap=5.0, q_scale=3.0),
          "alibi": dict(alibi_slopes=alibi_slopes(Hq)),
          "dropout": dict(dropout_p=0.2, dropout_seed=77),
          "dlse": dict(with_dlse=True)}[mods]
    run_case(2, Hq, Hkv, 33, 65, D, dtype, window=(-1, 0), seed=D + Hq * Hkv, **kw)
