"""The triton forward's tensor-descriptor (TMA) variant (kernels._attn_fwd with TMA=True).

- Correctness: Triton 3.9's interpreter runs device-side tensor descriptors
  (tl.make_tensor_descriptor, descriptor load/store, zero padding out of bounds) on CPU tensors,
  so the variant runs here with FASTATTN_TRITON_TMA=1 against the float64 oracle (DESIGN.md's
  rule): dense, causal/window, GQA, odd lengths, padded head dims, Dv != D, block-sparse.
- Selection: only on request (FASTATTN_TRITON_TMA=1) or a validated "triton-tma" entry of the
  GPU validation table, only on sm_90+; backend="auto" alone never turns it on.
- Compile: sm_90 ahead of time, 0 spills, wgmma and TMA copies (cp.async.bulk.tensor).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("triton")

import fastattn  # noqa: E402
import fastattn.sparse as fs  # noqa: E402
from fastattn import gpu_validation  # noqa: E402
from fastattn.backends.triton import ops  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracle import FLOOR, check_against_oracle, make_qkv  # noqa: E402,F401

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.fixture
def interp(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def tma_spy(monkeypatch):
    """Records what ops._use_tma decided for each forward launch."""
    seen = []
    real = ops._use_tma

    def spy(*a, **kw):
        r = real(*a, **kw)
        seen.append(r)
        return r

    monkeypatch.setattr(ops, "_use_tma", spy)
    return seen


# --------------------------------------------------------------------------- selection


def test_tma_policy():
    P = ops.tma_policy
    # interpreter (arch None): only when requested
    assert P(None, True, False) and not P(None, None, True) and not P(None, False, True)
    # sm_80: never (no TMA hardware), whatever is asked
    assert not P(8, True, True) and not P(8, None, True)
    # sm_90: requested, or unset with a validated entry; 0 forbids it
    assert P(9, True, False) and P(9, None, True)
    assert not P(9, None, False) and not P(9, False, True)
    assert P(10, None, True)


def _fake_sm90(monkeypatch, table):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(gpu_validation, "TABLE", table)


def _entry(backend, correct=True, sanitizer="clean"):
    return gpu_validation.parse_entry(dict(backend=backend, arch="sm_90", correct=correct,
                                           sanitizer=sanitizer))


def test_auto_never_picks_tma_without_a_validation_entry(monkeypatch):
    """On an sm_90 GPU with FASTATTN_TRITON_TMA unset, the compiled-kernel path takes the TMA
    forward only when the table holds a validated "triton-tma" entry for sm_90: not with an
    empty table, not with a validated "triton" entry (that validates the pointer kernels), not
    with a failed or unsanitary "triton-tma" entry, and never when the env var says 0."""
    monkeypatch.delenv(ops.TMA_ENV, raising=False)
    t = [torch.empty(1, 2, 64, 64, dtype=F16) for _ in range(4)]
    _fake_sm90(monkeypatch, {})
    assert not ops._use_tma(*t, interpret=False)
    _fake_sm90(monkeypatch, {("triton", "sm_90"): _entry("triton")})
    assert not ops._use_tma(*t, interpret=False)
    _fake_sm90(monkeypatch, {("triton-tma", "sm_90"): _entry("triton-tma", correct=False)})
    assert not ops._use_tma(*t, interpret=False)
    _fake_sm90(monkeypatch, {("triton-tma", "sm_90"): _entry("triton-tma", sanitizer="findings")})
    assert not ops._use_tma(*t, interpret=False)
    _fake_sm90(monkeypatch, {("triton-tma", "sm_90"): _entry("triton-tma")})
    assert ops._use_tma(*t, interpret=False)
    monkeypatch.setenv(ops.TMA_ENV, "0")
    assert not ops._use_tma(*t, interpret=False)
    monkeypatch.setenv(ops.TMA_ENV, "1")
    _fake_sm90(monkeypatch, {})
    assert ops._use_tma(*t, interpret=False)  # explicit request
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert not ops._use_tma(*t, interpret=False)  # sm_80: never


def test_shipped_table_has_no_tma_entry():
    assert not any(b == ops.TMA_FAMILY for b, _ in gpu_validation.load_table([
        gpu_validation.TABLE_FILE]))


def test_layout_rules():
    ok = torch.empty(1, 2, 33, 40, dtype=F16)  # row stride 80 B
    assert ops.tma_layout_ok(ok)
    assert not ops.tma_layout_ok(torch.empty(1, 2, 33, 20, dtype=F16))  # 40 B rows
    assert not ops.tma_layout_ok(torch.empty(1, 2, 40, 33, dtype=F16).transpose(-1, -2))
    assert not ops.tma_layout_ok(torch.empty(1 * 2 * 33 * 40 + 1, dtype=F16)[1:].view(1, 2, 33, 40))


def test_scratch_allocator_is_set_only_where_none_is():
    """The TMA launch needs triton.set_allocator (device-side descriptors take global scratch):
    ops sets one in a context that has none and leaves a caller's own alone."""
    import contextvars

    import triton
    from triton.runtime import _allocation

    def run():
        assert _allocation._allocator.get() is _allocation._NULL_ALLOCATOR
        ops._ensure_allocator()
        assert _allocation._allocator.get() is not _allocation._NULL_ALLOCATOR
        mine = lambda size, alignment, stream: None  # noqa: E731
        triton.set_allocator(mine)
        ops._ensure_allocator()
        assert _allocation._allocator.get() is mine

    contextvars.Context().run(run)


def test_interpreter_default_is_the_pointer_kernel(interp, tma_spy, monkeypatch):
    monkeypatch.delenv(ops.TMA_ENV, raising=False)
    q, k, v = make_qkv(1, 2, 1, 17, 33, 32, F16, requires_grad=False)
    fastattn.attention(q, k, v, backend="triton")
    assert tma_spy == [False]


# --------------------------------------------------------------------------- interpreter


def _check(q, k, v, tma_spy, expect_tma=True, **kw):
    window = kw.get("window") or (-1, -1)
    if kw.get("causal"):
        window = (window[0], 0 if window[1] == -1 else min(window[1], 0))
    mask = kw["block_mask"].to_dense() if kw.get("block_mask") is not None else None
    check_against_oracle(lambda a, b, c: fastattn.attention(a, b, c, backend="triton",
                                                            return_lse=True, **kw),
                         q, k, v, window=window, mask=mask)
    assert tma_spy and all(x == expect_tma for x in tma_spy), tma_spy


CASES = [  # B, Hq, Hkv, Nq, Nk, D, Dv, dtype, kwargs
    (1, 2, 2, 17, 33, 32, None, F16, {}),
    (2, 4, 2, 33, 47, 64, None, BF16, dict(causal=True)),  # GQA, bottom-right causal
    (1, 2, 1, 40, 40, 40, None, F32, dict(window=(9, 3))),  # padded head dim (40 -> 64)
    (1, 2, 1, 16, 50, 24, 40, F16, dict(causal=True)),  # Dv != D, Nq < Nk
    (1, 1, 1, 1, 97, 16, None, BF16, {}),  # a single query row
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[7]}-{c[3]}x{c[4]}-d{c[5]}-{sorted(c[8])}"
                                             for c in CASES])
def test_tma_forward_matches_oracle(interp, tma_spy, monkeypatch, case):
    monkeypatch.setenv(ops.TMA_ENV, "1")
    B, Hq, Hkv, Nq, Nk, D, Dv, dtype, kw = case
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, Dv=Dv)
    _check(q, k, v, tma_spy, **kw)


def test_tma_block_sparse_matches_oracle(interp, tma_spy, monkeypatch):
    monkeypatch.setenv(ops.TMA_ENV, "1")
    bm = fs.streaming(70, 70, sink_size=4, window_size=10, block_size=(16, 16))
    q, k, v = make_qkv(1, 2, 1, 70, 70, 32, F16)
    _check(q, k, v, tma_spy, block_mask=bm)


def test_tma_same_result_as_pointer_kernel(interp, tma_spy, monkeypatch):
    """Same tiles, same arithmetic order: the two forwards agree bitwise."""
    q, k, v = make_qkv(1, 2, 1, 37, 45, 64, F16, requires_grad=False)
    monkeypatch.setenv(ops.TMA_ENV, "0")
    a, la = fastattn.attention(q, k, v, causal=True, backend="triton", return_lse=True)
    monkeypatch.setenv(ops.TMA_ENV, "1")
    b, lb = fastattn.attention(q, k, v, causal=True, backend="triton", return_lse=True)
    assert tma_spy == [False, True]
    assert torch.equal(a, b) and torch.equal(la, lb)


def test_tma_falls_back_when_the_layout_does_not_allow_it(interp, tma_spy, monkeypatch):
    monkeypatch.setenv(ops.TMA_ENV, "1")
    q, k, v = make_qkv(1, 2, 1, 17, 21, 20, F16)  # 40-byte rows: not a TMA stride
    _check(q, k, v, tma_spy, expect_tma=False, causal=True)


# --------------------------------------------------------------------------- sm_90 compile


def test_tma_tiles_leave_out_what_spills_under_block_masks():
    kern = ops.load_kernels(interpret=False)
    lim = kern.SMEM_LIMIT[90]
    base = kern.default_tiles("fwd", 64, 64, 2, lim, (128, 128))
    tma = kern.default_tiles("fwd", 64, 64, 2, lim, (128, 128), tma=True)
    assert (128, 128, 8, 3, None) in base and (128, 128, 8, 3, None) not in tma
    assert set(tma) == set(base) - {(128, 128, 8, 3, None)}
    # dense/causal calls keep the full table (the tile is clean there)
    assert kern.default_tiles("fwd", 64, 64, 2, lim, tma=True) == kern.default_tiles(
        "fwd", 64, 64, 2, lim)


needs_ptxas = pytest.mark.skipif(
    __import__("shutil").which("ptxas") is None, reason="ptxas not on PATH")


@needs_ptxas
@pytest.mark.parametrize("dtype,head_dim,mode", [("float16", 64, "causal"),
                                                 ("bfloat16", 128, "causal"),
                                                 ("float16", 128, "sparse")])
def test_tma_variant_compiles_for_sm90_without_spills(dtype, head_dim, mode):
    from fastattn.bench import triton_compile as aot

    v = next(x for x in aot.tma_variants((dtype,), (head_dim,), (mode,)))
    assert v.tma and v.arch == 90
    r = aot.compile_variant(v)
    assert not r.error, r.error
    assert r.spills == 0, f"{v}: {r.registers} registers, {r.spills} B spilled"
    assert r.tma_ops, "no cp.async.bulk.tensor (TMA) in the sm_90 PTX"
    assert r.wgmma and r.ok
