"""BlockMask: the block-sparse layout every kernel family (cpu, triton, cuda) executes.

FORMAT (everything a kernel author needs)
-----------------------------------------
A BlockMask describes which (query, key) pairs may attend, for sequence lengths
(Nq, Nk), tiled into query blocks of BLOCK_M rows and key blocks of BLOCK_N columns:

    NQB = ceil(Nq / BLOCK_M),  NKB = ceil(Nk / BLOCK_N)

Layouts broadcast over (batch, head): every index tensor has leading dims (Bm, Hm) with
Bm in {1, B} and Hm in {1, Hq} (query heads). A kernel reads layout [b if Bm > 1 else 0,
h if Hm > 1 else 0].

Forward lists (per query block, the key blocks to visit), int32, contiguous:
    kv_num_blocks       (Bm, Hm, NQB)         number of PARTIAL key blocks of each query block
    kv_indices          (Bm, Hm, NQB, KMAX)   their key-block indices, ascending; entries past
                                              kv_num_blocks are padding (0) and never read
    full_kv_num_blocks  (Bm, Hm, NQB)         number of FULL key blocks
    full_kv_indices     (Bm, Hm, NQB, KMAXF)  their indices, ascending
    kv_mask_ids         (Bm, Hm, NQB, KMAX)   per partial block (aligned with kv_indices):
                                              index into partial_masks, or -1
Backward lists (per key block, the query blocks that visit it; the exact transpose):
    q_num_blocks, q_indices, full_q_num_blocks, full_q_indices, q_mask_ids
                        (Bm, Hm, NKB) and (Bm, Hm, NKB, QMAX[F]) likewise
Token rule for PARTIAL blocks:
    window = (left, right)  ints, bottom-right aligned with offset = Nk - Nq, -1 = unbounded
                            (see fastattn.masking): token (i, j) passes iff
                            (left == -1 or j >= i + offset - left) and
                            (right == -1 or j <= i + offset + right).
                            (-1, -1) = no analytic rule; causal = (-1, 0).
    partial_masks  bool (P, BLOCK_M, BLOCK_N): explicit bitmasks, shared by id (identical
                            blocks stored once); P may be 0.
    Token (i, j) inside partial block (qb, kb) with mask id `mid` is visible iff
        window rule(i, j) and (mid == -1 or partial_masks[mid, i - qb*BLOCK_M, j - kb*BLOCK_N]).
FULL blocks are visible for every in-range token: kernels apply no token mask there.
Blocks in neither list are never visited. Rows i >= Nq / columns j >= Nk of the last
blocks are out of range: kernels bound their loops, masks there are ignored.

Invariants (checked by validate()): partial and full lists are disjoint; transposed lists
are the exact transpose (including mask ids); a block is listed as full only if every
in-range token of it is visible.

`kernel_tensors()` returns the 11 tensors in the order the compiled kernels take them:
    [kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, kv_mask_ids,
     q_num_blocks,  q_indices,  full_q_num_blocks,  full_q_indices,  q_mask_ids,
     partial_masks (as uint8)]

Details this implementation adds (the format above is unchanged):
    - KMAX, KMAXF, QMAX, QMAXF are at least 1 (a row with no blocks still has one padding
      slot), so no index tensor has a zero-sized dimension; padding in *_mask_ids is -1.
    - Full blocks always lie inside the window rule (validate() checks it), so the visible
      set is exactly: window rule AND (full block, or partial block AND its bitmask).
    - Masks built by fastattn.sparse use mask id -1 whenever the window rule alone gives a
      partial block's visible set, and store bitmasks with out-of-range tokens zeroed.
"""

from __future__ import annotations

import torch

from .._validate import check_window
from ..kernel_mask import BlockLists, KernelMask
from ._builder import (
    EVAL,
    RULE,
    Coo,
    build,
    cdiv,
    delta_range,
    tile_bounds,
    tile_token_indices,
    window_class,
    window_lists,
    window_tiles,
)

_KEEP_COO = 1 << 22  # blocks; larger masks rebuild their flat block list on demand

_LIST_NAMES = BlockLists._fields[:-1]  # the int32 lists; partial_masks is last


def normalize_block_size(block_size) -> tuple[int, int]:
    """int or (BLOCK_M, BLOCK_N) -> (BLOCK_M, BLOCK_N), positive ints."""
    bs = (block_size, block_size) if isinstance(block_size, int) else block_size
    try:
        bm, bn = bs
    except (TypeError, ValueError):
        bm = bn = None
    if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in (bm, bn)):
        raise ValueError(
            f"block_size must be a positive int or a pair (BLOCK_M, BLOCK_N) of positive ints, "
            f"got {block_size!r}")
    return bm, bn


def intersect_windows(a, b) -> tuple[int, int]:
    """The window rule a AND b (-1 is unbounded)."""
    side = lambda x, y: y if x == -1 else (x if y == -1 else min(x, y))
    return side(a[0], b[0]), side(a[1], b[1])


def hull_windows(a, b) -> tuple[int, int]:
    """The window rule a OR b: both intervals of delta contain 0, so their union is one."""
    side = lambda x, y: -1 if -1 in (x, y) else max(x, y)
    return side(a[0], b[0]), side(a[1], b[1])


def _pack_lists(L, R, lay, row, col, mid):
    """Flat entries sorted by (lay, row, col) -> counts (L*R,), indices and mask ids (L*R, K)."""
    flat = lay * R + row
    counts = torch.bincount(flat, minlength=L * R)
    K = max(1, int(counts.max()) if counts.numel() else 0)
    pos = torch.arange(flat.numel()) - (torch.cumsum(counts, 0) - counts)[flat]
    idx = torch.zeros(L * R, K, dtype=torch.int32)
    mids = torch.full((L * R, K), -1, dtype=torch.int32)
    idx[flat, pos] = col.to(torch.int32)
    mids[flat, pos] = mid.to(torch.int32)
    return counts.to(torch.int32), idx, mids


def _lists_from_coo(coo: Coo, Bm, Hm, NQB, NKB):
    """The 10 list tensors (CPU, int32, contiguous) of sorted block entries."""
    L = Bm * Hm
    out = {}
    for prefix, R in (("kv", NQB), ("q", NKB)):
        if prefix == "kv":
            c = coo
            row, col = c.qb, c.kb
        else:
            # stable sort by (layout, kb) keeps qb ascending inside each key block's row
            key = coo.kb if L == 1 else coo.lay.long() * NKB + coo.kb
            c = coo.select(torch.sort(key, stable=True).indices)
            row, col = c.kb, c.qb
        p, f = ~c.full, c.full
        num, idx, mids = _pack_lists(L, R, c.lay[p], row[p], col[p], c.mid[p])
        fnum, fidx, _ = _pack_lists(L, R, c.lay[f], row[f], col[f], c.mid[f])
        out[f"{prefix}_num_blocks"] = num.view(Bm, Hm, R)
        out[f"{prefix}_indices"] = idx.view(Bm, Hm, R, idx.shape[1])
        out[f"full_{prefix}_num_blocks"] = fnum.view(Bm, Hm, R)
        out[f"full_{prefix}_indices"] = fidx.view(Bm, Hm, R, fidx.shape[1])
        out[f"{prefix}_mask_ids"] = mids.view(Bm, Hm, R, mids.shape[1])
    return out


def _coo_from_lists(num, idx, fnum, fidx, mids, transposed=False):
    """List tensors (Bm, Hm, R[, K]) -> Coo sorted by (lay, qb, kb), on the CPU. Assumes the
    counts are in range (validate() checks that first)."""
    Bm, Hm, R = num.shape
    L = Bm * Hm
    parts = []
    for n, ix, m, full in ((num, idx, mids, False), (fnum, fidx, None, True)):
        n = n.reshape(L, R).long().cpu()
        ix = ix.reshape(L, R, ix.shape[-1]).long().cpu()
        valid = torch.arange(ix.shape[-1]) < n[..., None]
        lay, r, s = valid.nonzero(as_tuple=True)
        c = ix[lay, r, s]
        mid = torch.full_like(c, -1) if m is None else m.reshape(L, R, m.shape[-1]).long().cpu()[lay, r, s]
        row, col = (c, r) if transposed else (r, c)
        parts.append(Coo.make(lay, row, col, torch.full_like(c, full, dtype=torch.bool), mid))
    return Coo.cat(parts)


class BlockMask:
    """A block-sparse attention layout (format: see the module docstring).

    Build one with the pattern constructors of fastattn.sparse (causal, sliding_window, ...,
    from_mask_fn, from_dense), with BlockMask.from_kv_blocks (explicit forward lists) or
    BlockMask.from_block_layout (a boolean block grid). Attributes: seq_lengths (Nq, Nk),
    BLOCK_M, BLOCK_N, window (left, right), partial_masks and the 10 list tensors.
    """

    def __init__(self, *, seq_lengths, block_size, kv_num_blocks, kv_indices,
                 full_kv_num_blocks, full_kv_indices, kv_mask_ids, q_num_blocks, q_indices,
                 full_q_num_blocks, full_q_indices, q_mask_ids, partial_masks, window=(-1, -1),
                 validate=True):
        self.seq_lengths = tuple(int(n) for n in seq_lengths)
        self.BLOCK_M, self.BLOCK_N = normalize_block_size(block_size)
        self.window = check_window(window)
        self.kv_num_blocks, self.kv_indices = kv_num_blocks, kv_indices
        self.full_kv_num_blocks, self.full_kv_indices = full_kv_num_blocks, full_kv_indices
        self.kv_mask_ids = kv_mask_ids
        self.q_num_blocks, self.q_indices = q_num_blocks, q_indices
        self.full_q_num_blocks, self.full_q_indices = full_q_num_blocks, full_q_indices
        self.q_mask_ids = q_mask_ids
        self.partial_masks = partial_masks
        self._coo = None  # CPU Coo, computed on demand
        self._kernel_mask = None
        self._device_cache = {}
        self._window_cache = {}
        self._density = None
        self._pure_window = False  # lists are exactly the window rule's band (no bitmasks)
        if validate:
            self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def _from_coo(cls, coo: Coo, partial_masks, *, Nq, Nk, block_size, window, Bm, Hm,
                  device=None):
        BM, BN = block_size
        lists = _lists_from_coo(coo, Bm, Hm, cdiv(Nq, BM), cdiv(Nk, BN))
        bm = cls(seq_lengths=(Nq, Nk), block_size=(BM, BN), partial_masks=partial_masks,
                 window=window, validate=False, **lists)
        if len(coo) <= _KEEP_COO:
            bm._coo = coo  # else recomputed from the lists if ever needed
        return bm if device is None else bm.to(device)

    @classmethod
    def _build(cls, Nq, Nk, block_size, window=(-1, -1), Bm=1, Hm=1, device=None, **kw):
        """The general builder every pattern uses (see fastattn.sparse._builder.build)."""
        BM, BN = normalize_block_size(block_size)
        window = check_window(window)
        coo, masks = build(Nq, Nk, BM, BN, window, Bm, Hm, **kw)
        return cls._from_coo(coo, masks, Nq=Nq, Nk=Nk, block_size=(BM, BN), window=window,
                             Bm=Bm, Hm=Hm, device=device)

    @classmethod
    def _window_only(cls, Nq, Nk, block_size, window, device=None):
        """The pure window rule: lists in closed form (no per-block enumeration), so that
        e.g. causal over 1M tokens costs little more than its output."""
        BM, BN = normalize_block_size(block_size)
        window = check_window(window)
        if Nq == 0 or Nk == 0:
            bm = cls._build(Nq, Nk, (BM, BN), window)
        else:
            bm = cls(seq_lengths=(Nq, Nk), block_size=(BM, BN), window=window, validate=False,
                     partial_masks=torch.zeros((0, BM, BN), dtype=torch.bool),
                     **window_lists(Nq, Nk, BM, BN, window))
        bm._pure_window = True
        return bm if device is None else bm.to(device)

    @classmethod
    def from_kv_blocks(cls, kv_num_blocks, kv_indices, full_kv_num_blocks=None,
                       full_kv_indices=None, kv_mask_ids=None, partial_masks=None, *,
                       seq_lengths, block_size=(128, 128), window=(-1, -1)):
        """From the forward lists alone (shapes as in the format; (NQB,) / (NQB, K) are read
        as one shared layout). Missing full lists mean none; missing kv_mask_ids mean -1
        (window rule only). The transposed lists are computed; the result is validated."""
        BM, BN = normalize_block_size(block_size)
        Nq, Nk = (int(n) for n in seq_lengths)
        NQB = cdiv(Nq, BM)

        def lead(t, name, nd):
            t = torch.as_tensor(t)
            if t.ndim == nd - 2:
                t = t.view(1, 1, *t.shape)
            if t.ndim != nd:
                raise ValueError(f"{name} must be {nd}-D (Bm, Hm, NQB{', K' if nd == 4 else ''})"
                                 f", got shape {tuple(t.shape)}")
            return t.to(torch.int32).contiguous()

        num = lead(kv_num_blocks, "kv_num_blocks", 3)
        idx = lead(kv_indices, "kv_indices", 4)
        Bm, Hm = num.shape[:2]
        if full_kv_num_blocks is None:
            fnum = torch.zeros_like(num)
            fidx = torch.zeros((Bm, Hm, num.shape[2], 1), dtype=torch.int32)
        else:
            fnum = lead(full_kv_num_blocks, "full_kv_num_blocks", 3)
            fidx = lead(full_kv_indices, "full_kv_indices", 4)
        mids = (torch.full_like(idx, -1) if kv_mask_ids is None
                else lead(kv_mask_ids, "kv_mask_ids", 4))
        if partial_masks is None:
            partial_masks = torch.zeros((0, BM, BN), dtype=torch.bool)
        window = check_window(window)
        # Check the forward half first so that transposing cannot fail on garbage.
        probe = cls(seq_lengths=(Nq, Nk), block_size=(BM, BN), partial_masks=partial_masks,
                    window=window, validate=False, kv_num_blocks=num, kv_indices=idx,
                    full_kv_num_blocks=fnum, full_kv_indices=fidx, kv_mask_ids=mids,
                    q_num_blocks=None, q_indices=None, full_q_num_blocks=None,
                    full_q_indices=None, q_mask_ids=None)
        probe._validate_forward(NQB)
        coo = _coo_from_lists(num, idx, fnum, fidx, mids).sorted(NQB, cdiv(Nk, BN))
        bm = cls._from_coo(coo, partial_masks.bool().cpu(), Nq=Nq, Nk=Nk, block_size=(BM, BN),
                           window=window, Bm=Bm, Hm=Hm)
        bm.validate()
        return bm

    @classmethod
    def from_block_layout(cls, layout, Nq, Nk, block_size=(128, 128), window=(-1, -1),
                          device=None):
        """From a bool block grid (NQB, NKB) or (Bm, Hm, NQB, NKB): True blocks are visited and
        their tokens follow the window rule (full where the rule covers the block)."""
        BM, BN = normalize_block_size(block_size)
        layout = torch.as_tensor(layout).cpu()
        if layout.ndim == 2:
            layout = layout[None, None]
        NQB, NKB = cdiv(Nq, BM), cdiv(Nk, BN)
        if layout.ndim != 4 or tuple(layout.shape[2:]) != (NQB, NKB):
            raise ValueError(
                f"layout must have shape (NQB, NKB) or (Bm, Hm, NQB, NKB) with NQB = "
                f"ceil(Nq / BLOCK_M) = {NQB} and NKB = ceil(Nk / BLOCK_N) = {NKB}, got "
                f"{tuple(layout.shape)}")
        Bm, Hm = layout.shape[:2]
        lay, qb, kb = layout.reshape(Bm * Hm, NQB, NKB).bool().nonzero(as_tuple=True)

        def candidates(q0, q1):
            sel = (qb >= q0) & (qb < q1)
            return lay[sel], qb[sel], kb[sel]

        return cls._build(Nq, Nk, (BM, BN), window, Bm, Hm, device=device,
                          candidates=candidates, rows_per_chunk=max(1, NQB))

    # ------------------------------------------------------------------ basic properties
    @property
    def Nq(self) -> int:
        return self.seq_lengths[0]

    @property
    def Nk(self) -> int:
        return self.seq_lengths[1]

    @property
    def block_size(self) -> tuple[int, int]:
        return (self.BLOCK_M, self.BLOCK_N)

    @property
    def num_q_blocks(self) -> int:
        return cdiv(self.Nq, self.BLOCK_M)

    @property
    def num_kv_blocks(self) -> int:
        return cdiv(self.Nk, self.BLOCK_N)

    @property
    def Bm(self) -> int:
        return self.kv_num_blocks.shape[0]

    @property
    def Hm(self) -> int:
        return self.kv_num_blocks.shape[1]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(Bm, Hm, Nq, Nk), the shape of to_dense()."""
        return (self.Bm, self.Hm, self.Nq, self.Nk)

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    def coo(self) -> Coo:
        """Visited blocks as flat CPU lists sorted by (layout, qb, kb) (layout = b * Hm + h)."""
        if self._coo is None:
            self._coo = _coo_from_lists(
                self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks,
                self.full_kv_indices, self.kv_mask_ids).sorted(self.num_q_blocks,
                                                                self.num_kv_blocks)
        return self._coo

    @property
    def num_visited_blocks(self) -> int:
        """Visited (full + partial) blocks summed over the stored Bm * Hm layouts; a layout
        shared by H heads (Hm = 1) is counted once."""
        return int(self.kv_num_blocks.sum()) + int(self.full_kv_num_blocks.sum())

    @property
    def block_density(self) -> float:
        """Fraction of the NQB * NKB blocks visited, averaged over layouts."""
        total = self.Bm * self.Hm * self.num_q_blocks * self.num_kv_blocks
        return self.num_visited_blocks / total if total else 0.0

    def sparsity(self) -> float:
        """Percentage of blocks skipped (100 * (1 - block_density)), as FlexAttention's."""
        return 100.0 * (1.0 - self.block_density)

    @property
    def density(self) -> float:
        """Fraction of the Nq * Nk (query, key) pairs visible, averaged over layouts."""
        if self._density is None:
            self._density = self._count_visible() / max(1, self.Bm * self.Hm * self.Nq * self.Nk)
        return self._density

    def _count_visible(self) -> int:
        coo, (Nq, Nk), (BM, BN) = self.coo(), self.seq_lengths, self.block_size
        i0, i1, j0, j1 = tile_bounds(coo.qb, coo.kb, Nq, Nk, BM, BN)
        total = int(((i1 - i0 + 1) * (j1 - j0 + 1))[coo.full].sum())
        # Partial blocks following the window rule: count per row analytically.
        left, right = self.window
        sel = (~coo.full & (coo.mid < 0)).nonzero().flatten()
        for s in range(0, sel.numel(), 1 << 14):
            e = sel[s:s + (1 << 14)]
            i = i0[e, None] + torch.arange(BM)  # (E, BM)
            p = i + (Nk - Nq)
            lo = j0[e, None] if left == -1 else torch.maximum(j0[e, None], p - left)
            hi = j1[e, None] if right == -1 else torch.minimum(j1[e, None], p + right)
            total += int(((hi - lo + 1).clamp(min=0) * (i <= i1[e, None])).sum())
        sel = (coo.mid >= 0).nonzero().flatten()
        masks = self.partial_masks.cpu()
        step = max(1, (1 << 22) // (BM * BN))
        for s in range(0, sel.numel(), step):
            e = sel[s:s + step]
            t = window_tiles(coo.qb[e], coo.kb[e], BM, BN, Nq, Nk, self.window)
            total += int((t & masks[coo.mid[e]]).sum())
        return total

    # ------------------------------------------------------------------ views
    def to_dense(self) -> torch.Tensor:
        """The mask kernels compute: bool (Bm, Hm, Nq, Nk), True = visible."""
        coo, (Nq, Nk), (BM, BN) = self.coo(), self.seq_lengths, self.block_size
        NQB, NKB, L = self.num_q_blocks, self.num_kv_blocks, self.Bm * self.Hm
        tiles = torch.zeros((L, NQB, NKB, BM, BN), dtype=torch.bool)
        f = coo.full
        tiles[coo.lay[f], coo.qb[f], coo.kb[f]] = True
        part = (~f).nonzero().flatten()
        masks = self.partial_masks.cpu()
        step = max(1, (1 << 22) // (BM * BN))
        for s in range(0, part.numel(), step):
            e = part[s:s + step]
            t = window_tiles(coo.qb[e], coo.kb[e], BM, BN, Nq, Nk, self.window)
            mid = coo.mid[e]
            has = mid >= 0
            t[has] &= masks[mid[has]]
            tiles[coo.lay[e], coo.qb[e], coo.kb[e]] = t
        dense = tiles.permute(0, 1, 3, 2, 4).reshape(L, NQB * BM, NKB * BN)[:, :Nq, :Nk]
        return dense.reshape(self.Bm, self.Hm, Nq, Nk).to(self.device)

    def _block_grid(self, lay=0, rows=None, cols=None) -> torch.Tensor:
        """Block states of layout lay: int8 (rows, cols), 0 empty, 1 partial, 2 full."""
        coo = self.coo()
        rows = self.num_q_blocks if rows is None else rows
        cols = self.num_kv_blocks if cols is None else cols
        sel = (coo.lay == lay) & (coo.qb < rows) & (coo.kb < cols)
        grid = torch.zeros((rows, cols), dtype=torch.int8)
        grid[coo.qb[sel], coo.kb[sel]] = torch.where(coo.full[sel], 2, 1).to(torch.int8)
        return grid

    def __repr__(self) -> str:
        return (f"BlockMask(Nq={self.Nq}, Nk={self.Nk}, block_size=({self.BLOCK_M}, "
                f"{self.BLOCK_N}), layouts=(Bm={self.Bm}, Hm={self.Hm}), window={self.window}, "
                f"blocks={self.num_visited_blocks}/{self.Bm * self.Hm * self.num_q_blocks * self.num_kv_blocks}"
                f" ({100 * self.block_density:.1f}%), partial_masks={self.partial_masks.shape[0]}"
                f", device={self.device})")

    _GLYPHS = (".", "+", "#")  # empty, partial, full

    def to_string(self, max_blocks: int = 64, b: int = 0, h: int = 0) -> str:
        """Text picture of layout (b, h): one character per block, rows = query blocks.
        '#' full, '+' partial (token-masked), '.' skipped. At most max_blocks per side."""
        lay = min(b, self.Bm - 1) * self.Hm + min(h, self.Hm - 1)
        rows, cols = min(self.num_q_blocks, max_blocks), min(self.num_kv_blocks, max_blocks)
        grid = self._block_grid(lay, rows, cols)
        lines = [f"{self!r}", f"layout (b={b}, h={h}): rows = {self.num_q_blocks} query blocks, "
                 f"columns = {self.num_kv_blocks} key blocks; '#' full, '+' partial, '.' skipped"]
        for r in range(rows):
            line = "".join(self._GLYPHS[v] for v in grid[r].tolist())
            lines.append(line + (" ..." if cols < self.num_kv_blocks else ""))
        if rows < self.num_q_blocks:
            lines.append(f"... ({self.num_q_blocks - rows} more query blocks)")
        return "\n".join(lines)

    def plot(self, path=None, b: int = 0, h: int = 0, max_pixels: int = 1024):
        """Picture of layout (b, h)'s blocks (white skipped, light partial, dark full) drawn
        with matplotlib's Agg canvas (no pyplot state). Grids larger than max_pixels per side
        are pooled (a pixel shows the densest block it covers). Saves a PNG and returns path
        when path is given, else returns the matplotlib Figure."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure

        lay = min(b, self.Bm - 1) * self.Hm + min(h, self.Hm - 1)
        NQB, NKB = self.num_q_blocks, self.num_kv_blocks
        fq, fk = cdiv(max(NQB, 1), max_pixels), cdiv(max(NKB, 1), max_pixels)
        coo = self.coo()
        sel = coo.lay == lay
        grid = torch.zeros((cdiv(NQB, fq), cdiv(NKB, fk)), dtype=torch.int8)
        flat = (coo.qb[sel].long() // fq) * grid.shape[1] + coo.kb[sel].long() // fk
        vals = torch.where(coo.full[sel], 2, 1).to(torch.int8)
        grid.view(-1).scatter_reduce_(0, flat, vals, "amax")
        fig = Figure(figsize=(6, 6 * max(grid.shape[0], 1) / max(grid.shape[1], 1) + 0.6))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.imshow(grid.numpy(), cmap=ListedColormap(["white", "#9ecae1", "#08519c"]),
                  vmin=0, vmax=2, interpolation="nearest", aspect="auto")
        ax.set_xlabel(f"key block (x{fk})" if fk > 1 else "key block")
        ax.set_ylabel(f"query block (x{fq})" if fq > 1 else "query block")
        ax.set_title(f"Nq={self.Nq} Nk={self.Nk} block {self.BLOCK_M}x{self.BLOCK_N} "
                     f"layout ({b},{h}): {100 * self.block_density:.1f}% blocks", fontsize=9)
        if path is None:
            return fig
        fig.savefig(path, format="png", dpi=100)
        return path

    # ------------------------------------------------------------------ checks
    def validate_for(self, B: int, H: int, Nq: int, Nk: int) -> None:
        """Raises ValueError naming block_mask unless it fits q (B, H, Nq, D), k (B, ., Nk, D)."""
        if (self.Nq, self.Nk) != (Nq, Nk):
            raise ValueError(
                f"block_mask was built for Nq={self.Nq}, Nk={self.Nk} but the inputs have "
                f"Nq={Nq} (q.shape[2]) and Nk={Nk} (k.shape[2]); build it with Nq={Nq}, "
                f"Nk={Nk} (e.g. fastattn.sparse.causal({Nq}, {Nk}))")
        if self.Bm not in (1, B):
            raise ValueError(
                f"block_mask has per-batch layouts for batch size {self.Bm} but the inputs have "
                f"batch size {B}; build it with B={B} (or one layout shared by the batch)")
        if self.Hm not in (1, H):
            raise ValueError(
                f"block_mask has per-head layouts for {self.Hm} heads but the inputs have {H} "
                f"query heads; build it with H={H} (or one layout shared by all heads)")

    def _fail(self, msg):
        raise ValueError(f"invalid BlockMask (Nq={self.Nq}, Nk={self.Nk}, block_size="
                         f"{self.block_size}): {msg}")

    def _check_lists(self, prefix, R, C, lead=None):
        """Checks one direction's 5 tensors: shapes, dtypes, counts, ascending in-range indices,
        disjoint partial/full lists and mask ids."""
        names = [f"{prefix}_num_blocks", f"{prefix}_indices", f"full_{prefix}_num_blocks",
                 f"full_{prefix}_indices", f"{prefix}_mask_ids"]
        ts = [getattr(self, n) for n in names]
        for n, t in zip(names, ts, strict=True):
            if not isinstance(t, torch.Tensor):
                self._fail(f"{n} must be a tensor, got {type(t).__name__}")
            if t.dtype != torch.int32 or not t.is_contiguous():
                self._fail(f"{n} must be a contiguous int32 tensor, got {t.dtype}"
                           f"{'' if t.is_contiguous() else ', non-contiguous'}")
            if t.device != self.kv_num_blocks.device:
                self._fail(f"{n} is on {t.device}, kv_num_blocks on {self.kv_num_blocks.device}")
        num, idx, fnum, fidx, mids = ts
        lead = lead or tuple(num.shape[:2])
        what = "NQB = ceil(Nq / BLOCK_M)" if prefix == "kv" else "NKB = ceil(Nk / BLOCK_N)"
        for n, t, nd in zip(names, ts, (3, 4, 3, 4, 4), strict=True):
            if t.ndim != nd or tuple(t.shape[:2]) != lead or t.shape[2] != R or min(lead) < 1:
                self._fail(f"{n} must have shape ({lead[0]}, {lead[1]}, {R}{', K' if nd == 4 else ''}"
                           f") (Bm, Hm, {what}), got {tuple(t.shape)}")
        if mids.shape != idx.shape:
            self._fail(f"{names[4]} must have the shape of {names[1]} {tuple(idx.shape)}, got "
                       f"{tuple(mids.shape)}")
        P = self.partial_masks.shape[0]
        listed = []  # flat keys row * C + col of the partial, then the full entries
        for n_name, i_name, n, ix, m in ((names[0], names[1], num, idx, mids),
                                          (names[2], names[3], fnum, fidx, None)):
            n, ix = n.cpu().long(), ix.cpu().long()
            K = ix.shape[-1]
            if bool(((n < 0) | (n > K)).any()):
                bad = ((n < 0) | (n > K)).nonzero()[0].tolist()
                self._fail(f"{n_name}{bad} = {int(n[tuple(bad)])} is outside [0, {K}] "
                           f"({i_name} has room for {K} entries)")
            valid = torch.arange(K) < n[..., None]
            if bool((valid & ((ix < 0) | (ix >= C))).any()):
                bad = (valid & ((ix < 0) | (ix >= C))).nonzero()[0].tolist()
                self._fail(f"{i_name}{bad} = {int(ix[tuple(bad)])} is not a block index in "
                           f"[0, {C})")
            pairs = valid[..., 1:] & (ix[..., 1:] <= ix[..., :-1])
            if bool(pairs.any()):
                bad = pairs.nonzero()[0].tolist()
                self._fail(f"{i_name}{bad[:3]} is not strictly ascending: "
                           f"{ix[tuple(bad[:3])][: int(n[tuple(bad[:3])])].tolist()}")
            if m is not None:
                m = m.cpu().long()
                if bool((valid & ((m < -1) | (m >= P))).any()):
                    bad = (valid & ((m < -1) | (m >= P))).nonzero()[0].tolist()
                    self._fail(f"{names[4]}{bad} = {int(m[tuple(bad)])} is not -1 or an index "
                               f"into partial_masks (P = {P})")
            rows, slots = valid.reshape(-1, K).nonzero(as_tuple=True)
            listed.append(rows * C + ix.reshape(-1, K)[rows, slots])
        both = listed[1][torch.isin(listed[1], listed[0])]
        if both.numel():
            r, c = divmod(int(both[0]), C)
            Hm, Rr = lead[1], R
            self._fail(f"block {c} is listed both as partial and as full in row "
                       f"[{r // (Hm * Rr)}, {(r // Rr) % Hm}, {r % Rr}] of {names[1]} and "
                       f"{names[3]}; the lists must be disjoint")

    def _validate_forward(self, NQB):
        if not (isinstance(self.partial_masks, torch.Tensor) and self.partial_masks.ndim == 3
                and self.partial_masks.dtype == torch.bool
                and tuple(self.partial_masks.shape[1:]) == self.block_size):
            got = (f"{self.partial_masks.dtype} {tuple(self.partial_masks.shape)}"
                   if isinstance(self.partial_masks, torch.Tensor)
                   else type(self.partial_masks).__name__)
            self._fail(f"partial_masks must be a bool tensor of shape (P, {self.BLOCK_M}, "
                       f"{self.BLOCK_N}), got {got}")
        if min(self.seq_lengths) < 0:
            self._fail("sequence lengths must be >= 0")
        self._check_lists("kv", NQB, self.num_kv_blocks)

    def validate(self) -> None:
        """Checks every invariant of the format; raises ValueError saying what is wrong."""
        self._validate_forward(self.num_q_blocks)
        lead = tuple(self.kv_num_blocks.shape[:2])
        self._check_lists("q", self.num_kv_blocks, self.num_q_blocks, lead)
        NQB, NKB = self.num_q_blocks, self.num_kv_blocks
        fwd = _coo_from_lists(self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks,
                              self.full_kv_indices, self.kv_mask_ids).sorted(NQB, NKB)
        bwd = _coo_from_lists(self.q_num_blocks, self.q_indices, self.full_q_num_blocks,
                              self.full_q_indices, self.q_mask_ids, transposed=True
                              ).sorted(NQB, NKB)
        same = len(fwd) == len(bwd) and all(
            torch.equal(getattr(fwd, f), getattr(bwd, f)) for f in ("lay", "qb", "kb", "full", "mid"))
        if not same:
            fk, bk = fwd.keys(NQB, NKB), bwd.keys(NQB, NKB)
            only_f = fk[~torch.isin(fk, bk)]
            only_b = bk[~torch.isin(bk, fk)]
            if only_f.numel() or only_b.numel():
                k = (only_f if only_f.numel() else only_b)[0].item()
                side = "forward (kv_*)" if only_f.numel() else "backward (q_*)"
                self._fail(f"the q_* lists are not the transpose of the kv_* lists: block "
                           f"(layout {k // (NQB * NKB)}, qb {(k // NKB) % NQB}, kb {k % NKB}) "
                           f"is only in the {side} lists")
            self._fail("the q_* lists are not the transpose of the kv_* lists: a block is full "
                       "in one direction and partial in the other, or has another mask id")
        f = fwd.full
        wfull, _ = window_class(fwd.qb[f], fwd.kb[f], self.Nq, self.Nk, self.BLOCK_M,
                                self.BLOCK_N, self.window)
        if not bool(wfull.all()):
            e = (~wfull).nonzero()[0].item()
            self._fail(f"block (qb {int(fwd.qb[f][e])}, kb {int(fwd.kb[f][e])}) is listed as full "
                       f"but the window rule {self.window} hides some of its tokens; list it as "
                       f"partial (mask id -1)")
        if len(fwd) <= _KEEP_COO:
            self._coo = fwd

    # ------------------------------------------------------------------ kernels, devices
    def kernel_mask(self) -> KernelMask:
        """The named record the kernels take (fastattn.kernel_mask): the 11 block lists in
        the order of csrc/common/block_mask_fields.h, this mask's token window and block size.
        Built once and cached."""
        if self._kernel_mask is None:
            lists = BlockLists(*(getattr(self, n).contiguous() for n in _LIST_NAMES),
                               partial_masks=self.partial_masks.to(torch.uint8).contiguous())
            self._kernel_mask = KernelMask(window=tuple(self.window), lists=lists,
                                           block_size=tuple(self.block_size))
        return self._kernel_mask

    def kernel_tensors(self) -> list[torch.Tensor]:
        """The 11 tensors of kernel_mask(), as the ops' `Tensor[] block_mask` list."""
        return self.kernel_mask().tensors

    def to(self, device) -> BlockMask:
        """This mask on `device` (self when already there; copies are cached)."""
        device = torch.device(device)
        cur = self.device
        if device.type == cur.type and (device.index is None or device.index == cur.index):
            return self
        key = str(device)
        if key not in self._device_cache:
            moved = BlockMask(
                seq_lengths=self.seq_lengths, block_size=self.block_size, window=self.window,
                partial_masks=self.partial_masks.to(device), validate=False,
                **{n: getattr(self, n).to(device) for n in _LIST_NAMES})
            moved._coo, moved._density = self._coo, self._density
            moved._pure_window = self._pure_window
            self._device_cache[key] = moved
        return self._device_cache[key]

    # ------------------------------------------------------------------ combinators
    def with_window(self, left: int, right: int) -> BlockMask:
        """This mask AND the window rule (left, right) (bottom-right aligned, -1 unbounded).
        Cached per (left, right): the public API calls it on every forward."""
        win = check_window((left, right), "window")
        if intersect_windows(self.window, win) == self.window:
            return self  # the rule already holds on every visible token
        if win not in self._window_cache:
            Nq, Nk = self.seq_lengths
            if self._pure_window:
                out = BlockMask._window_only(Nq, Nk, self.block_size,
                                             intersect_windows(self.window, win))
            else:
                out = self & BlockMask._window_only(Nq, Nk, self.block_size, win)
            self._window_cache[win] = out.to(self.device)
        return self._window_cache[win]

    def __and__(self, other):
        if not isinstance(other, BlockMask):
            return NotImplemented
        return _combine(self, other, "and")

    def __or__(self, other):
        if not isinstance(other, BlockMask):
            return NotImplemented
        return _combine(self, other, "or")


# Block kinds inside a combination.
_ABSENT, _KFULL, _KRULE, _KBITS = 0, 1, 2, 3


def _broadcast_layouts(a: BlockMask, b: BlockMask, op):
    out = []
    for name, x, y in (("Bm", a.Bm, b.Bm), ("Hm", a.Hm, b.Hm)):
        if x != y and 1 not in (x, y):
            raise ValueError(f"cannot combine BlockMasks with {op}: layouts {name}={x} and "
                             f"{name}={y} do not broadcast (each must be 1 or equal)")
        out.append(max(x, y))
    return out


class _Lookup:
    """Block kind / mask id of a BlockMask's blocks, addressed in broadcast layouts."""

    def __init__(self, bm: BlockMask, Bm, Hm):
        self.bm, self.Bm, self.Hm = bm, Bm, Hm
        coo = bm.coo()
        self.NQB, self.NKB = bm.num_q_blocks, bm.num_kv_blocks
        self.keys = coo.keys(self.NQB, self.NKB)  # sorted
        self.kind = torch.where(coo.full, _KFULL, torch.where(coo.mid >= 0, _KBITS, _KRULE))
        self.mid = coo.mid.long()
        self.masks = bm.partial_masks.cpu()

    def src_layout(self, b, h):
        return (b if self.bm.Bm > 1 else b * 0) * self.bm.Hm + (h if self.bm.Hm > 1 else h * 0)

    def expanded(self):
        """All blocks as (lay, qb, kb) in the broadcast layouts."""
        coo, parts = self.bm.coo(), []
        for lay in range(self.Bm * self.Hm):
            s = self.src_layout(torch.tensor(lay // self.Hm), torch.tensor(lay % self.Hm))
            sel = coo.lay == s
            parts.append((torch.full_like(coo.qb[sel], lay, dtype=torch.long), coo.qb[sel].long(),
                          coo.kb[sel].long()))
        return parts

    def find(self, b, h, qb, kb):
        key = (self.src_layout(b, h) * self.NQB + qb) * self.NKB + kb
        pos = torch.searchsorted(self.keys, key).clamp(max=max(len(self.keys) - 1, 0))
        if len(self.keys) == 0:
            return torch.zeros_like(key), torch.full_like(key, -1)
        hit = self.keys[pos] == key
        return torch.where(hit, self.kind[pos], _ABSENT), torch.where(hit, self.mid[pos], -1)

    def tiles(self, b, h, qb, kb, visible):
        """P tiles (bitmask, ones for full/rule blocks), or with visible=True the visible set
        (window rule applied), zeros where absent. bool (E, BM, BN)."""
        kind, mid = self.find(b, h, qb, kb)
        bm = self.bm
        if visible:
            t = window_tiles(qb, kb, bm.BLOCK_M, bm.BLOCK_N, bm.Nq, bm.Nk, bm.window)
        else:
            t = tile_token_indices(qb, kb, bm.BLOCK_M, bm.BLOCK_N, bm.Nq, bm.Nk)[2].clone()
        bits = kind == _KBITS
        t[bits] &= self.masks[mid[bits]]
        t[kind == _KFULL] = True
        t[kind == _ABSENT] = False
        return t


def _combine(a: BlockMask, b: BlockMask, op: str) -> BlockMask:
    """a & b (op 'and') or a | b (op 'or'), through the general builder."""
    sym = "&" if op == "and" else "|"
    if a.seq_lengths != b.seq_lengths or a.block_size != b.block_size:
        raise ValueError(
            f"cannot combine BlockMasks with {sym}: one has (Nq, Nk)={a.seq_lengths}, "
            f"block_size={a.block_size}, the other (Nq, Nk)={b.seq_lengths}, "
            f"block_size={b.block_size}; build both for the same lengths and block size")
    Bm, Hm = _broadcast_layouts(a, b, sym)
    Nq, Nk = a.seq_lengths
    NQB, NKB = a.num_q_blocks, a.num_kv_blocks
    la, lb = _Lookup(a, Bm, Hm), _Lookup(b, Bm, Hm)
    ka = torch.cat([(lay * NQB + q) * NKB + k for lay, q, k in la.expanded()])
    kb_ = torch.cat([(lay * NQB + q) * NKB + k for lay, q, k in lb.expanded()])
    if op == "and":
        keys, window = ka[torch.isin(ka, kb_)], intersect_windows(a.window, b.window)
    else:
        keys, window = torch.unique(torch.cat([ka, kb_])), hull_windows(a.window, b.window)
    cl, cq, ck = keys // (NQB * NKB), (keys // NKB) % NQB, keys % NKB
    order = torch.argsort(cq, stable=True)
    cl, cq, ck = cl[order], cq[order], ck[order]

    def candidates(q0, q1):
        s, e = torch.searchsorted(cq, torch.tensor([q0, q1])).tolist()
        return cl[s:e], cq[s:e], ck[s:e]

    def classify(bb, hh, qb, kb):
        kind_a, mid_a = la.find(bb, hh, qb, kb)
        kind_b, mid_b = lb.find(bb, hh, qb, kb)
        rule_a = (kind_a == _KFULL) | (kind_a == _KRULE)
        rule_b = (kind_b == _KFULL) | (kind_b == _KRULE)
        if op == "and":
            # Both follow their window rules there: the result follows the intersection.
            code = torch.where(rule_a & rule_b, RULE, EVAL)
            key = torch.stack([kind_a, mid_a, kind_b, mid_b], 1)
        else:
            # One full, or both following their rules (union of two windows = the hull).
            code = torch.where((kind_a == _KFULL) | (kind_b == _KFULL) | (rule_a & rule_b),
                               RULE, EVAL)
            d0 = delta_range(qb, kb, Nq, Nk, a.BLOCK_M, a.BLOCK_N)[2]
            key = torch.stack([kind_a, mid_a, kind_b, mid_b, d0], 1)
        return code, key

    if op == "and":
        tile_fn = lambda bb, hh, qb, kb: la.tiles(bb, hh, qb, kb, False) & lb.tiles(bb, hh, qb, kb, False)
    else:
        tile_fn = lambda bb, hh, qb, kb: la.tiles(bb, hh, qb, kb, True) | lb.tiles(bb, hh, qb, kb, True)
    out = BlockMask._build(Nq, Nk, a.block_size, window, Bm, Hm, candidates=candidates,
                           classify=classify, tile_fn=tile_fn)
    return out.to(a.device)


__all__ = ["BlockMask"]
