"""Block-sparse attention patterns, each defined exactly as its source defines it.

Conventions of every constructor:
  - Nq query rows, Nk key columns, bottom-right aligned as everywhere in fastattn: query i
    sits at key position p = i + Nk - Nq (FlashAttention >= 2.1). A pattern stated for
    self-attention (Nq == Nk, p = i) extends to Nq != Nk (KV-cache decoding) by reading i
    as p, and delta = j - p is a key's offset from the query's diagonal.
  - block_size: int or (BLOCK_M, BLOCK_N), default (128, 128); device: where the returned
    tensors live (masks are built on the CPU).
  - Large sequences: band patterns (causal, windows, streaming, Longformer, BigBird, ...)
    only enumerate blocks near their band and classify blocks analytically, so memory
    grows with the number of visited blocks, not with Nq * Nk.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._builder import (
    EMPTY,
    EVAL,
    RULE,
    band_candidates,
    band_kb_range,
    cdiv,
    delta_range,
    expand_ranges,
    mask_fn_tiles,
    tile_bounds,
    unique_blocks,
)
from .._validate import check_window
from ._intervals import ALL_FALSE, ALL_TRUE, classify_by_intervals
from .block_mask import BlockMask, normalize_block_size

__all__ = [
    "causal",
    "sliding_window",
    "dilated_window",
    "strided",
    "fixed",
    "bigbird",
    "longformer",
    "streaming",
    "document",
    "prefix_lm",
    "block_local",
    "neighborhood_2d",
    "axial_2d",
    "from_mask_fn",
    "from_block_fn",
    "EMPTY_BLOCK",
    "PARTIAL_BLOCK",
    "FULL_BLOCK",
    "from_dense",
]

DEFAULT_BLOCK = (128, 128)


# ---------------------------------------------------------------------------- helpers
def _int(name, v, lo=0, allow_unbounded=False):
    ok = isinstance(v, int) and not isinstance(v, bool) and (v >= lo or (allow_unbounded and v == -1))
    if not ok:
        bound = f">= {lo}" + (" or -1 (unbounded)" if allow_unbounded else "")
        raise ValueError(f"{name} must be an int {bound}, got {v!r}")
    return int(v)


def _lengths(Nq, Nk):
    Nq = _int("Nq", Nq)
    Nk = Nq if Nk is None else _int("Nk", Nk)
    return Nq, Nk


def _key(E, *cols):
    """Grouping key (E, 3) for the builder: equal keys = equal tiles of the predicate."""
    k = torch.zeros((E, 3), dtype=torch.long)
    for c, v in enumerate(cols):
        k[:, c] = v
    return k


def _floordiv(a, b):
    return torch.div(a, b, rounding_mode="floor")


def _unique_key(E):
    return torch.full((E, 3), -1, dtype=torch.long)


def _window_pattern(Nq, Nk, window, block_size, device):
    """The pure window rule W = (left, right): every block is full or follows the rule."""
    return BlockMask._window_only(Nq, Nk, block_size, window, device)


# ---------------------------------------------------------------------------- windows
def causal(Nq, Nk=None, *, block_size=DEFAULT_BLOCK, device=None) -> BlockMask:
    """Causal, bottom-right aligned: query i sees key j iff j <= i + Nk - Nq (FlashAttention
    >= 2.1; for Nq == Nk the usual lower triangle). Window rule (-1, 0), no bitmasks."""
    Nq, Nk = _lengths(Nq, Nk)
    return _window_pattern(Nq, Nk, (-1, 0), block_size, device)


def sliding_window(Nq, Nk, left, right=None, *, causal=False, block_size=DEFAULT_BLOCK,
                   device=None) -> BlockMask:
    """Local window (FlashAttention's window_size=(left, right); Mistral/Longformer style):
    query i sees key j iff p - left <= j <= p + right with p = i + Nk - Nq; -1 is unbounded.
    right defaults to left (symmetric). causal=True caps right at 0. Window rule
    (left, right), no bitmasks."""
    Nq, Nk = _lengths(Nq, Nk)
    left = _int("left", left, allow_unbounded=True)
    right = left if right is None else _int("right", right, allow_unbounded=True)
    if causal:
        right = 0 if right == -1 else min(right, 0)
    return _window_pattern(Nq, Nk, (left, right), block_size, device)


def dilated_window(Nq, Nk, window, dilation, *, causal=False, block_size=DEFAULT_BLOCK,
                   device=None) -> BlockMask:
    """Dilated sliding window (Longformer, Beltagy et al. 2020, sec. 3.1): with
    delta = j - (i + Nk - Nq), query i sees key j iff

        |delta| <= window * dilation  and  delta % dilation == 0   (and delta <= 0 if causal)

    i.e. its own diagonal key plus `window` keys on each side spaced `dilation` apart
    (2 * window + 1 keys; receptive field 2 * window * dilation + 1). dilation=1 is
    sliding_window(window, window). Window rule (window * dilation, window * dilation or 0);
    bitmasks hold the `delta % dilation == 0` lattice (at most `dilation` distinct ones
    per block alignment)."""
    Nq, Nk = _lengths(Nq, Nk)
    w, d = _int("window", window), _int("dilation", dilation, lo=1)
    win = (w * d, 0 if causal else w * d)
    if d == 1:
        return _window_pattern(Nq, Nk, win, block_size, device)
    BM, BN = normalize_block_size(block_size)
    off = Nk - Nq

    def mask_fn(b, h, q, kv):
        return torch.remainder(kv - q - off, d) == 0

    def classify(b, h, qb, kb):
        d0 = delta_range(qb, kb, Nq, Nk, BM, BN)[2]
        return EVAL, _key(qb.numel(), 0, torch.remainder(d0, d))

    return BlockMask._build(
        Nq, Nk, (BM, BN), win, device=device, classify=classify,
        tile_fn=mask_fn_tiles(mask_fn, Nq, Nk, BM, BN),
        candidates=lambda q0, q1: band_candidates(q0, q1, 1, Nq, Nk, BM, BN, *win))


# ---------------------------------------------------------------------------- Sparse Transformer
def strided(Nq, Nk=None, *, stride, block_size=DEFAULT_BLOCK, device=None) -> BlockMask:
    """Sparse Transformer strided pattern (Child et al. 2019, "Generating Long Sequences with
    Sparse Transformers", sec. 4.2), both heads' sets merged into one mask, causal. With
    p = i + Nk - Nq and l = stride, query i sees key j iff

        j <= p  and  ((p - j) < l  or  (p - j) % l == 0)

    (A(1): the previous l positions, written {max(0, i - l), ..., i} in the paper, whose
    extra element i - l is also in A(2); A(2): every l-th position before i).
    Window rule causal (-1, 0) plus bitmasks."""
    Nq, Nk = _lengths(Nq, Nk)
    period = _int("stride", stride, lo=1)
    BM, BN = normalize_block_size(block_size)
    off = Nk - Nq

    def mask_fn(b, h, q, kv):
        t = q + off - kv
        return (t < period) | (torch.remainder(t, period) == 0)

    def classify(b, h, qb, kb):
        dmin, dmax, d0 = delta_range(qb, kb, Nq, Nk, BM, BN)
        tmin, tmax = -dmax, -dmin  # range of p - j over the block
        code = torch.where(tmax < period, RULE, EVAL)
        far = tmin >= period  # only the every-l-th lattice: depends on d0 mod l
        key = torch.where(far[:, None], _key(qb.numel(), 0, torch.remainder(d0, period)),
                          _key(qb.numel(), 1, d0))
        return code, key

    return BlockMask._build(
        Nq, Nk, (BM, BN), (-1, 0), device=device, classify=classify,
        tile_fn=mask_fn_tiles(mask_fn, Nq, Nk, BM, BN),
        candidates=lambda q0, q1: band_candidates(q0, q1, 1, Nq, Nk, BM, BN, -1, 0))


def fixed(Nq, Nk=None, *, stride, c, causal=True, block_size=DEFAULT_BLOCK,
          device=None) -> BlockMask:
    """Sparse Transformer fixed pattern (Child et al. 2019, sec. 4.2), both heads' sets
    merged into one mask. With p = i + Nk - Nq, l = stride, query i sees key j iff

        floor(j / l) == floor(p / l)      (A(1): same length-l block)
        or  j % l >= l - c                (A(2): the last c "summary" positions of every block)

    and, for causal=True (the paper's autoregressive setting), j <= p. causal=False gives
    the bidirectional variant. Requires 1 <= c <= l. Window rule (-1, 0) or none, plus
    bitmasks."""
    Nq, Nk = _lengths(Nq, Nk)
    period = _int("stride", stride, lo=1)
    c = _int("c", c, lo=1)
    if c > period:
        raise ValueError(f"c (summary positions per block) must be <= stride ({period}), got {c}")
    BM, BN = normalize_block_size(block_size)
    off = Nk - Nq
    win = (-1, 0) if causal else (-1, -1)

    def mask_fn(b, h, q, kv):
        same_block = _floordiv(kv, period) == _floordiv(q + off, period)
        return same_block | (torch.remainder(kv, period) >= period - c)

    def classify(b, h, qb, kb):
        i0, i1, j0, j1 = tile_bounds(qb, kb, Nq, Nk, BM, BN)
        qlo, qhi = _floordiv(i0 + off, period), _floordiv(i1 + off, period)
        klo, khi = j0 // period, j1 // period
        same = (qlo == qhi) & (klo == khi) & (qlo == klo)
        code = torch.where(same | (c == period), RULE, EVAL)
        apart = (khi < qlo) | (klo > qhi)  # only summary columns: depends on j0 mod period
        key = torch.where(apart[:, None], _key(qb.numel(), 0, torch.remainder(j0, period)),
                          _unique_key(qb.numel()))
        return code, key

    return BlockMask._build(
        Nq, Nk, (BM, BN), win, device=device, classify=classify,
        tile_fn=mask_fn_tiles(mask_fn, Nq, Nk, BM, BN),
        candidates=lambda q0, q1: band_candidates(q0, q1, 1, Nq, Nk, BM, BN, *win))


# ---------------------------------------------------------------------------- BigBird
def _bigbird_random_blocks(num_blocks, num_random_blocks, num_global_blocks, num_heads,
                           generator) -> torch.Tensor:
    """BigBird's random key blocks: int64 (num_heads, num_blocks, r), ascending per row, -1
    padded. For each head and each non-global query block q, min(r, n) distinct blocks drawn
    uniformly without replacement from the n non-global key blocks outside q's window
    {q-1, q, q+1} (Floyd's sampling, vectorized over rows); global rows get none."""
    nb, r, g = num_blocks, num_random_blocks, num_global_blocks
    rows = num_heads * nb
    out = torch.full((rows, r), -1, dtype=torch.long)
    if r == 0 or rows == 0:
        return out.view(num_heads, nb, r)
    q = torch.arange(nb).repeat(num_heads)
    mid_lo, mid_hi = g, nb - g - 1  # non-global blocks [mid_lo, mid_hi]
    ws, we = torch.clamp(q - 1, min=mid_lo), torch.clamp(q + 1, max=mid_hi)
    wcount = torch.clamp(we - ws + 1, min=0)
    n = torch.clamp(torch.full_like(q, mid_hi - mid_lo + 1) - wcount, min=0)
    n_ = torch.clamp(n, min=r)  # Floyd over max(n, r) values; picks >= n are dropped
    for step in range(r):
        top = n_ - r + step  # draw t uniform in [0, top]
        t = torch.clamp((torch.rand(rows, dtype=torch.float64, generator=generator)
                         * (top + 1)).long(), max=top)
        taken = (out[:, :step] == t[:, None]).any(1)
        out[:, step] = torch.where(taken, top, t)
    out = torch.where(out < n[:, None], out, -1)
    # Rank u among the candidates -> block id, skipping the window.
    blk = mid_lo + out
    blk = torch.where((wcount[:, None] > 0) & (blk >= ws[:, None]), blk + wcount[:, None], blk)
    glob = (q < g) | (q >= nb - g)
    blk = torch.where((out >= 0) & ~glob[:, None], blk, -1)
    blk = torch.where(blk < 0, nb, blk).sort(1).values  # ascending, padding last
    return torch.where(blk == nb, -1, blk).view(num_heads, nb, r)


def bigbird(N, *, bigbird_block_size=64, num_random_blocks=3, num_global_blocks=1,
            num_heads=None, seed=0, generator=None, block_size=None,
            device=None) -> BlockMask:
    """BigBird ITC (Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences", and
    its reference block-sparse implementation), self-attention over N tokens, defined on
    blocks of bigbird_block_size (b) tokens: nb = ceil(N / b), token i in block i // b.
    Query block q sees key block k iff

        q or k is global (among the first or last num_global_blocks blocks; ITC: 1 each)
        or |q - k| <= 1                     (sliding blocks, 3 blocks wide)
        or k in R[h, q]                     (num_random_blocks random blocks)

    R[h, q] (see _bigbird_random_blocks) holds, for non-global q, r distinct non-global
    blocks outside q's window drawn uniformly (fewer if fewer exist), from `generator` or
    torch.Generator().manual_seed(seed). num_heads=H draws one R per head (the reference
    does) and gives per-head layouts (Hm = H). The reference's two edge rows that may draw
    from their own window are not reproduced: every row excludes its window.
    block_size defaults to (b, b): then every tile is full or skipped."""
    N = _int("N", N)
    bb = _int("bigbird_block_size", bigbird_block_size, lo=1)
    r = _int("num_random_blocks", num_random_blocks)
    g = _int("num_global_blocks", num_global_blocks)
    H = 1 if num_heads is None else _int("num_heads", num_heads, lo=1)
    BM, BN = normalize_block_size((bb, bb) if block_size is None else block_size)
    if generator is None:
        generator = torch.Generator().manual_seed(_int("seed", seed))
    nb = cdiv(N, bb)
    R = _bigbird_random_blocks(nb, r, g, H, generator)  # (H, nb, r)

    def is_global(x):
        return (x < g) | (x >= nb - g)

    # Visible coarse blocks (h, q, k), then the tiles covering them.
    qs = torch.arange(nb)
    parts = []
    for h in range(H if nb else 0):
        gq = qs[is_global(qs)]
        parts.append(expand_ranges(torch.full_like(gq, h), gq, torch.zeros_like(gq),
                                   torch.full_like(gq, nb - 1)))
        gk = qs[is_global(qs)]
        parts.append((torch.full((nb * gk.numel(),), h), qs.repeat_interleave(gk.numel()),
                      gk.repeat(nb)))
        parts.append(expand_ranges(torch.full_like(qs, h), qs, (qs - 1).clamp(min=0),
                                   (qs + 1).clamp(max=nb - 1)))
        rq, rk = (R[h] >= 0).nonzero(as_tuple=True)
        parts.append((torch.full_like(rq, h), rq, R[h][rq, rk]))
    NQB, NKB = cdiv(N, BM), cdiv(N, BN)
    if parts:
        h, q, k = unique_blocks(nb, nb, *parts)
        # coarse rows -> tile rows, then coarse columns -> tile columns
        h, k, qt = expand_ranges(h, k, q * bb // BM, (torch.clamp(q * bb + bb, max=N) - 1) // BM)
        h, qt, kt = expand_ranges(h, qt, k * bb // BN, (torch.clamp(k * bb + bb, max=N) - 1) // BN)
        cl, cq, ck = unique_blocks(NQB, NKB, (h, qt, kt))
        order = torch.argsort(cq, stable=True)
        cl, cq, ck = cl[order], cq[order], ck[order]
    else:
        cl = cq = ck = torch.zeros(0, dtype=torch.long)

    def candidates(q0, q1):
        s, e = torch.searchsorted(cq, torch.tensor([q0, q1])).tolist()
        return cl[s:e], cq[s:e], ck[s:e]

    def mask_fn(b, h, q, kv):
        qb, kb = q // bb, kv // bb
        rand = (R[h, qb] == kb.unsqueeze(-1)).any(-1)  # (E, BM, 1, r) vs (E, 1, BN, 1)
        return is_global(qb) | is_global(kb) | ((qb - kb).abs() <= 1) | rand

    aligned = bb % BM == 0 and bb % BN == 0  # each tile inside one coarse block

    def classify(b, h, qb, kb):
        return (RULE if aligned else EVAL), None

    return BlockMask._build(N, N, (BM, BN), (-1, -1), 1, H, device=device,
                            candidates=candidates, classify=classify,
                            tile_fn=mask_fn_tiles(mask_fn, N, N, BM, BN))


# ---------------------------------------------------------------------------- Longformer
def _range_any_all(cum, lo, hi):
    """With cum = [0, cumsum(flags)], whether any / all flags in [lo, hi] are set."""
    cnt = cum[hi + 1] - cum[lo]
    return cnt > 0, cnt == hi - lo + 1


def longformer(Nq, Nk=None, *, window, global_tokens=(), block_size=DEFAULT_BLOCK,
               device=None) -> BlockMask:
    """Longformer (Beltagy et al. 2020, sec. 3.1): sliding window of total size `window`
    (w, even; w/2 on each side) plus global attention. With p = i + Nk - Nq and
    G = global_tokens (key positions in [0, Nk)), query i sees key j iff

        |j - p| <= w / 2   or   p in G   or   j in G

    (global tokens attend to every token and every token attends to them; symmetric).
    Without global tokens this is sliding_window(w/2, w/2). Window rule none; bitmasks on
    band edges and on blocks holding global rows/columns."""
    Nq, Nk = _lengths(Nq, Nk)
    w = _int("window", window)
    if w % 2:
        raise ValueError(f"window must be even (w/2 keys on each side, as in Longformer), got {w}")
    half = w // 2
    G = torch.as_tensor(list(global_tokens) if not isinstance(global_tokens, torch.Tensor)
                        else global_tokens, dtype=torch.long).flatten().cpu()
    if G.numel() and (int(G.min()) < 0 or int(G.max()) >= Nk):
        raise ValueError(f"global_tokens must be key positions in [0, {Nk}), got values in "
                         f"[{int(G.min())}, {int(G.max())}]")
    if G.numel() == 0:
        return _window_pattern(Nq, Nk, (half, half), block_size, device)
    BM, BN = normalize_block_size(block_size)
    off = Nk - Nq
    gk = torch.zeros(Nk, dtype=torch.bool)
    gk[G] = True
    pos = torch.arange(Nq) + off
    gq = torch.zeros(Nq, dtype=torch.bool)
    ok = (pos >= 0) & (pos < Nk)
    gq[ok] = gk[pos[ok]]
    cum_q = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(gq.long(), 0)])
    cum_k = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(gk.long(), 0)])
    NKB = cdiv(Nk, BN)
    kbs = torch.arange(NKB)
    gkb = kbs[_range_any_all(cum_k, kbs * BN, torch.clamp(kbs * BN + BN, max=Nk) - 1)[0]]

    def candidates(q0, q1):
        qb = torch.arange(q0, q1)
        rows_g = _range_any_all(cum_q, qb * BM, torch.clamp(qb * BM + BM, max=Nq) - 1)[0]
        gr = qb[rows_g]
        z = torch.zeros_like(gr)
        return unique_blocks(
            cdiv(Nq, BM), NKB,
            band_candidates(q0, q1, 1, Nq, Nk, BM, BN, half, half),
            expand_ranges(z, gr, z, torch.full_like(gr, NKB - 1)),
            (torch.zeros(qb.numel() * gkb.numel(), dtype=torch.long),
             qb.repeat_interleave(gkb.numel()), gkb.repeat(qb.numel())))

    def mask_fn(b, h, q, kv):
        return ((kv - q - off).abs() <= half) | gq[q] | gk[kv]

    def classify(b, h, qb, kb):
        i0, i1, j0, j1 = tile_bounds(qb, kb, Nq, Nk, BM, BN)
        rq_any, rq_all = _range_any_all(cum_q, i0, i1)
        ck_any, ck_all = _range_any_all(cum_k, j0, j1)
        dmin, dmax, d0 = delta_range(qb, kb, Nq, Nk, BM, BN)
        band_full = (dmin >= -half) & (dmax <= half)
        band_empty = (dmax < -half) | (dmin > half)
        code = torch.where(band_full | rq_all | ck_all, RULE, EVAL)
        code = torch.where(band_empty & ~rq_any & ~ck_any, EMPTY, code)
        E = qb.numel()
        key = _unique_key(E)
        key = torch.where((~rq_any & ~ck_any)[:, None], _key(E, 0, d0), key)  # band edge
        key = torch.where((band_empty & rq_any & ~ck_any)[:, None], _key(E, 1, qb), key)
        key = torch.where((band_empty & ck_any & ~rq_any)[:, None], _key(E, 2, kb), key)
        return code, key

    return BlockMask._build(Nq, Nk, (BM, BN), (-1, -1), device=device, candidates=candidates,
                            classify=classify, tile_fn=mask_fn_tiles(mask_fn, Nq, Nk, BM, BN))


# ---------------------------------------------------------------------------- StreamingLLM
def streaming(Nq, Nk=None, *, sink_size=4, window_size, block_size=DEFAULT_BLOCK,
              device=None) -> BlockMask:
    """StreamingLLM attention sinks (Xiao et al. 2023, "Efficient Streaming Language Models
    with Attention Sinks"): causal, each query sees the first sink_size tokens (the sinks)
    and its window_size most recent tokens, itself included (the KV cache of
    sink_size + window_size entries). With p = i + Nk - Nq, query i sees key j iff

        j <= p  and  (j < sink_size  or  p - j < window_size)

    Window rule causal (-1, 0) plus bitmasks on the sink and window-edge blocks."""
    Nq, Nk = _lengths(Nq, Nk)
    sink = _int("sink_size", sink_size)
    win = _int("window_size", window_size, lo=1)
    BM, BN = normalize_block_size(block_size)
    off = Nk - Nq
    sink_kb = cdiv(sink, BN)  # key blocks holding sinks: [0, sink_kb)

    def candidates(q0, q1):
        qb = torch.arange(q0, q1)
        _, hi = band_kb_range(qb, Nq, Nk, BM, BN, -1, 0)
        hi = torch.clamp(hi, max=sink_kb - 1)
        z = torch.zeros_like(qb)
        return unique_blocks(cdiv(Nq, BM), cdiv(Nk, BN),
                             band_candidates(q0, q1, 1, Nq, Nk, BM, BN, win - 1, 0),
                             expand_ranges(z, qb, z, hi))

    def mask_fn(b, h, q, kv):
        return (kv < sink) | (q + off - kv < win)

    def classify(b, h, qb, kb):
        _, _, j0, j1 = tile_bounds(qb, kb, Nq, Nk, BM, BN)
        dmin, dmax, d0 = delta_range(qb, kb, Nq, Nk, BM, BN)
        tmin, tmax = -dmax, -dmin  # range of p - j
        code = torch.where((tmax < win) | (j1 < sink), RULE, EVAL)
        code = torch.where((j0 >= sink) & (tmin >= win), EMPTY, code)
        E = qb.numel()
        key = torch.where((j0 >= sink)[:, None], _key(E, 0, d0),
                          torch.where((tmin >= win)[:, None], _key(E, 1, kb), _unique_key(E)))
        return code, key

    return BlockMask._build(Nq, Nk, (BM, BN), (-1, 0), device=device, candidates=candidates,
                            classify=classify, tile_fn=mask_fn_tiles(mask_fn, Nq, Nk, BM, BN))


# ---------------------------------------------------------------------------- documents
def _seq_lens_table(seq_lens) -> torch.Tensor:
    """seq_lens as int64 (Bm, D): a flat list/1-D tensor is one layout."""
    if isinstance(seq_lens, torch.Tensor):
        t = seq_lens.detach().cpu()
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.ndim not in (1, 2):
            raise ValueError(f"seq_lens must be a 1-D or 2-D integer tensor, got "
                             f"{t.dtype} {tuple(t.shape)}")
        t = t.long()
    else:
        if not isinstance(seq_lens, Sequence) or isinstance(seq_lens, str):
            raise ValueError(f"seq_lens must be a list of ints, a list of lists (one per batch "
                             f"element) or an integer tensor, got {type(seq_lens).__name__}")
        rows = [list(r) for r in seq_lens] if any(isinstance(r, (Sequence, torch.Tensor))
                                                   for r in seq_lens) else [list(seq_lens)]
        width = max((len(r) for r in rows), default=0)
        for r in rows:
            for x in r:
                if not (isinstance(x, int) and not isinstance(x, bool)):
                    raise ValueError(f"seq_lens entries must be ints, got {x!r}")
        t = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)
    t = t.view(1, -1) if t.ndim == 1 else t
    if bool((t < 0).any()):
        raise ValueError(f"seq_lens must be >= 0, got {t.tolist()}")
    return t


def document(seq_lens, *, causal=False, block_size=DEFAULT_BLOCK, device=None) -> BlockMask:
    """Document / varlen masking (block-diagonal; xformers' BlockDiagonalMask, FlexAttention's
    document mask): N = sum(seq_lens) packed tokens, token t belongs to document
    doc(t) = the d with starts[d] <= t < starts[d] + seq_lens[d]. Query i sees key j iff

        doc(i) == doc(j)   (and j <= i if causal)

    seq_lens: ints (one layout) or one list per batch element / an int tensor (B, D) padded
    with zeros (per-batch layouts, Bm = B); every batch element must total the same N.
    Window rule none or causal (-1, 0); bitmasks only on blocks that straddle a boundary."""
    lens = _seq_lens_table(seq_lens)
    totals = lens.sum(1)
    if bool((totals != totals[0]).any()):
        raise ValueError(f"every batch element's seq_lens must sum to the same N, got sums "
                         f"{totals.tolist()}; pad with an extra document to equalize them")
    N, Bm = int(totals[0]), lens.shape[0]
    BM, BN = normalize_block_size(block_size)
    win = (-1, 0) if causal else (-1, -1)
    D = lens.shape[1]
    ends = torch.cumsum(lens, 1)
    starts = ends - lens
    doc = torch.stack([torch.repeat_interleave(torch.arange(D), lens[b]) for b in range(Bm)]) \
        if N else torch.zeros((Bm, 0), dtype=torch.long)  # (Bm, N)

    def candidates(q0, q1):
        n = q1 - q0
        lay = torch.arange(Bm).repeat_interleave(n)
        qb = torch.arange(q0, q1).repeat(Bm)
        i0, i1 = qb * BM, torch.clamp(qb * BM + BM, max=N) - 1
        lo = starts[lay, doc[lay, i0]] // BN
        hi = (ends[lay, doc[lay, i1]] - 1) // BN
        if causal:
            hi = torch.minimum(hi, band_kb_range(qb, N, N, BM, BN, -1, 0)[1])
        return expand_ranges(lay, qb, lo, hi)

    def mask_fn(b, h, q, kv):
        return doc[b, q] == doc[b, kv]

    def classify(b, h, qb, kb):
        i0, i1, j0, j1 = tile_bounds(qb, kb, N, N, BM, BN)
        r0, r1, c0, c1 = doc[b, i0], doc[b, i1], doc[b, j0], doc[b, j1]
        code = torch.where((r0 == r1) & (c0 == c1) & (r0 == c0), RULE, EVAL)
        code = torch.where((c1 < r0) | (c0 > r1), EMPTY, code)
        return code, None

    return BlockMask._build(N, N, (BM, BN), win, Bm, 1, device=device, candidates=candidates,
                            classify=classify, tile_fn=mask_fn_tiles(mask_fn, N, N, BM, BN))


def prefix_lm(Nq, Nk=None, *, prefix_length, block_size=DEFAULT_BLOCK,
              device=None) -> BlockMask:
    """Prefix LM (Raffel et al. 2020, T5 sec. 3.2.1; UniLM): bidirectional attention over the
    first prefix_length tokens, causal after. With p = i + Nk - Nq, query i sees key j iff

        j <= p   or   j < prefix_length

    prefix_length: an int, or one per batch element (list / int tensor (B,)) for per-batch
    layouts (Bm = B). Window rule none; bitmasks on diagonal and prefix-edge blocks."""
    Nq, Nk = _lengths(Nq, Nk)
    if isinstance(prefix_length, int) and not isinstance(prefix_length, bool):
        pre = torch.tensor([prefix_length])
    else:
        pre = torch.as_tensor(prefix_length).cpu().flatten()
        if pre.dtype.is_floating_point or pre.dtype == torch.bool or pre.numel() == 0:
            raise ValueError(f"prefix_length must be an int or a sequence of ints, got "
                             f"{prefix_length!r}")
        pre = pre.long()
    if bool((pre < 0).any()):
        raise ValueError(f"prefix_length must be >= 0, got {pre.tolist()}")
    Bm = pre.numel()
    BM, BN = normalize_block_size(block_size)
    off = Nk - Nq
    NQB, NKB = cdiv(Nq, BM), cdiv(Nk, BN)

    def candidates(q0, q1):
        n = q1 - q0
        lay = torch.arange(Bm).repeat_interleave(n)
        qb = torch.arange(q0, q1).repeat(Bm)
        hi = torch.clamp(torch.div(pre[lay] - 1, BN, rounding_mode="floor"), max=NKB - 1)
        return unique_blocks(NQB, NKB,
                             band_candidates(q0, q1, Bm, Nq, Nk, BM, BN, -1, 0),
                             expand_ranges(lay, qb, torch.zeros_like(qb), hi))

    def mask_fn(b, h, q, kv):
        return (kv <= q + off) | (kv < pre[b])

    def classify(b, h, qb, kb):
        _, _, j0, j1 = tile_bounds(qb, kb, Nq, Nk, BM, BN)
        dmin, dmax, d0 = delta_range(qb, kb, Nq, Nk, BM, BN)
        p = pre[b]
        code = torch.where((dmax <= 0) | (j1 < p), RULE, EVAL)
        code = torch.where((j0 >= p) & (dmin > 0), EMPTY, code)
        E = qb.numel()
        key = torch.where((j0 >= p)[:, None], _key(E, 0, d0),
                          torch.where((dmin > 0)[:, None], _key(E, 1, kb, p), _unique_key(E)))
        return code, key

    return BlockMask._build(Nq, Nk, (BM, BN), (-1, -1), Bm, 1, device=device,
                            candidates=candidates, classify=classify,
                            tile_fn=mask_fn_tiles(mask_fn, Nq, Nk, BM, BN))


# ---------------------------------------------------------------------------- block-local
def block_local(N, block_len, *, causal=False, block_size=DEFAULT_BLOCK,
                device=None) -> BlockMask:
    """Non-overlapping block-local attention (the "local attention" baseline of the Long
    Range Arena, Tay et al. 2021; Image Transformer's 1D local blocks, Parmar et al. 2018):
    the N tokens are cut into consecutive chunks of block_len (the last one may be shorter)
    and query i sees key j iff

        i // block_len == j // block_len      (and j <= i if causal)

    The document mask over equal-length documents; bitmasks only on blocks that straddle
    a chunk boundary (none when block_len is a multiple of the block size)."""
    N = _int("N", N)
    L = _int("block_len", block_len, lo=1)
    lens = [L] * (N // L) + ([N % L] if N % L else [])
    if not lens:
        lens = [0]
    return document(lens, causal=causal, block_size=block_size, device=device)


# ---------------------------------------------------------------------------- 2D (images)
def _grid_args(h, w, prefix_tokens):
    h, w = _int("h", h, lo=1), _int("w", w, lo=1)
    P = _int("prefix_tokens", prefix_tokens)
    return h, w, P


def _grid_tables(h, w, P):
    """Per token t of the P + h * w sequence (prefix tokens first, then patches row-major):
    row, column (-1 for prefix tokens) and whether it is a prefix (global) token."""
    N = P + h * w
    t = torch.arange(N)
    patch = (t - P).clamp(min=0)
    glob = t < P
    row = torch.where(glob, -1, patch // w)
    col = torch.where(glob, -1, patch % w)
    return N, row, col, glob


def _grid_candidates(N, P, BM, BN, lo_tok, hi_tok):
    """Candidates of a 2D pattern: per query block the key blocks of its token range
    [lo_tok(qb), hi_tok(qb)] (inclusive), plus the prefix rows (all key blocks) and the
    prefix columns (every query block)."""
    NQB, NKB = cdiv(N, BM), cdiv(N, BN)
    pkb = cdiv(P, BN)  # key blocks holding prefix tokens: [0, pkb)

    def candidates(q0, q1):
        qb = torch.arange(q0, q1)
        z = torch.zeros_like(qb)
        lo, hi = lo_tok(qb) // BN, hi_tok(qb) // BN
        parts = [expand_ranges(z, qb, lo, hi),
                 expand_ranges(z, qb, z, torch.full_like(qb, pkb - 1))]
        pre = qb[qb * BM < P]  # query blocks holding prefix tokens see every key block
        zp = torch.zeros_like(pre)
        parts.append(expand_ranges(zp, pre, zp, torch.full_like(pre, NKB - 1)))
        return unique_blocks(NQB, NKB, *parts)

    return candidates


def neighborhood_2d(h, w, kernel, *, prefix_tokens=0, block_size=DEFAULT_BLOCK,
                    device=None) -> BlockMask:
    """2D neighbourhood attention (Hassani et al. 2023, "Neighborhood Attention Transformer";
    NATTEN's na2d without dilation) over an h x w grid of patches flattened row-major
    (patch (r, c) is token P + r * w + c, P = prefix_tokens). With kernel k (odd, or a pair
    (kh, kw) of odd sizes, k <= h and k <= w), patch (r, c) sees patch (r', c') iff

        s_r <= r' < s_r + kh   and   s_c <= c' < s_c + kw,
        s_r = clamp(r - kh // 2, 0, h - kh),   s_c = clamp(c - kw // 2, 0, w - kw)

    i.e. the k x k window centred on it, shifted inwards at the borders so that every patch
    sees exactly kh * kw patches (itself included). The P prefix tokens (e.g. a [CLS]
    token) are global: they see every token and every token sees them. Window rule none,
    bitmasks on the blocks the windows cut; key blocks are enumerated only within the rows
    a query block's windows reach."""
    h, w, P = _grid_args(h, w, prefix_tokens)
    if isinstance(kernel, (tuple, list)) and len(kernel) == 2:
        kh, kw = _int("kernel[0]", kernel[0], lo=1), _int("kernel[1]", kernel[1], lo=1)
    else:
        kh = kw = _int("kernel", kernel, lo=1)
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel must be odd (the window is centred on its patch), got "
                         f"{(kh, kw) if kh != kw else kh}; pass odd sizes, e.g. 7 instead of 8")
    if kh > h or kw > w:
        raise ValueError(f"kernel {(kh, kw)} does not fit the {h} x {w} grid: kernel must be "
                         f"<= h and <= w (a window larger than the grid is dense attention)")
    BM, BN = normalize_block_size(block_size)
    N, row, col, glob = _grid_tables(h, w, P)
    sr = torch.where(glob, 0, (row - kh // 2).clamp(min=0, max=h - kh))
    sc = torch.where(glob, 0, (col - kw // 2).clamp(min=0, max=w - kw))

    def mask_fn(b, hh, q, kv):
        inside = ((row[kv] >= sr[q]) & (row[kv] < sr[q] + kh)
                  & (col[kv] >= sc[q]) & (col[kv] < sc[q] + kw))
        return glob[q] | glob[kv] | inside

    def first_tok(qb):  # first key token any query of the block may see (outside the prefix)
        i0 = (qb * BM).clamp(max=max(N - 1, 0))
        return P + sr[i0.clamp(min=P)] * w

    def last_tok(qb):
        i1 = (torch.clamp(qb * BM + BM, max=N) - 1).clamp(min=P)
        return torch.clamp(P + (sr[i1] + kh) * w - 1, max=N - 1)

    return BlockMask._build(N, N, (BM, BN), (-1, -1), device=device,
                            candidates=_grid_candidates(N, P, BM, BN, first_tok, last_tok),
                            tile_fn=mask_fn_tiles(mask_fn, N, N, BM, BN))


def axial_2d(h, w, *, prefix_tokens=0, block_size=DEFAULT_BLOCK, device=None) -> BlockMask:
    """Axial attention (Ho et al. 2019, "Axial Attention in Multidimensional Transformers";
    both axes in one mask, as in the Sparse Transformer's 2D factorization) over an h x w
    grid of patches flattened row-major (patch (r, c) is token P + r * w + c, P =
    prefix_tokens): patch (r, c) sees patch (r', c') iff

        r' == r   or   c' == c          (its own row and its own column: h + w - 1 patches)

    The P prefix tokens are global, as in neighborhood_2d. Window rule none, bitmasks.
    In row-major order a column reaches every row, so most blocks hold a few visible
    tokens: the kernels skip little (the token density is (h + w - 1) / (h * w)) unless
    blocks are smaller than a row."""
    h, w, P = _grid_args(h, w, prefix_tokens)
    BM, BN = normalize_block_size(block_size)
    N, row, col, glob = _grid_tables(h, w, P)

    def mask_fn(b, hh, q, kv):
        return glob[q] | glob[kv] | (row[q] == row[kv]) | (col[q] == col[kv])

    def classify(b, hh, qb, kb):  # empty: rows apart and columns apart
        i0, i1, j0, j1 = tile_bounds(qb, kb, N, N, BM, BN)
        i0, j0 = i0.clamp(min=P), j0.clamp(min=P)
        qr0, qr1, kr0, kr1 = row[i0], row[i1], row[j0], row[j1]
        qc0 = torch.where(qr0 == qr1, col[i0], 0)
        qc1 = torch.where(qr0 == qr1, col[i1], w - 1)
        kc0 = torch.where(kr0 == kr1, col[j0], 0)
        kc1 = torch.where(kr0 == kr1, col[j1], w - 1)
        apart = ((qr1 < kr0) | (kr1 < qr0)) & ((qc1 < kc0) | (kc1 < qc0))
        apart &= (qb * BM >= P) & (kb * BN >= P)  # no prefix (global) token inside
        return torch.where(apart, EMPTY, EVAL), None

    return BlockMask._build(N, N, (BM, BN), (-1, -1), device=device, classify=classify,
                            tile_fn=mask_fn_tiles(mask_fn, N, N, BM, BN))


# ---------------------------------------------------------------------------- generic
def from_mask_fn(mask_fn, Nq, Nk, B=None, H=None, *, block_size=DEFAULT_BLOCK, window=None,
                 device=None, analyze=True) -> BlockMask:
    """Any vectorized predicate, like FlexAttention's mask_mod: query i of layout (b, h) sees
    key j iff mask_fn(b, h, q_idx, kv_idx) is True. mask_fn gets int64 tensors broadcastable
    to one shape (b, h: (E, 1, 1); q_idx: (E, BLOCK_M, 1); kv_idx: (E, 1, BLOCK_N); indices
    are clamped into range, so they may index tensors) and returns a bool tensor of that
    broadcast shape. B / H: number of per-batch / per-head layouts (None: one shared layout,
    called with b = 0 / h = 0). window=(left, right): an optional window rule the predicate
    is known to lie within; only blocks it touches are evaluated (a large speedup for long
    sequences).

    Cost: blocks are first classified without evaluating tokens, by running mask_fn once on
    whole index ranges (interval arithmetic over +, -, *, // and % by constants, abs,
    comparisons, &, |, ^, ~; b and h are exact and may index tensors): blocks it proves
    empty or full cost nothing more, and only the others have their tokens evaluated. A
    predicate outside that algebra (indexing a tensor with q_idx, torch functions, ...) has
    every token evaluated, exactly as before (analyze=False forces that). Either way the
    result is the same BlockMask. Token evaluation runs on chunks of bounded size (memory
    bounded by one chunk per thread), on up to torch.get_num_threads() threads."""
    if not callable(mask_fn):
        raise TypeError(f"mask_fn must be callable fn(b, h, q_idx, kv_idx) -> bool tensor, got "
                        f"{type(mask_fn).__name__}")
    Nq, Nk = _int("Nq", Nq), _int("Nk", Nk)
    Bm = 1 if B is None else _int("B", B, lo=1)
    Hm = 1 if H is None else _int("H", H, lo=1)
    BM, BN = normalize_block_size(block_size)
    win = check_window(window)
    if not isinstance(analyze, bool):
        raise TypeError(f"analyze must be a bool, got {type(analyze).__name__}")
    cand = None
    if win != (-1, -1):
        cand = lambda q0, q1: band_candidates(q0, q1, Bm * Hm, Nq, Nk, BM, BN, *win)
    classify = _interval_classifier(mask_fn, Nq, Nk, BM, BN) if analyze else None
    return BlockMask._build(Nq, Nk, (BM, BN), win, Bm, Hm, device=device, candidates=cand,
                            classify=classify, tile_fn=mask_fn_tiles(mask_fn, Nq, Nk, BM, BN))


# Block codes of from_block_fn.
EMPTY_BLOCK, PARTIAL_BLOCK, FULL_BLOCK = 0, 1, 2


def from_block_fn(block_fn, Nq, Nk, B=None, H=None, *, mask_fn=None, block_size=DEFAULT_BLOCK,
                  window=None, device=None) -> BlockMask:
    """A block mask from a rule over block indices, with tokens evaluated only inside the
    blocks the rule calls partial: cost grows with the number of blocks, not Nq * Nk.

    block_fn(b, h, q_block, kv_block) gets int64 tensors broadcastable to one shape (E,)
    (block indices: query block q_block holds tokens [q_block * BLOCK_M, min((q_block + 1) *
    BLOCK_M, Nq)), likewise kv_block with BLOCK_N and Nk) and returns per block an int tensor
    of sparse.EMPTY_BLOCK (0: no token visible), sparse.PARTIAL_BLOCK (1: evaluate mask_fn
    on its tokens) or sparse.FULL_BLOCK (2: every in-range token visible), or a pair (codes,
    key): partial blocks of equal int64 key have equal token masks (e.g. key = q_block -
    kv_block for a rule on i - j, with square blocks and Nq == Nk), so mask_fn runs once per
    key; ragged edge blocks are always evaluated on their own. mask_fn(b, h, q_idx, kv_idx)
    is the token rule (as in from_mask_fn), required when some block is partial.

    The result is the BlockMask from_mask_fn(mask_fn, ...) builds when block_fn's codes are
    true to mask_fn (they are trusted, not checked: a block called full or empty is taken as
    such). B, H, block_size, window and device as in from_mask_fn."""
    if not callable(block_fn):
        raise TypeError(f"block_fn must be callable fn(b, h, q_block, kv_block) -> int tensor, "
                        f"got {type(block_fn).__name__}")
    if mask_fn is not None and not callable(mask_fn):
        raise TypeError(f"mask_fn must be callable fn(b, h, q_idx, kv_idx) -> bool tensor or "
                        f"None, got {type(mask_fn).__name__}")
    Nq, Nk = _int("Nq", Nq), _int("Nk", Nk)
    Bm = 1 if B is None else _int("B", B, lo=1)
    Hm = 1 if H is None else _int("H", H, lo=1)
    BM, BN = normalize_block_size(block_size)
    win = check_window(window)

    def classify(b, h, qb, kb):
        res = block_fn(b, h, qb, kb)
        codes, key = res if isinstance(res, tuple) and len(res) == 2 else (res, None)
        if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point \
                or codes.dtype.is_complex:
            raise TypeError(f"block_fn must return an int tensor of block codes (0 empty, 1 "
                            f"partial, 2 full), or (codes, key), got "
                            f"{getattr(codes, 'dtype', type(codes).__name__)}")
        codes = torch.broadcast_to(codes.long(), qb.shape)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 2):
            raise ValueError(f"block_fn returned codes in [{int(codes.min())}, "
                             f"{int(codes.max())}]; use sparse.EMPTY_BLOCK (0), "
                             f"sparse.PARTIAL_BLOCK (1) or sparse.FULL_BLOCK (2)")
        if mask_fn is None and bool((codes == PARTIAL_BLOCK).any()):
            raise ValueError("block_fn called some blocks partial but mask_fn is None: pass "
                             "mask_fn=fn(b, h, q_idx, kv_idx) for the tokens of partial blocks")
        if key is not None:
            key = torch.broadcast_to(torch.as_tensor(key).long(), qb.shape)
        out = torch.where(codes == FULL_BLOCK, RULE,
                          torch.where(codes == EMPTY_BLOCK, EMPTY, EVAL))
        return out, key

    tile_fn = mask_fn_tiles(mask_fn, Nq, Nk, BM, BN) if mask_fn is not None else \
        mask_fn_tiles(lambda b, h, i, j: torch.ones((), dtype=torch.bool), Nq, Nk, BM, BN)
    cand = None
    if win != (-1, -1):
        cand = lambda q0, q1: band_candidates(q0, q1, Bm * Hm, Nq, Nk, BM, BN, *win)
    return BlockMask._build(Nq, Nk, (BM, BN), win, Bm, Hm, device=device, candidates=cand,
                            classify=classify, tile_fn=tile_fn)

def _interval_classifier(mask_fn, Nq, Nk, BM, BN):
    """A build() classify that proves blocks empty (EMPTY) or full (RULE) by interval
    arithmetic (_intervals.py) and leaves the rest to token evaluation (EVAL); after the
    first failure (mask_fn outside the algebra) it answers EVAL for everything."""
    state = {"ok": True}

    def classify(b, h, qb, kb):
        if state["ok"]:
            i0, i1, j0, j1 = tile_bounds(qb, kb, Nq, Nk, BM, BN)
            try:
                c = classify_by_intervals(mask_fn, b, h, i0, i1, j0, j1)
            except Exception:  # noqa: BLE001 - any failure: evaluate tokens instead
                state["ok"] = False
            else:
                return torch.where(c == ALL_TRUE, RULE, torch.where(c == ALL_FALSE, EMPTY, EVAL)), None
        return torch.full_like(qb, EVAL), None

    return classify


def _tight_window(mask) -> tuple[int, int]:
    """Smallest window rule (left, right) holding every visible token of mask (L, Nq, Nk);
    a side that reaches every key is -1."""
    L, Nq, Nk = mask.shape
    off = Nk - Nq
    left = right = None
    cols = torch.arange(Nk)
    step = max(1, (1 << 22) // max(L * Nk, 1))  # rows per chunk: bounded int64 temporaries
    for s in range(0, Nq, step):
        m = mask[:, s:s + step]
        p = torch.arange(s, s + m.shape[1]) + off
        anyr = m.any(-1)  # (L, rows)
        if not bool(anyr.any()):
            continue
        first = torch.where(m, cols, Nk).amin(-1)
        last = torch.where(m, cols, -1).amax(-1)
        lt = int((p - first)[anyr].max())
        rt = int((last - p)[anyr].max())
        left = lt if left is None else max(left, lt)
        right = rt if right is None else max(right, rt)
    if left is None:
        return (-1, -1)
    left = -1 if left >= Nk - 1 else max(left, 0)
    right = -1 if right >= Nq - 1 else max(right, 0)
    return left, right


def from_dense(mask, *, block_size=DEFAULT_BLOCK, device=None) -> BlockMask:
    """From a dense bool mask (Nq, Nk) or (Bm, Hm, Nq, Nk), True = visible (Bm in {1, B},
    Hm in {1, H}). The tightest window rule holding the mask is found (so e.g. a lower
    triangle becomes exactly causal(...)); blocks are full, follow that rule (mask id -1) or
    get a deduplicated bitmask. device defaults to the mask's device."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = visible), got {mask.dtype}; for an "
                        f"additive float mask pass mask == 0")
    if mask.ndim not in (2, 4):
        raise ValueError(f"mask must be 2-D (Nq, Nk) or 4-D (Bm, Hm, Nq, Nk), got shape "
                         f"{tuple(mask.shape)}")
    dev = mask.device if device is None else device
    m4 = (mask[None, None] if mask.ndim == 2 else mask).cpu()
    Bm, Hm, Nq, Nk = m4.shape
    BM, BN = normalize_block_size(block_size)
    NQB, NKB = cdiv(Nq, BM), cdiv(Nk, BN)
    flat = m4.reshape(Bm * Hm, Nq, Nk)
    win = _tight_window(flat)
    # Per tile: any visible (candidates) and all in-range visible (RULE).
    pad = (0, NKB * BN - Nk, 0, NQB * BM - Nq)
    tiles = torch.nn.functional.pad(flat, pad).view(Bm * Hm, NQB, BM, NKB, BN)
    anyv = tiles.any(4).any(2)
    del tiles
    hidden = torch.nn.functional.pad(~flat, pad).view(Bm * Hm, NQB, BM, NKB, BN)
    allv = ~hidden.any(4).any(2)
    del hidden
    cl, cq, ck = anyv.nonzero(as_tuple=True)

    def candidates(q0, q1):
        s, e = torch.searchsorted(cq, torch.tensor([q0, q1])).tolist()
        return cl[s:e], cq[s:e], ck[s:e]

    order = torch.argsort(cq, stable=True)
    cl, cq, ck = cl[order], cq[order], ck[order]

    def classify(b, h, qb, kb):
        return torch.where(allv[b * Hm + h, qb, kb], RULE, EVAL), None

    def mask_fn(b, h, q, kv):
        return m4[b, h, q, kv]

    return BlockMask._build(Nq, Nk, (BM, BN), win, Bm, Hm, device=dev, candidates=candidates,
                            classify=classify, tile_fn=mask_fn_tiles(mask_fn, Nq, Nk, BM, BN))
