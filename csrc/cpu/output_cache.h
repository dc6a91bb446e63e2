// A caching allocator for the CPU kernels' large outputs (forward out, backward dQ/dK/dV).
//
// Why: glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh
// mapping and unmaps it on free, so each call's output is paged in anew: at N=16384, H=8,
// D=64 the 32 MiB float32 output costs 13 ms of page faults (writing a kept block: 1 ms),
// 40% of a sparse forward's fixed cost (benchmarks/results/cpu_sparse_fixed_cost_*.md).
// Like PyTorch's CUDA caching allocator, freed output blocks are kept for the next call of
// the same size instead of going back to the system.
//
//   - blocks of at least kMinCachedBytes only (smaller ones use torch's CPU allocator);
//   - a freed block is kept while the kept total stays within the limit (default 256 MiB,
//     FASTATTN_CPU_CACHE_MB at load, fastattn.cpu_output_cache(limit_mb=...) at run time;
//     0 turns caching off), otherwise it is freed at once;
//   - reuse needs the exact byte size (attention outputs repeat their shapes step after step);
//   - fastattn.empty_cpu_output_cache() frees every kept block.
// Tensors made with it are ordinary resizable CPU tensors; contents start uninitialised,
// as with at::empty. Thread-safe (one mutex); never destroyed, so tensors that outlive the
// interpreter's teardown can still be freed.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fastattn::cpu {

constexpr int64_t kMinCachedBytes = int64_t{1} << 20;

struct OutputCacheStats {
  int64_t limit_bytes, kept_bytes, kept_blocks, hits, misses;
};

// at::empty(shape, opt) for CPU tensors, through the cache.
at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& opt);
OutputCacheStats output_cache_stats();
void set_output_cache_limit(int64_t bytes);  // also trims the kept blocks to the new limit
void empty_output_cache();

}  // namespace fastattn::cpu
