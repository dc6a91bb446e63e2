"""Score modifiers in the cpu kernels (softcap, ALiBi, dropout; fastattn.score_mods defines
them) against the float64 oracle by the DESIGN.md rule, forward and q/k/v gradients, over
causal/window/block masks, GQA, Nq != Nk, odd lengths and head dims, every claimed dtype."""

import pytest
import torch
from conftest import requires_cpu_ext
from oracle import FLOOR, assert_by_rule, make_qkv, run_with_grads

import fastattn
import fastattn.sparse as fs
from fastattn.backends.reference import reference_attention
from fastattn.score_mods import dropout_keep_mask

pytestmark = requires_cpu_ext

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _check(q, k, v, dtype, **kw):
    """cpu kernel vs the float64 oracle, with torch's own low-precision error as the yardstick."""
    scale = q.shape[-1] ** -0.5
    g = torch.Generator().manual_seed(9)
    dout = torch.randn(q.shape[:3] + (v.shape[-1],), generator=g)
    bm = kw.pop("block_mask", None)
    mask = None if bm is None else bm.to_dense()
    window = kw.pop("window", None)
    causal = kw.pop("causal", False)
    left_right = fastattn._validate.normalize_window(window, causal)

    def kernel(q_, k_, v_):
        return fastattn.attention(q_, k_, v_, causal=causal, window=window, block_mask=bm,
                                  backend="cpu", return_lse=True, **kw)

    def ref(cdt):
        def fn(q_, k_, v_):
            if cdt is None:
                q_, k_, v_ = q_.double(), k_.double(), v_.double()
            return reference_attention(q_, k_, v_, scale=scale, window=left_right, mask=mask,
                                       compute_dtype=cdt, **kw)
        return fn

    got = run_with_grads(kernel, q, k, v, dout)
    r64 = run_with_grads(ref(None), q, k, v, dout)
    low = run_with_grads(ref(dtype), q, k, v, dout)
    for name, a, b, c in zip(("out", "lse", "dq", "dk", "dv"), got, r64, low):
        if name == "lse":
            fin = torch.isfinite(b)
            assert torch.equal(torch.isfinite(a), fin)
            assert (a[fin].double() - b[fin]).abs().max() <= 2 * (c[fin].double() - b[fin]).abs().max() + 1e-4
            continue
        assert_by_rule(name, a, b, c, dtype, factor=2.0 if name == "out" else 3.0)


CASES = [  # B, Hq, Hkv, Nq, Nk, D, masks
    pytest.param(2, 4, 2, 97, 113, 59, dict(causal=True), id="gqa-causal-97x113-d59"),
    pytest.param(1, 2, 1, 113, 97, 111, dict(window=(17, 9)), id="mqa-window-113x97-d111"),
    pytest.param(1, 2, 2, 130, 130, 64, dict(), id="dense-130-d64"),
]
MODS = [
    pytest.param(dict(softcap=50.0), id="softcap50"),
    pytest.param(dict(softcap=2.0), id="softcap2"),
    pytest.param(dict(alibi=(1,)), id="alibi-h"),
    pytest.param(dict(alibi=(2,)), id="alibi-bh"),
    pytest.param(dict(dropout_p=0.17, dropout_seed=1234), id="dropout"),
    pytest.param(dict(softcap=5.0, alibi=(1,), dropout_p=0.1, dropout_seed=2**63 + 77), id="all"),
]


def _mods(mods, B, Hq):
    mods = dict(mods)
    if "alibi" in mods:
        shape = (Hq,) if mods.pop("alibi") == (1,) else (B, Hq)
        mods["alibi_slopes"] = torch.rand(shape, generator=torch.Generator().manual_seed(4)) * 0.5
    return mods


@pytest.mark.parametrize("mods", MODS)
@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,masks", CASES)
def test_float32(B, Hq, Hkv, Nq, Nk, D, masks, mods):
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, F32, seed=1)
    _check(q, k, v, F32, **masks, **_mods(mods, B, Hq))


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("mods", MODS[1::2] + MODS[-1:])
def test_low_precision(dtype, mods):
    q, k, v = make_qkv(1, 4, 2, 97, 113, 64, dtype, seed=2)
    _check(q, k, v, dtype, causal=True, **_mods(mods, 1, 4))


@pytest.mark.parametrize("mods", [MODS[1], MODS[3], MODS[4], MODS[5]])
def test_block_mask(mods):
    q, k, v = make_qkv(1, 2, 1, 150, 150, 32, F32, seed=3)
    bm = fs.bigbird(150, bigbird_block_size=16, num_random_blocks=1, seed=0) \
        & fs.sliding_window(150, 150, 40, 40, block_size=(16, 16))  # full + partial blocks
    _check(q, k, v, F32, block_mask=bm, **_mods(mods, 1, 2))


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("mods", [pytest.param({}, id="none"), MODS[3], MODS[5]])
def test_scattered_full_blocks(dtype, mods):
    """BigBird's full blocks lie apart (global, window, random): the forward runs the full
    blocks of a query block as one softmax span, its modifiers and P V per run of adjacent
    key blocks; the last key block is narrower (150 = 9 x 16 + 6)."""
    q, k, v = make_qkv(1, 4, 2, 150, 150, 32, dtype, seed=5)
    bm = fs.bigbird(150, bigbird_block_size=16, num_random_blocks=2, seed=1)
    _check(q, k, v, dtype, block_mask=bm, **_mods(mods, 1, 4))


def test_dropout_keep_bits_match_the_reference_exactly():
    # v = identity rows: out[i] = P_drop[i, :] (one-hot keys), so the kernel's keep pattern
    # is read off its output and must equal score_mods' mask bit for bit
    B, H, N = 1, 2, 64
    q = torch.zeros(B, H, N, 8)
    k = torch.zeros(B, H, N, 8)
    v = torch.eye(N).expand(B, H, N, N).contiguous()
    out = fastattn.attention(q, k, v, dropout_p=0.25, dropout_seed=99, backend="cpu")
    keep = dropout_keep_mask(99, 0.25, B, H, N, N)
    torch.testing.assert_close(out, keep.float() / (N * 0.75), atol=1e-6, rtol=1e-5)


def test_dropout_fraction_and_reproducibility():
    B, H, N, D = 1, 4, 256, 16
    q, k, v = make_qkv(B, H, H, N, N, D, F32, seed=5, requires_grad=False)
    p = 0.3
    keep = dropout_keep_mask(7, p, B, H, N, N)
    assert abs((1 - keep.float().mean().item()) - p) < 0.01
    runs = []
    for seed in (7, 7, 8):
        xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = fastattn.attention(*xs, dropout_p=p, dropout_seed=seed, backend="cpu")
        out.square().sum().backward()
        runs.append([out.detach()] + [t.grad for t in xs])
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1])), "same seed: bitwise equal"
    assert not torch.equal(runs[0][0], runs[2][0]), "another seed: another mask"
    # default seed comes from torch's generator
    torch.manual_seed(3)
    a = fastattn.attention(q, k, v, dropout_p=p, backend="cpu")
    torch.manual_seed(3)
    b = fastattn.attention(q, k, v, dropout_p=p, backend="cpu")
    assert torch.equal(a, b)


def test_softcap_bites_and_auto_picks_cpu():
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16, F32, seed=6, requires_grad=False)
    q = q * 4
    plain = fastattn.attention(q, k, v, backend="cpu")
    capped = fastattn.attention(q, k, v, softcap=1.0, backend="cpu")
    assert (plain - capped).abs().max() > 1e-2
    from fastattn import dispatch
    from fastattn.backends.base import Problem
    p = Problem(device=q.device, dtype=F32, B=1, Hq=2, Hkv=2, Nq=40, Nk=40, D=16, Dv=16,
                window=(-1, -1), block_mask=None, scale=0.25, needs_grad=True, return_lse=False,
                softcap=1.0, dropout_p=0.1)
    assert dispatch.select(p, "auto").name == "cpu"


def test_bad_modifier_arguments():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, F32, requires_grad=False)
    with pytest.raises(ValueError, match="softcap"):
        fastattn.attention(q, k, v, softcap=-1.0, backend="cpu")
    with pytest.raises(ValueError, match="dropout_p"):
        fastattn.attention(q, k, v, dropout_p=1.0, backend="cpu")
    with pytest.raises(ValueError, match="alibi_slopes"):
        fastattn.attention(q, k, v, alibi_slopes=torch.ones(3), backend="cpu")
    with pytest.raises(TypeError, match="alibi_slopes"):
        fastattn.attention(q, k, v, alibi_slopes=torch.ones(2, dtype=torch.int32), backend="cpu")
    assert FLOOR[F32] > 0
