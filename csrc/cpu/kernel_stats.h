// Counters that show what the CPU kernels did, for tests and debugging
// (fastattn.backends.cpu.kernel_stats()): how many mask blocks the forward and backward
// computed -- one per (batch, head, query block, key block) visited, so a block-sparse call
// counts exactly its listed blocks -- and which at::parallel_for threads ran the tasks of the
// last call, and how many forward/backward calls took the bfloat16 dot-product path
// (kernel_args.h). Relaxed atomics, one update per task chunk: free next to the tile products.
// Concurrent calls add into the same counters (the thread sets then mix).
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

namespace fastattn::cpu {

struct KernelStats {
  int64_t fwd_visits = 0, bwd_visits = 0;
  uint64_t fwd_threads = 0, bwd_threads = 0;  // bit t: thread t ran a task of the last call
  int64_t fwd_bf16_dot = 0, bwd_bf16_dot = 0;  // calls that ran the bfloat16 products
};

inline KernelStats& kernel_stats() {
  static KernelStats stats;
  return stats;
}

inline void add_visits(int64_t* counter, int64_t n) {
  if (counter != nullptr && n != 0) __atomic_fetch_add(counter, n, __ATOMIC_RELAXED);
}

inline void note_thread(uint64_t* mask) {
  __atomic_fetch_or(mask, uint64_t{1} << (at::get_thread_num() & 63), __ATOMIC_RELAXED);
}

}  // namespace fastattn::cpu
