"""The mask hand-off from the API to the kernels: one small named record per call.

Every backend that runs a compiled or Triton kernel receives the call's mask as a
`KernelMask`, built once by the public API (fastattn.api) and carried on the `Problem`:

    KernelMask(window=(left, right), lists=None)            dense / causal / window calls
    KernelMask(window=mask.window, lists=BlockLists(...),   block-sparse calls (the call's
               block_size=(BLOCK_M, BLOCK_N))                causal/window folded into the mask)

`window` is the token rule the kernel applies (bottom-right aligned, -1 = unbounded); with a
block mask it is the rule for partial blocks. `BlockLists` names the 11 tensors of the ops'
`Tensor[] block_mask` argument in the order the kernels read them; the C++ side names the
same fields in csrc/common/block_mask_fields.h (a test keeps the two in step). The format of
each tensor is documented in fastattn/sparse/block_mask.py.

This module is plain data: it imports nothing from fastattn.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class BlockLists(NamedTuple):
    """The block lists of a BlockMask as the kernels take them (int32 / uint8, contiguous)."""

    kv_num_blocks: torch.Tensor       # (Bm, Hm, NQB)
    kv_indices: torch.Tensor          # (Bm, Hm, NQB, KMAX)
    full_kv_num_blocks: torch.Tensor  # (Bm, Hm, NQB)
    full_kv_indices: torch.Tensor     # (Bm, Hm, NQB, KMAXF)
    kv_mask_ids: torch.Tensor         # (Bm, Hm, NQB, KMAX)
    q_num_blocks: torch.Tensor        # (Bm, Hm, NKB)
    q_indices: torch.Tensor           # (Bm, Hm, NKB, QMAX)
    full_q_num_blocks: torch.Tensor   # (Bm, Hm, NKB)
    full_q_indices: torch.Tensor      # (Bm, Hm, NKB, QMAXF)
    q_mask_ids: torch.Tensor          # (Bm, Hm, NKB, QMAX)
    partial_masks: torch.Tensor       # (P, BLOCK_M, BLOCK_N) uint8


class KernelMask(NamedTuple):
    """What a kernel needs to know about the call's mask (see the module docstring)."""

    window: tuple[int, int]
    lists: BlockLists | None = None
    block_size: tuple[int, int] | None = None  # (BLOCK_M, BLOCK_N) of lists

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The ops' `Tensor[] block_mask` argument: [] for dense/window calls."""
        return [] if self.lists is None else list(self.lists)

    @property
    def is_sparse(self) -> bool:
        return self.lists is not None


def int64_seed(seed: int) -> int:
    """A 64-bit dropout seed as the signed int64 the op schemas carry (kernels read its bits)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return seed - (1 << 64) if seed >= 1 << 63 else seed
