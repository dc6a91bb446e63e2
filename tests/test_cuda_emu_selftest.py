"""Tests of the CUDA emulation layer (tests/cuda_emu) itself: a shared-memory reduction, warp
shuffles and votes, atomics, wmma products in every layout, 16-bit conversions, and the bugs it
must report (divergent barrier, missing barrier, uninitialized shared memory, misaligned or
non-uniform wmma arguments, >48 KiB shared memory without opt-in); and the PTX layer
(csrc/cuda/ptx_ops.h): mma.sync m16n8k16 against a matmul with fragments indexed as the PTX ISA
documents them, ldmatrix layouts (plain and .trans), a cp.async + ldmatrix + mma GEMM, a missing
cp.async.wait_group (stale/NaN reads) and shared-memory races caught by the hazard detector."""

from __future__ import annotations

import ctypes
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_emu import build  # noqa: E402

P = ctypes.c_void_p


@pytest.fixture(scope="module")
def lib():
    L = build.load("cuda_emu_selftest")
    for name in ("st_block_sum_static", "st_block_sum_dynamic", "st_warp_ops", "st_atomics",
                 "st_wmma_gemm", "st_convert", "st_bug", "st_ptx_mma", "st_ptx_ldmatrix",
                 "st_ptx_gemm", "st_ptx_bug"):
        getattr(L, name).restype = ctypes.c_char_p
    L.st_set_schedule.argtypes = [ctypes.c_int, ctypes.c_ulonglong]
    yield L
    L.st_set_schedule(0, 0)


def ok(err):
    assert err is None, err.decode()


def ptr(t):
    return P(t.data_ptr())


@pytest.mark.parametrize("schedule", [0, 1, 2])
def test_block_reduction_static_smem(lib, schedule):
    lib.st_set_schedule(schedule, 7)
    x = torch.arange(1000, dtype=torch.float32) % 17
    out = torch.zeros(8)
    ok(lib.st_block_sum_static(ptr(x), ptr(out), 1000))
    expect = torch.nn.functional.pad(x, (0, 24)).view(8, 128).sum(1)
    torch.testing.assert_close(out, expect)
    lib.st_set_schedule(0, 0)


def test_block_reduction_dynamic_smem_2d_block(lib):
    x = torch.randn(700, dtype=torch.float32)
    out = torch.zeros(3)
    ok(lib.st_block_sum_dynamic(ptr(x), ptr(out), 700, 32, 8))  # 256 threads as 32 x 8
    expect = torch.nn.functional.pad(x, (0, 68)).view(3, 256).sum(1)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-4)


def test_warp_shuffles_and_votes(lib):
    nw = 3
    x = torch.arange(32 * nw, dtype=torch.float32)
    outs = [torch.zeros(32 * nw) for _ in range(4)]
    ballot = torch.zeros(32 * nw, dtype=torch.int32)
    any_all = torch.zeros(64 * nw, dtype=torch.int32)
    ok(lib.st_warp_ops(ptr(x), *map(ptr, outs), ptr(ballot), ptr(any_all), nw))
    s, bc, down, up = outs
    xw = x.view(nw, 32)
    torch.testing.assert_close(s.view(nw, 32), xw.sum(1, keepdim=True).expand(nw, 32))
    torch.testing.assert_close(bc.view(nw, 32), xw[:, 5:6].expand(nw, 32))
    exp_down = torch.cat([xw[:, 1:], xw[:, 31:]], 1)  # lane 31 keeps its own value
    torch.testing.assert_close(down.view(nw, 32), exp_down)
    exp_up = torch.cat([xw[:, :3], xw[:, :29]], 1)  # lanes 0..2 keep their own
    torch.testing.assert_close(up.view(nw, 32), exp_up)
    odd_mask = sum(1 << i for i in range(1, 32, 2))
    assert (ballot.view(torch.int32).to(torch.int64) & 0xFFFFFFFF == odd_mask).all()
    aa = any_all.view(nw, 32, 2)
    assert aa[0, :, 0].eq(0).all() and aa[1:, :, 0].eq(1).all()  # warp 0 holds 0..31
    assert aa[:, :, 1].eq(1).all()


def test_atomics(lib):
    counter = torch.zeros(1, dtype=torch.int32)
    fsum = torch.zeros(1)
    imax = torch.full((1,), -1, dtype=torch.int32)
    ok(lib.st_atomics(ptr(counter), ptr(fsum), ptr(imax), 5, 96))
    assert counter.item() == 480 and fsum.item() == 240.0 and imax.item() == 479


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("a_col,b_col,c_col", [(0, 0, 0), (0, 1, 0), (1, 0, 1), (1, 1, 0)])
def test_wmma_product(lib, dtype, a_col, b_col, c_col):
    M, N, K = 48, 32, 64
    g = torch.Generator().manual_seed(a_col * 4 + b_col * 2 + c_col)
    a = torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(K, N, generator=g).to(dtype)
    A = a.t().contiguous() if a_col else a.contiguous()
    B = b.t().contiguous() if b_col else b.contiguous()
    C = torch.zeros(M * N)
    ok(lib.st_wmma_gemm(ptr(A), ptr(B), ptr(C), M, N, K, int(dtype == torch.bfloat16),
                        a_col, b_col, c_col))
    C = C.view(N, M).t() if c_col else C.view(M, N)
    expect = 2 * (a.double() @ b.double())  # products of 16-bit values, fp32 accumulation
    torch.testing.assert_close(C.double(), expect, rtol=1e-5, atol=1e-4)


def test_half_bf16_conversions_match_torch(lib):
    x = torch.cat([torch.randn(4000) * 10, torch.randn(1000) * 1e-6,
                   torch.tensor([0.0, -0.0, 65504.0, 65520.0, 1e6, float("inf"), -float("inf"),
                                 3.0e38, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11])]).float()
    h, bf = torch.zeros_like(x), torch.zeros_like(x)
    ok(lib.st_convert(ptr(x), ptr(h), ptr(bf), x.numel()))
    torch.testing.assert_close(h, x.half().float(), rtol=0, atol=0)
    torch.testing.assert_close(bf, x.bfloat16().float(), rtol=0, atol=0)
    nan = torch.tensor([float("nan")])
    ok(lib.st_convert(ptr(nan), ptr(h), ptr(bf), 1))
    assert h[0].isnan() and bf[0].isnan()


def bug(lib, which):
    out = torch.zeros(1024)
    A = torch.zeros(1024, dtype=torch.float16)
    err = lib.st_bug(which, ptr(out), ptr(A))
    return (None if err is None else err.decode()), out


def test_reports_divergent_syncthreads(lib):
    err, _ = bug(lib, 0)
    assert err and "divergent __syncthreads" in err


@pytest.mark.parametrize("schedule", [0, 1])
def test_missing_barrier_gives_wrong_result(lib, schedule):
    # Threads run as far as they can before anyone else: a read of another thread's shared
    # memory without a barrier sees a stale value, in either resume order.
    lib.st_set_schedule(schedule, 0)
    err, out = bug(lib, 1)
    lib.st_set_schedule(0, 0)
    assert err is None
    base = out[64].item()
    expect = base + (torch.arange(64) + 1) % 64
    assert not torch.equal(out[:64], expect)


def test_uninitialized_shared_memory_reads_nan(lib):
    err, out = bug(lib, 2)
    assert err is None and out[:32].isnan().all()


def test_reports_misaligned_wmma_pointer(lib):
    err, _ = bug(lib, 3)
    assert err and "256-bit" in err


def test_reports_non_uniform_wmma_arguments(lib):
    err, _ = bug(lib, 4)
    assert err and "warp-collective" in err


def test_large_dynamic_smem_needs_opt_in(lib):
    err, _ = bug(lib, 5)
    assert err and "cudaFuncSetAttribute" in err
    err, out = bug(lib, 6)
    assert err is None and (out[:32] == 1).all()


# ---- PTX layer (csrc/cuda/ptx_ops.h) ----------------------------------------------------------
# The per-lane layouts below are written from the PTX ISA ("Matrix Fragments for mma.m16n8k16
# with floating point type", "ldmatrix"), independently of the emulator's code:
# g = lane // 4, t = lane % 4.

def _bits(x):
    return x.view(torch.int16).to(torch.int32) & 0xFFFF


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ptx_mma_m16n8k16_matches_matmul(lib, dtype):
    g = torch.Generator().manual_seed(3)
    A = torch.randn(16, 16, generator=g).to(dtype)
    B = torch.randn(16, 8, generator=g).to(dtype)
    C = torch.randn(16, 8, generator=g)
    D = torch.zeros(16, 8)
    ok(lib.st_ptx_mma(ptr(A.contiguous()), ptr(B.contiguous()), ptr(C), ptr(D),
                      int(dtype == torch.bfloat16)))
    expect = A.double() @ B.double() + C.double()
    torch.testing.assert_close(D.double(), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num", [1, 2, 4])
@pytest.mark.parametrize("trans", [0, 1])
def test_ptx_ldmatrix_layout(lib, num, trans):
    src = torch.arange(4 * 64, dtype=torch.int16)  # matrix i, row r, col c -> 64 i + 8 r + c
    out = torch.zeros(32 * 4, dtype=torch.int32)
    ok(lib.st_ptx_ldmatrix(ptr(src), ptr(out), num, trans))
    out = out.view(32, 4).to(torch.int64) & 0xFFFFFFFF
    for lane in range(32):
        gq, t = lane // 4, lane % 4
        for i in range(num):
            if trans:   # rows 2t, 2t+1 of column g
                lo, hi = 64 * i + 8 * (2 * t) + gq, 64 * i + 8 * (2 * t + 1) + gq
            else:       # row g, columns 2t, 2t+1
                lo, hi = 64 * i + 8 * gq + 2 * t, 64 * i + 8 * gq + 2 * t + 1
            assert out[lane, i].item() == lo | (hi << 16), (lane, i)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ptx_cp_async_ldmatrix_mma_gemm(lib, dtype):
    M, N, K = 128, 64, 96
    g = torch.Generator().manual_seed(5)
    A = torch.randn(M, K, generator=g).to(dtype)
    B = torch.randn(K, N, generator=g).to(dtype)
    C = torch.zeros(M, N)
    ok(lib.st_ptx_gemm(ptr(A), ptr(B), ptr(C), M, N, K, int(dtype == torch.bfloat16)))
    torch.testing.assert_close(C.double(), A.double() @ B.double(), rtol=1e-5, atol=1e-4)


def ptx_bug(lib, which):
    src = torch.arange(1024, dtype=torch.float32)
    out = torch.zeros(64)
    err = lib.st_ptx_bug(which, ptr(src), ptr(out))
    return (None if err is None else err.decode()), out, src


def test_ptx_missing_cp_async_wait_reads_unlanded_memory(lib):
    # Read before the wait_group: the values are the NaN fill, and the late landing is a race
    # with the other threads' reads.
    err, out, src = ptx_bug(lib, 0)
    assert err and "shared-memory race" in err and "cp.async (lands at wait_group)" in err
    assert out[:32].isnan().any()
    # No wait_group at all: the copy never lands (reported when the thread exits).
    err, out, src = ptx_bug(lib, 9)
    assert err and "no cp.async.wait_group covered" in err
    err, out, src = ptx_bug(lib, 1)
    assert err is None
    torch.testing.assert_close(out[:32], src[(torch.arange(32) * 4 + 4) % 128])


def test_ptx_race_detector(lib):
    err, _, _ = ptx_bug(lib, 2)
    assert err and "shared-memory race" in err and "st.shared" in err
    err, out, _ = ptx_bug(lib, 3)       # __syncthreads between: fine
    assert err is None and out[63].item() == 0.0 and out[0].item() == 1.0
    err, _, _ = ptx_bug(lib, 4)         # __syncwarp orders the lanes of one warp
    assert err is None
    err, _, _ = ptx_bug(lib, 5)         # but not two warps
    assert err and "shared-memory race" in err


def test_ptx_race_detector_write_after_read_by_cp_async(lib):
    err, _, _ = ptx_bug(lib, 6)
    assert err and "shared-memory race" in err and "cp.async" in err
    err, _, _ = ptx_bug(lib, 7)
    assert err is None


def test_ptx_divergent_warp_collective_is_reported(lib):
    err, _, _ = ptx_bug(lib, 8)
    assert err and "divergent ldmatrix" in err
