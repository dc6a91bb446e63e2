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
"""
