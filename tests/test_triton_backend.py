"""The triton backend's kernels, run in Triton's interpreter on CPU tensors, against the
float64 oracle by the DESIGN.md rule: |kernel - oracle| <= 2 |torch - oracle| + floor, where
"torch" is the same attention math done by torch in the input precision.

TRITON_INTERPRET=1 is set for this module's tests by a fixture (and restored after), not at
import: pytest imports every test module before running any test, so a module-level
assignment would leak the interpreter into every other module's tests. The backend does not
depend on when the variable is set: it loads its kernel file once per mode
(fastattn.backends.triton.ops.load_kernels), and CPU tensors always get the interpreted
copy; test_import_order_does_not_matter checks that in a fresh process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import fastattn  # noqa: E402
import fastattn.sparse as fs  # noqa: E402
from fastattn import dispatch  # noqa: E402
from fastattn.backends.base import Problem  # noqa: E402
from fastattn.backends.reference import reference_attention  # noqa: E402
from fastattn.backends.triton import TritonBackend  # noqa: E402
from fastattn.masking import window_mask  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
FLOOR = {F32: 1e-5, F16: 1e-3, BF16: 8e-3}  # absolute floor, relative to the oracle's max


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


def make_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, Dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or D
    q = torch.randn(B, Hq, Nq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Nk, Dv, generator=g).to(dtype)
    return q, k, v


def dense_mask(Nq, Nk, window, block_mask):
    """(1|B, 1|H, Nq, Nk) bool, True = visible, or None."""
    m = None
    if window != (-1, -1):
        m = window_mask(Nq, Nk, *window)
    if block_mask is not None:
        bm = block_mask.to_dense()
        m = bm if m is None else (bm & m)
    return m


def torch_lowp(q, k, v, scale, mask):
    """The same attention computed by torch in the inputs' precision (scores and P @ V in
    that dtype, softmax in float32), the baseline error of the DESIGN.md rule."""
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if mask is None:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool)
    mask = mask.expand_as(s)
    s = s.masked_fill(~mask, float("-inf"))
    seen = mask.any(-1, keepdim=True)
    s = torch.where(seen, s, torch.zeros_like(s))
    p = torch.softmax(s, dim=-1) * seen
    return torch.matmul(p.to(v.dtype), v)


def assert_close_rule(name, got, ref64, lowp):
    err = (got.double() - ref64).abs().max().item()
    base = (lowp.double() - ref64).abs().max().item()
    floor = FLOOR[got.dtype] * max(1.0, ref64.abs().max().item())
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if err > 2 * base + floor:
        idx = (got.double() - ref64).abs().flatten().argmax().item()
        raise AssertionError(
            f"{name}: max error {err:.3e} > 2 x torch's {base:.3e} + floor {floor:.1e} "
            f"(first worst at flat index {idx}: got {got.flatten()[idx].item():.6g}, "
            f"oracle {ref64.flatten()[idx].item():.6g})")


def check(q, k, v, *, causal=False, window=None, block_mask=None, grads=True, seed=1):
    """Forward (out, lse) and q/k/v gradients through fastattn.attention(backend="triton")
    against the float64 oracle and torch's low-precision baseline."""
    from fastattn._validate import normalize_window

    scale = q.shape[-1] ** -0.5
    qt, kt, vt = (x.clone().requires_grad_(grads) for x in (q, k, v))
    out, lse = fastattn.attention(qt, kt, vt, causal=causal, window=window,
                                  block_mask=block_mask, backend="triton", return_lse=True)
    assert out.dtype == q.dtype and out.shape == (*q.shape[:3], v.shape[-1])
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]

    win = normalize_window(window, causal)
    mask = dense_mask(q.shape[2], k.shape[2], win, block_mask)
    q64, k64, v64 = (x.double().requires_grad_(grads) for x in (q, k, v))
    ref, ref_lse = reference_attention(q64, k64, v64, scale=scale, mask=mask)
    ql, kl, vl = (x.clone().requires_grad_(grads) for x in (q, k, v))
    low = torch_lowp(ql, kl, vl, scale, mask)

    assert_close_rule("out", out, ref.detach(), low.detach())
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse: -inf rows differ from the oracle"
    assert torch.allclose(lse[finite], ref_lse[finite], atol=2e-2 if q.dtype != F32 else 1e-5,
                          rtol=1e-3)
    if mask is not None:  # rows that see no key: out 0, lse -inf
        empty = ~mask.expand(*q.shape[:2], *mask.shape[-2:]).any(-1)
        assert (out[empty] == 0).all() and (lse[empty] == float("-inf")).all()
    if not grads:
        return out, lse
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(q.dtype)
    out.backward(do)
    ref.backward(do.double())
    low.backward(do)
    for name, a, r, lo in zip("qkv", (qt, kt, vt), (q64, k64, v64), (ql, kl, vl)):
        assert a.grad.dtype == a.dtype and a.grad.shape == a.shape
        assert_close_rule(f"d{name}", a.grad, r.grad, lo.grad)
    return out, lse


# --------------------------------------------------------------------------- dense / window


DENSE_CASES = [
    # (B, Hq, Hkv, Nq, Nk, D, dtype, causal, window)
    pytest.param(1, 2, 2, 17, 17, 16, F32, False, None, id="f32-17-d16"),
    pytest.param(1, 2, 2, 97, 97, 64, F16, True, None, id="f16-causal-97-d64"),
    pytest.param(2, 2, 1, 97, 33, 40, BF16, True, None, id="bf16-causal-NqgtNk-gqa-d40"),
    pytest.param(1, 4, 2, 33, 97, 40, F32, False, (8, 4), id="f32-window-NqltNk-gqa"),
    pytest.param(1, 4, 1, 1, 97, 64, F16, True, None, id="f16-decode-mqa-Nq1"),
    pytest.param(1, 2, 2, 97, 17, 16, F16, False, (3, 0), id="f16-window-left-causal"),
    pytest.param(1, 2, 2, 40, 64, 16, BF16, False, (-1, 5), id="bf16-window-right-only"),
]


@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,dtype,causal,window", DENSE_CASES)
def test_dense_and_window(B, Hq, Hkv, Nq, Nk, D, dtype, causal, window):
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, dtype)
    check(q, k, v, causal=causal, window=window)


def test_value_head_dim_differs():
    q, k, v = make_qkv(1, 2, 1, 33, 40, 32, F32, Dv=16)
    check(q, k, v, causal=True)


def test_fully_masked_rows_are_zero_with_zero_grads():
    # bottom-right causal with Nq > Nk: the first Nq - Nk queries see no key
    q, k, v = make_qkv(1, 2, 1, 40, 17, 16, F16)
    qt, kt, vt = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = fastattn.attention(qt, kt, vt, causal=True, backend="triton", return_lse=True)
    (out.float() * torch.randn(out.shape)).sum().backward()
    assert (out[:, :, :23] == 0).all() and (lse[:, :, :23] == float("-inf")).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, 23:]).all()
    for t in (qt, kt, vt):
        assert torch.isfinite(t.grad).all()
    assert (qt.grad[:, :, :23] == 0).all()
    # a window that hides everything: output 0 everywhere, zero gradients
    qt.grad = kt.grad = vt.grad = None
    out = fastattn.attention(qt, kt, vt, window=(0, 0), causal=False, backend="triton")
    empty = ~window_mask(40, 17, 0, 0).any(-1)
    assert empty.any() and (out[:, :, empty] == 0).all()
    out.sum().backward()
    assert (qt.grad[:, :, empty] == 0).all() and torch.isfinite(kt.grad).all()


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(3)
    # (B, N, H, D) storage viewed as (B, H, N, D), as transformer code produces
    q = torch.randn(1, 33, 2, 32, generator=g).transpose(1, 2)
    k = torch.randn(1, 40, 2, 32, generator=g).transpose(1, 2)
    v = torch.randn(1, 40, 2, 48, generator=g)[..., :32].transpose(1, 2)
    assert not q.is_contiguous() and not v.is_contiguous()
    check(q, k, v, causal=True)


def test_gradient_through_lse():
    # ring attention merges partial results on lse, so d(loss)/d(lse) must flow back
    q, k, v = make_qkv(1, 2, 1, 33, 40, 16, F32)
    w_out = torch.randn(1, 2, 33, 16)
    w_lse = torch.randn(1, 2, 33)
    grads = []
    for backend in ("triton", "reference"):
        xs = [x.clone().double().requires_grad_() if backend == "reference"
              else x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = fastattn.attention(*xs, causal=True, backend=backend, return_lse=True)
        (out.double() * w_out.double()).sum().add((lse.double() * w_lse.double()).sum()).backward()
        grads.append([x.grad.double() for x in xs])
    for name, a, r in zip("qkv", *grads):
        assert torch.allclose(a, r, atol=1e-5, rtol=1e-4), f"d{name}"


@pytest.mark.parametrize("lse_loss", ["sum", "transposed"])
def test_gradient_through_lse_with_strided_grad(lse_loss):
    # lse.sum() hands backward an expanded (stride-0) gradient and a loss on lse.mT a
    # transposed one; both must give the same gradients as the oracle.
    q, k, v = make_qkv(2, 2, 2, 17, 24, 16, F32)
    w = torch.randn(2, 17, 2)
    grads = []
    for backend in ("triton", "reference"):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = fastattn.attention(*xs, causal=True, backend=backend, return_lse=True)
        loss = lse.sum() if lse_loss == "sum" else (lse.transpose(1, 2) * w).sum()
        (loss + out.sum()).backward()
        grads.append([x.grad for x in xs])
    for name, a, r in zip("qkv", *grads):
        assert torch.allclose(a, r, atol=1e-5, rtol=1e-4), f"d{name}"


def test_backward_is_bitwise_deterministic():
    q, k, v = make_qkv(1, 4, 2, 65, 97, 32, BF16)
    bm = fs.sliding_window(65, 97, 20, 3, block_size=(32, 16))
    runs = []
    for _ in range(2):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fastattn.attention(*xs, causal=True, backend="triton")
        out.backward(torch.ones_like(out))
        xs2 = [x.clone().requires_grad_() for x in (q, k, v)]
        fastattn.attention(*xs2, block_mask=bm, backend="triton").sum().backward()
        runs.append([x.grad for x in xs + xs2])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- block-sparse

N = 97
SPARSE_CASES = [
    # (id, mask factory, B, Hq, Hkv, D, dtype, causal) — lengths N x N unless the mask says
    ("causal", lambda: fs.causal(N, N, block_size=(32, 16)), 1, 2, 1, 32, F32, False),
    ("sliding_window", lambda: fs.sliding_window(N, N, 9, 3, block_size=(16, 32)), 1, 2, 2, 40, F16, False),
    ("dilated_window", lambda: fs.dilated_window(N, N, 24, 2, causal=True, block_size=(16, 16)), 1, 2, 1, 16, BF16, False),
    ("strided", lambda: fs.strided(N, N, stride=8, block_size=(16, 16)), 1, 2, 2, 16, F32, False),
    ("fixed", lambda: fs.fixed(N, N, stride=16, c=4, block_size=(32, 32)), 1, 2, 1, 16, F16, False),
    ("bigbird", lambda: fs.bigbird(N, bigbird_block_size=16, num_random_blocks=1, num_heads=2, block_size=(16, 16)), 1, 2, 1, 16, F32, False),
    ("longformer", lambda: fs.longformer(N, N, window=8, global_tokens=(0, 50), block_size=(32, 32)), 1, 2, 1, 16, F16, False),
    ("streaming", lambda: fs.streaming(N, N, sink_size=4, window_size=10, block_size=(16, 16)), 1, 2, 1, 16, BF16, False),
    ("document", lambda: fs.document([30, 40, 27], causal=True, block_size=(16, 16)), 1, 2, 1, 16, F32, False),
    ("prefix_lm", lambda: fs.prefix_lm(N, N, prefix_length=20, block_size=(32, 16)), 1, 2, 1, 16, F16, False),
    ("from_mask_fn", lambda: fs.from_mask_fn(lambda b, h, i, j: ((i + j) % 3 == 0) | (j <= i - 40), N, N, block_size=(16, 16)), 1, 2, 1, 16, F32, False),
    ("from_dense_per_head", lambda: fs.from_dense(torch.rand(1, 2, 40, N, generator=torch.Generator().manual_seed(0)) > 0.6, block_size=(16, 16)), 1, 2, 1, 16, F32, True),
    ("and_or", lambda: (fs.causal(N, N, block_size=(16, 16)) & fs.sliding_window(N, N, 20, 0, block_size=(16, 16))) | fs.streaming(N, N, sink_size=2, window_size=4, block_size=(16, 16)), 1, 2, 2, 16, BF16, False),
]


@pytest.mark.parametrize("name,factory,B,Hq,Hkv,D,dtype,causal", SPARSE_CASES,
                         ids=[c[0] for c in SPARSE_CASES])
def test_block_sparse(name, factory, B, Hq, Hkv, D, dtype, causal):
    bm = factory()
    q, k, v = make_qkv(B, Hq, Hkv, bm.Nq, bm.Nk, D, dtype)
    check(q, k, v, block_mask=bm, causal=causal)


def test_default_block_size_mask_runs_in_sub_tiles():
    # fastattn.sparse's default 128 x 128 blocks: the kernels walk each listed block in
    # smaller tiles (here the interpreter's 32 x 16), bitmask offsets included
    bm = fs.from_mask_fn(lambda b, h, i, j: (j <= i) & ((i - j) % 7 != 3), 150, 150)
    assert bm.block_size == (128, 128) and bm.partial_masks.shape[0] > 0
    q, k, v = make_qkv(1, 2, 1, 150, 150, 16, BF16)
    check(q, k, v, block_mask=bm)


def test_head_dim_256_splits_dkdv():
    # at head dim 256 the dK/dV pass runs as a dV launch and a dK launch
    from fastattn.backends.triton.ops import load_kernels

    assert load_kernels(True).dkdv_parts(256, 256) == (1, 2)
    q, k, v = make_qkv(1, 2, 1, 20, 33, 200, F16)
    check(q, k, v, causal=True)


def _table_tiles():
    """Every (BLOCK_M, BLOCK_N) the GPU tables can hand a kernel, with the padded head dims
    and kernels that use it (TILES and TILES_MODS)."""
    from fastattn.backends.triton.ops import load_kernels

    kern = load_kernels(True)
    out = {}
    for table in (kern.TILES, kern.TILES_MODS):
        for kernel, by_dim in table.items():
            for bd, tiles in by_dim.items():
                for t in tiles:
                    out.setdefault(t[:2], set()).add((kernel, bd))
    return kern, out


_KERN, _TABLE_TILES = _table_tiles()


@pytest.mark.parametrize("tile", sorted(_TABLE_TILES), ids=lambda t: f"{t[0]}x{t[1]}")
def test_every_gpu_table_tile_in_the_interpreter(monkeypatch, tile):
    # The interpreter normally runs one fixed tile; here each tile shape the GPU autotuner
    # may pick runs every kernel (fwd, dK/dV, dQ) at the largest head dim it is listed for,
    # with odd lengths, GQA and a causal window, so tile-edge logic is checked at those
    # sizes too (head dim 256: the dV and dK launches; dropout + softcap with TILES_MODS').
    monkeypatch.setattr(_KERN, "INTERPRET_TILE", dict(BLOCK_M=tile[0], BLOCK_N=tile[1]))
    bd = max(d for _, d in _TABLE_TILES[tile])
    D = {16: 16, 32: 24, 64: 40, 128: 72, 256: 200}[bd]
    q, k, v = make_qkv(1, 2, 1, 45, 70, D, F16)
    check(q, k, v, causal=True, window=(30, 0))


def test_block_mask_with_empty_rows():
    m = torch.rand(40, 33, generator=torch.Generator().manual_seed(1)) > 0.5
    m[5:21] = False  # whole query rows (and a whole query block) see nothing
    bm = fs.from_dense(m, block_size=(16, 16))
    q, k, v = make_qkv(1, 2, 1, 40, 33, 16, F16)
    out, _ = check(q, k, v, block_mask=bm)
    assert (out[:, :, 5:21] == 0).all()


# --------------------------------------------------------------------------- backend object


def _problem(q, k, v, window=(-1, -1), block_mask=None, return_lse=True, needs_grad=False):
    return Problem(device=q.device, dtype=q.dtype, B=q.shape[0], Hq=q.shape[1], Hkv=k.shape[1],
                   Nq=q.shape[2], Nk=k.shape[2], D=q.shape[3], Dv=v.shape[3], window=window,
                   block_mask=block_mask, scale=q.shape[-1] ** -0.5, needs_grad=needs_grad,
                   return_lse=return_lse)


def test_backend_direct_call_matches_public_path():
    q, k, v = make_qkv(1, 2, 1, 33, 40, 16, F32)
    b = TritonBackend()
    out, lse = b.forward(q, k, v, _problem(q, k, v, window=(-1, 0)))
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), scale=0.25,
                                       window=(-1, 0))
    assert torch.allclose(out.double(), ref, atol=1e-5)
    assert torch.allclose(lse, ref_lse, atol=1e-5)
    pub = fastattn.attention(q, k, v, causal=True, backend="triton")
    assert torch.equal(pub, out)
    bm = fs.causal(33, 40, block_size=(16, 16))
    out2, _ = b.forward(q, k, v, _problem(q, k, v, block_mask=bm))
    assert torch.allclose(out2, out, atol=1e-6)


def test_backend_declares_and_explains(monkeypatch):
    b = TritonBackend()
    assert b.name == "triton" and b.priority == 30
    ok, why = b.available()
    assert ok and "interpreter" in why
    q, k, v = make_qkv(1, 2, 1, 8, 8, 16, F32)
    p = _problem(q, k, v)
    assert b.why_not(p) == []
    assert b.auto_priority(p) is None  # the interpreter is never picked by "auto"
    assert dispatch.select(p, "auto").name != "triton"
    reasons = b.why_not(_problem(*(x.double() for x in (q, k, v))))
    assert any("dtypes" in r for r in reasons)
    reasons = b.why_not(_problem(*make_qkv(1, 1, 1, 4, 4, 320, F32)))
    assert any("head dims up to 256" in r for r in reasons)
    bad = fs.causal(8, 8, block_size=(8, 8))
    assert any("block sizes" in r for r in b.why_not(_problem(q, k, v, block_mask=bad)))
    with pytest.raises(dispatch.BackendUnavailableError, match="block sizes"):
        fastattn.attention(q, k, v, block_mask=bad, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = b.available()
    if not torch.cuda.is_available():
        assert not ok and "TRITON_INTERPRET" in why and "GPU" in why
        assert b.why_not(p) == [why]
        with pytest.raises(dispatch.BackendUnavailableError, match="TRITON_INTERPRET"):
            fastattn.attention(q, k, v, backend="triton")


def test_library_ops_registered_with_fake_and_autograd():
    q, k, v = make_qkv(1, 2, 1, 17, 17, 16, F32)
    # fake (meta) implementations: shapes without running a kernel
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(x) for x in (q, k, v))
        out, lse = torch.ops.fastattn.triton_fwd(fq, fk, fv, 0.25, -1, 0, [], 0, 0)
        assert out.shape == (1, 2, 17, 16) and lse.shape == (1, 2, 17)
        assert lse.dtype == torch.float32
    torch.library.opcheck(torch.ops.fastattn.triton_fwd.default,
                          (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(),
                           0.25, -1, 0, [], 0, 0),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


def test_import_order_does_not_matter():
    # triton and the compiled (non-interpreted) kernels imported first, TRITON_INTERPRET set
    # afterwards: CPU tensors must still run, in the interpreter.
    code = textwrap.dedent("""
        import os
        os.environ.pop("TRITON_INTERPRET", None)
        import triton, torch, fastattn
        from fastattn.backends.triton import ops
        import fastattn.backends.triton.kernels  # jit objects built with the interpreter off
        assert type(ops.load_kernels(False)._attn_fwd).__name__ == "JITFunction"
        os.environ["TRITON_INTERPRET"] = "1"
        q, k, v = (torch.randn(1, 1, 17, 16) for _ in range(3))
        out = fastattn.attention(q, k, v, causal=True, backend="triton")
        ref = fastattn.attention(q, k, v, causal=True, backend="reference")
        assert (out - ref).abs().max() < 1e-5, (out - ref).abs().max()
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python_pkg"))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


# --------------------------------------------------------------------------- wide sweep (slow)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=["f16", "bf16", "f32"])
@pytest.mark.parametrize("D", [16, 40, 64, 128])
@pytest.mark.parametrize("Nq,Nk", [(1, 17), (17, 1), (17, 97), (97, 97), (257, 97), (97, 257)])
@pytest.mark.parametrize("mask", ["none", "causal", "window", "sparse"])
def test_wide_sweep(dtype, D, Nq, Nk, mask):
    q, k, v = make_qkv(1, 4, 2, Nq, Nk, D, dtype, seed=Nq * 7 + Nk + D)
    if mask == "sparse":
        bm = fs.from_mask_fn(lambda b, h, i, j: (j <= i + (Nk - Nq)) & ((j % 5 != 1) | (j < 16)),
                             Nq, Nk, block_size=(32, 16))
        check(q, k, v, block_mask=bm)
    else:
        check(q, k, v, causal=mask == "causal", window=(13, 2) if mask == "window" else None)


# A fast sample of the sweep for the default suite: head dim 128 in float32 and bfloat16
# (otherwise covered only under -m slow), each mask kind once.
@pytest.mark.parametrize("dtype,D,Nq,Nk,mask", [
    (F32, 128, 17, 97, "none"), (BF16, 128, 17, 97, "causal"),
    (F32, 128, 97, 17, "window"), (BF16, 128, 97, 257, "sparse")],
    ids=["f32-none", "bf16-causal", "f32-window", "bf16-sparse"])
def test_wide_sweep_sample(dtype, D, Nq, Nk, mask):
    test_wide_sweep(dtype, D, Nq, Nk, mask)


@pytest.mark.slow
def test_property_random_shapes_and_patterns():
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies

    @hyp.settings(max_examples=25, deadline=None, derandomize=True)
    @hyp.given(Nq=st.integers(1, 80), Nk=st.integers(1, 80), D=st.sampled_from([16, 24, 40, 64]),
               group=st.sampled_from([1, 2]), dtype=st.sampled_from([F16, BF16, F32]),
               left=st.integers(-1, 40), right=st.integers(-1, 40), sparse=st.booleans(),
               bs=st.sampled_from([(16, 16), (32, 16), (16, 32)]))
    def prop(Nq, Nk, D, group, dtype, left, right, sparse, bs):
        q, k, v = make_qkv(1, 2 * group, 2, Nq, Nk, D, dtype)
        if sparse:
            bm = fs.from_dense(torch.rand(Nq, Nk, generator=torch.Generator().manual_seed(Nq + Nk)) > 0.3,
                               block_size=bs)
            check(q, k, v, block_mask=bm, window=(left, right))
        else:
            check(q, k, v, window=(left, right))

    prop()
