"""`fastattn info --check`: a small forward + backward on each available CPU backend against
float64 naive attention, by DESIGN.md's test rule (error <= 2x torch's own float32 error of
the same math + a floor). What an install (wheel, sdist, clone) runs to show it works."""

from __future__ import annotations

import torch

from . import api, dispatch
from .backends.reference import reference_attention

_FLOOR = 2e-5  # float32 floor of the test rule


def _fwd_bwd(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout.to(out.dtype)))


def check_backend(name: str, seed: int = 0) -> tuple[bool, str]:
    """Causal GQA attention (B=2, Hq=4, Hkv=2, Nq=37, Nk=53, D=40) in float32, forward and
    gradients. Returns (passed, detail)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 37, 40, generator=g)
    k, v = (torch.randn(2, 2, 53, 40, generator=g) for _ in range(2))
    dout = torch.randn(2, 4, 37, 40, generator=g)
    scale = 40 ** -0.5

    def ref(dtype):
        return lambda q_, k_, v_: reference_attention(
            q_.to(dtype), k_.to(dtype), v_.to(dtype), scale=scale, window=(-1, 0),
            compute_dtype=dtype)[0]

    exact = _fwd_bwd(ref(torch.float64), q, k, v, dout)
    torch32 = _fwd_bwd(ref(torch.float32), q, k, v, dout)
    got = _fwd_bwd(lambda q_, k_, v_: api.attention(q_, k_, v_, causal=True, backend=name),
                   q, k, v, dout)
    worst = 0.0
    for what, e, t, x in zip(("out", "dq", "dk", "dv"), exact, torch32, got):
        err = (x.double() - e).abs().max().item()
        allowed = 2 * (t.double() - e).abs().max().item() + _FLOOR
        if not err <= allowed:
            return False, f"{what} error {err:.2e} > allowed {allowed:.2e}"
        worst = max(worst, err / allowed)
    return True, f"out and gradients within the test rule (worst error {worst:.2f} of allowed)"


def run() -> list[tuple[str, bool, str]]:
    """(backend, passed, detail) for each available backend that runs on the CPU."""
    results = []
    for name, (ok, _why) in dispatch.available_backends().items():
        b = dispatch.get(name)
        if not ok or b is None or "cpu" not in b.devices or name == "reference":
            continue
        try:
            passed, detail = check_backend(name)
        except Exception as e:  # a broken install must report, not crash the check
            passed, detail = False, f"{type(e).__name__}: {e}"
        results.append((name, passed, detail))
    return results
