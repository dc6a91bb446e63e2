// Reads the named block-mask hand-off (common/block_mask_fields.h) into the raw-pointer view the tile iterators use.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "common/block_mask_fields.h"
#include "cpu/kernel_args.h"

namespace fastattn::cpu {

// Returns the lists and the block sizes (BLOCK_M, BLOCK_N) from partial_masks' shape.
// The tensors are validated by the binding (dtype, contiguity, shapes) before this runs.
inline SparseLists sparse_lists_from(const std::vector<at::Tensor>& t, int64_t& BM, int64_t& BN) {
  SparseLists s;
  if (t.empty()) return s;
  s.active = true;
  s.Bm = t[kKvNumBlocks].size(0);
  s.Hm = t[kKvNumBlocks].size(1);
  s.NQB = t[kKvNumBlocks].size(2);
  s.NKB = t[kQNumBlocks].size(2);
  s.kmax = t[kKvIndices].size(3);
  s.kmaxf = t[kFullKvIndices].size(3);
  s.qmax = t[kQIndices].size(3);
  s.qmaxf = t[kFullQIndices].size(3);
  s.kv_num = t[kKvNumBlocks].data_ptr<int32_t>();
  s.kv_idx = t[kKvIndices].data_ptr<int32_t>();
  s.fkv_num = t[kFullKvNumBlocks].data_ptr<int32_t>();
  s.fkv_idx = t[kFullKvIndices].data_ptr<int32_t>();
  s.kv_mid = t[kKvMaskIds].data_ptr<int32_t>();
  s.q_num = t[kQNumBlocks].data_ptr<int32_t>();
  s.q_idx = t[kQIndices].data_ptr<int32_t>();
  s.fq_num = t[kFullQNumBlocks].data_ptr<int32_t>();
  s.fq_idx = t[kFullQIndices].data_ptr<int32_t>();
  s.q_mid = t[kQMaskIds].data_ptr<int32_t>();
  s.masks = t[kPartialMasks].data_ptr<uint8_t>();
  BM = t[kPartialMasks].size(1);
  BN = t[kPartialMasks].size(2);
  return s;
}

}  // namespace fastattn::cpu
