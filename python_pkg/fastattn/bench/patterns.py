"""The benchmark's attention patterns, built once per (pattern, N) and handed to every backend
in the form it takes:

    fastattn backends   fastattn.attention kwargs: causal/window, or a fastattn.sparse
                        BlockMask (exactly the mask the kernels iterate)
    naive, sdpa         the dense boolean (Bm, Hm, N, N) mask (None when unmasked)
    flex                a torch BlockMask from create_block_mask(mask_mod, ...)

Parameters (fixed so results stay comparable across runs):

    dense       no mask
    causal      j <= i
    window      causal sliding window, left = 512:        i - 512 <= j <= i
    bigbird     BigBird ITC, 64-token blocks, 1 global block at each end, 3 random blocks
                per row (seed 0), 3-block sliding window; one layout shared by all heads
    longformer  Longformer: window 512 (256 each side) + 16 global tokens (the first 16)
    strided     Sparse Transformer strided, stride 256 (local 256 + every 256th key), causal
    streaming   StreamingLLM: 4 sink tokens + causal window of 512
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import fastattn.sparse as fs

PATTERNS = ("dense", "causal", "window", "bigbird", "longformer", "strided", "streaming")
WINDOW = 512
LONGFORMER_GLOBAL = 16
STRIDE = 256
SINKS = 4

DESCRIPTIONS = {
    "dense": "no mask",
    "causal": "causal (j <= i)",
    "window": f"causal sliding window, left={WINDOW}",
    "bigbird": "BigBird ITC: 64-token blocks, 1+1 global, 3 random (seed 0), 3-block window",
    "longformer": f"Longformer: window {WINDOW} + {LONGFORMER_GLOBAL} global tokens",
    "strided": f"Sparse Transformer strided, stride {STRIDE}, causal",
    "streaming": f"StreamingLLM: {SINKS} sinks + causal window {WINDOW}",
}


def build_block_mask(name: str, N: int) -> fs.BlockMask | None:
    """The fastattn.sparse BlockMask of a pattern (None for dense)."""
    if name == "dense":
        return None
    if name == "causal":
        return fs.causal(N, N)
    if name == "window":
        return fs.sliding_window(N, N, WINDOW, 0, causal=True)
    if name == "bigbird":
        return fs.bigbird(N, bigbird_block_size=64, num_random_blocks=3, num_global_blocks=1,
                          seed=0)
    if name == "longformer":
        return fs.longformer(N, N, window=WINDOW,
                             global_tokens=range(min(LONGFORMER_GLOBAL, N)))
    if name == "strided":
        return fs.strided(N, N, stride=STRIDE)
    if name == "streaming":
        return fs.streaming(N, N, sink_size=SINKS, window_size=WINDOW)
    raise ValueError(f"unknown pattern {name!r}; choose from {', '.join(PATTERNS)}")


def attention_kwargs(name: str, block_mask) -> dict:
    """How a user calls fastattn.attention for the pattern: causal/window through the
    arguments (the kernels' analytic rule), everything else through block_mask."""
    if name == "dense":
        return {}
    if name == "causal":
        return {"causal": True}
    if name == "window":
        return {"causal": True, "window": (WINDOW, 0)}
    return {"block_mask": block_mask}


@dataclass
class Pattern:
    """One pattern at one length, with the facts predictions and FLOP counts need."""

    name: str
    N: int
    block_mask: fs.BlockMask | None
    density: float = 1.0  # visible (query, key) pairs / N^2, averaged over layouts
    visited_blocks: float = 0.0  # visited tiles per layout
    block_size: tuple[int, int] = (128, 128)
    layouts: int = 1  # Bm * Hm
    _dense: torch.Tensor | None = field(default=None, repr=False)

    @staticmethod
    def build(name: str, N: int) -> Pattern:
        bm = build_block_mask(name, N)
        if bm is None:
            nb = -(-N // 128)
            return Pattern(name, N, None, 1.0, float(nb * nb), (128, 128), 1)
        layouts = bm.Bm * bm.Hm
        return Pattern(name, N, bm, float(bm.density), bm.num_visited_blocks / layouts,
                       tuple(bm.block_size), layouts)

    @property
    def masked(self) -> bool:
        return self.name != "dense"

    @property
    def visible_pairs(self) -> float:
        """Visible (query, key) pairs per batch element and head."""
        return self.density * self.N * self.N

    @property
    def visited_pairs(self) -> float:
        """(query, key) pairs inside visited tiles per layout: the work a block-sparse
        kernel does (>= visible_pairs)."""
        return self.visited_blocks * self.block_size[0] * self.block_size[1]

    def info(self) -> dict:
        """Facts for spec.predict_skip / spec.work_units."""
        return {"pattern": self.name, "masked": self.masked, "layouts": self.layouts,
                "visited_pairs": min(self.visited_pairs, float(self.N) ** 2),
                "flex_mask_bytes_per_pair": FLEX_MASK_BYTES_PER_PAIR.get(self.name, 28)}

    def attention_kwargs(self) -> dict:
        return attention_kwargs(self.name, self.block_mask)

    def dense_mask(self, device="cpu") -> torch.Tensor | None:
        """bool (Bm, Hm, N, N), True = visible; None for dense. Built once, cached."""
        if not self.masked:
            return None
        if self._dense is None:
            if self.name in ("causal", "window"):
                i = torch.arange(self.N, device=device)
                d = i[:, None] - i[None, :]  # query - key
                m = d >= 0
                if self.name == "window":
                    m &= d <= WINDOW
                self._dense = m[None, None]
            else:
                self._dense = self.block_mask.to_dense().to(device)
        return self._dense

    def flex_block_mask(self, device="cpu"):
        """torch's flex BlockMask for the same pattern (None for dense), from a mask_mod:
        closed forms for causal and window, a lookup into this pattern's block layout and
        bitmasks for the others (so flex sees exactly fastattn's mask)."""
        from torch.nn.attention.flex_attention import create_block_mask

        if not self.masked:
            return None
        N = self.N
        if self.name == "causal":
            def mask_mod(b, h, q, kv):
                return q >= kv
        elif self.name == "window":
            def mask_mod(b, h, q, kv):
                return (q >= kv) & (q - kv <= WINDOW)
        else:
            mask_mod = layout_mask_mod(self.block_mask, device)
        bm = self.block_mask
        B = bm.Bm if bm.Bm > 1 else None
        H = bm.Hm if bm.Hm > 1 else None
        return create_block_mask(mask_mod, B, H, N, N, device=device)


# Peak bytes per (query, key) pair of create_block_mask, measured at N = 8192 (VmHWM, torch
# 2.13): 10 for the closed-form mask_mods (bool and index temporaries), 27 for the layout
# lookup (int64 gathers); the lookup value is rounded up for the other patterns.
FLEX_MASK_BYTES_PER_PAIR = {"causal": 10, "window": 10}


def layout_mask_mod(bm: fs.BlockMask, device="cpu"):
    """A FlexAttention mask_mod equal to bm.to_dense(): per (layout, query block, key block)
    a kind (0 skipped, 1 full, 2 partial) and a bitmask id; partial tokens pass the window
    rule and their bitmask. Built from the documented forward lists only."""
    Bm, Hm = bm.Bm, bm.Hm
    NQB, NKB = bm.num_q_blocks, bm.num_kv_blocks
    BM, BN = bm.block_size
    Nq, Nk = bm.seq_lengths
    kind = torch.zeros((Bm, Hm, NQB, NKB), dtype=torch.int8)
    mid = torch.full((Bm, Hm, NQB, NKB), -1, dtype=torch.int32)
    for b in range(Bm):
        for h in range(Hm):
            for qb in range(NQB):
                nf = int(bm.full_kv_num_blocks[b, h, qb])
                kind[b, h, qb, bm.full_kv_indices[b, h, qb, :nf].long()] = 1
                npart = int(bm.kv_num_blocks[b, h, qb])
                kbs = bm.kv_indices[b, h, qb, :npart].long()
                kind[b, h, qb, kbs] = 2
                mid[b, h, qb, kbs] = bm.kv_mask_ids[b, h, qb, :npart].int()
    bits = bm.partial_masks.to(torch.bool)
    if bits.shape[0] == 0:
        bits = torch.ones((1, BM, BN), dtype=torch.bool)
    kind, mid, bits = kind.to(device), mid.to(device), bits.to(device)
    left, right = bm.window
    off = Nk - Nq
    bsel, hsel = int(Bm > 1), int(Hm > 1)

    def mask_mod(b, h, q, kv):
        qb, kb = q // BM, kv // BN
        k_ = kind[b * bsel, h * hsel, qb, kb]
        m_ = mid[b * bsel, h * hsel, qb, kb]
        d = kv - (q + off)
        ok = torch.ones_like(d, dtype=torch.bool)
        if left != -1:
            ok = ok & (d >= -left)
        if right != -1:
            ok = ok & (d <= right)
        bit = bits[m_.clamp(min=0), q % BM, kv % BN] | (m_ < 0)
        return (k_ == 1) | ((k_ == 2) & ok & bit)

    return mask_mod
