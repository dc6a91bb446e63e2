"""Internal: turns a token rule into BlockMask block lists, blockwise and in chunks.

A pattern is described to `build` by
    window     the analytic token rule W = (left, right) of fastattn.masking (may be (-1, -1));
    tile_fn    P, the rest of the rule, evaluated on whole tiles: tile_fn(b, h, qb, kb) for E
               blocks returns bool (E, BLOCK_M, BLOCK_N); None means P = True;
    candidates the blocks that may hold a visible token, per chunk of query blocks
               (default: all of them), so band patterns never enumerate NQB x NKB blocks;
    classify   an optional analytic shortcut per block: EMPTY (no visible token), RULE (P is
               True on every in-range token where W is, so the block is W restricted to it)
               or EVAL (evaluate P), plus an optional integer key: interior blocks of equal
               key have equal P tiles, so P is evaluated once per key (and window position).
A token (i, j) is visible iff W(i, j) and P(i, j). Blocks become FULL (every in-range token
visible), PARTIAL with mask id -1 (visible set == W on the block), PARTIAL with a stored
bitmask (P on the block, out-of-range tokens zeroed, identical bitmasks stored once) or are
dropped (nothing visible).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..masking import window_visible

EMPTY, RULE, EVAL = 0, 1, 2

# Work sizes: candidate pairs per chunk of query blocks, tile elements per evaluation.
_PAIRS_PER_CHUNK = 1 << 20
_TILE_ELEMS = 1 << 22


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Coo:
    """Visited blocks as flat int32 lists sorted by (layout, qb, kb); mid -1 = no bitmask.
    (int32 halves the memory of masks with tens of millions of blocks; keys are int64.)"""

    lay: torch.Tensor
    qb: torch.Tensor
    kb: torch.Tensor
    full: torch.Tensor  # bool
    mid: torch.Tensor

    @staticmethod
    def empty(device="cpu") -> Coo:
        z = torch.zeros(0, dtype=torch.int32, device=device)
        return Coo(z, z, z, z.bool(), z)

    @staticmethod
    def make(lay, qb, kb, full, mid) -> Coo:
        i32 = lambda t: t.to(torch.int32)
        return Coo(i32(lay), i32(qb), i32(kb), full.bool(), i32(mid))

    def __len__(self) -> int:
        return self.lay.numel()

    def select(self, sel) -> Coo:
        return Coo(self.lay[sel], self.qb[sel], self.kb[sel], self.full[sel], self.mid[sel])

    def sorted(self, NQB: int, NKB: int) -> Coo:
        keys = self.keys(NQB, NKB)
        if keys.numel() < 2 or bool((keys[1:] > keys[:-1]).all()):
            return self  # already in order (band builders emit blocks in order)
        return self.select(torch.argsort(keys))

    def keys(self, NQB: int, NKB: int) -> torch.Tensor:
        return (self.lay.long() * NQB + self.qb) * NKB + self.kb

    @staticmethod
    def cat(parts) -> Coo:
        if not parts:
            return Coo.empty()
        return Coo(*(torch.cat([getattr(p, f) for p in parts]) for f in
                     ("lay", "qb", "kb", "full", "mid")))


def tile_bounds(qb, kb, Nq, Nk, BM, BN):
    """In-range token bounds of blocks, inclusive: rows i0..i1, columns j0..j1."""
    i0 = qb * BM
    j0 = kb * BN
    i1 = torch.clamp(i0 + BM, max=Nq) - 1
    j1 = torch.clamp(j0 + BN, max=Nk) - 1
    return i0, i1, j0, j1


def delta_range(qb, kb, Nq, Nk, BM, BN):
    """Range of delta = j - (i + Nk - Nq) over the in-range tokens of each block, and d0, the
    delta of the block's top-left corner (which fixes W's tile on interior blocks)."""
    i0, i1, j0, j1 = tile_bounds(qb, kb, Nq, Nk, BM, BN)
    off = Nk - Nq
    return j0 - i1 - off, j1 - i0 - off, j0 - i0 - off


def window_class(qb, kb, Nq, Nk, BM, BN, window):
    """Per block: W holds on every in-range token (wfull) / on none (wempty)."""
    left, right = window
    dmin, dmax, _ = delta_range(qb, kb, Nq, Nk, BM, BN)
    wfull = torch.ones_like(qb, dtype=torch.bool)
    wempty = torch.zeros_like(qb, dtype=torch.bool)
    if left != -1:
        wfull &= dmin >= -left
        wempty |= dmax < -left
    if right != -1:
        wfull &= dmax <= right
        wempty |= dmin > right
    return wfull, wempty


def band_kb_range(qb, Nq, Nk, BM, BN, left, right):
    """Key blocks [lo, hi] (inclusive, lo > hi if none) that W = (left, right) touches for
    query blocks qb."""
    off = Nk - Nq
    i0 = qb * BM
    i1 = torch.clamp(i0 + BM, max=Nq) - 1
    jlo = torch.zeros_like(qb) if left == -1 else torch.clamp(i0 + off - left, min=0)
    jhi = torch.full_like(qb, Nk - 1) if right == -1 else torch.clamp(i1 + off + right, max=Nk - 1)
    lo = jlo // BN
    hi = torch.where(jhi >= jlo, jhi // BN, lo - 1)
    return lo, hi


def expand_ranges(lay, qb, lo, hi):
    """(lay, qb, [lo, hi]) rows -> flat (lay, qb, kb) for every kb in each range."""
    n = torch.clamp(hi - lo + 1, min=0)
    total = int(n.sum())
    if total == 0:
        z = torch.zeros(0, dtype=torch.long)
        return z, z, z
    start = torch.cumsum(n, 0) - n
    rep = torch.repeat_interleave(torch.arange(len(n)), n)
    kb = lo[rep] + (torch.arange(total) - start[rep])
    return lay[rep], qb[rep], kb


def unique_blocks(NQB, NKB, *parts):
    """Union of (lay, qb, kb) lists, deduplicated and sorted."""
    lay = torch.cat([p[0] for p in parts])
    qb = torch.cat([p[1] for p in parts])
    kb = torch.cat([p[2] for p in parts])
    key = torch.unique((lay * NQB + qb) * NKB + kb)
    return key // (NQB * NKB), (key // NKB) % NQB, key % NKB


def band_candidates(q0, q1, L, Nq, Nk, BM, BN, left, right):
    """Blocks of query blocks [q0, q1) touched by W = (left, right), for all L layouts."""
    qb = torch.arange(q0, q1).repeat(L)
    lay = torch.arange(L).repeat_interleave(q1 - q0)
    lo, hi = band_kb_range(qb, Nq, Nk, BM, BN, left, right)
    return expand_ranges(lay, qb, lo, hi)


def tile_token_indices(qb, kb, BM, BN, Nq, Nk):
    """Token indices of E blocks: q_idx (E, BM, 1), kv_idx (E, 1, BN) clamped into range (so
    predicates may index tensors with them) and the in-range mask (E, BM, BN)."""
    q = qb.view(-1, 1, 1) * BM + torch.arange(BM).view(1, -1, 1)
    kv = kb.view(-1, 1, 1) * BN + torch.arange(BN).view(1, 1, -1)
    inrange = (q < Nq) & (kv < Nk)
    return q.clamp(max=max(Nq - 1, 0)), kv.clamp(max=max(Nk - 1, 0)), inrange


def window_tiles(qb, kb, BM, BN, Nq, Nk, window):
    """W restricted to the in-range tokens of E blocks: bool (E, BM, BN)."""
    q, kv, inrange = tile_token_indices(qb, kb, BM, BN, Nq, Nk)
    return window_visible(q, kv, Nq, Nk, *window) & inrange


def mask_fn_tiles(fn, Nq, Nk, BM, BN):
    """Adapts a vectorized predicate fn(b, h, q_idx, kv_idx) -> bool to a tile_fn."""

    def tile_fn(b, h, qb, kb):
        q, kv, inrange = tile_token_indices(qb, kb, BM, BN, Nq, Nk)
        out = fn(b.view(-1, 1, 1), h.view(-1, 1, 1), q, kv)
        if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
            raise TypeError(
                f"mask_fn must return a bool tensor, got "
                f"{out.dtype if isinstance(out, torch.Tensor) else type(out).__name__}")
        return torch.broadcast_to(out, inrange.shape) & inrange

    return tile_fn


class MaskStore:
    """Distinct (BLOCK_M, BLOCK_N) bitmasks, each stored once; add() returns their ids."""

    def __init__(self, BM: int, BN: int):
        self.BM, self.BN = BM, BN
        self.ids: dict[bytes, int] = {}
        self.tiles: list[torch.Tensor] = []

    def add(self, tiles: torch.Tensor) -> torch.Tensor:
        if tiles.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long)
        packed = np.packbits(tiles.reshape(tiles.shape[0], -1).numpy(), axis=1)
        uniq, first, inv = np.unique(packed, axis=0, return_index=True, return_inverse=True)
        uid = torch.empty(len(uniq), dtype=torch.long)
        for u in range(len(uniq)):
            key = uniq[u].tobytes()
            mid = self.ids.get(key)
            if mid is None:
                mid = self.ids[key] = len(self.tiles)
                self.tiles.append(tiles[int(first[u])].clone())
            uid[u] = mid
        return uid[torch.from_numpy(inv.reshape(-1))]

    def tensor(self) -> torch.Tensor:
        if not self.tiles:
            return torch.zeros((0, self.BM, self.BN), dtype=torch.bool)
        return torch.stack(self.tiles)


# Results of evaluating one block.
_DROP, _FULL, _WPART, _BITS = 0, 1, 2, 3


def _evaluate(b, h, qb, kb, wfull, key, tile_fn, store, Nq, Nk, BM, BN, window):
    """Evaluates P on EVAL blocks (once per group of equal key and window position).
    Returns per block its result (_DROP/_FULL/_WPART/_BITS) and mask id (-1 unless _BITS)."""
    E = qb.numel()
    NQB, NKB = cdiv(Nq, BM), cdiv(Nk, BN)
    ragged = ((qb == NQB - 1) & (Nq % BM != 0)) | ((kb == NKB - 1) & (Nk % BN != 0))
    if key is None:
        key = torch.full((E, 1), -1, dtype=torch.long)
    key = key.view(E, -1).clone()
    alone = (key[:, 0] < 0) | ragged  # evaluated on their own
    key[alone] = 0
    key[alone, 0] = -1 - torch.arange(E)[alone]
    _, _, d0 = delta_range(qb, kb, Nq, Nk, BM, BN)
    ctx = torch.where(wfull, torch.full_like(d0, Nq + Nk + BM + BN + 1), d0)
    _, inv = torch.unique(torch.cat([key, ctx[:, None]], 1), dim=0, return_inverse=True)
    G = int(inv.max()) + 1
    rep = torch.full((G,), E, dtype=torch.long).scatter_reduce(0, inv, torch.arange(E), "amin")
    res = torch.empty(G, dtype=torch.long)
    mid = torch.full((G,), -1, dtype=torch.long)
    step = max(1, _TILE_ELEMS // (BM * BN))
    no_window = tuple(window) == (-1, -1)

    def chunk(s):
        r = rep[s:s + step]
        _, _, inrange = tile_token_indices(qb[r], kb[r], BM, BN, Nq, Nk)
        P = tile_fn(b[r], h[r], qb[r], kb[r]) & inrange
        # W restricted to the in-range tokens (just those when there is no window rule)
        Wt = inrange if no_window else window_tiles(qb[r], kb[r], BM, BN, Nq, Nk, window)
        V = P if no_window else P & Wt
        anyv = V.flatten(1).any(1)
        eqw = (V == Wt).flatten(1).all(1)
        out = torch.where(eqw, torch.where(wfull[r], _FULL, _WPART), _BITS)
        out = torch.where(anyv, out, _DROP)
        return out, P[out == _BITS]

    starts = range(0, G, step)
    # Chunks run on a few threads when there are several (torch ops release the GIL); the
    # bitmasks join the store in chunk order, so mask ids do not depend on the threads.
    workers = min(_eval_threads(), len(starts))
    if workers > 1:
        with ThreadPoolExecutor(workers) as ex:
            results = ex.map(chunk, starts)
            for s, (out, bits_tiles) in zip(starts, results):
                _store_chunk(s, step, out, bits_tiles, res, mid, store)
    else:
        for s in starts:
            out, bits_tiles = chunk(s)
            _store_chunk(s, step, out, bits_tiles, res, mid, store)
    return res[inv], mid[inv]


def _eval_threads() -> int:
    return max(1, min(torch.get_num_threads(), 8))


def _store_chunk(s, step, out, bits_tiles, res, mid, store):
    m = torch.full_like(out, -1)
    m[out == _BITS] = store.add(bits_tiles)
    res[s:s + step] = out
    mid[s:s + step] = m


def build(Nq, Nk, BM, BN, window, Bm=1, Hm=1, *, candidates=None, classify=None,
          tile_fn=None, rows_per_chunk=None):
    """Returns (Coo sorted by (lay, qb, kb), partial_masks bool (P, BM, BN)), all on the CPU.

    candidates(q0, q1) -> (lay, qb, kb) int64 for query blocks in [q0, q1) (duplicates not
    allowed); classify(b, h, qb, kb) -> (codes int, key int64 (E,) / (E, k) or None)."""
    NQB, NKB, L = cdiv(Nq, BM), cdiv(Nk, BN), Bm * Hm
    store = MaskStore(BM, BN)
    if NQB == 0 or NKB == 0 or L == 0:
        return Coo.empty(), store.tensor()
    C = rows_per_chunk or max(1, _PAIRS_PER_CHUNK // (L * NKB))
    parts = []
    for q0 in range(0, NQB, C):
        q1 = min(NQB, q0 + C)
        if candidates is None:
            n = q1 - q0
            lay = torch.arange(L).repeat_interleave(n * NKB)
            qb = torch.arange(q0, q1).repeat_interleave(NKB).repeat(L)
            kb = torch.arange(NKB).repeat(L * n)
        else:
            lay, qb, kb = candidates(q0, q1)
        if lay.numel() == 0:
            continue
        if tuple(window) == (-1, -1):  # no window rule: every block in it, wholly
            wfull = torch.ones_like(qb, dtype=torch.bool)
        else:
            wfull, wempty = window_class(qb, kb, Nq, Nk, BM, BN, window)
            keep = ~wempty
            lay, qb, kb, wfull = lay[keep], qb[keep], kb[keep], wfull[keep]
        if L == 1:
            b = h = torch.zeros_like(qb)
        else:
            b, h = lay // Hm, lay % Hm
        key = None
        if tile_fn is None:
            code = torch.full_like(qb, RULE)
        elif classify is None:
            code = torch.full_like(qb, EVAL)
        else:
            code, key = classify(b, h, qb, kb)
            code = torch.as_tensor(code).expand_as(qb)
        res = torch.where(wfull, _FULL, _WPART)  # RULE blocks
        mid = torch.full_like(qb, -1)
        ev = (code == EVAL).nonzero().flatten()
        if ev.numel():
            k = None if key is None else key[ev]
            res[ev], mid[ev] = _evaluate(b[ev], h[ev], qb[ev], kb[ev], wfull[ev], k, tile_fn,
                                         store, Nq, Nk, BM, BN, window)
        res[code == EMPTY] = _DROP
        keep = res != _DROP
        parts.append(Coo.make(lay[keep], qb[keep], kb[keep], res[keep] == _FULL, mid[keep])
                     .sorted(NQB, NKB))
        del lay, qb, kb, res, mid, code, wfull, keep, b, h
    return Coo.cat(parts).sorted(NQB, NKB), store.tensor()


def _fill_ranges(R, starts, counts, K):
    """Rows of up to two ascending runs: starts/counts (2, R) -> indices int32 (R, K) with
    row r = [s0, s0 + 1, ..., s0 + c0 - 1, s1, ..., s1 + c1 - 1, 0 padding]."""
    s = torch.arange(K, dtype=torch.int32).view(1, K)
    s0, c0 = starts[0].view(R, 1).int(), counts[0].view(R, 1).int()
    s1, c1 = starts[1].view(R, 1).int(), counts[1].view(R, 1).int()
    idx = torch.where(s < c0, s0 + s, s1 + (s - c0))
    return torch.where(s < c0 + c1, idx, 0).contiguous()


def _band_runs(lo, hi, flo, fhi):
    """Block runs of one direction from the touched range [lo, hi] and the full range
    [flo, fhi] (both per row, monotone): partial = [lo, hi] minus [flo, fhi] (two runs),
    full = [flo, fhi] clipped to [lo, hi]."""
    flo, fhi = torch.maximum(flo, lo), torch.minimum(fhi, hi)
    has_full = flo <= fhi
    n = torch.clamp(hi - lo + 1, min=0)
    fn = torch.where(has_full, fhi - flo + 1, 0)
    # without full blocks the whole touched range is one partial run
    p0s, p0n = lo, torch.where(has_full, flo - lo, n)
    p1s, p1n = fhi + 1, torch.where(has_full, hi - fhi, 0)
    return (torch.stack([p0s, p1s]), torch.stack([p0n, p1n]),
            torch.stack([flo, flo]), torch.stack([fn, torch.zeros_like(fn)]))


def window_lists(Nq, Nk, BM, BN, window):
    """The 10 list tensors of the pure window rule W = (left, right), in closed form (no
    per-block enumeration): per query block the touched key blocks form one range, the full
    ones a sub-range; the transposed lists are the same for key blocks (the band is monotone)."""
    left, right = window
    NQB, NKB = cdiv(Nq, BM), cdiv(Nk, BN)
    off = Nk - Nq
    big = 1 << 40
    out = {}
    # forward: for query block qb, rows i0..i1
    qb = torch.arange(NQB)
    i0, i1 = qb * BM, torch.clamp(qb * BM + BM, max=Nq) - 1
    lo, hi = band_kb_range(qb, Nq, Nk, BM, BN, left, right)
    # full iff j0 >= i1 + off - left (all rows see the block's first column) and
    # j1 <= i0 + off + right (all rows see its last column)
    flo = torch.zeros_like(qb) if left == -1 else cdiv_t(i1 + off - left, BN)
    X = torch.full_like(qb, big) if right == -1 else i0 + off + right
    fhi = torch.where(X >= Nk - 1, NKB - 1, torch.div(X + 1, BN, rounding_mode="floor") - 1)
    fwd = _band_runs(lo, hi, flo, fhi)
    # backward: for key block kb, columns j0..j1; query block qb is touched iff its range holds kb
    kb = torch.arange(NKB)
    qlo = torch.searchsorted(hi.contiguous(), kb)  # first qb with hi >= kb
    qhi = torch.searchsorted(lo.contiguous(), kb, right=True) - 1  # last qb with lo <= kb
    fq = ((flo <= fhi) & (torch.maximum(flo, lo) <= torch.minimum(fhi, hi)))
    fl, fh = torch.maximum(flo, lo), torch.minimum(fhi, hi)
    # full rows for kb: fl <= kb <= fh with fl, fh monotone in qb
    fh_m = torch.where(fq, fh, -1)
    fl_m = torch.where(fq, fl, big)
    fqlo = torch.searchsorted(torch.cummax(fh_m, 0).values.contiguous(), kb)
    fqhi = torch.searchsorted(torch.cummin(fl_m.flip(0), 0).values.flip(0).contiguous(), kb,
                              right=True) - 1
    bwd = _band_runs(qlo, qhi, fqlo, fqhi)
    for prefix, R, (ps, pn, fs, fn) in (("kv", NQB, fwd), ("q", NKB, bwd)):
        K = max(1, int((pn.sum(0)).max()) if R else 1)
        KF = max(1, int((fn.sum(0)).max()) if R else 1)
        out[f"{prefix}_num_blocks"] = pn.sum(0).int().view(1, 1, R)
        out[f"{prefix}_indices"] = _fill_ranges(R, ps, pn, K).view(1, 1, R, K)
        out[f"full_{prefix}_num_blocks"] = fn.sum(0).int().view(1, 1, R)
        out[f"full_{prefix}_indices"] = _fill_ranges(R, fs, fn, KF).view(1, 1, R, KF)
        out[f"{prefix}_mask_ids"] = torch.full((1, 1, R, K), -1, dtype=torch.int32)
    return out


def cdiv_t(a, b: int):
    """ceil(a / b) for int tensors (any sign)."""
    return -torch.div(-a, b, rounding_mode="floor")
