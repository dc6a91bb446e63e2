// Tile sizes and shared-memory layouts of the kernels, and the choice per head dim.
//
// Every warp owns 16 rows of a tile (one wmma m16n16k16 row of fragments). Shared-memory rows
// are padded by 8 16-bit elements (16 B) / 4 floats: that keeps every wmma pointer 32-byte
// aligned and ldm a multiple of 16 B, and skews rows across banks.
#pragma once

#include "cuda_compat.h"

namespace fastattn::cuda {

constexpr int kPadH = 8;  // 16-bit elements of row padding
constexpr int kPadF = 4;  // float elements of row padding

constexpr int cmax(int a, int b) { return a > b ? a : b; }
constexpr int cmin(int a, int b) { return a < b ? a : b; }

// Shared memory of one SM that blocks may use, per target arch (device passes only; the host pass
// never reads it), and the 1 KB the system reserves per block since sm_80. kMinBlocksPerSm of a
// kernel = how many blocks shared memory lets co-reside; giving it to __launch_bounds__ tells
// ptxas not to let registers become the tighter occupancy limit.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr int kSmemPerSm = 228 * 1024;
#elif defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 800 || __CUDA_ARCH__ == 870)
constexpr int kSmemPerSm = 164 * 1024;
#else
constexpr int kSmemPerSm = 100 * 1024;  // sm_86 / sm_89, and the host pass
#endif
constexpr int kSmemReservedPerBlock = 1024;

// Forward: a block computes kBlockM query rows (16 per warp) against key tiles of kBlockN.
template <int kHeadDim_, int kBlockM_, int kBlockN_, typename elem_type_>
struct FwdTraits {
  using elem_type = elem_type_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_;
  static constexpr int kNWarps = kBlockM / 16, kNThreads = kNWarps * 32;
  static constexpr int kLdQK = kHeadDim + kPadH;                // sQ, sK, sV
  static constexpr int kLdS = cmax(kBlockN, kHeadDim) + kPadF;  // per-warp S, then P@V, scratch
  static constexpr int kLdP = kBlockN + kPadH;                  // per-warp P
  static constexpr int kSmemQ = kBlockM * kLdQK * 2;
  static constexpr int kSmemKV = 2 * kBlockN * kLdQK * 2;
  static constexpr int kSmemS = kNWarps * 16 * kLdS * 4;
  static constexpr int kSmemP = kNWarps * 16 * kLdP * 2;
  static constexpr int kSmemBytes = kSmemQ + kSmemKV + kSmemS + kSmemP;
  // d=64: 3 blocks/SM on sm_80, 4 on sm_90 (<= 128 registers); d=128: 2 / 3 (<= 168).
  static constexpr int kMinBlocksPerSm =
      cmax(1, cmin(4, kSmemPerSm / (kSmemBytes + kSmemReservedPerBlock)));
  static_assert(kBlockM % 16 == 0 && kBlockN % 32 == 0 && kHeadDim % 16 == 0, "tile shape");
};

// Backward dK/dV: a block owns kBlockN keys (16 per row group of warps) and streams query
// chunks of kBlockM. kSplitD warps share a row group, each accumulating kHeadDim / kSplitD
// columns of dK and dV (their fragments are the register budget of this kernel).
template <int kHeadDim_, int kBlockN_, int kBlockM_, int kSplitD_, typename elem_type_>
struct BwdDkdvTraits {
  using elem_type = elem_type_;
  static constexpr int kHeadDim = kHeadDim_, kBlockN = kBlockN_, kBlockM = kBlockM_;
  static constexpr int kSplitD = kSplitD_;
  static constexpr int kRowGroups = kBlockN / 16;
  static constexpr int kNWarps = kRowGroups * kSplitD, kNThreads = kNWarps * 32;
  static constexpr int kLdQK = kHeadDim + kPadH;                // sK, sV, sQ, sdO
  static constexpr int kLdA = cmax(kBlockM, kHeadDim) + kPadF;  // per-row-group S^T, then dK/dV out
  static constexpr int kLdB = kBlockM + kPadF;                  // per-row-group dP^T
  static constexpr int kLdP = kBlockM + kPadH;                  // per-row-group P^T and dS^T
  static constexpr int kSmemKV = 2 * kBlockN * kLdQK * 2;
  static constexpr int kSmemQdO = 2 * kBlockM * kLdQK * 2;
  static constexpr int kSmemA = kRowGroups * 16 * kLdA * 4;
  static constexpr int kSmemB = kRowGroups * 16 * kLdB * 4;
  static constexpr int kSmemP = 2 * kRowGroups * 16 * kLdP * 2;
  static constexpr int kSmemRow = 2 * kBlockM * 4;  // lse (log2 units) and delta of the chunk
  static constexpr int kSmemBytes = kSmemKV + kSmemQdO + kSmemA + kSmemB + kSmemP + kSmemRow;
  static_assert(kBlockM % (16 * kSplitD) == 0 && kHeadDim % (16 * kSplitD) == 0, "tile shape");
  static_assert(kBlockM % (2 * kSplitD) == 0 && kHeadDim % (16 * kSplitD) == 0, "tile shape");
};

// Backward dQ: a block owns kBlockM query rows (16 per warp) and streams key tiles of kBlockN.
template <int kHeadDim_, int kBlockM_, int kBlockN_, typename elem_type_>
struct BwdDqTraits {
  using elem_type = elem_type_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_;
  static constexpr int kNWarps = kBlockM / 16, kNThreads = kNWarps * 32;
  static constexpr int kLdQK = kHeadDim + kPadH;
  static constexpr int kLdA = cmax(kBlockN, kHeadDim) + kPadF;  // per-warp S, then dQ out
  static constexpr int kLdB = kBlockN + kPadF;                  // per-warp dP
  static constexpr int kLdP = kBlockN + kPadH;                  // per-warp dS
  static constexpr int kSmemQdO = 2 * kBlockM * kLdQK * 2;
  static constexpr int kSmemKV = 2 * kBlockN * kLdQK * 2;
  static constexpr int kSmemA = kNWarps * 16 * kLdA * 4;
  static constexpr int kSmemB = kNWarps * 16 * kLdB * 4;
  static constexpr int kSmemP = kNWarps * 16 * kLdP * 2;
  static constexpr int kSmemBytes = kSmemQdO + kSmemKV + kSmemA + kSmemB + kSmemP;
};

// ---- tile choices per head dim ---------------------------------------------------------------
// All tiles divide 64, so a BlockMask with 64-multiple blocks maps onto whole kernel tiles.
//
// Forward. d=64: 64x64 tiles, 4 warps: per thread 32 O floats + 32 S floats, 54 KB smem
// (4 CTAs/SM on sm_80). d=128: the O accumulator is 64 floats per thread, so the key tile drops
// to 32 to keep the S row-half at 16 floats and registers without spills; 72 KB smem
// (2 CTAs/SM on sm_80, 3 on sm_90).
template <int kHeadDim, typename T>
struct FwdConfig;
template <typename T>
struct FwdConfig<64, T> {
  using type = FwdTraits<64, 64, 64, T>;
};
template <typename T>
struct FwdConfig<128, T> {
  using type = FwdTraits<128, 64, 32, T>;
};

// Backward dK/dV. Each thread keeps (d / kSplitD / 16) * 8 * 2 floats of dK/dV fragments.
// d=64: 64 keys, 64-query chunks, 4 warps (64 accumulator floats/thread, 71 KB smem).
// d=128: one warp per row group would need 128 accumulator floats per thread and spill, so two
// warps split the columns (8 warps); the query chunk drops to 32 to stay near 100 KB of smem.
template <int kHeadDim, typename T>
struct BwdDkdvConfig;
template <typename T>
struct BwdDkdvConfig<64, T> {
  using type = BwdDkdvTraits<64, 64, 64, 1, T>;
};
template <typename T>
struct BwdDkdvConfig<128, T> {
  using type = BwdDkdvTraits<128, 64, 32, 2, T>;
};

// Backward dQ: 64 query rows, 4 warps; the dQ fragments are d/2 floats per thread.
// d=128 streams 32-key tiles for the same reason as the forward.
template <int kHeadDim, typename T>
struct BwdDqConfig;
template <typename T>
struct BwdDqConfig<64, T> {
  using type = BwdDqTraits<64, 64, 64, T>;
};
template <typename T>
struct BwdDqConfig<128, T> {
  using type = BwdDqTraits<128, 64, 32, T>;
};

}  // namespace fastattn::cuda
