"""Differential fuzzer (issue 20): random attention problems run on every kernel family this
machine can run, each checked against the float64 oracle by the DESIGN.md rule (forward out,
lse, and dq/dk/dv) and against each other.

Drawn per case: batch, GQA group, odd lengths (Nq != Nk), head dims with Dv != D, dtype,
causal / window / a block mask from a random predicate (intersected with causal or a window),
softcap, ALiBi, dropout (fixed seed: the keep bits are a counter-based hash every family and
the oracle compute alike, so the dropout cases also check the keep bits are identical),
return_lse. Families:

    cpu        fastattn.attention(backend="cpu"), natively (every case)
    triton     backend="triton" in Triton's interpreter (TRITON_INTERPRET=1), tiny shapes
    cuda-emu   the CUDA kernels through the CUDA emulator (tests/cuda_emu), fp16/bf16,
               D == Dv in multiples of 8, block masks of 64 x 64 blocks
    cuda-emu-atomic  the same with deterministic=False (the FA2-class atomic-dQ backward)
    sdpa       backend="sdpa" where it applies (no lse, no softcap/ALiBi/dropout)

Cross-family: on the cases several families serve, every pair must agree within the sum of
their two error bounds against the oracle, and agree exactly on which rows see no key (0
output, lse -inf).

The default suite runs a fixed (derandomized) sample of each family; `-m slow` runs the long
fuzz. Any failure the fuzzer finds is kept below as an explicit regression case
(REGRESSIONS, run by test_regressions). Counts of cases run per family are printed at the end
of the module (pytest -s).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
from conftest import CPU_OK
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import FLOOR

import fastattn
from fastattn import dispatch, sparse
from fastattn.backends.reference import reference_attention
from fastattn.masking import window_mask

COUNTS: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    if COUNTS:
        print("\nfuzz cases run per family: " + ", ".join(f"{k}={v}" for k, v in
                                                         sorted(COUNTS.items())))


# ------------------------------------------------------------------ the case

# Random predicates for block masks: (name, fn(i, j, p) -> bool tensor) with parameter p.
PREDICATES = {
    "band": lambda i, j, p: (i - j).abs() <= p % 23,
    "stride": lambda i, j, p: ((i - j) % (p % 5 + 2) == 0) | (j < p % 7),
    "checker": lambda i, j, p: ((i // (p % 9 + 2)) + (j // (p % 5 + 3))) % 2 == 0,
    "random": None,  # a random dense table, indexed by the token indices
    "empty-rows": lambda i, j, p: (i % 4 != 1) & (j <= i + p % 11),
}


@dataclass
class Case:
    B: int
    Hq: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    Dv: int
    dtype: torch.dtype
    causal: bool = False
    window: tuple | None = None
    pred: str | None = None
    pred_p: int = 0
    block: tuple = (16, 16)
    softcap: float | None = None
    alibi: bool = False
    dropout_p: float = 0.0
    seed: int = 0
    return_lse: bool = True
    tags: list = field(default_factory=list)

    def __repr__(self):  # what hypothesis prints for a failing example
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__dataclass_fields__
                           if k != "tags")
        return f"Case({fields})"


def make_block_mask(c: Case):
    if c.pred is None:
        return None
    if c.pred == "random":
        g = torch.Generator().manual_seed(c.pred_p)
        table = torch.rand(c.Nq, c.Nk, generator=g) < 0.4
        return sparse.from_dense(table, block_size=c.block)
    f = PREDICATES[c.pred]
    return sparse.from_mask_fn(lambda b, h, i, j: f(i, j, c.pred_p), c.Nq, c.Nk,
                               block_size=c.block)


def tensors(c: Case):
    g = torch.Generator().manual_seed(c.seed)
    q = torch.randn(c.B, c.Hq, c.Nq, c.D, generator=g).to(c.dtype)
    k = torch.randn(c.B, c.Hkv, c.Nk, c.D, generator=g).to(c.dtype)
    v = torch.randn(c.B, c.Hkv, c.Nk, c.Dv, generator=g).to(c.dtype)
    dout = torch.randn(c.B, c.Hq, c.Nq, c.Dv, generator=g)
    slopes = (torch.rand(c.Hq, generator=g) * 0.5 + 0.01) if c.alibi else None
    return q, k, v, dout, slopes


def visible(c: Case, bm):
    """Dense bool mask (., ., Nq, Nk) of the call (bottom-right causal / window, block mask)."""
    left, right = (-1, -1) if c.window is None else c.window
    if c.causal:
        right = 0 if right == -1 else min(right, 0)
    m = window_mask(c.Nq, c.Nk, left, right)
    if bm is not None:
        m = m & bm.to_dense()
    return m, (left, right)


def run_grads(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, lse = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))
    return out.detach(), (None if lse is None else lse.detach()), dq, dk, dv


def oracle(c: Case, q, k, v, dout, slopes, compute_dtype=None):
    bm = make_block_mask(c)
    mask, _ = visible(c, bm)
    kw = dict(scale=c.D ** -0.5, mask=mask, softcap=c.softcap or 0.0, alibi_slopes=slopes,
              dropout_p=c.dropout_p, dropout_seed=c.seed)

    def fn(q_, k_, v_):
        if compute_dtype is None:
            q_, k_, v_ = q_.double(), k_.double(), v_.double()
        return reference_attention(q_, k_, v_, compute_dtype=compute_dtype, **kw)

    return run_grads(fn, q, k, v, dout)


# ------------------------------------------------------------------ families


class Unserved(Exception):
    """The family cannot serve this case (declared limits), not a failure."""


def run_api(backend):
    def run(c: Case, q, k, v, dout, slopes):
        bm = make_block_mask(c)
        kw = dict(causal=c.causal, window=c.window, block_mask=bm, softcap=c.softcap,
                  alibi_slopes=slopes, dropout_p=c.dropout_p or None,
                  dropout_seed=c.seed if c.dropout_p else None, backend=backend,
                  return_lse=c.return_lse and backend != "sdpa")

        def fn(q_, k_, v_):
            res = fastattn.attention(q_, k_, v_, **kw)
            return res if isinstance(res, tuple) else (res, None)

        try:
            return run_grads(fn, q, k, v, dout)
        except dispatch.BackendUnavailableError as e:
            raise Unserved(str(e).splitlines()[1] if "\n" in str(e) else str(e)) from None
    return run


def run_cuda_emu(c: Case, q, k, v, dout, slopes, deterministic=True):
    if c.dtype not in (torch.float16, torch.bfloat16) or c.D != c.Dv or c.D % 8 or c.D > 128:
        raise Unserved("cuda: fp16/bf16, D == Dv, a multiple of 8 up to 128")
    from cuda_emu import emu
    bm = make_block_mask(c)
    _, win = visible(c, None)
    kt = None
    if bm is not None:
        if c.block[0] % 64 or c.block[1] % 64:
            raise Unserved("cuda: block masks of 64-multiple blocks")
        if win != (-1, -1):
            bm = bm.with_window(*win)
        kt, win = bm.kernel_tensors(), bm.window
    mods = {}
    if c.softcap:
        mods["softcap"] = c.softcap
    if slopes is not None:
        mods["alibi_slopes"] = slopes
    if c.dropout_p:
        mods.update(dropout_p=c.dropout_p, dropout_seed=c.seed)
    scale = c.D ** -0.5
    out, lse = emu.forward(q, k, v, scale=scale, window=win, block_mask=kt, **mods)
    dq, dk, dv = emu.backward(dout.to(c.dtype), q, k, v, out, lse, scale=scale, window=win,
                              block_mask=kt, deterministic=deterministic, **mods)
    return out, lse, dq, dk, dv


def _triton_ok():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def run_sdpa(c: Case, *args):
    # torch's own SDPA misses the rule on 16-bit GQA calls with a mask (dv: SDPA_REGRESSION
    # below, kept as a strict xfail); the fuzz holds it to the rule everywhere else.
    if c.dtype != torch.float32 and c.Hq != c.Hkv and (c.causal or c.window or c.pred):
        raise Unserved("sdpa: 16-bit GQA with a mask (torch's own error exceeds the rule)")
    return run_api("sdpa")(c, *args)


def run_cuda_emu_atomic(c: Case, *args):
    """The CUDA kernels with deterministic=False: the FlashAttention-2 class backward
    (fa2_bwd_kernel.h, atomic dQ)."""
    return run_cuda_emu(c, *args, deterministic=False)


FAMILIES = {"cpu": run_api("cpu"), "triton": run_api("triton"), "cuda-emu": run_cuda_emu,
            "cuda-emu-atomic": run_cuda_emu_atomic, "sdpa": run_sdpa}


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# ------------------------------------------------------------------ the checks


def _bound(got, ref64, low, dtype):
    """(max error, allowed) by the DESIGN.md rule for one tensor: 2x the error of torch's own
    computation in the call's dtype, plus that dtype's floor (lse too: a 16-bit call's lse
    is held to torch's 16-bit computation, as tests/test_cuda_score_mods.py does)."""
    if got.numel() == 0:
        return 0.0, 0.0
    err = (got.double() - ref64.double()).abs().max().item()
    base = (low.double() - ref64.double()).abs().max().item()
    return err, 2 * base + FLOOR[dtype]


UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _delta_allowance(c: Case, out64, lse64, dout, q, k, mask):
    """The one term the DESIGN.md rule does not cover, added to the dq / dk bounds of 16-bit
    calls (found by this fuzzer, REGRESSIONS below): like FlashAttention, every family's
    backward forms delta_i = rowsum(dO_i * O_i) from the output O rounded to the call's
    dtype, while torch's softmax backward (the rule's reference) cancels sum_j P_ij dP_ij
    exactly. The rounding moves delta_i by up to d_i = sum_d |dO_id| |O_id| u (u: unit
    roundoff), hence dS_ij by P_ij d_i scale, dq_i by scale d_i max|k| and dk_j by
    scale max|q| sum_i P_ij d_i <= scale max|q| max_i d_i (rows that see j). It dominates only
    where torch's own error is ~0: rows that see one key (Nk = 1, narrow masks)."""
    rows_per_key = torch.broadcast_to(mask, (c.B, c.Hq, c.Nq, c.Nk)).sum(-2).max().item() \
        if mask.numel() else 0
    # Every family also recomputes P = exp(S - lse) from the float32 natural-log lse, whose
    # rounding (|lse| 2^-24, doubled by the log2 round trip) scales p by up to 1 +- 2u|lse|;
    # dV_j = sum_i p_ij dO_i adds that over the rows that see j. (Regression 4: float32, Nk =
    # 1, 140 rows: 3.26e-5 against a bound of 2.95e-5.)
    lse_max = lse64.abs()[torch.isfinite(lse64)].max().item() if torch.isfinite(lse64).any() \
        else 0.0
    out = {"dv": 2 * 2.0 ** -24 * lse_max * dout.double().abs().max().item() * rows_per_key
           / (1 - c.dropout_p) if dout.numel() else 0.0}
    u = UNIT_ROUNDOFF.get(c.dtype)
    if u is None:
        return out
    d = (dout.double().abs() * out64.double().abs()).sum(-1) * u  # (B, Hq, Nq)
    scale = c.D ** -0.5
    dmax = d.max().item() if d.numel() else 0.0
    out.update(dq=scale * dmax * k.double().abs().max().item() if k.numel() else 0.0,
               dk=scale * dmax * q.double().abs().max().item() * rows_per_key
               if q.numel() else 0.0)
    return out


def check_case(c: Case, families):
    """Runs the case on `families`, checks each against the oracle and the pairs against each
    other; returns the families that served it."""
    q, k, v, dout, slopes = tensors(c)
    ref = oracle(c, q, k, v, dout, slopes)
    low = oracle(c, q, k, v, dout, slopes, compute_dtype=c.dtype)
    ref32 = oracle(c, q, k, v, dout, slopes, compute_dtype=torch.float32)
    bm = make_block_mask(c)
    mask, _ = visible(c, bm)
    empty_rows = ~torch.broadcast_to(mask, (c.B, c.Hq, c.Nq, c.Nk)).any(-1)
    slack = _delta_allowance(c, ref[0], ref[1], dout, q, k, mask)
    served, bounds = {}, {}
    for fam in families:
        try:
            got = FAMILIES[fam](c, q, k, v, dout, slopes)
        except Unserved:
            COUNTS[f"{fam} (not served)"] += 1
            continue
        COUNTS[fam] += 1
        served[fam], bounds[fam] = got, {}
        for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
            g = got[i]
            if name == "lse":
                if g is None:
                    continue
                r = ref[1]
                assert torch.equal(torch.isneginf(g), torch.isneginf(r)), \
                    f"{fam} lse: -inf rows differ from the oracle's: {c}"
                fin = torch.isfinite(r)
                lo = low[1] if c.dtype != torch.float32 else ref32[1]
                err, tol = _bound(g[fin], r[fin], lo[fin], c.dtype)
            else:
                assert g.shape == ref[i].shape and g.dtype == c.dtype, (fam, name, g.shape, g.dtype)
                assert not torch.isnan(g).any(), f"{fam} {name}: NaN: {c}"
                err, tol = _bound(g, ref[i], low[i] if c.dtype != torch.float32 else ref32[i],
                                  c.dtype)
                tol += slack.get(name, 0.0)
            bounds[fam][name] = tol
            assert err <= tol, (f"{fam} {name}: error {err:.3g} > {tol:.3g} (2x torch's + "
                                f"floor) against the float64 oracle: {c}")
        if empty_rows.any():  # rows that see no key: exactly 0 output
            assert (got[0][empty_rows] == 0).all(), f"{fam}: a row that sees no key is not 0: {c}"
    names = sorted(served)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            fa, fb = names[a], names[b]
            for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
                ga, gb = served[fa][i], served[fb][i]
                if ga is None or gb is None or name not in bounds[fa] or name not in bounds[fb]:
                    continue
                if name == "lse":
                    assert torch.equal(torch.isneginf(ga), torch.isneginf(gb)), (fa, fb, c)
                    fin = torch.isfinite(ga)
                    ga, gb = ga[fin], gb[fin]
                diff = (ga.double() - gb.double()).abs().max().item() if ga.numel() else 0.0
                assert diff <= bounds[fa][name] + bounds[fb][name], (
                    f"{fa} vs {fb} {name}: differ by {diff:.3g}: {c}")
    return list(served)


# ------------------------------------------------------------------ strategies


@st.composite
def cases(draw, *, max_n=70, dtypes=(torch.float32, torch.bfloat16, torch.float16),
          dims=(8, 16, 24, 40, 64), blocks=((16, 16), (32, 16), (64, 64)), dv_same=False):
    Hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3]))
    D = draw(st.sampled_from(dims))
    Dv = D if dv_same else draw(st.sampled_from(sorted(set(dims) | {D})))
    c = Case(B=draw(st.integers(1, 2)), Hq=Hkv * group, Hkv=Hkv,
             Nq=draw(st.integers(1, max_n)), Nk=draw(st.integers(1, max_n)), D=D, Dv=Dv,
             dtype=draw(st.sampled_from(dtypes)), seed=draw(st.integers(0, 2 ** 31 - 1)))
    kind = draw(st.sampled_from(["full", "causal", "window", "block", "block+causal"]))
    if kind in ("causal", "block+causal"):
        c.causal = True
    if kind == "window":
        c.window = (draw(st.integers(-1, 30)), draw(st.integers(-1, 30)))
        c.causal = draw(st.booleans())
    if kind.startswith("block"):
        c.pred = draw(st.sampled_from(sorted(PREDICATES)))
        c.pred_p = draw(st.integers(0, 1000))
        c.block = draw(st.sampled_from(blocks))
    if draw(st.booleans()):
        c.softcap = draw(st.sampled_from([5.0, 30.0]))
    c.alibi = draw(st.booleans())
    if draw(st.integers(0, 3)) == 0:
        c.dropout_p = draw(st.sampled_from([0.1, 0.3]))
    c.return_lse = draw(st.booleans())
    return c


def _settings(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


FAST = int(os.environ.get("FASTATTN_FUZZ_EXAMPLES", "0")) or None
requires_cpu = pytest.mark.skipif(not CPU_OK, reason="cpu backend unavailable")


# ------------------------------------------------------------------ default-suite sample


@requires_cpu
@_settings(FAST or 60)
@given(cases())
def test_fuzz_cpu(c):
    check_case(c, ["cpu"])


@requires_cpu
@_settings(FAST or 25)
@given(cases(max_n=50))
def test_fuzz_cpu_vs_sdpa(c):
    c.softcap, c.alibi, c.dropout_p = None, False, 0.0  # what sdpa can serve
    check_case(c, ["cpu", "sdpa"])


@requires_cpu
@pytest.mark.skipif(not _triton_ok(), reason="triton not installed")
@_settings(FAST or 6)
@given(cases(max_n=24, dtypes=(torch.float32,), dims=(16, 32), blocks=((16, 16),)))
def test_fuzz_triton_vs_cpu(interpreter, c):
    check_case(c, ["cpu", "triton"])


@requires_cpu
@_settings(FAST or 3)
@given(cases(max_n=40, dtypes=(torch.float16, torch.bfloat16), dims=(16, 64),
             blocks=((64, 64),), dv_same=True))
def test_fuzz_cuda_emu_vs_cpu(c):
    check_case(c, ["cpu", "cuda-emu"])


@requires_cpu
@_settings(FAST or 3)
@given(cases(max_n=40, dtypes=(torch.float16, torch.bfloat16), dims=(16, 64, 128),
             blocks=((64, 64), (128, 64)), dv_same=True))
def test_fuzz_cuda_emu_atomic_bwd_vs_cpu(c):
    check_case(c, ["cpu", "cuda-emu-atomic"])


# ------------------------------------------------------------------ the long run (-m slow)


@pytest.mark.slow
@requires_cpu
@settings(max_examples=int(os.environ.get("FASTATTN_FUZZ_LONG", "1500")), deadline=None,
          database=None, suppress_health_check=list(HealthCheck))
@given(cases(max_n=160))
def test_fuzz_cpu_long(c):
    check_case(c, ["cpu", "sdpa"] if not (c.softcap or c.alibi or c.dropout_p) else ["cpu"])


@pytest.mark.slow
@requires_cpu
@pytest.mark.skipif(not _triton_ok(), reason="triton not installed")
@settings(max_examples=int(os.environ.get("FASTATTN_FUZZ_LONG_TRITON", "150")), deadline=None,
          database=None, suppress_health_check=list(HealthCheck))
@given(cases(max_n=40, dtypes=(torch.float32,), dims=(16, 32, 40), blocks=((16, 16), (32, 16))))
def test_fuzz_triton_long(interpreter, c):
    check_case(c, ["cpu", "triton"])


@pytest.mark.slow
@requires_cpu
@settings(max_examples=int(os.environ.get("FASTATTN_FUZZ_LONG_CUDA", "60")), deadline=None,
          database=None, suppress_health_check=list(HealthCheck))
@given(cases(max_n=80, dtypes=(torch.float16, torch.bfloat16), dims=(16, 40, 64, 128),
             blocks=((64, 64), (128, 64)), dv_same=True))
def test_fuzz_cuda_emu_long(c):
    check_case(c, ["cpu", "cuda-emu", "cuda-emu-atomic"])


# ------------------------------------------------------------------ regressions

# Every failing case the fuzzer found, kept as an explicit case: (families, Case).
# 1-2: bfloat16 + dropout, rows that see a single key: dq off by ~2x the floor. Not a kernel
#      bug: delta = rowsum(dO * O) from the bf16-rounded O (FlashAttention's algorithm, in
#      every family) vs torch's exact cancellation; the bound now carries that term
#      (_delta_allowance). Found by test_fuzz_cpu_long and test_fuzz_cuda_emu_long.
# 3: the sdpa backend (torch's own SDPA, not a fastattn kernel), float16, GQA 3:1 with a
#    window mask, Nk = 1: dv error 0.0156 > 0.0098. Equal heads or no mask pass (the cause
#    inside torch's masked GQA path was not investigated). fastattn's cpu kernel passes it.
#    Kept as a strict xfail (test_sdpa_regression); the fuzz no longer draws that class for
#    sdpa (run_sdpa). Found by test_fuzz_cpu_long.
# 4: float32, Nk = 1, 140 rows, softcap + ALiBi: cpu dv 3.26e-5 > 2.95e-5. P is recomputed
#    from the float32 natural-log lse (as in FlashAttention); its rounding scales p by up to
#    1 +- 2u|lse|, summed over the 140 rows into dv, where torch's softmax gives p = 1
#    exactly. The bound now carries that term too. Found by test_fuzz_cpu_long.
SDPA_REGRESSION = Case(B=1, Hq=3, Hkv=1, Nq=79, Nk=1, D=16, Dv=16, dtype=torch.float16,
                       window=(0, 13), seed=5685, return_lse=False)
REGRESSIONS: list = [
    (["cpu"], Case(B=1, Hq=1, Hkv=1, Nq=2, Nk=1, D=8, Dv=8, dtype=torch.bfloat16,
                   dropout_p=0.1, seed=0, return_lse=False)),
    (["cpu", "cuda-emu"], Case(B=1, Hq=1, Hkv=1, Nq=1, Nk=1, D=16, Dv=16, dtype=torch.bfloat16,
                               dropout_p=0.1, seed=1, return_lse=False)),
    (["cpu"], SDPA_REGRESSION),
    (["cpu"], Case(B=2, Hq=1, Hkv=1, Nq=140, Nk=1, D=16, Dv=8, dtype=torch.float32,
                   softcap=5.0, alibi=True, return_lse=False)),
]


@requires_cpu
@pytest.mark.parametrize("families,case", REGRESSIONS)
def test_regressions(families, case, monkeypatch):
    if "triton" in families:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_case(case, families)


@requires_cpu
@pytest.mark.xfail(strict=True, reason="torch's SDPA (the sdpa backend) on float16 GQA with a "
                   "mask: dv beyond the rule (regression 3)")
def test_sdpa_regression():
    q, k, v, dout, slopes = tensors(SDPA_REGRESSION)
    c = SDPA_REGRESSION
    ref = oracle(c, q, k, v, dout, slopes)
    low = oracle(c, q, k, v, dout, slopes, compute_dtype=c.dtype)
    got = run_api("sdpa")(c, q, k, v, dout, slopes)
    err, tol = _bound(got[4], ref[4], low[4], c.dtype)
    assert err <= tol, f"sdpa dv: {err:.3g} > {tol:.3g}"
