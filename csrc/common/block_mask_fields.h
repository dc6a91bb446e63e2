// The block-mask hand-off to the kernels: the names and order of the tensors in the
// `Tensor[] block_mask` argument of every fastattn op (cpu_*, cuda_*, triton_*).
//
// The Python side builds them once per BlockMask as fastattn.kernel_mask.BlockLists, a
// NamedTuple whose fields are exactly kBlockMaskFieldNames below, in this order (a test
// reads this header and compares). Kernels and bindings index the list only through
// BlockMaskField, never by a bare number. Plain C++ (no torch headers): the CUDA kernels'
// params code includes it too. Format of each tensor: python_pkg/fastattn/sparse/block_mask.py.
#pragma once

namespace fastattn {

enum BlockMaskField : int {
  kKvNumBlocks = 0,     // (Bm, Hm, NQB) int32: partial key blocks per query block
  kKvIndices,           // (Bm, Hm, NQB, KMAX) int32, ascending
  kFullKvNumBlocks,     // (Bm, Hm, NQB) int32: full key blocks per query block
  kFullKvIndices,       // (Bm, Hm, NQB, KMAXF) int32, ascending
  kKvMaskIds,           // (Bm, Hm, NQB, KMAX) int32: partial_masks id or -1
  kQNumBlocks,          // (Bm, Hm, NKB) int32: the transpose, for backward passes
  kQIndices,            // (Bm, Hm, NKB, QMAX) int32
  kFullQNumBlocks,      // (Bm, Hm, NKB) int32
  kFullQIndices,        // (Bm, Hm, NKB, QMAXF) int32
  kQMaskIds,            // (Bm, Hm, NKB, QMAX) int32
  kPartialMasks,        // (P, BLOCK_M, BLOCK_N) uint8 bitmasks
  kBlockMaskFieldCount  // = 11
};

inline constexpr const char* kBlockMaskFieldNames[kBlockMaskFieldCount] = {
    "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "kv_mask_ids",
    "q_num_blocks",  "q_indices",  "full_q_num_blocks",  "full_q_indices",  "q_mask_ids",
    "partial_masks"};

// Rank of each tensor: counts are 3-D, index lists 4-D, the bitmasks 3-D.
inline constexpr int block_mask_field_rank(int f) {
  return (f == kKvNumBlocks || f == kFullKvNumBlocks || f == kQNumBlocks || f == kFullQNumBlocks ||
          f == kPartialMasks) ? 3 : 4;
}

}  // namespace fastattn
