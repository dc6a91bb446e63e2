// Dynamic scheduling of a driver's independent tasks over at::parallel_for's threads.
//
// at::parallel_for hands each thread one fixed, contiguous range. On a shared host one core
// is often slower for a while (another tenant, a clock step), and with fixed ranges the fast
// thread then idles at the end: ~4% of a sliding-window forward's time sat in the OpenMP
// barrier (perf, AMD EPYC Zen 4 class, 2 threads). Here every thread takes the next small
// chunk of tasks from one shared counter until none is left. A task owns its outputs (a
// forward query slice, a backward (head, dQ split) pair, a decode split), so which thread
// runs it, and in what order, never changes a result: outputs stay bitwise identical across
// runs and thread counts.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>

#include "cpu/kernel_stats.h"
#include "cpu/operands.h"

namespace fastattn::cpu {

// Runs f(begin, end, scratch) over chunks of [0, total); scratch is per thread (floats).
// threads (optional): bit t set when thread t ran a chunk (kernel_stats).
template <typename F>
inline void run_task_queue(int64_t total, int64_t scratch_floats, uint64_t* threads, F&& f) {
  if (total <= 0) return;
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  // chunks of ~1/64 of a thread's share: few counter updates, a short tail
  const int64_t chunk = std::max<int64_t>(1, total / (nt * 64));
  // thread t starts with chunk t (so every thread the pool runs gets work), then takes
  // the next chunk from the counter
  std::atomic<int64_t> next{nt * chunk};
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    std::optional<Scratch> buf;  // made at this thread's first chunk
    for (int64_t t = t0; t < t1; ++t) {  // one t per thread (fewer threads: a few each)
      const int64_t b = t * chunk;
      if (b >= total) break;
      if (!buf) {
        buf.emplace(scratch_floats);
        if (threads != nullptr) note_thread(threads);
      }
      f(b, std::min(total, b + chunk), buf->ptr);
    }
    for (;;) {
      const int64_t b = next.fetch_add(chunk, std::memory_order_relaxed);
      if (b >= total) break;
      if (!buf) buf.emplace(scratch_floats);
      f(b, std::min(total, b + chunk), buf->ptr);
    }
  });
}

}  // namespace fastattn::cpu
