"""The test rule of DESIGN.md, shared by every kernel test.

A kernel passes when its error against the float64 oracle is at most 2x the error of
torch's own computation of the same math in the kernel's precision, plus a small absolute
floor (FlashAttention's rule). Gradients are checked the same way."""

from __future__ import annotations

import torch

from fastattn.backends.reference import reference_attention
from fastattn.masking import window_mask

FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 4e-3, torch.float64: 1e-10}


def make_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, Dv=None, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Nk, Dv or D, generator=g).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def run_with_grads(fn, q, k, v, dout):
    """fn(q, k, v) -> out or (out, lse); returns (out, lse|None, dq, dk, dv)."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    res = fn(q, k, v)
    out, lse = res if isinstance(res, tuple) else (res, None)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))
    return out.detach(), (None if lse is None else lse.detach()), dq, dk, dv


def oracle(q, k, v, *, scale=None, window=(-1, -1), mask=None, dout, compute_dtype=None):
    """(out, lse, dq, dk, dv) of naive attention; compute_dtype=None means float64 inputs."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def fn(q_, k_, v_):
        if compute_dtype is None:
            q_, k_, v_ = q_.double(), k_.double(), v_.double()
        return reference_attention(q_, k_, v_, scale=scale, window=window, mask=mask,
                                   compute_dtype=compute_dtype)

    return run_with_grads(fn, q, k, v, dout)


def _first_mismatches(got, ref, tol, n=5):
    diff = (got.double() - ref).abs()
    bad = (diff > tol).nonzero()[:n]
    return "; ".join(f"at {tuple(i.tolist())}: got {got[tuple(i)].item():.6g}, "
                     f"expected {ref[tuple(i)].item():.6g}" for i in bad)


def assert_by_rule(name, got, ref64, lowp, dtype, factor=2.0):
    """|got - ref64| <= factor * |lowp - ref64| + floor, elementwise maximum norms."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN in result"
    err = (got.double() - ref64).abs().max().item() if got.numel() else 0.0
    base = (lowp.double() - ref64).abs().max().item() if got.numel() else 0.0
    tol = factor * base + FLOOR[dtype]
    assert err <= tol, (f"{name}: max error {err:.3g} > {factor} x torch's {base:.3g} + "
                        f"{FLOOR[dtype]:g}; first mismatches: {_first_mismatches(got, ref64, tol)}")


def check_against_oracle(fn, q, k, v, *, scale=None, window=(-1, -1), mask=None, seed=1,
                         check_lse=True):
    """Runs fn (a fastattn call returning (out, lse)) with gradients, and checks out, lse
    and dq/dk/dv by the rule against float64 and against torch in q's precision."""
    dtype = q.dtype
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=g)
    got = run_with_grads(fn, q, k, v, dout)
    ref = oracle(q, k, v, scale=scale, window=window, mask=mask, dout=dout)
    low = oracle(q, k, v, scale=scale, window=window, mask=mask, dout=dout,
                 compute_dtype=dtype) if dtype != torch.float32 else None
    if low is None:  # float32: torch's own float32 computation
        low = oracle(q, k, v, scale=scale, window=window, mask=mask, dout=dout,
                     compute_dtype=torch.float32)
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        if name == "lse":
            if not check_lse or got[1] is None:
                continue
            g_lse, r_lse = got[1], ref[1].double()
            inf_g, inf_r = torch.isinf(g_lse), torch.isinf(r_lse)
            assert torch.equal(inf_g, inf_r), "lse: -inf rows differ from the oracle's"
            assert (g_lse[inf_g] < 0).all(), "lse: +inf where -inf expected"
            assert_by_rule("lse", g_lse[~inf_g], r_lse[~inf_r], low[1][~inf_r], torch.float32
                           if dtype == torch.float32 else dtype)
            continue
        assert_by_rule(name, got[i], ref[i].double(), low[i], dtype)
    return got


def dense_window_mask(Nq, Nk, window):
    return window_mask(Nq, Nk, *window)
