"""Mask building that scales (issue 20): from_mask_fn classifies blocks by interval
arithmetic and evaluates tokens only where that cannot decide; from_block_fn takes a rule
over block indices. Both must give exactly the BlockMask of token-by-token evaluation
(analyze=False), list for list and bitmask for bitmask, on many patterns and odd lengths."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastattn import sparse
from fastattn.sparse._intervals import ALL_FALSE, ALL_TRUE, UNKNOWN, classify_by_intervals
from fastattn.sparse.block_mask import _LIST_NAMES


def assert_same(a, b, what=""):
    for n in _LIST_NAMES:
        assert torch.equal(getattr(a, n), getattr(b, n)), f"{what}: {n} differs"
    assert torch.equal(a.partial_masks, b.partial_masks), f"{what}: partial_masks differ"
    assert a.window == b.window and a.block_size == b.block_size


LENS = torch.tensor([50, 130])  # per-batch key lengths, indexed by the exact b
DOC = torch.tensor([0] * 50 + [1] * 77 + [2] * 100)  # document ids (indexing: no intervals)

# (name, predicate(b, h, i, j), B, H); every one must build the same mask both ways
PREDICATES = [
    ("causal", lambda b, h, i, j: j <= i, None, None),
    ("window-causal", lambda b, h, i, j: (j <= i) & (i - j <= 37), None, None),
    ("window-two-sided", lambda b, h, i, j: abs(i - j) <= 20, None, None),
    ("dilated", lambda b, h, i, j: ((i - j) % 3 == 0) & (j <= i), None, None),
    ("strided", lambda b, h, i, j: ((i // 16) == (j // 16)) | ((j % 16) == 15), None, None),
    ("prefix-lm", lambda b, h, i, j: (j < 40) | (j <= i), None, None),
    ("per-head", lambda b, h, i, j: j <= i + 8 * h - 10, None, 3),
    ("per-batch-xor", lambda b, h, i, j: (j < 30 + 10 * b) ^ (i < 64), 2, None),
    ("negated", lambda b, h, i, j: ~((i - j > 5) | (j - i > 50)), None, None),
    ("products", lambda b, h, i, j: (i * 3 - j * 2 >= -40) & (i * j <= 9000), None, None),
    ("not-equal", lambda b, h, i, j: i != j, None, None),
    ("per-batch lengths (tensor[b] on the left)",
     lambda b, h, i, j: (LENS[b] > j) & (j <= i + 3), 2, None),
    ("document (indexing: token path)",
     lambda b, h, i, j: (DOC[i] == DOC[j]) & (j <= i), None, None),
    ("torch.where (token path)",
     lambda b, h, i, j: torch.where(i > 100, j <= i, j >= i), None, None),
]


@pytest.mark.parametrize("pred", PREDICATES, ids=[p[0] for p in PREDICATES])
@pytest.mark.parametrize("Nq,Nk,bs", [(227, 227, (64, 64)), (97, 213, (32, 16)),
                                      (213, 97, (16, 48)), (1, 77, (64, 64))])
def test_analyzed_equals_token_evaluation(pred, Nq, Nk, bs):
    name, fn, B, H = pred
    if "document" in name and max(Nq, Nk) > len(DOC):
        pytest.skip("document ids cover 227 tokens")
    a = sparse.from_mask_fn(fn, Nq, Nk, B, H, block_size=bs)
    t = sparse.from_mask_fn(fn, Nq, Nk, B, H, block_size=bs, analyze=False)
    assert_same(a, t, name)


def test_analyzed_with_window_hint():
    fn = lambda b, h, i, j: (j <= i) & ((i - j) % 4 != 1)
    a = sparse.from_mask_fn(fn, 301, 301, block_size=32, window=(60, 0))
    t = sparse.from_mask_fn(fn, 301, 301, block_size=32, window=(60, 0), analyze=False)
    assert_same(a, t)


def test_interval_classification_is_sound_and_tight():
    """ALL_TRUE / ALL_FALSE only where every token agrees; UNKNOWN where tokens disagree."""
    fn = lambda b, h, i, j: (i - j >= 0) & (i - j <= 10)
    q_lo = torch.tensor([0, 40, 0, 20])
    q_hi = torch.tensor([9, 49, 9, 25])
    kv_lo = torch.tensor([0, 0, 50, 15])
    kv_hi = torch.tensor([9, 9, 59, 19])
    z = torch.zeros(4, dtype=torch.long)
    got = classify_by_intervals(fn, z, z, q_lo, q_hi, kv_lo, kv_hi).tolist()
    assert got == [UNKNOWN, ALL_FALSE, ALL_FALSE, ALL_TRUE]


@pytest.mark.parametrize("fn", [
    lambda b, h, i, j: DOC[i] == DOC[j],           # indexing with a range
    lambda b, h, i, j: torch.ones_like(i, dtype=torch.bool),
    lambda b, h, i, j: (i > j) if bool(i < 5) else (i < j),  # control flow on a value
    lambda b, h, i, j: i.view(-1) > 0,
    lambda b, h, i, j: i // j > 0,                 # division by a range
])
def test_outside_the_algebra_raises(fn):
    z = torch.zeros(1, dtype=torch.long)
    with pytest.raises(Exception):  # noqa: B017 - any error means: evaluate the tokens
        classify_by_intervals(fn, z, z, z, z + 5, z, z + 5)


# ------------------------------------------------------------------ from_block_fn

def _window_rule(W, BM, BN, key=True):
    def fn(b, h, qb, kb):
        dmin = qb * BM - (kb * BN + BN - 1)
        dmax = qb * BM + BM - 1 - kb * BN
        codes = torch.where((dmin >= 0) & (dmax <= W), sparse.FULL_BLOCK,
                            torch.where((dmax < 0) | (dmin > W), sparse.EMPTY_BLOCK,
                                        sparse.PARTIAL_BLOCK))
        return (codes, qb - kb) if key else codes
    return fn


def _all_partial(b, h, qb, kb):
    return torch.full_like(qb, sparse.PARTIAL_BLOCK)


@pytest.mark.parametrize("N,bs", [(1000, 64), (777, 32), (129, 128), (64, 64), (1, 16)])
@pytest.mark.parametrize("key", [True, False])
def test_block_fn_window_equals_mask_fn(N, bs, key):
    W = 97
    fn = lambda b, h, i, j: (j <= i) & (i - j <= W)
    ref = sparse.from_mask_fn(fn, N, N, block_size=bs, analyze=False)
    got = sparse.from_block_fn(_window_rule(W, bs, bs, key), N, N, mask_fn=fn, block_size=bs)
    assert_same(got, ref)


@pytest.mark.parametrize("pred", PREDICATES, ids=[p[0] for p in PREDICATES])
def test_block_fn_all_partial_equals_mask_fn(pred):
    """Calling every block partial is always true: the result equals from_mask_fn."""
    name, fn, B, H = pred
    ref = sparse.from_mask_fn(fn, 201, 213, B, H, block_size=(32, 48), analyze=False)
    got = sparse.from_block_fn(_all_partial, 201, 213, B, H, mask_fn=fn, block_size=(32, 48))
    assert_same(got, ref, name)


def test_block_fn_per_head_document():
    """A per-head rule with full and empty blocks decided from block indices alone."""
    BM = 16
    doc_start = torch.tensor([0, 48, 48 + 64])  # documents of 48, 64 and 37 tokens

    def doc_of(t):
        return (t >= doc_start[1]).long() + (t >= doc_start[2]).long()

    mask_fn = lambda b, h, i, j: (doc_of(i) == doc_of(j)) & (j <= i + h)

    def block_fn(b, h, qb, kb):
        qd0, qd1 = doc_of(qb * BM), doc_of(torch.clamp(qb * BM + BM - 1, max=148))
        kd0, kd1 = doc_of(kb * BM), doc_of(torch.clamp(kb * BM + BM - 1, max=148))
        disjoint = (qd1 < kd0) | (kd1 < qd0)
        past = kb * BM + BM - 1 <= qb * BM + h  # every key <= every query + h
        one_doc = (qd0 == qd1) & (kd0 == kd1) & (qd0 == kd0)
        future = kb * BM > qb * BM + BM - 1 + h
        return torch.where(disjoint | future, sparse.EMPTY_BLOCK,
                           torch.where(one_doc & past, sparse.FULL_BLOCK, sparse.PARTIAL_BLOCK))

    ref = sparse.from_mask_fn(mask_fn, 149, 149, H=3, block_size=BM, analyze=False)
    got = sparse.from_block_fn(block_fn, 149, 149, H=3, mask_fn=mask_fn, block_size=BM)
    assert_same(got, ref)
    assert (got.to_dense() == ref.to_dense()).all()


def test_block_fn_errors():
    with pytest.raises(TypeError, match="block_fn must be callable"):
        sparse.from_block_fn(3, 10, 10)
    with pytest.raises(ValueError, match="mask_fn is None"):
        sparse.from_block_fn(_all_partial, 10, 10)
    with pytest.raises(ValueError, match=r"codes in \[0, 14\]; use sparse.EMPTY_BLOCK"):
        sparse.from_block_fn(lambda b, h, qb, kb: qb * 7, 300, 300)
    with pytest.raises(TypeError, match="int tensor of block codes"):
        sparse.from_block_fn(lambda b, h, qb, kb: qb * 0.5, 300, 300)
    # no partial blocks: no mask_fn needed
    bm = sparse.from_block_fn(lambda b, h, qb, kb: torch.where(kb <= qb, 2, 0), 256, 256,
                              block_size=64)
    assert_same(bm, sparse.from_mask_fn(lambda b, h, i, j: (j // 64) <= (i // 64), 256, 256,
                                        block_size=64, analyze=False))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 140), st.integers(1, 140), st.sampled_from([8, 16, 24, 64]),
       st.integers(-30, 30), st.integers(1, 7), st.integers(0, 6), st.booleans())
def test_random_predicates_analyzed_equals_tokens(Nq, Nk, bs, c, m, r, neg):
    """Random predicates from the algebra: offsets, strides, products, negation."""
    def fn(b, h, i, j):
        p = ((i - j + c) % m == r % m) | (i * 2 - j >= c * 3)
        return ~p if neg else p
    a = sparse.from_mask_fn(fn, Nq, Nk, block_size=bs)
    t = sparse.from_mask_fn(fn, Nq, Nk, block_size=bs, analyze=False)
    assert_same(a, t)
