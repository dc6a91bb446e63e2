"""The CUDA split-KV decode kernels (csrc/cuda/decode_kernel.h), run on the CPU through the
emulation layer (tests/cuda_emu), against the float64 oracle (fastattn's decode_reference) by
DESIGN.md's rule: max |kernel - oracle| <= 2 * max |torch_lowp - oracle| + floor(dtype), where
torch_lowp is the reference on the 16-bit inputs (float32 math, output rounded to the dtype).
Caches hold NaN past every row's cache_seqlens (an uninitialized cache): never read.
Emulation runs every CUDA thread as a fiber and each warp shuffle as a barrier, so shapes stay
small."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_emu import emu  # noqa: E402

from fastattn.backends.reference import decode_reference  # noqa: E402

F16, BF16 = torch.float16, torch.bfloat16
FLOOR = {F16: 2.0 ** -10, BF16: 2.0 ** -7}
NAN = float("nan")


def _inputs(B, Hq, Hkv, Nq, Ncache, D, Dv, dtype, seqlens, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Ncache, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Ncache, Dv, generator=g).to(dtype)
    lens = torch.tensor(seqlens, dtype=torch.int32)
    for b, L in enumerate(seqlens):  # garbage past each row's length
        k[b, :, L:] = NAN
        v[b, :, L:] = NAN
    return q, k, v, lens


def _check(out, lse, q, k, v, lens, dtype, **kw):
    # the oracle materializes P V, where a masked key's NaN would leak (0 * NaN): it gets the
    # caches with the garbage past cache_seqlens zeroed; the kernel got the NaN
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    ref, ref_lse = decode_reference(q.double(), k.double(), v.double(), cache_seqlens=lens, **kw)
    low, _ = decode_reference(q, k, v, cache_seqlens=lens, **kw)
    assert torch.isfinite(out).all(), "NaN/inf in the output (read past cache_seqlens?)"
    err = (out.double() - ref).abs().max().item()
    base = (low.double() - ref).abs().max().item()
    assert err <= 2 * base + FLOOR[dtype], f"out: max err {err:.3e} > 2 * {base:.3e} + floor"
    inf = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), inf), "lse: -inf rows differ"
    assert torch.equal(out[inf], torch.zeros_like(out[inf])), "rows that see no key must be 0"
    if (~inf).any():
        lerr = (lse[~inf].double() - ref_lse[~inf]).abs().max().item()
        # softcap: tanh is tanh.approx.f32 under --use_fast_math (relative error ~2^-11, as
        # the emulator models it), which moves each logit by up to softcap * 2^-11
        tol = 1e-4 + kw.get("softcap", 0.0) * 2.0 ** -11
        assert lerr <= tol, f"lse: max err {lerr:.3e} > {tol:.1e}"


# (B, Hq, Hkv, Nq, Ncache, D, Dv, seqlens, window (left, right))
CASES = {
    "gqa2-nq2-d64": (2, 4, 2, 2, 77, 64, 64, [77, 39], (-1, 0)),
    "gqa2-nq2-d128": (2, 4, 2, 2, 77, 128, 128, [61, 77], (-1, 0)),
    # R = 4 * 3 = 12 rows at head dim 128: two row tiles of 8 (grid z)
    "gqa4-nq3-d128-rowtiles": (1, 4, 1, 3, 53, 128, 128, [53], (-1, 0)),
    # R = 8 * 3 = 24 rows at head dim 64: two row tiles of 16
    "gqa8-nq3-d64-rowtiles": (1, 8, 1, 3, 45, 64, 64, [45], (-1, 0)),
    # head dims padded inside the kernel, Dv != D, a left window
    "mqa-nq1-d40-dv24-window": (2, 2, 1, 1, 70, 40, 24, [70, 33], (17, 0)),
    # window_right: -1 (every key < L, FlashAttention's non-causal cache) and 2
    "noncausal": (1, 2, 2, 3, 50, 64, 64, [47], (-1, -1)),
    "right2-left5": (1, 2, 1, 4, 40, 64, 64, [31], (5, 2)),
    # rows that see nothing: L = 0 (every query) and L = 1 < Nq (query 0)
    "empty-rows": (2, 2, 1, 2, 33, 64, 64, [0, 1], (-1, 0)),
}


@pytest.mark.parametrize("splits", [1, 3], ids=["S1", "S3"])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_decode_matches_oracle(name, dtype, splits):
    B, Hq, Hkv, Nq, Nc, D, Dv, seqlens, (wl, wr) = CASES[name]
    q, k, v, lens = _inputs(B, Hq, Hkv, Nq, Nc, D, Dv, dtype, seqlens)
    out, lse = emu.decode(q, k, v, cache_seqlens=lens, window=(wl, wr), num_splits=splits)
    _check(out, lse, q, k, v, lens, dtype, window_left=wl, window_right=wr)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
def test_decode_many_splits_and_no_seqlens(dtype):
    """More splits than key steps of the shortest row (empty chunks: lse -inf partials), and
    no cache_seqlens (every row holds Ncache tokens)."""
    q, k, v, lens = _inputs(2, 2, 2, 1, 40, 64, 64, dtype, [40, 5])
    out, lse = emu.decode(q, k, v, cache_seqlens=lens, num_splits=4)
    _check(out, lse, q, k, v, lens, dtype)
    q, k, v, full = _inputs(2, 2, 2, 1, 40, 64, 64, dtype, [40, 40], seed=2)  # no garbage
    out, lse = emu.decode(q, k, v, num_splits=2, max_len=40)
    _check(out, lse, q, k, v, full, dtype)


@pytest.mark.parametrize("splits", [1, 2])
def test_decode_softcap_alibi(splits):
    q, k, v, lens = _inputs(2, 4, 2, 2, 57, 64, 64, BF16, [57, 30], seed=3)
    slopes = torch.rand(2, 4, generator=torch.Generator().manual_seed(4)) * 0.3
    out, lse = emu.decode(q, k, v, cache_seqlens=lens, num_splits=splits, softcap=5.0,
                          alibi_slopes=slopes)
    _check(out, lse, q, k, v, lens, BF16, softcap=5.0, alibi_slopes=slopes)


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_nonfinite_v_reaches_only_rows_that_see_it(splits):
    """Nq = 3 queries at positions 44, 45, 46 (L = 47). A NaN in v[key 45, dim 5] reaches
    queries 1 and 2, an inf in v[key 46, dim 7] query 2 only: exactly those entries are
    non-finite (per element, as the float64 math does); every other entry equals the clean
    run's."""
    q, k, v, lens = _inputs(1, 2, 1, 3, 60, 64, 64, F16, [47])
    clean, _ = emu.decode(q, k, v, cache_seqlens=lens, num_splits=splits)
    v[0, 0, 45, 5] = NAN
    v[0, 0, 46, 7] = float("inf")
    out, _ = emu.decode(q, k, v, cache_seqlens=lens, num_splits=splits)
    bad = ~torch.isfinite(out)
    exp = torch.zeros_like(bad)
    exp[0, :, 1:, 5] = True
    exp[0, :, 2, 7] = True
    assert torch.equal(bad, exp), bad.nonzero().tolist()
    assert torch.isnan(out[0, :, 1:, 5]).all()
    assert torch.isinf(out[0, :, 2, 7]).all()
    assert torch.equal(out[~exp], clean[~exp])


def test_decode_split_count_does_not_change_much():
    """S = 1 (direct write) and S = 5 (partials + combine) agree to fp16 rounding."""
    q, k, v, lens = _inputs(1, 2, 1, 2, 90, 64, 64, F16, [90], seed=7)
    a, la = emu.decode(q, k, v, cache_seqlens=lens, num_splits=1)
    b, lb = emu.decode(q, k, v, cache_seqlens=lens, num_splits=5)
    assert (a.float() - b.float()).abs().max().item() <= 2 ** -9
    assert (la - lb).abs().max().item() <= 1e-5


def test_decode_chunks_cover_the_cache():
    for max_len in (1, 15, 16, 17, 77, 1000):
        for s in (1, 2, 3, 7, 64):
            c = emu.decode_chunk(max_len, s)
            assert c % 16 == 0 and c * s >= max_len, (max_len, s, c)


def test_decode_rejects_bad_params():
    q, k, v, lens = _inputs(1, 2, 1, 1, 16, 64, 64, F16, [16])
    with pytest.raises(emu.EmulatedKernelError, match="head dims"):
        emu.decode(torch.zeros(1, 2, 1, 160, dtype=F16), torch.zeros(1, 1, 16, 160, dtype=F16),
                   torch.zeros(1, 1, 16, 160, dtype=F16))
    with pytest.raises(emu.EmulatedKernelError, match="max_len"):
        emu.decode(q, k, v, cache_seqlens=lens, max_len=17)
