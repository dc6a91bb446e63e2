// Reads BlockMask.kernel_tensors() into the raw-pointer view the tile iterators use.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "tiles.h"

namespace fastattn::cpu {

// Returns the lists and the block sizes (BLOCK_M, BLOCK_N) from partial_masks' shape.
// The 11 tensors are validated by the binding (dtype, contiguity, shapes) before this runs.
inline SparseLists sparse_lists_from(const std::vector<at::Tensor>& t, int64_t& BM, int64_t& BN) {
  SparseLists s;
  if (t.empty()) return s;
  s.active = true;
  s.Bm = t[0].size(0);
  s.Hm = t[0].size(1);
  s.NQB = t[0].size(2);
  s.NKB = t[5].size(2);
  s.kmax = t[1].size(3);
  s.kmaxf = t[3].size(3);
  s.qmax = t[6].size(3);
  s.qmaxf = t[8].size(3);
  s.kv_num = t[0].data_ptr<int32_t>();
  s.kv_idx = t[1].data_ptr<int32_t>();
  s.fkv_num = t[2].data_ptr<int32_t>();
  s.fkv_idx = t[3].data_ptr<int32_t>();
  s.kv_mid = t[4].data_ptr<int32_t>();
  s.q_num = t[5].data_ptr<int32_t>();
  s.q_idx = t[6].data_ptr<int32_t>();
  s.fq_num = t[7].data_ptr<int32_t>();
  s.fq_idx = t[8].data_ptr<int32_t>();
  s.q_mid = t[9].data_ptr<int32_t>();
  s.masks = t[10].data_ptr<uint8_t>();
  BM = t[10].size(1);
  BN = t[10].size(2);
  return s;
}

}  // namespace fastattn::cpu
