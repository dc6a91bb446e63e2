"""Split-KV decode kernels (fastattn.decode) against the float64 oracle, by the DESIGN rule:
the cpu kernel natively, the triton kernel in Triton's interpreter on CPU tensors."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import requires_cpu_ext
from fastattn.decode import decode_attention, decode_mask, decode_reference
from oracle import FLOOR, assert_by_rule

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False


def _inputs(B, Hq, Hkv, Nq, Ncache, D, dtype, Dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Ncache, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Ncache, Dv or D, generator=g).to(dtype)
    return q, k, v


def _check(backend, q, k, v, seqlens, window_left, num_splits):
    out, lse = decode_attention(q, k, v, cache_seqlens=seqlens, window_left=window_left,
                                backend=backend, num_splits=num_splits, return_lse=True)
    wl = -1 if window_left is None else window_left
    ref, ref_lse = decode_reference(q.double(), k.double(), v.double(), cache_seqlens=seqlens,
                                    window_left=wl)
    # torch's own error in the kernel's precision: the same math computed in that dtype
    cdt = q.dtype
    low, _ = decode_reference(q, k, v, cache_seqlens=seqlens, window_left=wl) if cdt == torch.float32 \
        else _lowp_reference(q, k, v, seqlens, wl)
    assert out.dtype == q.dtype and out.shape == ref.shape
    assert_by_rule("out", out, ref, low, cdt)
    inf = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), inf), "lse: -inf rows differ from the oracle's"
    assert (out[inf] == 0).all(), "rows that see no key must return 0"
    assert (lse[~inf].double() - ref_lse[~inf]).abs().max().item() <= 1e-4 if (~inf).any() else True


def _lowp_reference(q, k, v, seqlens, wl):
    from fastattn.backends.reference import reference_attention

    mask = decode_mask(seqlens, q.shape[0], q.shape[2], k.shape[2], wl)
    return reference_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask=mask, compute_dtype=q.dtype)


CASES = [
    # B, Hq, Hkv, Nq, Ncache, D, seqlens, window_left, num_splits
    (1, 4, 4, 1, 1, 16, None, None, None),
    (2, 4, 2, 1, 257, 64, [257, 17], None, None),
    (3, 8, 2, 1, 1025, 40, [1025, 1, 600], None, 4),
    (2, 6, 1, 4, 300, 128, [300, 2], None, 3),  # MQA; row 1 shorter than Nq: early queries see nothing
    (2, 4, 2, 3, 97, 16, [97, 50], 10, 2),  # left window
    (1, 2, 2, 2, 513, 32, [0], None, None),  # empty cache row
    (2, 2, 1, 1, 2048, 64, [2048, 1500], 255, 7),
]


@requires_cpu_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_cpu_decode_matches_oracle(case, dtype):
    B, Hq, Hkv, Nq, N, D, sl, wl, ns = case
    q, k, v = _inputs(B, Hq, Hkv, Nq, N, D, dtype)
    seqlens = None if sl is None else torch.tensor(sl, dtype=torch.int32)
    _check("cpu", q, k, v, seqlens, wl, ns)


@requires_cpu_ext
def test_cpu_decode_split_counts_agree():
    """Any number of splits gives the same result (to float32 rounding)."""
    q, k, v = _inputs(2, 4, 2, 2, 777, 32, torch.float32)
    sl = torch.tensor([777, 300])
    base = decode_attention(q, k, v, cache_seqlens=sl, num_splits=1)
    for s in (2, 3, 5, 13, 64):
        torch.testing.assert_close(decode_attention(q, k, v, cache_seqlens=sl, num_splits=s), base,
                                   atol=2e-6, rtol=1e-5)


@requires_cpu_ext
def test_cpu_decode_strided_cache_and_dv():
    """A cache that is a slice of a bigger buffer (non-contiguous rows), and Dv != D."""
    buf_k = torch.randn(2, 2, 400, 32)
    buf_v = torch.randn(2, 2, 400, 24)
    q = torch.randn(2, 4, 1, 32).transpose(2, 3).contiguous().transpose(2, 3)  # odd strides
    k, v = buf_k[:, :, :300], buf_v[:, :, :300]
    assert not k.is_contiguous()
    _check("cpu", q, k, v, torch.tensor([300, 123]), None, None)


@requires_cpu_ext
def test_cpu_decode_nan_propagates():
    q, k, v = _inputs(1, 2, 1, 1, 100, 16, torch.float32)
    v[0, 0, 10, 3] = float("nan")
    out = decode_attention(q, k, v)
    ref, _ = decode_reference(q, k, v)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))  # value column 3 is NaN, as in torch
    assert torch.isnan(out[..., 3]).all()
    k[0, 0, 20, 0] = float("nan")
    assert torch.isnan(decode_attention(q, k, v)).all()  # NaN score: the whole row


@pytest.mark.parametrize("bad,match", [
    (dict(cache_seqlens=torch.tensor([5.0, 3.0])), "int32 or int64"),
    (dict(cache_seqlens=torch.tensor([5])), r"shape \(B,\)"),
    (dict(cache_seqlens=torch.tensor([5, 99])), r"lie in \[0, Ncache"),
    (dict(window_left=-3), "window_left"),
    (dict(num_splits=0), "num_splits"),
    (dict(backend="sdpa"), "backend .sdpa. cannot serve this call:\n  - has no decode kernel"),
    # cuda has a decode kernel now; on CPU tensors it says why it cannot run them
    (dict(backend="cuda"), "backend .cuda. cannot serve this call:\n  - (the compiled|runs on cuda"
                           "|no GPU|this torch)"),
    (dict(backend="gpu"), "backend must be .auto. or one of"),
])
def test_decode_validation(bad, match):
    q, k, v = _inputs(2, 4, 2, 1, 64, 16, torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        decode_attention(q, k, v, **bad)


def test_decode_validation_shapes():
    q, k, v = _inputs(2, 3, 2, 1, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        decode_attention(q, k, v)
    q, k, v = _inputs(2, 4, 2, 1, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="k_cache"):
        decode_attention(q, k[:1], v)
    with pytest.raises(ValueError, match="inference-only"):
        decode_attention(q.requires_grad_(), k, v, backend="cpu")


def test_decode_reference_backend_is_differentiable():
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 1, 2, 20, 8, torch.float64))
    torch.autograd.gradcheck(lambda q, k, v: decode_attention(q, k, v, backend="reference",
                                                              cache_seqlens=torch.tensor([15])),
                             (q, k, v))


TRITON_CASES = [
    (1, 2, 2, 1, 1, 16, None, None, None),
    (2, 4, 2, 1, 70, 16, [70, 9], None, 3),
    (2, 6, 2, 2, 45, 40, [45, 1], None, None),  # GQA group 3, Nq 2, head dim 40
    (1, 2, 1, 3, 50, 16, [33], 7, 2),  # window
    (2, 2, 2, 1, 33, 16, [0, 33], None, None),  # empty row
    # R = G * Nq rows per kv head above the interpreter's row-tile cap (16): row tiles
    (1, 8, 1, 3, 40, 16, [40], None, 2),  # R = 24: 2 tiles, the last one ragged
    (2, 16, 2, 5, 37, 16, [37, 20], 9, None),  # R = 40: 3 tiles, window, ragged cache
]


def run_triton_cases():
    """Every TRITON_CASES x dtype through the triton kernel; run by the test below in a fresh
    interpreter, since TRITON_INTERPRET must be set before triton is first imported."""
    from fastattn.backends.triton import _interpreter_on

    assert _interpreter_on(), "TRITON_INTERPRET=1 must be set before triton loads"
    for case in TRITON_CASES:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            B, Hq, Hkv, Nq, N, D, sl, wl, ns = case
            q, k, v = _inputs(B, Hq, Hkv, Nq, N, D, dtype, seed=3)
            seqlens = None if sl is None else torch.tensor(sl, dtype=torch.int32)
            _check("triton", q, k, v, seqlens, wl, ns)
            print("ok", case, dtype)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
def test_triton_decode_matches_oracle_in_interpreter():
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); "
            "from test_models_decode import run_triton_cases; run_triton_cases()")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"triton decode cases failed:\n{r.stdout}\n{r.stderr[-4000:]}"
    assert r.stdout.count("ok ") == 3 * len(TRITON_CASES)


def test_floor_table_covers_kernel_dtypes():
    assert all(d in FLOOR for d in (torch.float32, torch.bfloat16, torch.float16))


# --- softcap, ALiBi and the general window (FlashAttention's KV-cache semantics) ----------

def _per_row_oracle(q, k, v, seqlens, window, softcap, slopes):
    """Each batch row attends over its own first L keys with fastattn's reference attention
    (bottom-right aligned: offset L - Nq), so ALiBi's distance is |L - Nq + i - j|."""
    from fastattn.backends.reference import reference_attention
    from fastattn.masking import window_mask

    outs, lses = [], []
    for b in range(q.shape[0]):
        L = int(seqlens[b])
        s = None if slopes is None else (slopes if slopes.ndim == 1 else slopes[b])
        o, l = reference_attention(q[b:b + 1].double(), k[b:b + 1, :, :L].double(),
                                   v[b:b + 1, :, :L].double(), scale=q.shape[-1] ** -0.5,
                                   window=window, softcap=softcap, alibi_slopes=s)
        if L == 0:
            o, l = torch.zeros_like(q[b:b + 1]).double(), torch.full(q.shape[1:3], float("-inf"))[None]
        outs.append(o)
        lses.append(l)
    assert window_mask is not None
    return torch.cat(outs), torch.cat(lses)


@requires_cpu_ext
@pytest.mark.parametrize("window", [(-1, 0), (-1, -1), (7, 3), (12, 0)], ids=str)
@pytest.mark.parametrize("mods", [dict(), dict(softcap=3.0), dict(alibi=1), dict(alibi=2),
                                  dict(softcap=5.0, alibi=1)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_decode_softcap_alibi_window(window, mods, dtype):
    B, Hq, Hkv, Nq, Ncache, D = 3, 4, 2, 3, 200, 32
    q, k, v = _inputs(B, Hq, Hkv, Nq, Ncache, D, dtype, seed=5)
    q = q * 3  # so a small softcap bites
    seqlens = torch.tensor([200, 37, 2], dtype=torch.int32)
    slopes = None
    if "alibi" in mods:
        shape = (Hq,) if mods["alibi"] == 1 else (B, Hq)
        slopes = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 0.3
    softcap = mods.get("softcap", 0.0)
    wl, wr = window
    out, lse = decode_attention(q, k, v, cache_seqlens=seqlens, window_left=wl, window_right=wr,
                                softcap=softcap, alibi_slopes=slopes, backend="cpu",
                                num_splits=2, return_lse=True)
    ref, ref_lse = _per_row_oracle(q, k, v, seqlens, window, softcap, slopes)
    # the reference backend of decode_attention (what auto uses with grads) must agree too
    rout, rlse = decode_attention(q.double(), k.double(), v.double(), cache_seqlens=seqlens,
                                  window_left=wl, window_right=wr, softcap=softcap,
                                  alibi_slopes=slopes, backend="reference", return_lse=True)
    torch.testing.assert_close(rout, ref, atol=1e-6, rtol=1e-6)  # (ALiBi bias is fp32 in one)
    low = decode_attention(q, k, v, cache_seqlens=seqlens, window_left=wl, window_right=wr,
                           softcap=softcap, alibi_slopes=slopes, backend="reference")
    assert_by_rule("out", out, ref, low if dtype == torch.float32 else low.float().to(dtype), dtype)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert (lse[fin].double() - ref_lse[fin]).abs().max() < 2e-2
    assert FLOOR[dtype] > 0


def test_decode_window_right_validation():
    q, k, v = _inputs(1, 2, 2, 1, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="window_right"):
        decode_attention(q, k, v, window_right=-3)
    with pytest.raises(ValueError, match="alibi_slopes"):
        decode_attention(q, k, v, alibi_slopes=torch.ones(5))
