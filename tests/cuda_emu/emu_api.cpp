// C entry points of the emulated kernel library (loaded with ctypes by tests/cuda_emu/emu.py).
// Built from the unmodified csrc/cuda sources compiled as C++ against cuda_emu.h.
#include <cstddef>
#include <exception>
#include <string>

#include "cuda/decode.h"
#include "cuda/fa2_fwd_kernel.h"
#include "cuda/flash.h"
#include "cuda_emu.h"

using fastattn::cuda::DecodeParams;
using fastattn::cuda::FlashParams;

namespace {
thread_local std::string g_error;

// Field order of FlashParams; emu.py mirrors it and compares these offsets with its own.
const size_t kOffsets[] = {
#define F(name) offsetof(FlashParams, name)
    F(q), F(k), F(v), F(o), F(lse), F(dout), F(dq), F(dk), F(dv), F(delta),
    F(q_batch_stride), F(q_head_stride), F(q_row_stride),
    F(k_batch_stride), F(k_head_stride), F(k_row_stride),
    F(v_batch_stride), F(v_head_stride), F(v_row_stride),
    F(o_batch_stride), F(o_head_stride), F(o_row_stride),
    F(do_batch_stride), F(do_head_stride), F(do_row_stride),
    F(dq_batch_stride), F(dq_head_stride), F(dq_row_stride),
    F(dk_batch_stride), F(dk_head_stride), F(dk_row_stride),
    F(dv_batch_stride), F(dv_head_stride), F(dv_row_stride),
    F(b), F(hq), F(hkv), F(nq), F(nk), F(d), F(is_bf16), F(window_left), F(window_right),
    F(block_sparse), F(kv_num_blocks), F(kv_indices), F(full_kv_num_blocks), F(full_kv_indices),
    F(kv_mask_ids), F(q_num_blocks), F(q_indices), F(full_q_num_blocks), F(full_q_indices),
    F(q_mask_ids), F(partial_masks), F(mask_b), F(mask_h), F(nqb), F(nkb), F(kmax),
    F(kmax_full), F(qmax), F(qmax_full), F(mask_block_m), F(mask_block_n), F(scale),
    F(softcap), F(alibi_slopes), F(dropout_seed), F(dropout_threshold), F(dropout_p), F(dlse),
    F(dq_accum), F(atomic_dq),
#undef F
};

// Field order of DecodeParams (emu.py's DecodeParams mirrors it).
const size_t kDecodeOffsets[] = {
#define F(name) offsetof(DecodeParams, name)
    F(q), F(k), F(v), F(o), F(lse), F(o_part), F(lse_part), F(cache_seqlens), F(alibi_slopes),
    F(q_batch_stride), F(q_head_stride), F(q_row_stride),
    F(k_batch_stride), F(k_head_stride), F(k_row_stride),
    F(v_batch_stride), F(v_head_stride), F(v_row_stride),
    F(o_batch_stride), F(o_head_stride), F(o_row_stride),
    F(b), F(hq), F(hkv), F(nq), F(ncache), F(d), F(dv), F(is_bf16), F(window_left),
    F(window_right), F(num_splits), F(max_len), F(chunk), F(scale), F(softcap),
#undef F
};
}  // namespace

// The FA2 kernels' shared-memory swizzle (fa2_fwd_kernel.h Swz) for rows of kchunks 16-byte
// chunks: mode 0: swz(row, chunk) (element offset); mode 1: the ldmatrix lane offset of k16 step
// a (chunk bit b) plus its immediate, Swz::lane_ofs(lane = row, a % kSteps, b) + step_imm(a).
// -1 for a row width the kernels do not use.
template <int K>
static long swz_query(long mode, long row, long a, long b) {
  using S = fastattn::cuda::Swz<K>;
  if (mode == 0) return fastattn::cuda::swz<K>(static_cast<int>(row), static_cast<int>(a));
  return S::lane_ofs(static_cast<int>(row), static_cast<int>(a % S::kSteps),
                     static_cast<int>(b)) + S::step_imm(static_cast<int>(a));
}

extern "C" {

long fa_emu_params_size() { return static_cast<long>(sizeof(FlashParams)); }

long fa_emu_params_offsets(long* out, long n) {
  const long count = static_cast<long>(sizeof(kOffsets) / sizeof(kOffsets[0]));
  for (long i = 0; i < count && i < n; ++i) out[i] = static_cast<long>(kOffsets[i]);
  return count;
}

void fa_emu_set_schedule(int schedule, unsigned long long seed) {
  cuda_emu::set_schedule(schedule, seed);
}

// The launches of the last fa_emu_run: up to n records of (grid x, grid y, threads per block,
// dynamic shared memory bytes) into out[4 i ..]; returns how many launches there were.
long fa_emu_last_launches(long* out, long n) {
  const auto& log = cuda_emu::detail::launch_log();
  const long count = static_cast<long>(log.size());
  for (long i = 0; i < count && i < n; ++i) {
    out[4 * i] = log[i].grid.x;
    out[4 * i + 1] = log[i].grid.y;
    out[4 * i + 2] = static_cast<long>(log[i].block.x) * log[i].block.y * log[i].block.z;
    out[4 * i + 3] = static_cast<long>(log[i].smem);
  }
  return count;
}

long fa_emu_swz(long kchunks, long mode, long row, long a, long b) {
  switch (kchunks) {
    case 4: return swz_query<4>(mode, row, a, b);
    case 8: return swz_query<8>(mode, row, a, b);
    case 12: return swz_query<12>(mode, row, a, b);
    case 16: return swz_query<16>(mode, row, a, b);
    case 24: return swz_query<24>(mode, row, a, b);
    case 32: return swz_query<32>(mode, row, a, b);
    default: return -1;
  }
}

// Returns nullptr on success, else the error message (valid until the next call).
const char* fa_emu_run(FlashParams* p, int backward) {
  cuda_emu::detail::launch_log().clear();
  try {
    if (backward)
      fastattn::cuda::run_bwd(*p, nullptr);
    else
      fastattn::cuda::run_fwd(*p, nullptr);
    return nullptr;
  } catch (const std::exception& e) {
    g_error = e.what();
    return g_error.c_str();
  }
}

unsigned fa_emu_dropout_threshold(double p) { return fastattn::cuda::dropout_threshold_24(p); }

const char* fa_emu_check_params(const FlashParams* p, int backward) {
  return fastattn::cuda::check_params(*p, backward != 0);
}

long fa_emu_decode_params_size() { return static_cast<long>(sizeof(DecodeParams)); }

long fa_emu_decode_params_offsets(long* out, long n) {
  const long count = static_cast<long>(sizeof(kDecodeOffsets) / sizeof(kDecodeOffsets[0]));
  for (long i = 0; i < count && i < n; ++i) out[i] = static_cast<long>(kDecodeOffsets[i]);
  return count;
}

// Split-KV decode (csrc/cuda/flash_decode.cu). nullptr on success, else the error message.
const char* fa_emu_decode(DecodeParams* p) {
  try {
    fastattn::cuda::run_decode(*p, nullptr);
    return nullptr;
  } catch (const std::exception& e) {
    g_error = e.what();
    return g_error.c_str();
  }
}

long fa_emu_decode_chunk(long max_len, long num_splits) {
  return static_cast<long>(fastattn::cuda::decode_chunk(max_len, num_splits));
}
}
