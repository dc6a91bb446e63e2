"""Score modifiers (softcap, ALiBi, dropout) inside the triton backend's kernels, run in
Triton's interpreter on CPU tensors, against the float64 reference (fastattn.backends.reference
with fastattn.score_mods' definitions) by the rule of tests/oracle.py:
|kernel - oracle| <= 2 * |torch in the kernel's precision - oracle| + floor, for out, lse, dq,
dk and dv. Dropout keep bits are read back from the forward (out = P_drop when V is the
identity) and from the dK/dV kernel (dV = P_drop^T when dO is the identity) and compared bit
for bit with score_mods.dropout_keep_mask.

TRITON_INTERPRET=1 is set by a module fixture, as in tests/test_triton_backend.py.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

import fastattn  # noqa: E402
import fastattn.sparse as fs  # noqa: E402
from fastattn import score_mods  # noqa: E402
from fastattn._validate import normalize_window  # noqa: E402
from fastattn.backends.reference import reference_attention  # noqa: E402
from fastattn.backends.triton import TritonBackend  # noqa: E402
from fastattn.masking import window_mask  # noqa: E402
from oracle import assert_by_rule  # noqa: E402

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


# --------------------------------------------------------------------------- helpers


def alibi_slopes(B, Hq, per_batch):
    """ALiBi's geometric slopes 2^(-8 h / Hq), optionally varied per batch row."""
    s = torch.tensor([2.0 ** (-8.0 * (h + 1) / Hq) for h in range(Hq)])
    return (s[None] * torch.linspace(1.0, 0.5, B)[:, None]).contiguous() if per_batch else s


def make_inputs(B, Hq, Hkv, Nq, Nk, D, dtype, seed=0, q_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, Nq, D, generator=g) * q_scale).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    dout = torch.randn(B, Hq, Nq, D, generator=g).to(dtype)
    return q, k, v, dout


def triton_run(q, k, v, dout, **kw):
    """(out, lse, dq, dk, dv) of fastattn.attention(backend="triton")."""
    xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = fastattn.attention(*xs, backend="triton", return_lse=True, **kw)
    grads = torch.autograd.grad(out, xs, dout)
    return (out.detach(), lse.detach(), *grads)


def dense_mask(Nq, Nk, window, block_mask):
    m = window_mask(Nq, Nk, *window) if window != (-1, -1) else None
    if block_mask is not None:
        bm = block_mask.to_dense()
        m = bm if m is None else (bm & m)
    return m


def reference_run(q, k, v, dout, compute_dtype, *, causal=False, window=None, block_mask=None,
                  softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_seed=0):
    """(out, lse, dq, dk, dv) of the reference; compute_dtype None = float64 (the oracle)."""
    win = normalize_window(window, causal)
    mask = dense_mask(q.shape[2], k.shape[2], win, block_mask)
    xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ins = [x.double() for x in xs] if compute_dtype is None else xs
    out, lse = reference_attention(*ins, scale=q.shape[-1] ** -0.5, mask=mask,
                                   compute_dtype=compute_dtype, softcap=softcap,
                                   alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                                   dropout_seed=dropout_seed)
    grads = torch.autograd.grad(out, xs, dout.to(out.dtype))
    return (out.detach(), lse.detach(), *grads)


def check(q, k, v, dout, **kw):
    """Kernel vs float64 oracle and torch in q's precision (float32 for float32 inputs)."""
    dtype = q.dtype
    got = triton_run(q, k, v, dout, **kw)
    ref = reference_run(q, k, v, dout, None, **kw)
    low = reference_run(q, k, v, dout, dtype, **kw)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    for name, g, r, lo in zip(("out", "dq", "dk", "dv"), (got[0], *got[2:]),
                              (ref[0], *ref[2:]), (low[0], *low[2:]), strict=True):
        assert g.shape == r.shape and g.dtype == dtype
        assert_by_rule(name, g, r.double(), lo, dtype)
    lse, ref_lse = got[1], ref[1]
    inf_g, inf_r = torch.isinf(lse), torch.isinf(ref_lse)
    assert torch.equal(inf_g, inf_r), "lse: -inf rows differ from the oracle's"
    assert (lse[inf_g] < 0).all()
    if (~inf_r).any():
        assert_by_rule("lse", lse[~inf_g], ref_lse.double()[~inf_r], low[1][~inf_r], dtype)
    return got


# --------------------------------------------------------------------------- accuracy

N = 97
CASES = [
    # id, (B, Hq, Hkv, Nq, Nk, D, dtype), q_scale, kwargs (alibi: slopes (Hq,) or (B, Hq))
    ("softcap5-f16-causal-gqa", (1, 4, 2, 97, 113, 64, F16), 4.0,
     dict(causal=True, softcap=5.0)),
    ("softcap50-bf16-window-d59", (1, 2, 2, 113, 97, 59, BF16), 4.0,
     dict(window=(20, 5), softcap=50.0)),
    ("softcap5-f32", (1, 2, 1, 33, 40, 16, F32), 3.0, dict(softcap=5.0)),
    ("alibi-h-f32-causal-gqa", (1, 4, 1, 97, 97, 40, F32), 1.0,
     dict(causal=True, alibi="h")),
    ("alibi-bh-f16-NqltNk-d59", (2, 2, 1, 33, 113, 59, F16), 1.0, dict(alibi="bh")),
    ("dropout-f16-causal-gqa", (1, 4, 2, 97, 113, 64, F16), 1.0,
     dict(causal=True, dropout_p=0.3, dropout_seed=1234)),
    ("dropout-f32-d59", (1, 2, 2, 113, 97, 59, F32), 1.0,
     dict(dropout_p=0.1, dropout_seed=2**63 + 12345)),
    ("all-bf16-blockmask", (1, 2, 1, N, N, 40, BF16), 3.0,
     dict(block_mask="mask_fn", softcap=20.0, alibi="bh", dropout_p=0.2, dropout_seed=7)),
    ("all-f16-causal-NqgtNk-d111", (1, 2, 2, 113, 97, 111, F16), 3.0,
     dict(causal=True, softcap=30.0, alibi="h", dropout_p=0.25, dropout_seed=99)),
]


def _kwargs(kw, B, Hq, Nq, Nk):
    kw = dict(kw)
    if "alibi" in kw:
        kw["alibi_slopes"] = alibi_slopes(B, Hq, per_batch=kw.pop("alibi") == "bh")  # (B, Hq)
    if kw.get("block_mask") == "mask_fn":
        kw["block_mask"] = fs.from_mask_fn(
            lambda b, h, i, j: (j <= i) & ((i - j) % 5 != 2) | (j < 8), Nq, Nk, block_size=(32, 16))
    return kw


@pytest.mark.parametrize("name,shape,q_scale,kw", CASES, ids=[c[0] for c in CASES])
def test_score_mods_against_oracle(name, shape, q_scale, kw):
    B, Hq, Hkv, Nq, Nk, D, dtype = shape
    q, k, v, dout = make_inputs(B, Hq, Hkv, Nq, Nk, D, dtype, q_scale=q_scale)
    out, lse, *_ = check(q, k, v, dout, **_kwargs(kw, B, Hq, Nq, Nk))
    if kw.get("causal") and Nq > Nk:  # rows that see no key: out 0, lse -inf
        assert (out[:, :, :Nq - Nk] == 0).all() and torch.isneginf(lse[:, :, :Nq - Nk]).all()


def test_softcap_bounds_the_logits():
    # with huge scores softcap keeps lse <= log(Nk) + softcap
    q, k, v, dout = make_inputs(1, 2, 1, 17, 40, 16, F32, q_scale=30.0)
    out, lse, *_ = check(q, k, v, dout, softcap=2.0)
    assert (lse <= torch.log(torch.tensor(40.0)) + 2.0 + 1e-5).all()


def test_gradient_through_lse_with_mods():
    # d(loss)/d(lse) (ring attention merges on lse) flows back through softcap and ALiBi
    q, k, v, _ = make_inputs(1, 2, 1, 33, 40, 16, F32, q_scale=3.0)
    kw = dict(causal=True, softcap=4.0, alibi_slopes=alibi_slopes(1, 2, False),
              dropout_p=0.2, dropout_seed=5)
    w_out = torch.randn(1, 2, 33, 16, generator=torch.Generator().manual_seed(1))
    w_lse = torch.randn(1, 2, 33, generator=torch.Generator().manual_seed(2))
    grads = []
    for backend in ("triton", "reference"):
        xs = [x.clone().double().requires_grad_() if backend == "reference"
              else x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = fastattn.attention(*xs, backend=backend, return_lse=True, **kw)
        (out.double() * w_out.double()).sum().add((lse.double() * w_lse.double()).sum()).backward()
        grads.append([x.grad.double() for x in xs])
    for name, a, r in zip("qkv", *grads, strict=True):
        assert torch.allclose(a, r, atol=2e-5, rtol=1e-4), f"d{name}: {(a - r).abs().max()}"


# --------------------------------------------------------------------------- dropout bits


def _keep_bits_forward(B, Hq, Nq, Nk, p, seed, causal=False):
    """Kernel keep bits: q = 0 makes P uniform over visible keys and V = I makes
    out[i, j] = P_ij * keep_ij / (1 - p), exactly representable in float32."""
    q = torch.zeros(B, Hq, Nq, Nk)
    k = torch.zeros(B, 1, Nk, Nk)
    v = torch.eye(Nk).expand(B, 1, Nk, Nk).contiguous()
    out = fastattn.attention(q, k, v, causal=causal, dropout_p=p, dropout_seed=seed,
                             backend="triton")
    return out > 0


def test_dropout_keep_bits_match_reference_forward():
    B, Hq, Nq, Nk, p, seed = 2, 3, 97, 48, 0.3, 0xDEADBEEF12345678
    got = _keep_bits_forward(B, Hq, Nq, Nk, p, seed, causal=True)
    keep = score_mods.dropout_keep_mask(seed, p, B, Hq, Nq, Nk)
    visible = window_mask(Nq, Nk, -1, 0)
    assert torch.equal(got, keep & visible)
    assert not got[~visible.expand_as(got)].any()


def test_dropout_keep_bits_match_reference_backward():
    # dV = P_drop^T dO with dO = I (one column per query row), Hkv = Hq: dV[j, i] = P_drop[i, j]
    B, H, Nq, Nk, p, seed = 1, 2, 40, 33, 0.4, 77
    q = torch.zeros(B, H, Nq, Nq)
    k = torch.zeros(B, H, Nk, Nq)
    v = torch.zeros(B, H, Nk, Nq, requires_grad=True)
    out = fastattn.attention(q, k, v, dropout_p=p, dropout_seed=seed, backend="triton")
    out.backward(torch.eye(Nq).expand(B, H, Nq, Nq))
    keep = score_mods.dropout_keep_mask(seed, p, B, H, Nq, Nk)
    assert torch.equal(v.grad.transpose(-1, -2) > 0, keep)
    assert torch.allclose(v.grad.transpose(-1, -2), keep / (Nk * (1 - p)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_fraction(p):
    # the definition drops a fraction p (24-bit threshold) ...
    B, Hq, Nq, Nk = 2, 4, 256, 256
    keep = score_mods.dropout_keep_mask(1234, p, B, Hq, Nq, Nk)
    assert abs((1 - keep.float().mean().item()) - p) < 0.01
    # ... and the kernel drops exactly those pairs (a corner of the same problem:
    # rows depend on (b, h, i), so keep B and Hq)
    got = _keep_bits_forward(B, Hq, 64, 32, p, 1234)
    assert torch.equal(got, score_mods.dropout_keep_mask(1234, p, B, Hq, 64, 32))
    assert abs((1 - got.float().mean().item()) - p) < 0.03


def test_same_seed_is_bitwise_reproducible():
    q, k, v, dout = make_inputs(1, 2, 1, 33, 47, 16, BF16, q_scale=2.0)
    kw = dict(causal=True, softcap=10.0, alibi_slopes=alibi_slopes(1, 2, False),
              dropout_p=0.25, dropout_seed=42)
    a = triton_run(q, k, v, dout, **kw)
    b = triton_run(q, k, v, dout, **kw)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    c = triton_run(q, k, v, dout, **dict(kw, dropout_seed=43))
    assert not torch.equal(a[0], c[0])
    # no seed: drawn from torch's generator, so torch.manual_seed reproduces it
    kw.pop("dropout_seed")
    torch.manual_seed(3)
    d = triton_run(q, k, v, dout, **kw)
    torch.manual_seed(3)
    e = triton_run(q, k, v, dout, **kw)
    for x, y in zip(d, e, strict=True):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------- plumbing


def test_backend_declares_score_mods():
    b = TritonBackend()
    assert b.supports_softcap and b.supports_alibi and b.supports_dropout
    q, k, v, _ = make_inputs(1, 2, 1, 8, 8, 16, F32)
    from fastattn.backends.base import Problem

    p = Problem(device=q.device, dtype=q.dtype, B=1, Hq=2, Hkv=1, Nq=8, Nk=8, D=16, Dv=16,
                window=(-1, -1), block_mask=None, scale=0.25, needs_grad=True, return_lse=True,
                softcap=5.0, alibi_slopes=torch.ones(1, 2), dropout_p=0.1, dropout_seed=3)
    assert b.why_not(p) == []


def test_library_ops_with_mods():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, _ = make_inputs(1, 2, 1, 17, 17, 16, F32)
    slopes = alibi_slopes(1, 2, True)
    args = (0.25, -1, 0, [], 0, 0, 5.0, slopes, 0.2, -3)
    with FakeTensorMode() as mode:
        fq, fk, fv, fs_ = (mode.from_tensor(x) for x in (q, k, v, slopes))
        out, lse = torch.ops.fastattn.triton_fwd(fq, fk, fv, 0.25, -1, 0, [], 0, 0, 5.0, fs_,
                                                 0.2, -3)
        assert out.shape == (1, 2, 17, 16) and lse.shape == (1, 2, 17)
    torch.library.opcheck(torch.ops.fastattn.triton_fwd.default,
                          (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), *args),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


# --------------------------------------------------------------------------- wide sweep (slow)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=["f16", "bf16", "f32"])
@pytest.mark.parametrize("D", [16, 59, 64, 128])
@pytest.mark.parametrize("Nq,Nk", [(1, 97), (97, 97), (113, 97), (97, 257)])
@pytest.mark.parametrize("mask", ["none", "causal", "window", "sparse"])
def test_wide_sweep_all_mods(dtype, D, Nq, Nk, mask):
    q, k, v, dout = make_inputs(1, 4, 2, Nq, Nk, D, dtype, seed=Nq + Nk + D, q_scale=3.0)
    kw = dict(softcap=8.0, alibi_slopes=alibi_slopes(1, 4, True), dropout_p=0.15,
              dropout_seed=Nq * Nk)
    if mask == "sparse":
        kw["block_mask"] = fs.from_mask_fn(
            lambda b, h, i, j: (j <= i + (Nk - Nq)) & ((j % 5 != 1) | (j < 16)), Nq, Nk,
            block_size=(32, 16))
    elif mask == "causal":
        kw["causal"] = True
    elif mask == "window":
        kw["window"] = (13, 2)
    check(q, k, v, dout, **kw)


# --------------------------------------------------------------------------- decode kernel

DECODE_CASES = [
    # B, Hq, Hkv, Nq, Ncache, D, cache_seqlens, window_left, num_splits, softcap, alibi
    (2, 4, 2, 1, 70, 16, [70, 9], None, 3, 5.0, "bh"),
    (2, 6, 2, 2, 45, 40, [45, 1], None, None, 0.0, "h"),
    (1, 2, 1, 3, 50, 59, [33], 7, 2, 20.0, None),
    (2, 2, 2, 1, 33, 16, [0, 33], None, None, 5.0, "h"),  # an empty row
]


def run_decode_cases():
    """fastattn.backends.triton.decode with softcap / ALiBi against the float64 reference, row by row
    (row b attends to its first L = cache_seqlens[b] cache entries, queries at L - Nq + i).
    Run in a fresh interpreter by the test below: the decode kernels are built when it
    is imported, so TRITON_INTERPRET must be set before that."""
    from fastattn.backends.triton import _interpreter_on
    from fastattn.backends.triton import decode as decode_triton

    assert _interpreter_on()
    for case in DECODE_CASES:
        B, Hq, Hkv, Nq, Nc, D, sl, wl, ns, cap, alibi = case
        for dtype in (F32, BF16, F16):
            g = torch.Generator().manual_seed(3)
            q = (torch.randn(B, Hq, Nq, D, generator=g) * 3).to(dtype)
            k = torch.randn(B, Hkv, Nc, D, generator=g).to(dtype)
            v = torch.randn(B, Hkv, Nc, D, generator=g).to(dtype)
            slopes = None if alibi is None else alibi_slopes(B, Hq, per_batch=alibi == "bh")
            out, lse = decode_triton.triton_decode_attention(
                q, k, v, cache_seqlens=torch.tensor(sl, dtype=torch.int32),
                window_left=-1 if wl is None else wl, num_splits=ns, softcap=cap,
                alibi_slopes=slopes)
            for b, L in enumerate(sl):
                if L == 0:
                    assert (out[b] == 0).all() and torch.isneginf(lse[b]).all()
                    continue
                sb = None if slopes is None else slopes.expand(B, Hq)[b:b + 1]
                kw = dict(scale=D ** -0.5, window=(-1 if wl is None else wl, 0), softcap=cap,
                          alibi_slopes=sb)
                xs = (q[b:b + 1], k[b:b + 1, :, :L], v[b:b + 1, :, :L])
                r_out, r_lse = reference_attention(*(x.double() for x in xs), **kw)
                l_out, l_lse = reference_attention(*xs, compute_dtype=dtype, **kw)
                assert_by_rule(f"out {case} {dtype} b={b}", out[b:b + 1], r_out, l_out, dtype)
                fin = torch.isfinite(r_lse)
                assert torch.equal(torch.isfinite(lse[b:b + 1]), fin)
                assert_by_rule(f"lse {case} {dtype} b={b}", lse[b:b + 1][fin],
                               r_lse.double()[fin], l_lse[fin], dtype)
            print("ok", case, dtype)


def test_decode_kernel_softcap_alibi():
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); "
            "from test_triton_score_mods import run_decode_cases; run_decode_cases()")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"decode cases failed:\n{r.stdout}\n{r.stderr[-4000:]}"
    assert r.stdout.count("ok ") == 3 * len(DECODE_CASES)


def test_op_accepts_per_head_slopes():
    # the op itself broadcasts (Hq,) slopes as the public API does
    q, k, v, _ = make_inputs(2, 2, 1, 17, 20, 16, F32)
    s = alibi_slopes(2, 2, False)
    out, _ = torch.ops.fastattn.triton_fwd(q, k, v, 0.25, -1, 0, [], 0, 0, 0.0, s, 0.0, 0)
    ref, _ = reference_attention(q.double(), k.double(), v.double(), scale=0.25, window=(-1, 0),
                                 alibi_slopes=s)
    assert torch.allclose(out.double(), ref, atol=1e-5)
