"""fastattn.sparse's image and LRA patterns: neighborhood_2d (NATTEN-style k x k windows,
shifted at the borders), axial_2d (own row and column) and block_local (non-overlapping
chunks). Each against a dense mask built straight from its definition (plain Python loops
over patches, independent of BlockMask), then run on every kernel family this machine runs
(cpu, reference, triton in its interpreter, cuda in the emulator), forward and backward,
against the float64 oracle by DESIGN.md's rule. Odd grids (h, w odd, h != w), a [CLS]-style
prefix token, kernels that fill a whole axis."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import requires_cpu_ext
from oracle import check_against_oracle, make_qkv
from test_sparse_patterns import check_mask

import fastattn
import fastattn.sparse as fs


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------- definitions
def ref_neighborhood(h, w, kh, kw, P=0):
    """NATTEN's rule, written patch by patch: window start clamp(r - kh // 2, 0, h - kh)."""
    N = P + h * w
    m = torch.zeros(N, N, dtype=torch.bool)
    m[:P, :] = True
    m[:, :P] = True
    for r in range(h):
        for c in range(w):
            sr = min(max(r - kh // 2, 0), h - kh)
            sc = min(max(c - kw // 2, 0), w - kw)
            for r2 in range(sr, sr + kh):
                for c2 in range(sc, sc + kw):
                    m[P + r * w + c, P + r2 * w + c2] = True
    return m


def ref_axial(h, w, P=0):
    N = P + h * w
    m = torch.zeros(N, N, dtype=torch.bool)
    m[:P, :] = True
    m[:, :P] = True
    for r in range(h):
        for c in range(w):
            for r2 in range(h):
                for c2 in range(w):
                    if r2 == r or c2 == c:
                        m[P + r * w + c, P + r2 * w + c2] = True
    return m


def ref_block_local(N, L, causal):
    i = torch.arange(N).view(-1, 1)
    j = torch.arange(N).view(1, -1)
    m = (i // L) == (j // L)
    return m & (j <= i) if causal else m


# ---------------------------------------------------------------------------- masks
@pytest.mark.parametrize("h,w,k,P,bs", [
    (5, 7, 3, 0, (16, 16)), (7, 5, (5, 3), 0, (8, 16)), (9, 9, 7, 1, (16, 32)),
    (3, 11, 3, 0, (4, 4)), (6, 4, (1, 3), 2, (16, 16)), (13, 7, 5, 1, (32, 32)),
    (4, 4, 1, 0, (16, 16)),
])
def test_neighborhood_2d_matches_definition(h, w, k, P, bs):
    kh, kw = (k, k) if isinstance(k, int) else k
    bm = fs.neighborhood_2d(h, w, k, prefix_tokens=P, block_size=bs)
    want = ref_neighborhood(h, w, kh, kw, P)
    check_mask(bm, want)
    # every patch sees exactly kh * kw patches (plus the prefix tokens)
    counts = bm.to_dense()[0, 0, P:].sum(-1)
    assert bool((counts == kh * kw + P).all())


def test_neighborhood_2d_kernel_of_whole_grid_is_dense():
    bm = fs.neighborhood_2d(5, 3, (5, 3), block_size=(8, 8))
    assert bool(bm.to_dense().all())


@pytest.mark.parametrize("h,w,P,bs", [(5, 7, 0, (16, 16)), (7, 3, 1, (4, 8)), (9, 6, 0, (3, 3)),
                                      (4, 9, 2, (32, 16))])
def test_axial_2d_matches_definition(h, w, P, bs):
    bm = fs.axial_2d(h, w, prefix_tokens=P, block_size=bs)
    check_mask(bm, ref_axial(h, w, P))
    assert bool((bm.to_dense()[0, 0, P:].sum(-1) == h + w - 1 + P).all())


@pytest.mark.parametrize("N,L,causal,bs", [(97, 10, False, (16, 16)), (97, 32, True, (32, 32)),
                                           (64, 64, False, (16, 16)), (5, 7, False, (4, 4)),
                                           (257, 16, True, (16, 64))])
def test_block_local_matches_definition(N, L, causal, bs):
    check_mask(fs.block_local(N, L, causal=causal, block_size=bs), ref_block_local(N, L, causal))


def test_neighborhood_is_banded_at_4096_tokens():
    # a 64 x 64 grid: only key blocks within the rows a query block's windows reach
    bm = fs.neighborhood_2d(64, 64, 7, block_size=(64, 64))
    assert bm.seq_lengths == (4096, 4096)
    assert int(bm.kv_num_blocks.max() + bm.full_kv_num_blocks.max()) <= 8
    assert bm.density < 0.15


@pytest.mark.parametrize("call,msg", [
    (lambda: fs.neighborhood_2d(5, 5, 4), "kernel must be odd"),
    (lambda: fs.neighborhood_2d(5, 5, (3, 2)), "kernel must be odd"),
    (lambda: fs.neighborhood_2d(3, 9, 5), "kernel .* does not fit the 3 x 9 grid"),
    (lambda: fs.neighborhood_2d(0, 9, 3), "h must be an int >= 1"),
    (lambda: fs.neighborhood_2d(4, 4, 3, prefix_tokens=-1), "prefix_tokens must be an int >= 0"),
    (lambda: fs.axial_2d(4, 2.0), "w must be an int >= 1"),
    (lambda: fs.block_local(10, 0), "block_len must be an int >= 1"),
])
def test_bad_arguments_name_the_argument(call, msg):
    with pytest.raises(ValueError, match=msg):
        call()


# ---------------------------------------------------------------------------- kernels
def _patterns(bs):
    return {
        "neighborhood": lambda: fs.neighborhood_2d(9, 11, 5, block_size=bs),
        "neighborhood_cls": lambda: fs.neighborhood_2d(7, 9, (3, 5), prefix_tokens=1, block_size=bs),
        "axial": lambda: fs.axial_2d(9, 11, block_size=bs),
        "axial_cls": lambda: fs.axial_2d(7, 9, prefix_tokens=1, block_size=bs),
        "block_local": lambda: fs.block_local(99, 20, block_size=bs),
    }


NAMES = ["neighborhood", "neighborhood_cls", "axial", "axial_cls", "block_local"]


@requires_cpu_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_cpu_kernels_match_oracle(name, dtype):
    bm = _patterns((16, 32))[name]()
    N = bm.seq_lengths[0]
    q, k, v = make_qkv(2, 4, 2, N, N, 40, dtype)
    fn = lambda a, b, c: fastattn.attention(a, b, c, block_mask=bm, backend="cpu", return_lse=True)
    check_against_oracle(fn, q, k, v, mask=bm.to_dense())


@pytest.mark.parametrize("name", NAMES)
def test_reference_backend_matches_oracle(name):
    bm = _patterns((16, 16))[name]()
    N = bm.seq_lengths[0]
    q, k, v = make_qkv(1, 2, 1, N, N, 16, torch.float32)
    fn = lambda a, b, c: fastattn.attention(a, b, c, block_mask=bm, backend="reference",
                                            return_lse=True)
    check_against_oracle(fn, q, k, v, mask=bm.to_dense())


@pytest.fixture()
def _triton_interpreter():
    pytest.importorskip("triton")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


TRITON_CASES = [
    ("neighborhood", lambda: fs.neighborhood_2d(7, 9, 3, block_size=(16, 16)), torch.float32),
    ("neighborhood_cls", lambda: fs.neighborhood_2d(5, 7, (3, 5), prefix_tokens=1, block_size=(16, 32)),
     torch.float16),
    ("axial", lambda: fs.axial_2d(7, 5, block_size=(16, 16)), torch.bfloat16),
    ("block_local", lambda: fs.block_local(45, 12, block_size=(16, 16)), torch.float32),
]


@pytest.mark.usefixtures("_triton_interpreter")
@pytest.mark.parametrize("name,factory,dtype", TRITON_CASES, ids=[c[0] for c in TRITON_CASES])
def test_triton_interpreter_matches_oracle(name, factory, dtype):
    import test_triton_backend as tt

    bm = factory()
    q, k, v = tt.make_qkv(1, 2, 1, bm.Nq, bm.Nk, 16, dtype)
    tt.check(q, k, v, block_mask=bm)


EMU_CASES = [
    ("neighborhood", lambda: fs.neighborhood_2d(11, 13, 5, block_size=64), torch.float16, 64),
    ("axial_cls", lambda: fs.axial_2d(9, 13, prefix_tokens=1, block_size=64), torch.bfloat16, 64),
]


@pytest.mark.parametrize("name,factory,dtype,D", EMU_CASES, ids=[c[0] for c in EMU_CASES])
def test_cuda_emulator_matches_oracle(name, factory, dtype, D):
    tc = pytest.importorskip("test_cuda_emulated")
    bm = factory()
    tc.run_case(1, 2, 1, bm.Nq, bm.Nk, D, dtype, block_mask=bm, seed=5)
