"""fastattn.sparse: every pattern against a dense mask built straight from its definition
(plain broadcasting over arange, independent of BlockMask and of fastattn.masking), the
format invariants, combinators, per-head/per-batch layouts, errors, and a long sequence."""

import math

import fastattn.sparse as fs
import pytest
import torch
from fastattn.sparse import BlockMask
from fastattn.sparse.patterns import _bigbird_random_blocks


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Mask building is many small tensor ops: intra-op threads only add contention on a
    shared 2-core machine (5x slower under load), so this module runs on one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


BLOCKS = [(16, 16), (32, 64), (128, 128)]
LENGTHS = [(1, 1), (17, 17), (97, 97), (257, 257), (17, 97), (97, 17), (257, 97), (1, 257)]
SQUARE = [1, 17, 97, 257]


def cases(params, lengths=LENGTHS):
    """pytest params (*length, block_size, *param) for every length and parameter set and
    every block size; the default run takes one block size per (length, params), rotating,
    and the rest of the product is marked slow."""
    out = []
    for pi, par in enumerate(params):
        for li, ln in enumerate(lengths):
            ln = ln if isinstance(ln, tuple) else (ln,)
            for bi, bs in enumerate(BLOCKS):
                marks = () if bi == (li + pi) % len(BLOCKS) else (pytest.mark.slow,)
                out.append(pytest.param(*ln, bs, *par, marks=marks))
    return out


# ---------------------------------------------------------------------------- definitions
def grid(Nq, Nk):
    """i (Nq, 1), j (1, Nk), p = i + Nk - Nq (bottom-right aligned query position)."""
    i = torch.arange(Nq).view(-1, 1)
    j = torch.arange(Nk).view(1, -1)
    return i, j, i + (Nk - Nq)


def ref_window(Nq, Nk, left, right):
    i, j, p = grid(Nq, Nk)
    lo = torch.ones(Nq, Nk, dtype=torch.bool) if left == -1 else j >= p - left
    hi = torch.ones(Nq, Nk, dtype=torch.bool) if right == -1 else j <= p + right
    return lo & hi


def ref_dilated(Nq, Nk, w, d, causal):
    i, j, p = grid(Nq, Nk)
    delta = j - p
    m = (delta.abs() <= w * d) & (delta % d == 0)
    return m & (delta <= 0) if causal else m


def ref_strided(Nq, Nk, stride):
    """Child et al. 2019: (i - j) < l or (i - j) % l == 0, causal; l = stride."""
    i, j, p = grid(Nq, Nk)
    t = p - j
    return (t >= 0) & ((t < stride) | (t % stride == 0))


def ref_fixed(Nq, Nk, stride, c, causal):
    """Child et al. 2019: floor(j / l) == floor(i / l) or j mod l >= l - c; l = stride."""
    i, j, p = grid(Nq, Nk)
    m = (torch.floor(j / stride) == torch.floor(p / stride)) | (j % stride >= stride - c)
    return m & (j <= p) if causal else m


def ref_bigbird(N, bb, g, R):
    """R (H, nb, r): random key blocks per head and query block (-1 = none)."""
    i, j, _ = grid(N, N)
    qb, kb = i // bb, j // bb
    nb = math.ceil(N / bb)
    glob = lambda x: (x < g) | (x >= nb - g)
    base = glob(qb) | glob(kb) | ((qb - kb).abs() <= 1)
    out = []
    for h in range(R.shape[0]):
        lay = torch.zeros(nb, nb, dtype=torch.bool)
        for q in range(nb):
            for k in R[h, q].tolist():
                if k >= 0:
                    lay[q, k] = True
        out.append(base | lay[qb, kb])
    return torch.stack(out)[None]


def ref_longformer(Nq, Nk, w, G):
    i, j, p = grid(Nq, Nk)
    G = torch.tensor(G, dtype=torch.long)
    return ((j - p).abs() <= w // 2) | torch.isin(p, G) | torch.isin(j, G)


def ref_streaming(Nq, Nk, sink, win):
    i, j, p = grid(Nq, Nk)
    return (j <= p) & ((j < sink) | (p - j < win))


def ref_document(lens, causal):
    """lens: list of lists (one per batch element)."""
    out = []
    for row in lens:
        ids = []
        for d, n in enumerate(row):
            ids += [d] * n
        ids = torch.tensor(ids, dtype=torch.long)
        N = len(ids)
        m = ids.view(-1, 1) == ids.view(1, -1)
        if causal:
            m &= torch.arange(N).view(1, -1) <= torch.arange(N).view(-1, 1)
        out.append(m)
    return torch.stack(out)[:, None]


def ref_prefix(Nq, Nk, prefixes):
    i, j, p = grid(Nq, Nk)
    return torch.stack([(j <= p) | (j < pre) for pre in prefixes])[:, None]


# ---------------------------------------------------------------------------- checks
def first_mismatches(got, want, n=5):
    bad = (got != want).nonzero().tolist()[:n]
    return f"{len((got != want).nonzero())} mismatches, first at {bad} (got, want) = " + \
        str([(bool(got[tuple(b)]), bool(want[tuple(b)])) for b in bad])


def block_grid(t_num, t_idx, t_mid=None, transposed=False):
    """Block states read row by row from list tensors: state (L, NQB, NKB) int (0 skipped,
    1 listed) and mask id grid (-2 where not listed); checks rows are strictly ascending."""
    Bm, Hm, R = t_num.shape
    K = t_idx.shape[-1]
    rows = []
    for r, (n, ix) in enumerate(zip(t_num.reshape(-1).tolist(), t_idx.reshape(-1, K),
                                    strict=True)):
        cols = ix[:n].long()
        assert bool((cols[1:] > cols[:-1]).all()), f"row {r} not strictly ascending: {cols}"
        mids = torch.full_like(cols, -1) if t_mid is None else t_mid.reshape(-1, K)[r, :n].long()
        rows.append((r // R, r % R, cols, mids))
    return rows


def to_grid(rows, L, NQB, NKB, transposed):
    state = torch.zeros(L, NQB, NKB, dtype=torch.long)
    mid = torch.full((L, NQB, NKB), -2, dtype=torch.long)
    for lay, r, cols, mids in rows:
        if transposed:
            assert not bool(state[lay, cols, r].any()), "block listed twice"
            state[lay, cols, r] = 1
            mid[lay, cols, r] = mids
        else:
            assert not bool(state[lay, r, cols].any()), "block listed twice"
            state[lay, r, cols] = 1
            mid[lay, r, cols] = mids
    return state, mid


def pooled(x, BM, BN):
    """any / all over the in-range tokens of each (BM, BN) tile of x (L, Nq, Nk)."""
    L, Nq, Nk = x.shape
    NQB, NKB = math.ceil(Nq / BM), math.ceil(Nk / BN)
    pad = (0, NKB * BN - Nk, 0, NQB * BM - Nq)
    anyv = torch.nn.functional.pad(x, pad).view(L, NQB, BM, NKB, BN).any(4).any(2)
    hidden = torch.nn.functional.pad(~x, pad).view(L, NQB, BM, NKB, BN).any(4).any(2)
    return anyv, ~hidden


def check_mask(bm: BlockMask, want: torch.Tensor):
    """to_dense equals the definition; the lists are exact (full = every in-range token
    visible, partial = some, skipped = none, mask id -1 = exactly the window rule there);
    the transposed lists are the transpose; densities and dedup hold."""
    bm.validate()
    Nq, Nk = bm.seq_lengths
    BM, BN = bm.block_size
    dense = bm.to_dense()
    assert dense.dtype == torch.bool and dense.shape == (bm.Bm, bm.Hm, Nq, Nk)
    want = (want[None, None] if want.ndim == 2 else want).expand_as(dense)
    assert torch.equal(dense, want), first_mismatches(dense, want)
    NQB, NKB, L = math.ceil(Nq / BM), math.ceil(Nk / BN), bm.Bm * bm.Hm
    assert bm.kv_num_blocks.shape == (bm.Bm, bm.Hm, NQB)
    assert bm.q_num_blocks.shape == (bm.Bm, bm.Hm, NKB)
    part, pmid = to_grid(block_grid(bm.kv_num_blocks, bm.kv_indices, bm.kv_mask_ids), L, NQB, NKB, False)
    full, _ = to_grid(block_grid(bm.full_kv_num_blocks, bm.full_kv_indices), L, NQB, NKB, False)
    tpart, tmid = to_grid(block_grid(bm.q_num_blocks, bm.q_indices, bm.q_mask_ids), L, NQB, NKB, True)
    tfull, _ = to_grid(block_grid(bm.full_q_num_blocks, bm.full_q_indices), L, NQB, NKB, True)
    assert torch.equal(part, tpart) and torch.equal(pmid, tmid) and torch.equal(full, tfull), \
        "the q_* lists are not the transpose of the kv_* lists"
    assert not bool((part & full).any()), "a block is both partial and full"
    anyv, allv = pooled(want.reshape(L, Nq, Nk), BM, BN)
    full, part = full.bool(), part.bool()
    assert torch.equal(full, allv), "full blocks != blocks whose in-range tokens are all visible"
    assert torch.equal(part, anyv & ~allv), "partial blocks != blocks with some visible tokens"
    rule = ref_window(Nq, Nk, *bm.window).expand(L, Nq, Nk)
    differs, _ = pooled(want.reshape(L, Nq, Nk) ^ rule, BM, BN)
    assert not bool((part & (pmid == -1) & differs).any()), "mask id -1 but not the window rule"
    # densities
    assert bm.density == pytest.approx(int(want.sum()) / max(1, want.numel()), abs=1e-12)
    visited = int(part.sum() + full.sum())
    assert bm.num_visited_blocks == visited
    if NQB * NKB:
        assert bm.block_density == pytest.approx(visited / (L * NQB * NKB))
    # partial bitmasks are stored once each
    pm = bm.partial_masks
    assert torch.unique(pm.flatten(1), dim=0).shape[0] == pm.shape[0]
    return dense


# ---------------------------------------------------------------------------- patterns
@pytest.mark.parametrize("Nq,Nk,bs", cases([()]))
def test_causal(Nq, Nk, bs):
    bm = fs.causal(Nq, Nk, block_size=bs)
    check_mask(bm, ref_window(Nq, Nk, -1, 0))
    assert bm.partial_masks.shape[0] == 0 and bm.window == (-1, 0)


@pytest.mark.parametrize("Nq,Nk,bs,left,right,causal", cases(
    [(5, 5, False), (0, 40, False), (33, None, True), (-1, 3, False), (70, -1, False),
     (0, 0, False)]))
def test_sliding_window(Nq, Nk, bs, left, right, causal):
    bm = fs.sliding_window(Nq, Nk, left, right, causal=causal, block_size=bs)
    r = left if right is None else right
    r = (0 if r == -1 else min(r, 0)) if causal else r
    check_mask(bm, ref_window(Nq, Nk, left, r))
    assert bm.partial_masks.shape[0] == 0


@pytest.mark.parametrize("Nq,Nk,bs,w,d,causal", cases(
    [(3, 2, False), (10, 3, True), (4, 1, False), (0, 5, False)]))
def test_dilated_window(Nq, Nk, bs, w, d, causal):
    bm = fs.dilated_window(Nq, Nk, w, d, causal=causal, block_size=bs)
    check_mask(bm, ref_dilated(Nq, Nk, w, d, causal))


@pytest.mark.parametrize("Nq,Nk,bs,stride", cases([(1,), (7,), (16,), (40,)]))
def test_strided(Nq, Nk, bs, stride):
    check_mask(fs.strided(Nq, Nk, stride=stride, block_size=bs), ref_strided(Nq, Nk, stride))


@pytest.mark.parametrize("Nq,Nk,bs,stride,c,causal", cases(
    [(16, 2, True), (7, 3, False), (32, 32, True), (40, 1, False)]))
def test_fixed(Nq, Nk, bs, stride, c, causal):
    bm = fs.fixed(Nq, Nk, stride=stride, c=c, causal=causal, block_size=bs)
    check_mask(bm, ref_fixed(Nq, Nk, stride, c, causal))


# BigBird block b vs tile size: equal, tile divides b, tile larger than b, not aligned.
BIGBIRD_TILES = [(16, None), (32, (16, 16)), (16, (32, 64)), (24, (16, 16))]
BIGBIRD_CASES = [
    pytest.param(N, bb, bs, *par, marks=() if (ni + ti + pi) % 4 == 0 else (pytest.mark.slow,))
    for ni, N in enumerate(SQUARE + [700]) for ti, (bb, bs) in enumerate(BIGBIRD_TILES)
    for pi, par in enumerate([(3, 1, None), (1, 2, 2), (0, 1, None)])]


@pytest.mark.parametrize("N,bb,bs,r,g,heads", BIGBIRD_CASES)
def test_bigbird(N, bb, bs, r, g, heads):
    bm = fs.bigbird(N, bigbird_block_size=bb, num_random_blocks=r, num_global_blocks=g,
                    num_heads=heads, seed=5, block_size=bs)
    R = _bigbird_random_blocks(math.ceil(N / bb), r, g, heads or 1,
                               torch.Generator().manual_seed(5))
    check_mask(bm, ref_bigbird(N, bb, g, R))
    assert bm.Hm == (heads or 1) and bm.window == (-1, -1)


def test_bigbird_random_blocks_properties():
    nb, r, g, H = 40, 3, 2, 4
    R = _bigbird_random_blocks(nb, r, g, H, torch.Generator().manual_seed(1))
    assert R.shape == (H, nb, r)
    for h in range(H):
        for q in range(nb):
            row = R[h, q].tolist()
            if q < g or q >= nb - g:
                assert row == [-1] * r  # global rows see everything already
                continue
            assert row == sorted(row) and len(set(row)) == r
            assert all(g <= k < nb - g and abs(k - q) > 1 for k in row)
    # per-head draws differ, the seed fixes them, another seed changes them
    assert not torch.equal(R[0], R[1])
    assert torch.equal(R, _bigbird_random_blocks(nb, r, g, H, torch.Generator().manual_seed(1)))
    assert not torch.equal(R, _bigbird_random_blocks(nb, r, g, H, torch.Generator().manual_seed(2)))
    # rows with fewer candidates than r take all of them
    R = _bigbird_random_blocks(7, 5, 1, 1, torch.Generator().manual_seed(0))
    assert R[0, 3].tolist() == [1, 5, -1, -1, -1]
    # every candidate is drawn with the same frequency (uniform sampling)
    R = _bigbird_random_blocks(12, 2, 1, 4000, torch.Generator().manual_seed(3))
    counts = torch.bincount(R[:, 5].flatten(), minlength=12).float()
    cand = [1, 2, 3, 7, 8, 9, 10]
    assert counts[[0, 4, 5, 6, 11]].sum() == 0
    assert (counts[cand] / counts[cand].mean() - 1).abs().max() < 0.1


def test_bigbird_seed_and_generator():
    a = fs.bigbird(512, bigbird_block_size=32, seed=1)
    b = fs.bigbird(512, bigbird_block_size=32, generator=torch.Generator().manual_seed(1))
    c = fs.bigbird(512, bigbird_block_size=32, seed=2)
    assert torch.equal(a.to_dense(), b.to_dense())
    assert not torch.equal(a.to_dense(), c.to_dense())


@pytest.mark.parametrize("Nq,Nk,bs,w,G", cases(
    [(8, [0, 5]), (0, [16]), (64, []), (20, [3, 40, 96, 200])]))
def test_longformer(Nq, Nk, bs, w, G):
    G = [g for g in G if g < Nk]
    bm = fs.longformer(Nq, Nk, window=w, global_tokens=G, block_size=bs)
    check_mask(bm, ref_longformer(Nq, Nk, w, G))


@pytest.mark.parametrize("Nq,Nk,bs,sink,win", cases([(4, 8), (0, 20), (20, 1), (40, 70)]))
def test_streaming(Nq, Nk, bs, sink, win):
    bm = fs.streaming(Nq, Nk, sink_size=sink, window_size=win, block_size=bs)
    check_mask(bm, ref_streaming(Nq, Nk, sink, win))


@pytest.mark.parametrize("lens,bs,causal", cases(
    [(False,), (True,)],
    lengths=[([17],), ([5, 12, 80],), ([1, 0, 96, 160],), ([[40, 57], [97], [0, 3, 94]],)]))
def test_document(lens, bs, causal):
    bm = fs.document(lens, causal=causal, block_size=bs)
    rows = lens if isinstance(lens[0], list) else [lens]
    check_mask(bm, ref_document(rows, causal))
    assert bm.Bm == len(rows)


def test_document_tensor_input_matches_lists():
    t = torch.tensor([[40, 57, 0], [10, 20, 67]])
    a = fs.document(t, block_size=16)
    b = fs.document([[40, 57], [10, 20, 67]], block_size=16)
    assert torch.equal(a.to_dense(), b.to_dense())


@pytest.mark.parametrize("Nq,Nk,bs,pre", cases([(0,), (10,), (64,), ([3, 100, 40],)]))
def test_prefix_lm(Nq, Nk, bs, pre):
    bm = fs.prefix_lm(Nq, Nk, prefix_length=pre, block_size=bs)
    check_mask(bm, ref_prefix(Nq, Nk, pre if isinstance(pre, list) else [pre]))


@pytest.mark.parametrize("Nq,Nk,bs", cases([()]))
def test_from_mask_fn_per_batch_and_head(Nq, Nk, bs):
    # a predicate that differs per batch and head: (j * (b + 1) + h) % 3 != 0 or j == i
    fn = lambda b, h, q, kv: ((kv * (b + 1) + h) % 3 != 0) | (kv == q)
    bm = fs.from_mask_fn(fn, Nq, Nk, B=2, H=3, block_size=bs)
    i, j, _ = grid(Nq, Nk)
    want = torch.stack([torch.stack([((j * (b + 1) + h) % 3 != 0) | (j == i) for h in range(3)])
                        for b in range(2)])
    check_mask(bm, want)
    assert (bm.Bm, bm.Hm) == (2, 3)


def test_from_mask_fn_with_window_hint_and_indexing():
    # indices are clamped in range, so a predicate may index a tensor with them
    ids = torch.randint(0, 3, (97,))
    fn = lambda b, h, q, kv: (ids[q] == ids[kv]) & (kv <= q)
    bm = fs.from_mask_fn(fn, 97, 97, block_size=(16, 32), window=(-1, 0))
    i, j, _ = grid(97, 97)
    check_mask(bm, (ids[i] == ids[j]) & (j <= i))
    with pytest.raises(TypeError, match="bool tensor"):
        fs.from_mask_fn(lambda b, h, q, kv: q - kv, 17, 17)


@pytest.mark.parametrize("Nq,Nk,bs", cases([()]))
def test_from_dense_random_and_roundtrip(Nq, Nk, bs):
    m = torch.rand(2, 1, Nq, Nk) < 0.3
    m[:, :, :, : Nk // 3] = True  # some full blocks too
    check_mask(fs.from_dense(m, block_size=bs), m)
    # a triangle is recognized as the causal rule: no bitmasks, same lists as causal()
    tri = ref_window(Nq, Nk, -1, 0)
    bm = fs.from_dense(tri, block_size=bs)
    check_mask(bm, tri)
    ref = fs.causal(Nq, Nk, block_size=bs)
    assert bm.partial_masks.shape[0] == 0
    assert all(torch.equal(x, y)
               for x, y in zip(bm.kernel_tensors(), ref.kernel_tensors(), strict=True))


def test_partial_masks_deduplicated():
    # a dilated window's interior blocks repeat with period `dilation`: few distinct bitmasks
    bm = fs.dilated_window(2048, 2048, 64, 4, block_size=64)
    check_mask(bm, ref_dilated(2048, 2048, 64, 4, False))
    assert bm.partial_masks.shape[0] <= 4
    bm = fs.strided(1024, 1024, stride=64, block_size=64)
    assert bm.partial_masks.shape[0] <= 3


# ---------------------------------------------------------------------------- format
def test_kernel_tensors_order_dtypes_and_cache():
    bm = fs.streaming(257, 257, sink_size=4, window_size=40, block_size=(32, 64))
    ts = bm.kernel_tensors()
    names = ["kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
             "kv_mask_ids", "q_num_blocks", "q_indices", "full_q_num_blocks",
             "full_q_indices", "q_mask_ids"]
    assert len(ts) == 11
    for name, t in zip(names, ts[:10], strict=True):
        assert t is getattr(bm, name) and t.dtype == torch.int32 and t.is_contiguous()
    assert ts[10].dtype == torch.uint8 and ts[10].shape[1:] == (32, 64) and ts[10].shape[0] >= 1
    assert torch.equal(ts[10].bool(), bm.partial_masks)
    assert bm.kernel_mask() is bm.kernel_mask()  # built once, cached
    assert all(x is y for x, y in zip(bm.kernel_tensors(), ts, strict=True))
    assert ts[0].shape == (1, 1, 9) and ts[5].shape == (1, 1, 5)


def test_with_window_matches_definition_and_is_cached():
    for bm, want in [
        (fs.strided(257, 257, stride=16, block_size=32), ref_strided(257, 257, 16)),
        (fs.longformer(97, 257, window=8, global_tokens=[3, 200], block_size=16),
         ref_longformer(97, 257, 8, [3, 200])),
        (fs.document([[40, 57], [97]], block_size=(16, 32)), ref_document([[40, 57], [97]], False)),
    ]:
        for left, right in [(-1, 0), (20, 0), (5, 30), (0, 0)]:
            ww = bm.with_window(left, right)
            check_mask(ww, want & ref_window(bm.Nq, bm.Nk, left, right))
            assert bm.with_window(left, right) is ww
    c = fs.causal(97, 97, block_size=16)
    assert c.with_window(-1, 0) is c and c.with_window(-1, 5) is c and c.with_window(-1, -1) is c
    check_mask(c.with_window(8, 0), ref_window(97, 97, 8, 0))
    assert c.with_window(8, 0).window == (8, 0)


def test_and_or_with_broadcasting():
    N, bs = 257, (32, 16)
    a = fs.bigbird(N, bigbird_block_size=16, num_heads=3, seed=0, block_size=bs)
    b = fs.document([[100, 157], [257]], causal=True, block_size=bs)
    c = fs.dilated_window(N, N, 5, 3, block_size=bs)
    da, db, dc = a.to_dense(), b.to_dense(), c.to_dense()
    for x, y, dx, dy in [(a, b, da, db), (b, c, db, dc), (a, c, da, dc), (c, c, dc, dc)]:
        check_mask(x & y, dx & dy)
        check_mask(x | y, dx | dy)
    assert (a & b).shape == (2, 3, N, N)
    # unions of window rules stay rule-only (the hull of two windows)
    u = fs.sliding_window(N, N, 20, 0, block_size=bs) | fs.sliding_window(N, N, 3, 9, block_size=bs)
    check_mask(u, ref_window(N, N, 20, 9))
    assert u.partial_masks.shape[0] == 0 and u.window == (20, 9)
    with pytest.raises(ValueError, match="do not broadcast"):
        fs.from_mask_fn(lambda b, h, q, kv: q >= kv, 17, 17, H=2) & \
            fs.from_mask_fn(lambda b, h, q, kv: q >= kv, 17, 17, H=3)
    with pytest.raises(ValueError, match="same lengths"):
        fs.causal(17, 17) & fs.causal(17, 18)
    with pytest.raises(ValueError, match="block_size"):
        fs.causal(17, 17, block_size=16) | fs.causal(17, 17, block_size=32)


def test_from_kv_blocks_and_block_layout():
    # a hand-written layout: Nq=40, Nk=50, blocks 16x16 -> 3 x 4 blocks
    bm = BlockMask.from_kv_blocks(
        kv_num_blocks=torch.tensor([1, 1, 2]), kv_indices=torch.tensor([[1, 0], [2, 0], [1, 3]]),
        full_kv_num_blocks=torch.tensor([1, 0, 1]), full_kv_indices=torch.tensor([[0], [0], [2]]),
        kv_mask_ids=torch.tensor([[0, -1], [0, -1], [1, 0]]),
        partial_masks=torch.stack([torch.eye(16, dtype=torch.bool),
                                   torch.ones(16, 16, dtype=torch.bool).triu()]),
        seq_lengths=(40, 50), block_size=16)
    want = torch.zeros(40, 50, dtype=torch.bool)
    want[0:16, 0:16] = True
    want[0:16, 16:32] = torch.eye(16, dtype=torch.bool)
    want[16:32, 32:48] = torch.eye(16, dtype=torch.bool)
    want[32:40, 16:32] = torch.ones(16, 16, dtype=torch.bool).triu()[:8]
    want[32:40, 32:48] = True
    want[32:40, 48:50] = torch.eye(16, dtype=torch.bool)[:8, :2]
    dense = bm.to_dense()[0, 0]
    assert torch.equal(dense, want), first_mismatches(dense, want)
    assert bm.q_num_blocks.tolist() == [[[0, 2, 1, 1]]]
    assert bm.q_mask_ids[0, 0, 1, :2].tolist() == [0, 1]
    # block layout: True blocks follow the window rule
    lay = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    bl = BlockMask.from_block_layout(lay, 40, 50, 16, window=(-1, 3))
    tok = lay.repeat_interleave(16, 0).repeat_interleave(16, 1)[:40, :50]
    check_mask(bl, tok & ref_window(40, 50, -1, 3))


def _lists(**over):
    base = dict(kv_num_blocks=torch.tensor([1, 1]), kv_indices=torch.tensor([[0, 0], [1, 0]]),
                full_kv_num_blocks=torch.tensor([0, 1]), full_kv_indices=torch.tensor([[0], [0]]),
                seq_lengths=(32, 32), block_size=16)
    base.update(over)
    return base


@pytest.mark.parametrize("over,msg", [
    (dict(kv_indices=torch.tensor([[0, 0], [5, 0]])), r"not a block index in \[0, 2\)"),
    (dict(kv_num_blocks=torch.tensor([3, 1])), r"outside \[0, 2\]"),
    (dict(kv_num_blocks=torch.tensor([2, 1]), kv_indices=torch.tensor([[1, 0], [1, 0]])),
     "not strictly ascending"),
    (dict(full_kv_indices=torch.tensor([[0], [1]])), "both as partial and as full"),
    (dict(kv_num_blocks=torch.tensor([1, 2, 3])), r"shape \(1, 1, 2\)"),
    (dict(kv_mask_ids=torch.tensor([[0, -1], [-1, -1]])), r"not -1 or an index into partial_masks"),
    (dict(window=(-1, 0), full_kv_indices=torch.tensor([[0], [1]]),
          full_kv_num_blocks=torch.tensor([1, 0]), kv_indices=torch.tensor([[1, 0], [0, 0]]),
          kv_num_blocks=torch.tensor([0, 1])), "listed as full but the window rule"),
    (dict(window=(0, -5)), "window must be a pair"),
    (dict(block_size=0), "block_size must be"),
])
def test_malformed_layouts_raise(over, msg):
    with pytest.raises(ValueError, match=msg):
        BlockMask.from_kv_blocks(**_lists(**over))


def test_validate_detects_broken_transpose():
    bm = fs.causal(64, 64, block_size=16)
    bm.validate()
    bm.q_num_blocks[0, 0, 3] = 0  # drop one partial block from the transpose
    with pytest.raises(ValueError, match="not the transpose"):
        bm.validate()
    bm = fs.streaming(64, 64, sink_size=3, window_size=20, block_size=16)
    bm.q_mask_ids[bm.q_mask_ids >= 0] += 1  # mask ids disagree / out of range
    with pytest.raises(ValueError, match="partial_masks|transpose"):
        bm.validate()
    bm = fs.causal(64, 64, block_size=16)
    bm.kv_indices = bm.kv_indices.long()
    with pytest.raises(ValueError, match="contiguous int32"):
        bm.validate()


def test_validate_for_messages():
    bm = fs.causal(128, 256, block_size=64)
    bm.validate_for(B=2, H=4, Nq=128, Nk=256)
    with pytest.raises(ValueError, match=r"block_mask was built for Nq=128, Nk=256.*Nq=100.*"
                                         r"build it with Nq=100, Nk=256"):
        bm.validate_for(B=2, H=4, Nq=100, Nk=256)
    heads = fs.bigbird(256, bigbird_block_size=64, num_heads=3)
    heads.validate_for(B=5, H=3, Nq=256, Nk=256)
    with pytest.raises(ValueError, match="block_mask has per-head layouts for 3 heads.*4 query"):
        heads.validate_for(B=1, H=4, Nq=256, Nk=256)
    batch = fs.document([[100, 156], [256]], block_size=64)
    with pytest.raises(ValueError, match="block_mask has per-batch layouts for batch size 2"):
        batch.validate_for(B=3, H=1, Nq=256, Nk=256)


@pytest.mark.parametrize("call,exc,msg", [
    (lambda: fs.longformer(64, 64, window=5), ValueError, "window must be even"),
    (lambda: fs.longformer(64, 64, window=4, global_tokens=[64]), ValueError, r"\[0, 64\)"),
    (lambda: fs.fixed(64, 64, stride=8, c=9), ValueError, "c .* must be <= stride"),
    (lambda: fs.document([[3, 4], [5]]), ValueError, "sum to the same N"),
    (lambda: fs.document([3, -1]), ValueError, ">= 0"),
    (lambda: fs.dilated_window(64, 64, 3, 0), ValueError, "dilation must be an int >= 1"),
    (lambda: fs.sliding_window(64, 64, -2), ValueError, "left must be"),
    (lambda: fs.streaming(64, 64, window_size=0), ValueError, "window_size"),
    (lambda: fs.causal(-1), ValueError, "Nq must be"),
    (lambda: fs.from_dense(torch.ones(4, 4)), TypeError, "bool tensor"),
    (lambda: fs.from_dense(torch.ones(2, 4, 4, dtype=torch.bool)), ValueError, "2-D .* or 4-D"),
    (lambda: fs.from_mask_fn(3, 4, 4), TypeError, "callable"),
    (lambda: fs.prefix_lm(8, 8, prefix_length=-2), ValueError, ">= 0"),
    (lambda: BlockMask.from_block_layout(torch.ones(2, 2, dtype=torch.bool), 40, 40, 16),
     ValueError, r"NQB = ceil\(Nq / BLOCK_M\) = 3"),
])
def test_bad_arguments(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def test_empty_lengths():
    for bm in (fs.causal(0, 0), fs.causal(0, 17), fs.from_dense(torch.zeros(5, 0, dtype=torch.bool)),
               fs.document([0])):
        bm.validate()
        assert bm.to_dense().numel() == 0 and bm.num_visited_blocks == 0


# ---------------------------------------------------------------------------- views
def test_repr_to_string_and_plot(tmp_path):
    bm = fs.streaming(300, 300, sink_size=4, window_size=64, block_size=32)
    r = repr(bm)
    assert r.startswith("BlockMask(Nq=300, Nk=300, block_size=(32, 32)") and "\n" not in r
    s = bm.to_string()
    rows = s.splitlines()[2:]
    assert len(rows) == 10 and all(len(x) == 10 for x in rows)
    # streaming: sink block, window edge (partial), window interior (full), diagonal
    assert rows[0] == "+........." and rows[5] == "+..+#+...."
    assert rows[9] == "+......+#+"
    short = bm.to_string(max_blocks=4).splitlines()
    assert short[2] == "+... ..." and short[-1] == "... (6 more query blocks)"
    path = bm.plot(tmp_path / "mask.png")
    assert path == tmp_path / "mask.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = fs.causal(4096, 4096, block_size=16).plot(max_pixels=100)  # pooled 256 -> 86 px
    assert fig.axes[0].images[0].get_array().shape == (86, 86)


def test_to_device_and_sparsity():
    bm = fs.causal(256, 256, block_size=64)
    assert bm.to("cpu") is bm and bm.to(torch.device("cpu")) is bm
    assert bm.block_density == pytest.approx(10 / 16)
    assert bm.sparsity() == pytest.approx(100 * 6 / 16)
    assert bm.density == pytest.approx((256 * 257 / 2) / 256 ** 2)


# ---------------------------------------------------------------------------- long sequences
def test_long_sliding_window_is_banded():
    """N = 262144 tokens, 128-blocks: only the band is enumerated (Nq * Nk would be 64 GiB of
    bools); lists match the closed form."""
    N, left, BS = 262144, 1024, 128
    bm = fs.sliding_window(N, N, left, 0, block_size=BS)
    NB = N // BS
    assert bm.kv_indices.shape[-1] == 2 and bm.full_kv_indices.shape[-1] == left // BS - 1
    assert bm.partial_masks.shape[0] == 0
    # query block qb: diagonal block and the one left of the band edge are partial
    qb = torch.arange(NB)
    assert torch.equal(bm.kv_num_blocks[0, 0].long(), torch.where(qb >= 8, 2, 1))
    # blocks qb-7 .. qb-1 are full; qb-8 (band edge) and qb (diagonal) are partial
    assert torch.equal(bm.full_kv_num_blocks[0, 0].long(), torch.clamp(qb, max=7))
    assert bm.num_visited_blocks == int((torch.clamp(qb, max=8) + 1).sum())
    total_elems = sum(t.numel() for t in bm.kernel_tensors())
    assert total_elems < 40 * NB
    bm.validate()
    # the density (exact count, analytic per row) and a spot check of one block row
    expect = sum(min(i, left) + 1 for i in range(N)) / N ** 2
    assert bm.density == pytest.approx(expect, rel=1e-12)
    ww = bm.with_window(100, 0)
    assert ww.num_visited_blocks == int((torch.clamp(qb, max=1) + 1).sum())


@pytest.mark.slow
def test_million_token_patterns():
    """2^20 tokens: band patterns build, validate and have the exact density."""
    N = 1 << 20
    i = torch.arange(N, dtype=torch.float64)
    for bm, visible in [
        (fs.causal(N, N), (i + 1).sum()),
        (fs.sliding_window(N, N, 4096, 0), (torch.clamp(i, max=4096) + 1).sum()),
        (fs.streaming(N, N, sink_size=4, window_size=4096), torch.clamp(i + 1, max=4100).sum()),
        (fs.longformer(N, N, window=512, global_tokens=[0, 1, 2, N - 1]), None),
    ]:
        assert bm.kv_num_blocks.shape == (1, 1, N // 128)
        assert bm.partial_masks.shape[0] <= 16  # a few distinct edge bitmasks
        if bm.num_visited_blocks < 1 << 22:
            bm.validate()
        if visible is not None:
            assert bm.density == pytest.approx(float(visible) / N ** 2, rel=1e-12)


@pytest.mark.parametrize("Nq,Nk", [(1, 1), (17, 97), (97, 17), (257, 257), (100, 300), (300, 100)])
def test_closed_form_window_lists_match_builder(Nq, Nk):
    """Window-rule masks write their lists in closed form; the general builder, which
    classifies every block of the band, must give identical tensors."""
    from fastattn.sparse._builder import band_candidates

    for bs in [(16, 16), (32, 64), (64, 16), (128, 128)]:
        for win in [(-1, 0), (-1, -1), (0, 0), (5, 5), (0, 40), (33, 0), (-1, 3), (70, -1),
                    (200, 7), (1, 1000)]:
            fast = BlockMask._window_only(Nq, Nk, bs, win)
            slow = BlockMask._build(Nq, Nk, bs, win, candidates=lambda q0, q1, bs=bs, win=win:
                                    band_candidates(q0, q1, 1, Nq, Nk, bs[0], bs[1], *win))
            fast.validate()
            for name, x, y in zip(range(11), fast.kernel_tensors(), slow.kernel_tensors(),
                                  strict=True):
                assert torch.equal(x, y), (bs, win, name, x, y)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_public_api_uses_the_mask(backend):
    """fastattn.attention(block_mask=...) with causal/window intersects the mask exactly."""
    import fastattn
    from fastattn.backends.reference import reference_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 97, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 97, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 97, 16, generator=g, dtype=torch.float64)
    bm = fs.bigbird(97, bigbird_block_size=16, num_heads=4, seed=1) | \
        fs.streaming(97, 97, sink_size=3, window_size=20, block_size=16)
    for kw, rule in [({}, (-1, -1)), ({"causal": True}, (-1, 0)), ({"window": (10, 2)}, (10, 2))]:
        out = fastattn.attention(q, k, v, block_mask=bm, backend=backend, **kw)
        mask = bm.to_dense() & ref_window(97, 97, *rule)
        want, _ = reference_attention(q, k, v, scale=0.25, mask=mask)
        torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match="block_mask has per-head layouts for 4 heads"):
        fastattn.attention(q[:, :2], k, v, block_mask=bm, backend=backend)
