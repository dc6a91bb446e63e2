"""Non-finite inputs (DESIGN.md, "Non-finite inputs"): fastattn's kernels behave as
FlashAttention's contract says. NaN in a row of q gives NaN in that output row only; NaN (or
inf) in a row of k or v reaches exactly the query rows that see that key, by the call's mask
(causal, window, block mask); masked-out keys never spread it. Checked elementwise per kernel
family: the cpu kernels (every ISA variant this CPU runs) and the cpu decode kernel, the
triton kernels in Triton's interpreter (exact per output row: on a partially masked block a
row that sees a bad v row is NaN as a whole), the CUDA kernels through the CUDA emulator. Outputs
that the bad values cannot reach equal attention on the same inputs with the bad values
zeroed (bitwise NaN-free, by the DESIGN.md rule).

The reference and sdpa backends are documented as they are (a masked key's NaN in v can
spread there through 0 * NaN in P V); they are not held to this policy.
"""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cpu_ext

import fastattn
from fastattn import cpu_info, sparse
from fastattn.backends.reference import reference_attention
from fastattn.masking import window_mask

NAN, INF = float("nan"), float("inf")


def _visible(Nq, Nk, window, bm):
    vis = window_mask(Nq, Nk, *window)
    if bm is not None:
        vis = vis & bm.to_dense()[0, 0]
    return vis


def _poison(q, k, v, which, rows, value):
    """Writes `value` into column 1 + n of the n-th of `rows` of q, k or v (batch 0, head
    0): distinct columns, so each bad row's reach is seen on its own."""
    t = {"q": q, "k": k, "v": v}[which]
    for n, r in enumerate(rows):
        t[0, 0, r, 1 + n] = value
    return q, k, v


def _expected_nonfinite(q, k, v, vis, which, rows):
    """bool (B, Hq, Nq, Dv): where the output must be non-finite."""
    B, Hq, Nq, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    exp = torch.zeros(B, Hq, Nq, Dv, dtype=torch.bool)
    if which == "q":
        exp[0, 0, list(rows), :] = True
        return exp
    for h in range(Hq // Hkv):  # query heads of kv head 0
        for n, r in enumerate(rows):
            sees = vis[:, r]
            if which == "k":
                exp[0, h, sees, :] = True
            else:
                exp[0, h, sees, 1 + n] = True
    return exp


def _check(run, q, k, v, window, bm, which, rows, value, per_row=False):
    """run(q, k, v) -> out. Non-finite exactly where expected (per_row: whole output rows,
    the triton kernels' granularity for v); elsewhere the output of the same kernel on clean
    inputs (the bad values replaced by 0)."""
    clean = [t.clone() for t in (q, k, v)]
    bad = _poison(*[t.clone() for t in (q, k, v)], which, rows, value)
    vis = _visible(q.shape[2], k.shape[2], window, bm)
    out = run(*bad)
    exp = _expected_nonfinite(q, k, v, vis, which, rows)
    got = ~torch.isfinite(out.float())
    if per_row:  # the rows exactly; within them at least the expected columns
        assert torch.equal(got.any(-1), exp.any(-1)) and bool((got | ~exp).all()), (
            f"{which} rows {rows} = {value}: non-finite rows "
            f"{sorted(set(got.nonzero()[:, 2].tolist()))}, expected "
            f"{sorted(set(exp.nonzero()[:, 2].tolist()))}")
        exp = got
    assert torch.equal(got, exp), (
        f"{which} rows {rows} = {value}: non-finite outputs in rows "
        f"{sorted(set(got.nonzero()[:, 2].tolist()))}, expected rows "
        f"{sorted(set(exp.nonzero()[:, 2].tolist()))}")
    ref = run(*_poison(*clean, which, rows, 0.0))
    # rows the bad values cannot reach: bitwise equal; the finite columns of rows that see a
    # bad v row: equal up to the order of the float32 sums
    untouched = ~exp.any(-1, keepdim=True).expand_as(exp)
    assert torch.equal(out[untouched], ref[untouched])
    torch.testing.assert_close(out[~exp], ref[~exp])


# (name, Nq, Nk, window, block-mask maker or None, poisoned rows of q / of k and v)
CASES = [
    ("causal-br", 37, 41, (-1, 0), None, (5, 30)),
    ("window", 150, 150, (20, 3), None, (5, 90)),
    ("bitmask", 130, 130, (-1, -1),
     lambda: sparse.from_mask_fn(lambda b, h, i, j: (i - j) % 7 == 0, 130, 130,
                                 block_size=(64, 64)), (4, 101)),
    ("causal-blocks", 128, 128, (-1, -1), lambda: sparse.causal(128, 128, block_size=(64, 64)),
     (10, 100)),
    # no mask, whole tiles only: the cpu kernels fold the row maxima into the S product
    # there, skipping NaN (a q row of NaN must still give a NaN row, not an empty one)
    ("dense", 512, 512, (-1, -1), None, (5, 300)),
]
WHICH = [("q", NAN), ("k", NAN), ("v", NAN), ("v", INF)]  # (an inf in k gives +-inf scores)


@requires_cpu_ext
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("which,value", WHICH, ids=[f"{w}={v}" for w, v in WHICH])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cpu_kernel(case, which, value, dtype):
    name, Nq, Nk, window, mk, rows = case
    bm = mk() if mk else None
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, Nq, 16, generator=g).to(dtype)
    k = torch.randn(1, 1, Nk, 16, generator=g).to(dtype)  # GQA: both q heads read kv head 0
    v = torch.randn(1, 1, Nk, 24, generator=g).to(dtype)  # Dv != D
    if which == "q":
        rows = tuple(r for r in rows if r < Nq)
    win = None if window == (-1, -1) else window
    run = lambda q_, k_, v_: fastattn.attention(q_, k_, v_, window=win, block_mask=bm,
                                                backend="cpu")
    _check(run, q, k, v, window, bm, which, rows, value)


@requires_cpu_ext
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_cpu_kernel_every_isa(isa, monkeypatch):
    if isa not in cpu_info()["runnable"]:
        pytest.skip(f"this CPU cannot run the {isa} variant")
    monkeypatch.setenv("FASTATTN_CPU_ISA", isa)
    test_cpu_kernel(CASES[1], "v", NAN, torch.float32)
    test_cpu_kernel(CASES[2], "k", NAN, torch.float32)
    test_cpu_kernel(CASES[4], "q", NAN, torch.float32)
    test_cpu_kernel(CASES[4], "k", NAN, torch.float32)


@requires_cpu_ext
@pytest.mark.parametrize("which,value", WHICH, ids=[f"{w}={v}" for w, v in WHICH])
def test_cpu_decode_kernel(which, value):
    """Decoding Nq = 3 new tokens against a cache whose rows beyond cache_seqlens hold NaN
    (an uninitialized cache): only the visible keys matter."""
    from fastattn.decode import decode_attention
    g = torch.Generator().manual_seed(1)
    B, Hq, Hkv, Nq, Ncache, D = 2, 2, 1, 3, 80, 16
    q = torch.randn(B, Hq, Nq, D, generator=g)
    k = torch.randn(B, Hkv, Ncache, D, generator=g)
    v = torch.randn(B, Hkv, Ncache, D, generator=g)
    lens = torch.tensor([70, 50])
    k[:, :, 70:], v[:, :, 70:] = NAN, NAN    # garbage past every row's length
    k[1, :, 50:], v[1, :, 50:] = NAN, NAN
    L = 70  # batch row 0: query i sees keys j <= L - Nq + i
    window = (-1, 0)
    vis = torch.zeros(Nq, Ncache, dtype=torch.bool)
    vis[:, :L] = window_mask(Nq, L, *window)
    rows = (1,) if which == "q" else (40, 68)  # key 68 is seen by the last query row only
    run = lambda q_, k_, v_: decode_attention(q_, k_, v_, cache_seqlens=lens, backend="cpu")
    clean = [t.clone() for t in (q, k, v)]
    out = run(*_poison(q, k, v, which, rows, value))
    exp = _expected_nonfinite(q, k, v, vis, which, rows)
    got = ~torch.isfinite(out)
    assert torch.equal(got, exp), (which, got.nonzero()[:, 2].unique().tolist())
    ref = run(*_poison(*clean, which, rows, 0.0))
    torch.testing.assert_close(out[~exp], ref[~exp])


# ------------------------------------------------------------------ triton (interpreter)

@pytest.fixture
def _interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=[CASES[0][0], CASES[3][0]])
@pytest.mark.parametrize("which,value", WHICH[:4], ids=[f"{w}={v}" for w, v in WHICH[:4]])
def test_triton_kernel(_interpreter, case, which, value):
    name, Nq, Nk, window, mk, rows = case
    bm = mk() if mk else None
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, Nq, 16, generator=g)
    k = torch.randn(1, 1, Nk, 16, generator=g)
    v = torch.randn(1, 1, Nk, 16, generator=g)
    win = None if window == (-1, -1) else window
    run = lambda q_, k_, v_: fastattn.attention(q_, k_, v_, window=win, block_mask=bm,
                                                backend="triton")
    _check(run, q, k, v, window, bm, which, rows, value, per_row=True)


# ------------------------------------------------------------------ CUDA (emulated)

def _emu():
    try:
        from cuda_emu import emu
        emu.forward  # noqa: B018
    except Exception as e:  # pragma: no cover - no compiler for the emulator
        pytest.skip(f"CUDA emulator unavailable: {e}")
    return emu


@pytest.mark.parametrize("which,value", WHICH[:4], ids=[f"{w}={v}" for w, v in WHICH[:4]])
def test_cuda_kernel_emulated(which, value):
    emu = _emu()
    g = torch.Generator().manual_seed(0)
    Nq, Nk, window = 37, 70, (-1, 0)
    q = torch.randn(1, 1, Nq, 64, generator=g).half()
    k = torch.randn(1, 1, Nk, 64, generator=g).half()
    v = torch.randn(1, 1, Nk, 64, generator=g).half()
    rows = (5,) if which == "q" else (40, 66)
    run = lambda q_, k_, v_: emu.forward(q_, k_, v_, window=window)[0]
    _check(run, q, k, v, window, None, which, rows, value)


def test_reference_backend_is_documented_as_spreading():
    """The reference (and torch's sdpa) materialize P and compute P V: a masked key's NaN in
    v reaches rows that do not see it (0 * NaN). Documented, not a fastattn kernel."""
    q, k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    v[0, 0, 3] = NAN
    out, _ = reference_attention(q, k, v, scale=8 ** -0.5, window=(-1, 0))
    assert torch.isnan(out[0, 0, 0]).any()  # row 0 does not see key 3, yet NaN
