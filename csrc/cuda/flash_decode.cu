// Split-KV decode (decode.h, decode_kernel.h): parameter checks, the runtime -> template switch
// and the launches. All configurations live in this one file (they compile in seconds).
#include <stdexcept>

#include "decode.h"
#include "decode_kernel.h"
#include "static_switch.h"

namespace fastattn::cuda {

const char* check_decode_params(const DecodeParams& p) {
  if (p.b < 1 || p.hq < 1 || p.hkv < 1 || p.nq < 1 || p.ncache < 1)
    return "sizes must be positive (empty inputs are handled before the kernels)";
  if (p.hq % p.hkv != 0) return "the number of query heads must be a multiple of kv heads";
  if (p.d < 1 || p.dv < 1 || p.d > kDecodeMaxHeadDim || p.dv > kDecodeMaxHeadDim)
    return "head dims must lie in [1, 128]";
  if (p.b * p.hkv > 65535) return "batch * kv heads must be at most 65535 (grid y)";
  if (p.window_left < -1 || p.window_right < -1) return "window sides must be >= -1";
  if (!p.q || !p.k || !p.v || !p.o || !p.lse) return "null tensor pointer";
  if (!(p.softcap >= 0.f) || std::isinf(p.softcap)) return "softcap must be a finite float >= 0";
  if (p.num_splits < 1) return "num_splits must be >= 1";
  if (p.max_len < 1 || p.max_len > p.ncache) return "max_len must lie in [1, Ncache]";
  if (p.num_splits > 1 && (!p.o_part || !p.lse_part)) return "num_splits > 1 needs the workspace";
  const int64_t rows = (p.hq / p.hkv) * p.nq;
  const int64_t tiles = (rows + decode_rows_per_cta(p.d, p.dv) - 1) / decode_rows_per_cta(p.d, p.dv);
  if (tiles > 65535) return "(Hq / Hkv) * Nq query rows per kv head exceed the grid (z)";
  if (p.num_splits > 2147483647LL) return "num_splits exceeds the grid (x)";
  return nullptr;
}

namespace {

template <typename T, int kHeadDim, int kRows>
void launch_decode(DecodeParams& p, cudaStream_t stream) {
  const int64_t rows = (p.hq / p.hkv) * p.nq;
  const dim3 grid(static_cast<unsigned>(p.num_splits), static_cast<unsigned>(p.b * p.hkv),
                  static_cast<unsigned>((rows + kRows - 1) / kRows));
  FA_LAUNCH((flash_decode_split_kernel<T, kHeadDim, kRows>), grid, dim3(kDecodeThreads), 0,
            stream, p);
  FA_CUDA_CHECK(cudaGetLastError());
  if (p.num_splits > 1) {
    const dim3 grid_c(static_cast<unsigned>(p.b * p.hq * p.nq));
    FA_LAUNCH((flash_decode_combine_kernel<T>), grid_c, dim3(kDecodeThreads), 0, stream, p);
    FA_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace

void run_decode(DecodeParams& p, void* stream) {
  if (const char* why = check_decode_params(p)) throw std::invalid_argument(why);
  p.chunk = decode_chunk(p.max_len, p.num_splits);
  const auto s = static_cast<cudaStream_t>(stream);
  FP16_SWITCH(p.is_bf16, [&] {
    // rows per CTA: decode_rows_per_cta (16 at head dim 64, 8 at 128; see decode_kernel.h)
    if (p.d <= 64 && p.dv <= 64)
      launch_decode<elem_type, 64, 16>(p, s);
    else
      launch_decode<elem_type, 128, 8>(p, s);
  });
}

}  // namespace fastattn::cuda
