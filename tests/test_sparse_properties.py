"""Property tests (hypothesis) for fastattn.sparse: drawn lengths, block sizes and pattern
parameters; every mask must equal its definition and keep the format's invariants."""

import fastattn.sparse as fs
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_sparse_patterns import (  # noqa: F401  (_one_thread: the module-wide fixture)
    _one_thread,
    check_mask,
    ref_dilated,
    ref_document,
    ref_fixed,
    ref_longformer,
    ref_prefix,
    ref_streaming,
    ref_strided,
    ref_window,
)

SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

lengths = st.integers(1, 160)
blocks = st.tuples(st.sampled_from([8, 16, 24, 32, 64]), st.sampled_from([8, 16, 40, 64]))
side = st.one_of(st.just(-1), st.integers(0, 90))


@st.composite
def pattern(draw):
    """(name, BlockMask, dense definition) for a drawn pattern."""
    Nq, Nk, bs = draw(lengths), draw(lengths), draw(blocks)
    kind = draw(st.sampled_from(["window", "dilated", "strided", "fixed", "longformer",
                                 "streaming", "prefix", "document", "dense"]))
    if kind == "window":
        left, right = draw(side), draw(side)
        return kind, fs.sliding_window(Nq, Nk, left, right, block_size=bs), \
            ref_window(Nq, Nk, left, right)
    if kind == "dilated":
        w, d, c = draw(st.integers(0, 12)), draw(st.integers(1, 5)), draw(st.booleans())
        return kind, fs.dilated_window(Nq, Nk, w, d, causal=c, block_size=bs), \
            ref_dilated(Nq, Nk, w, d, c)
    if kind == "strided":
        stride = draw(st.integers(1, 50))
        return kind, fs.strided(Nq, Nk, stride=stride, block_size=bs), \
            ref_strided(Nq, Nk, stride)
    if kind == "fixed":
        stride = draw(st.integers(1, 50))
        c, causal = draw(st.integers(1, stride)), draw(st.booleans())
        return kind, fs.fixed(Nq, Nk, stride=stride, c=c, causal=causal, block_size=bs), \
            ref_fixed(Nq, Nk, stride, c, causal)
    if kind == "longformer":
        w = 2 * draw(st.integers(0, 30))
        G = sorted(set(draw(st.lists(st.integers(0, Nk - 1), max_size=4))))
        return kind, fs.longformer(Nq, Nk, window=w, global_tokens=G, block_size=bs), \
            ref_longformer(Nq, Nk, w, G)
    if kind == "streaming":
        sink, win = draw(st.integers(0, 40)), draw(st.integers(1, 80))
        return kind, fs.streaming(Nq, Nk, sink_size=sink, window_size=win, block_size=bs), \
            ref_streaming(Nq, Nk, sink, win)
    if kind == "prefix":
        pre = draw(st.lists(st.integers(0, Nk + 5), min_size=1, max_size=3))
        return kind, fs.prefix_lm(Nq, Nk, prefix_length=pre, block_size=bs), \
            ref_prefix(Nq, Nk, pre)
    if kind == "document":
        rows = draw(st.lists(st.lists(st.integers(0, 60), min_size=1, max_size=5),
                             min_size=1, max_size=3))
        N = max(sum(r) for r in rows)
        rows = [r + [N - sum(r)] for r in rows]  # equal totals
        c = draw(st.booleans())
        return kind, fs.document(rows, causal=c, block_size=bs), ref_document(rows, c)
    p = draw(st.floats(0.0, 1.0))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    m = torch.rand(draw(st.integers(1, 2)), 1, Nq, Nk, generator=g) < p
    return kind, fs.from_dense(m, block_size=bs), m


@SETTINGS
@given(pattern())
def test_pattern_matches_definition(pat):
    _, bm, want = pat
    check_mask(bm, want)


@SETTINGS
@given(pattern(), st.data())
def test_combinators_and_window(pat, data):
    _, a, da = pat
    Nq, Nk = a.seq_lengths
    # a second mask on the same lengths and tiles
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31)))
    db = torch.rand(1, data.draw(st.sampled_from([1, 2])), Nq, Nk, generator=g) < 0.5
    db |= ref_window(Nq, Nk, data.draw(side), data.draw(side))
    b = fs.from_dense(db, block_size=a.block_size)
    da4 = da if da.ndim == 4 else da[None, None]
    check_mask(a & b, da4 & db)  # layouts broadcast: (Bm, 1) with (1, Hm)
    check_mask(a | b, da4 | db)
    left, right = data.draw(side), data.draw(side)
    check_mask(a.with_window(left, right), da4 & ref_window(Nq, Nk, left, right))


@SETTINGS
@given(pattern())
def test_from_dense_roundtrip(pat):
    _, bm, want = pat
    again = fs.from_dense(bm.to_dense(), block_size=bm.block_size)
    check_mask(again, bm.to_dense())
    assert again.num_visited_blocks == bm.num_visited_blocks
