// Entry points: check the params, then turn the runtime options (dtype, head dim, dense or
// block-sparse) into template parameters — in this one place — and call the launcher.
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "flash_launch.h"
#include "static_switch.h"

namespace fastattn::cuda {

namespace {

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

bool strides_ok(int64_t bs, int64_t hs, int64_t rs) {
  return bs % 8 == 0 && hs % 8 == 0 && rs % 8 == 0;
}

}  // namespace

const char* check_params(const FlashParams& p, bool backward) {
  if (p.b < 1 || p.hq < 1 || p.hkv < 1 || p.nq < 1 || p.nk < 1)
    return "sizes must be positive (empty inputs are handled before the kernels)";
  if (p.hq % p.hkv != 0) return "the number of query heads must be a multiple of kv heads";
  if (p.d < 8 || p.d % 8 != 0 || p.d > kMaxHeadDimFwd)
    return backward ? "head dim must be a multiple of 8 in [8, 256] (backward)"
                    : "head dim must be a multiple of 8 in [8, 256]";
  if (backward && !p.atomic_dq && p.d > kMaxHeadDim)
    return "head dim must be a multiple of 8 in [8, 128] (backward) with the deterministic "
           "backward (atomic_dq = 0, deterministic=True); the atomic-dQ backward serves up to 256";
  if (p.b * p.hq > 65535) return "batch * heads must be at most 65535 (grid y)";
  if (p.window_left < -1 || p.window_right < -1) return "window sides must be >= -1";
  if (!p.q || !p.k || !p.v || !p.o || !p.lse) return "null tensor pointer";
  if (!(p.softcap >= 0.f) || std::isinf(p.softcap)) return "softcap must be a finite float >= 0";
  if (!(p.dropout_p >= 0.f && p.dropout_p < 1.f)) return "dropout_p must lie in [0, 1)";
  if (p.dropout_threshold > (1u << 24)) return "dropout threshold must be at most 2^24";
  if (p.alibi_slopes && reinterpret_cast<uintptr_t>(p.alibi_slopes) % 4 != 0)
    return "alibi_slopes must be 4-byte aligned float32";
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.o))
    return "tensors must be 16-byte aligned";
  if (!strides_ok(p.q_batch_stride, p.q_head_stride, p.q_row_stride) ||
      !strides_ok(p.k_batch_stride, p.k_head_stride, p.k_row_stride) ||
      !strides_ok(p.v_batch_stride, p.v_head_stride, p.v_row_stride) ||
      !strides_ok(p.o_batch_stride, p.o_head_stride, p.o_row_stride))
    return "strides must be multiples of 8 elements";
  if (backward) {
    if (!p.dout || !p.dq || !p.dk || !p.dv || !p.delta) return "null gradient pointer";
    if (p.atomic_dq && !p.dq_accum) return "atomic_dq needs the float32 dq_accum workspace";
    if (!aligned16(p.dout) || !aligned16(p.dq) || !aligned16(p.dk) || !aligned16(p.dv))
      return "gradient tensors must be 16-byte aligned";
    if (!strides_ok(p.do_batch_stride, p.do_head_stride, p.do_row_stride) ||
        !strides_ok(p.dq_batch_stride, p.dq_head_stride, p.dq_row_stride) ||
        !strides_ok(p.dk_batch_stride, p.dk_head_stride, p.dk_row_stride) ||
        !strides_ok(p.dv_batch_stride, p.dv_head_stride, p.dv_row_stride))
      return "gradient strides must be multiples of 8 elements";
  }
  if (p.block_sparse) {
    if (!p.kv_num_blocks || !p.kv_indices || !p.full_kv_num_blocks || !p.full_kv_indices ||
        !p.kv_mask_ids || !p.q_num_blocks || !p.q_indices || !p.full_q_num_blocks ||
        !p.full_q_indices || !p.q_mask_ids)
      return "block mask: null list pointer";
    if (p.mask_block_m <= 0 || p.mask_block_n <= 0 || p.mask_block_m % kMaskBlockMultiple != 0 ||
        p.mask_block_n % kMaskBlockMultiple != 0)
      return "block mask: the cuda kernels need BLOCK_M and BLOCK_N to be multiples of 64";
    if (p.nqb != (p.nq + p.mask_block_m - 1) / p.mask_block_m ||
        p.nkb != (p.nk + p.mask_block_n - 1) / p.mask_block_n)
      return "block mask: block counts do not match the sequence lengths";
    if (!(p.mask_b == 1 || p.mask_b == p.b) || !(p.mask_h == 1 || p.mask_h == p.hq))
      return "block mask: layouts must broadcast over (batch, query heads)";
    if (p.kmax < 0 || p.kmax_full < 0 || p.qmax < 0 || p.qmax_full < 0)
      return "block mask: negative list width";
  }
  return nullptr;
}

void run_fwd(FlashParams& p, void* stream) {
  if (const char* why = check_params(p, false)) throw std::invalid_argument(why);
  FP16_SWITCH(p.is_bf16, [&] {
    BOOL_SWITCH(p.block_sparse, kSparse, [&] {
      // The FlashAttention-2 class kernel (head dims 32 / 64 / 96 / 128 / 192 / 256) serves every
      // dense call and the block masks whose BLOCK_M is a multiple of its query tile (128 rows
      // for d <= 128, 64 above: always); the wmma kernel (64 / 128) the other masks.
      const int64_t fa2_block_m = p.d <= 128 ? kFa2FwdBlockM : kFa2FwdBlockMWide;
      if (!kSparse || p.mask_block_m % fa2_block_m == 0) {
        FA2_HEADDIM_SWITCH(p.d, [&] {
          run_fa2_fwd_<elem_type, kHeadDim, kSparse>(p, static_cast<cudaStream_t>(stream));
        });
      } else {
        HEADDIM_SWITCH(p.d, [&] {
          run_fwd_<elem_type, kHeadDim, kSparse>(p, static_cast<cudaStream_t>(stream));
        });
      }
    });
  });
}

void run_bwd(FlashParams& p, void* stream) {
  if (const char* why = check_params(p, true)) throw std::invalid_argument(why);
  FP16_SWITCH(p.is_bf16, [&] {
    BOOL_SWITCH(p.block_sparse, kSparse, [&] {
      // deterministic=False (atomic_dq): the FlashAttention-2 class backward, atomic dQ (head
      // dims 32 / 64 / 96 / 128 / 192 / 256); its key / query tiles (32 or 64) divide every
      // mask block the kernels accept. deterministic=True: the wmma kernels (64 / 128).
      if (p.atomic_dq) {
        FA2_HEADDIM_SWITCH(p.d, [&] {
          run_fa2_bwd_<elem_type, kHeadDim, kSparse>(p, static_cast<cudaStream_t>(stream));
        });
      } else {
        HEADDIM_SWITCH(p.d, [&] {
          run_bwd_<elem_type, kHeadDim, kSparse>(p, static_cast<cudaStream_t>(stream));
        });
      }
    });
  });
}

}  // namespace fastattn::cuda
