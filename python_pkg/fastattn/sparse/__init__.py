"""fastattn.sparse: the BlockMask block-sparse layout and constructors for the usual
attention patterns (see block_mask.py for the format kernels read, patterns.py for the
definitions and their sources).

    import fastattn, fastattn.sparse as fs
    bm = fs.causal(4096, 4096) & fs.sliding_window(4096, 4096, 512, 0)
    print(bm.to_string(max_blocks=32), bm.density)
    out = fastattn.attention(q, k, v, block_mask=bm)
"""

from .block_mask import BlockMask
from .patterns import (
    EMPTY_BLOCK,
    FULL_BLOCK,
    PARTIAL_BLOCK,
    axial_2d,
    bigbird,
    block_local,
    causal,
    dilated_window,
    document,
    fixed,
    from_block_fn,
    from_dense,
    from_mask_fn,
    longformer,
    neighborhood_2d,
    prefix_lm,
    sliding_window,
    streaming,
    strided,
)

__all__ = [
    "BlockMask",
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
