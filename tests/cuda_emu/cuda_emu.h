// cuda_emu.h — a small CUDA emulation layer: compiles CUDA C++ kernel sources with g++ and
// runs them on the CPU, so their numerics can be tested on machines without a GPU.
//
// How it is used: compile the unmodified .cu files as C++ with
//     g++ -x c++ -I tests/cuda_emu/include ...
// The shim headers there (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h, mma.h) include this file.
// Kernel launches go through the kernels' FA_LAUNCH macro, which calls cuda_emu::launch here.
//
// Execution model (documented semantics, not hardware timing):
//   - A launch runs its blocks one after another (x fastest, then y, then z).
//   - Every CUDA thread of a block is a fiber (ucontext) with its own stack, all on the calling
//     host thread. A fiber runs until it blocks at a synchronization point, so the schedule is
//     "each thread runs as far as it can" — the most adversarial order for a missing barrier.
//     The order fibers are resumed in is forward, reverse or seeded-random (set_schedule).
//   - __syncthreads() is a real barrier: a thread waits until every live thread of its block
//     arrived. All arrivals of one barrier must come from the same source line, otherwise the
//     launch fails with "divergent __syncthreads" (on a GPU that is undefined behaviour).
//     A block in which every live thread waits and none can proceed fails with "deadlock".
//   - Warp operations (__shfl*_sync, __ballot/__any/__all_sync, __syncwarp) are barriers of the
//     32 lanes of a warp that exchange values. Masks must name every live lane of the warp.
//   - __shared__ variables are function-local statics (one copy, reused by every block, as
//     blocks never overlap); dynamic shared memory is a buffer per launch, filled with 0xFF
//     bytes (NaN for float, half and bfloat16) before each block so reads of shared memory
//     nobody wrote show up as NaN. A launch asking for more than 48 KiB of dynamic shared
//     memory fails unless cudaFuncSetAttribute(MaxDynamicSharedMemorySize) allowed it, as on
//     a GPU; the limit is 227 KiB (sm_90).
//   - Atomics are plain read-modify-writes (fibers switch only at synchronization points).
//   - __half / __nv_bfloat16 store their 16 bits; conversions round to nearest even. As with
//     torch's nvcc flags (-D__CUDA_NO_HALF_CONVERSIONS__ ...), there are no implicit
//     conversions or operators: kernels must convert explicitly.
//   - Math: exact C library functions, except where nvcc's --use_fast_math substitutes an
//     approximation with a documented error bound large enough to matter (tanhf ->
//     tanh.approx.f32), which is modelled at that bound (cuda_emu::tanh_approx).
//   - nvcuda::wmma: the fragment layout is unspecified by CUDA, so here every thread holds the
//     whole tile (x[] in logical row-major order, num_elements = rows * cols). load/store/mma
//     follow the documented semantics, accumulate in float, and check the documented rules:
//     the pointer is 256-bit aligned, ldm is a multiple of 16 bytes, and every lane of the
//     warp calls the same operations with the same pointer and ldm, in the same order.
//
// Not emulated: memory-model races between blocks (blocks never overlap), clusters,
// cp.async / inline PTX, texture memory, streams (launches are synchronous), printf formats
// beyond the C library's.
#pragma once

#ifdef __CUDACC__
#error "cuda_emu.h is for host compilers; nvcc uses the real CUDA headers"
#endif

#include <ucontext.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define FASTATTN_CUDA_EMU 1

// ---- qualifiers ------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static
#define __align__(n) alignas(n)
#ifndef __restrict__
#define __restrict__ __restrict
#endif

// ---- vector types ----------------------------------------------------------------------------
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(8) int2 { int x, y; };
struct alignas(8) uint2 { unsigned x, y; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
static constexpr int warpSize = 32;

// ---- runtime API subset ----------------------------------------------------------------------
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
typedef struct CUstream_emu* cudaStream_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace cuda_emu {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

enum class State { Ready, WaitBlock, WaitWarp, Done };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  int tid = 0;  // linear thread index within the block
  uint3 idx{0, 0, 0};
  State state = State::Ready;
};

struct CollectiveRecord {
  const char* op;
  const void* ptr;
  unsigned ldm;
};

struct WarpState {
  int live = 0;
  int arrived = 0;
  const char* site_file = nullptr;
  int site_line = 0;
  uint64_t slots[32];
  std::vector<CollectiveRecord> log;  // wmma ops since the last point every lane agreed on
  int count[32];
};

struct Launch {
  dim3 grid, block;
  uint3 block_idx{0, 0, 0};
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  ucontext_t sched_ctx;
  Fiber* cur = nullptr;
  int live = 0;
  int arrived = 0;
  const char* bar_file = nullptr;
  int bar_line = 0;
  char* dyn_smem = nullptr;
  size_t dyn_smem_bytes = 0;
  std::function<void()> body;
  std::string error;
};

inline thread_local Launch* t_launch = nullptr;

struct Config {
  int schedule = 0;  // 0 forward, 1 reverse, 2 random
  uint64_t seed = 0;
  size_t stack_bytes = size_t(1) << 19;  // 512 KiB: wmma fragments are whole tiles here
};
inline Config& config() {
  static Config c;
  return c;
}

// Per-function opt-in for dynamic shared memory above 48 KiB.
inline std::map<const void*, int>& smem_optin() {
  static std::map<const void*, int> m;
  return m;
}

inline Launch& L() {
  if (!t_launch) throw Error("CUDA device function called outside a kernel launch");
  return *t_launch;
}

[[noreturn]] inline void fail(const std::string& msg) {
  Launch& l = L();
  char where[96];
  std::snprintf(where, sizeof where, " [block (%u,%u,%u) thread (%u,%u,%u)]", l.block_idx.x,
                l.block_idx.y, l.block_idx.z, l.cur->idx.x, l.cur->idx.y, l.cur->idx.z);
  throw Error(msg + where);
}

inline void yield_to_scheduler() {
  Launch& l = L();
  swapcontext(&l.cur->ctx, &l.sched_ctx);
}

inline void release_block_barrier(Launch& l) {
  l.arrived = 0;
  l.bar_file = nullptr;
  for (auto& f : l.fibers)
    if (f.state == State::WaitBlock) f.state = State::Ready;
}

inline void release_warp_barrier(Launch& l, int w) {
  WarpState& ws = l.warps[w];
  ws.arrived = 0;
  ws.site_file = nullptr;
  const int n = static_cast<int>(l.fibers.size());
  for (int t = w * 32; t < std::min(n, w * 32 + 32); ++t)
    if (l.fibers[t].state == State::WaitWarp) l.fibers[t].state = State::Ready;
}

inline void block_barrier(const char* file, int line) {
  Launch& l = L();
  if (l.arrived == 0) {
    l.bar_file = file;
    l.bar_line = line;
  } else if (l.bar_line != line || std::strcmp(l.bar_file, file) != 0) {
    fail("divergent __syncthreads: this thread is at " + std::string(file) + ":" +
         std::to_string(line) + ", other threads of its block wait at " + l.bar_file + ":" +
         std::to_string(l.bar_line));
  }
  if (++l.arrived == l.live) {
    release_block_barrier(l);
    return;
  }
  l.cur->state = State::WaitBlock;
  yield_to_scheduler();
}

inline int lane_id() { return L().cur->tid & 31; }
inline int warp_id() { return L().cur->tid >> 5; }

inline unsigned live_lane_mask(const Launch& l, int w) {
  unsigned m = 0;
  const int n = static_cast<int>(l.fibers.size());
  for (int t = w * 32; t < std::min(n, w * 32 + 32); ++t)
    if (l.fibers[t].state != State::Done) m |= 1u << (t - w * 32);
  return m;
}

inline void warp_barrier(unsigned mask, const char* file, int line) {
  Launch& l = L();
  const int w = warp_id();
  WarpState& ws = l.warps[w];
  const unsigned live = live_lane_mask(l, w);
  if (mask != live && mask != 0xffffffffu) {
    char buf[160];
    std::snprintf(buf, sizeof buf,
                  "warp operation with mask 0x%08x at %s:%d; the emulator needs the mask to "
                  "name every live lane of the warp (0x%08x)",
                  mask, file, line, live);
    fail(buf);
  }
  if (ws.arrived == 0) {
    ws.site_file = file;
    ws.site_line = line;
  } else if (ws.site_line != line || std::strcmp(ws.site_file, file) != 0) {
    fail("divergent warp operation: lane at " + std::string(file) + ":" + std::to_string(line) +
         ", other lanes at " + ws.site_file + ":" + std::to_string(ws.site_line));
  }
  if (++ws.arrived == ws.live) {
    release_warp_barrier(l, w);
    return;
  }
  l.cur->state = State::WaitWarp;
  yield_to_scheduler();
}

// Every lane of a warp must issue the same wmma operations with the same arguments.
inline void record_collective(const char* op, const void* ptr, unsigned ldm) {
  Launch& l = L();
  WarpState& ws = l.warps[warp_id()];
  const int lane = lane_id();
  const size_t k = static_cast<size_t>(ws.count[lane]++);
  if (k < ws.log.size()) {
    const CollectiveRecord& r = ws.log[k];
    if (std::strcmp(r.op, op) != 0 || r.ptr != ptr || r.ldm != ldm) {
      char buf[256];
      std::snprintf(buf, sizeof buf,
                    "wmma operations are warp-collective: op #%zu of lane %d is %s(ptr=%p, "
                    "ldm=%u) but another lane of its warp issued %s(ptr=%p, ldm=%u)",
                    k, lane, op, ptr, ldm, r.op, r.ptr, r.ldm);
      fail(buf);
    }
  } else {
    ws.log.push_back({op, ptr, ldm});
  }
  // Forget the history once every live lane has caught up with it.
  const int n = static_cast<int>(l.fibers.size());
  const int w = warp_id();
  for (int t = w * 32; t < std::min(n, w * 32 + 32); ++t)
    if (l.fibers[t].state != State::Done && ws.count[t - w * 32] != static_cast<int>(ws.log.size()))
      return;
  ws.log.clear();
  for (int& c : ws.count) c = 0;
}

inline void fiber_entry() {
  Launch& l = *t_launch;
  Fiber* self = l.cur;
  try {
    l.body();
    WarpState& ws = l.warps[self->tid >> 5];
    if (ws.count[self->tid & 31] != static_cast<int>(ws.log.size()))
      fail("lane exited after " + std::to_string(ws.count[self->tid & 31]) +
           " wmma operations while another lane of its warp issued " +
           std::to_string(ws.log.size()));
  } catch (const std::exception& e) {
    if (l.error.empty()) l.error = e.what();
  } catch (...) {
    if (l.error.empty()) l.error = "unknown exception in kernel";
  }
  self->state = State::Done;
  --l.live;
  WarpState& ws = l.warps[self->tid >> 5];
  --ws.live;
  // Exited threads no longer count at barriers (as on sm_70+).
  if (l.arrived > 0 && l.arrived == l.live) release_block_barrier(l);
  if (ws.arrived > 0 && ws.arrived == ws.live) release_warp_barrier(l, self->tid >> 5);
  setcontext(&l.sched_ctx);
}

struct StackPool {
  std::vector<char*> stacks;
  size_t bytes = 0;
  ~StackPool() {
    for (char* s : stacks) munmap(s - 4096, bytes + 4096);
  }
  char* get(size_t i, size_t want) {
    if (want != bytes) {
      for (char* s : stacks) munmap(s - 4096, bytes + 4096);
      stacks.clear();
      bytes = want;
    }
    while (stacks.size() <= i) {
      // One guard page below each stack turns an overflow into a segfault, not corruption.
      void* p = mmap(nullptr, bytes + 4096, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) throw Error("cuda_emu: cannot allocate a fiber stack");
      mprotect(p, 4096, PROT_NONE);
      stacks.push_back(static_cast<char*>(p) + 4096);
    }
    return stacks[i];
  }
};

inline void run_block(Launch& l, std::vector<int>& order, std::mt19937_64& rng) {
  const int n = static_cast<int>(l.fibers.size());
  l.live = n;
  l.arrived = 0;
  l.bar_file = nullptr;
  for (int w = 0; w < static_cast<int>(l.warps.size()); ++w) {
    WarpState& ws = l.warps[w];
    ws.live = std::min(32, n - 32 * w);
    ws.arrived = 0;
    ws.site_file = nullptr;
    ws.log.clear();
    for (int& c : ws.count) c = 0;
  }
  if (l.dyn_smem_bytes) std::memset(l.dyn_smem, 0xFF, l.dyn_smem_bytes);
  for (Fiber& f : l.fibers) {
    f.state = State::Ready;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = config().stack_bytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  int done = 0;
  while (done < n) {
    if (config().schedule == 2) std::shuffle(order.begin(), order.end(), rng);
    bool progressed = false;
    done = 0;
    for (int t : order) {
      Fiber& f = l.fibers[t];
      if (f.state == State::Ready) {
        l.cur = &f;
        swapcontext(&l.sched_ctx, &f.ctx);
        progressed = true;
        if (!l.error.empty()) throw Error(l.error);
      }
      done += f.state == State::Done;
    }
    if (!progressed && done < n) {
      char buf[160];
      std::snprintf(buf, sizeof buf,
                    "deadlock in block (%u,%u,%u): %d live threads all wait at barriers that "
                    "cannot complete",
                    l.block_idx.x, l.block_idx.y, l.block_idx.z, n - done);
      throw Error(buf);
    }
  }
}

inline void run_grid(const void* fn, dim3 grid, dim3 block, size_t smem,
                     std::function<void()> body) {
  const size_t nthreads = size_t(block.x) * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || block.z > 64)
    throw Error("invalid block size " + std::to_string(block.x) + "x" + std::to_string(block.y) +
                "x" + std::to_string(block.z) + " (at most 1024 threads)");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    throw Error("invalid grid size");
  constexpr size_t kDefaultSmem = 48 * 1024, kMaxSmem = 227 * 1024;
  if (smem > kMaxSmem)
    throw Error("dynamic shared memory " + std::to_string(smem) + " B exceeds 227 KiB");
  if (smem > kDefaultSmem) {
    auto it = smem_optin().find(fn);
    if (it == smem_optin().end() || static_cast<size_t>(it->second) < smem)
      throw Error("launch needs " + std::to_string(smem) +
                  " B of dynamic shared memory (> 48 KiB) but cudaFuncSetAttribute("
                  "cudaFuncAttributeMaxDynamicSharedMemorySize) did not allow it");
  }
  static thread_local StackPool pool;
  Launch l;
  l.grid = grid;
  l.block = block;
  l.body = std::move(body);
  l.fibers.resize(nthreads);
  l.warps.resize((nthreads + 31) / 32);
  std::vector<char> smem_buf(smem + 128);
  l.dyn_smem = smem ? reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(smem_buf.data()) + 127) &
                                              ~uintptr_t(127))
                    : nullptr;
  l.dyn_smem_bytes = smem;
  for (size_t t = 0; t < nthreads; ++t) {
    Fiber& f = l.fibers[t];
    f.tid = static_cast<int>(t);
    f.idx = {static_cast<unsigned>(t % block.x), static_cast<unsigned>((t / block.x) % block.y),
             static_cast<unsigned>(t / (size_t(block.x) * block.y))};
    f.stack = pool.get(t, config().stack_bytes);
  }
  std::vector<int> order(nthreads);
  for (size_t t = 0; t < nthreads; ++t)
    order[t] = config().schedule == 1 ? static_cast<int>(nthreads - 1 - t) : static_cast<int>(t);
  std::mt19937_64 rng(config().seed);
  Launch* prev = t_launch;
  t_launch = &l;
  try {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          l.block_idx = {x, y, z};
          run_block(l, order, rng);
        }
  } catch (...) {
    t_launch = prev;
    throw;
  }
  t_launch = prev;
}

}  // namespace detail

// schedule: 0 forward, 1 reverse, 2 random (seeded); applies to later launches.
inline void set_schedule(int schedule, uint64_t seed) {
  detail::config().schedule = schedule;
  detail::config().seed = seed;
}

template <class... KArgs, class... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t,
            Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "wrong number of kernel arguments");
  // Kernel parameters are copied at launch, as on a GPU.
  std::tuple<std::decay_t<KArgs>...> params(std::forward<Args>(args)...);
  detail::run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem,
                   [&] { std::apply(kernel, params); });
}

inline char* dynamic_smem() { return detail::L().dyn_smem; }

}  // namespace cuda_emu

// ---- built-in variables ----------------------------------------------------------------------
#define threadIdx (::cuda_emu::detail::L().cur->idx)
#define blockIdx (::cuda_emu::detail::L().block_idx)
#define blockDim (::cuda_emu::detail::L().block)
#define gridDim (::cuda_emu::detail::L().grid)

// ---- runtime API -----------------------------------------------------------------------------
inline cudaError_t& cuda_emu_last_error() {
  static thread_local cudaError_t e = cudaSuccess;
  return e;
}
inline cudaError_t cudaGetLastError() {
  cudaError_t e = cuda_emu_last_error();
  cuda_emu_last_error() = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return cuda_emu_last_error(); }
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "emulated CUDA error";
}
template <class F>
cudaError_t cudaFuncSetAttribute(F* fn, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > 227 * 1024) return cudaErrorInvalidValue;
    ::cuda_emu::detail::smem_optin()[reinterpret_cast<const void*>(fn)] = value;
  }
  return cudaSuccess;
}

// ---- synchronization -------------------------------------------------------------------------
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::cuda_emu::detail::block_barrier(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  ::cuda_emu::detail::warp_barrier(mask, file, line);
}
inline void __threadfence() {}
inline void __threadfence_block() {}

namespace cuda_emu::detail {
// Each lane publishes 8 bytes, the warp meets, each lane reads its source, the warp meets again
// (so no slot is overwritten before everyone read it).
template <class T, class SrcFn>
T warp_exchange(unsigned mask, T v, SrcFn src_of, const char* file, int line) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  Launch& l = L();
  WarpState& ws = l.warps[warp_id()];
  const int lane = lane_id();
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  ws.slots[lane] = bits;
  warp_barrier(mask, file, line);
  const int src = src_of(lane);
  T r;
  std::memcpy(&r, &ws.slots[src], sizeof(T));
  warp_barrier(mask, file, line);
  return r;
}
}  // namespace cuda_emu::detail

template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32, const char* file = __builtin_FILE(),
              int line = __builtin_LINE()) {
  return ::cuda_emu::detail::warp_exchange(
      mask, v, [&](int lane) { return (lane & ~(width - 1)) + (src & (width - 1)); }, file, line);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                  const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::cuda_emu::detail::warp_exchange(
      mask, v,
      [&](int lane) {
        int s = lane ^ lane_mask;
        return ((s & ~(width - 1)) == (lane & ~(width - 1))) ? s : lane;
      },
      file, line);
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32,
                   const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::cuda_emu::detail::warp_exchange(
      mask, v,
      [&](int lane) {
        int s = lane + static_cast<int>(delta);
        return (s & ~(width - 1)) == (lane & ~(width - 1)) ? s : lane;
      },
      file, line);
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32,
                 const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::cuda_emu::detail::warp_exchange(
      mask, v,
      [&](int lane) {
        int s = lane - static_cast<int>(delta);
        return (s >= 0 && (s & ~(width - 1)) == (lane & ~(width - 1))) ? s : lane;
      },
      file, line);
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  using namespace ::cuda_emu::detail;
  Launch& l = L();
  WarpState& ws = l.warps[warp_id()];
  ws.slots[lane_id()] = pred != 0;
  warp_barrier(mask, file, line);
  unsigned r = 0;
  const unsigned live = live_lane_mask(l, warp_id());
  for (int i = 0; i < 32; ++i)
    if ((live >> i & 1u) && ws.slots[i]) r |= 1u << i;
  warp_barrier(mask, file, line);
  return r & mask;
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return __ballot_sync(mask, pred, file, line) != 0;
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  const unsigned live = ::cuda_emu::detail::live_lane_mask(::cuda_emu::detail::L(),
                                                           ::cuda_emu::detail::warp_id());
  return __ballot_sync(mask, pred, file, line) == (mask & live);
}

// ---- atomics (plain: fibers only switch at synchronization points) ---------------------------
template <class T>
T atomicAdd(T* p, T v) {
  T old = *p;
  *p = old + v;
  return old;
}
template <class T>
T atomicMax(T* p, T v) {
  T old = *p;
  *p = old > v ? old : v;
  return old;
}
template <class T>
T atomicMin(T* p, T v) {
  T old = *p;
  *p = old < v ? old : v;
  return old;
}
template <class T>
T atomicExch(T* p, T v) {
  T old = *p;
  *p = v;
  return old;
}
template <class T>
T atomicCAS(T* p, T compare, T v) {
  T old = *p;
  if (old == compare) *p = v;
  return old;
}

// ---- math intrinsics -------------------------------------------------------------------------
inline float __expf(float x) { return std::exp(x); }

namespace cuda_emu {
// What nvcc --use_fast_math makes of tanhf: the hardware's tanh.approx.f32 (sm_75+), whose PTX
// documentation bounds its relative error by about 2^-11. Its exact bits are not documented, so
// the emulator returns the worst case that bound allows in one direction: |tanh| shrunk by a
// factor (1 - 2^-11). Kernels reach it through fa_tanhf (csrc/cuda/cuda_compat.h).
inline float tanh_approx(float x) { return std::tanh(x) * (1.0f - 0x1p-11f); }
}  // namespace cuda_emu
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
inline unsigned __float_as_uint(float f) {
  unsigned i;
  std::memcpy(&i, &f, 4);
  return i;
}
template <class T>
T __ldg(const T* p) {
  return *p;
}

// ---- half and bfloat16 -----------------------------------------------------------------------
struct __half {
  uint16_t __x;
  __half() = default;
};
using half = __half;
struct __half2 {
  __half x, y;
};
struct __nv_bfloat16 {
  uint16_t __x;
  __nv_bfloat16() = default;
};
using nv_bfloat16 = __nv_bfloat16;
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline __half __float2half_rn(float f) {
  _Float16 h = static_cast<_Float16>(f);  // IEEE round-to-nearest-even (GCC >= 12, x86-64)
  __half r;
  std::memcpy(&r.__x, &h, 2);
  return r;
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.__x, 2);
  return static_cast<float>(v);
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  __nv_bfloat16 r;
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it quiet
    r.__x = static_cast<uint16_t>((u >> 16) | 0x40);
    return r;
  }
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even (overflow rounds to inf)
  r.__x = static_cast<uint16_t>(u >> 16);
  return r;
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t u = static_cast<uint32_t>(h.__x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

namespace cuda_emu::detail {
inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T>
T from_float(float v);
template <>
inline float from_float<float>(float v) { return v; }
template <>
inline __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
}  // namespace cuda_emu::detail

// ---- nvcuda::wmma ----------------------------------------------------------------------------
namespace nvcuda {
namespace wmma {

// Tag types, incomplete as in CUDA's mma.h (usable only as template arguments).
struct matrix_a;
struct matrix_b;
struct accumulator;
struct row_major;
struct col_major;
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K>
struct frag_shape;
template <int M, int N, int K>
struct frag_shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct frag_shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct frag_shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

// Every thread holds the whole tile, in logical row-major order.
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert((M == 16 && N == 16 && K == 16) || (M == 32 && N == 8 && K == 16) ||
                    (M == 8 && N == 32 && K == 16),
                "wmma shapes for 16-bit inputs: m16n16k16, m32n8k16, m8n32k16");
  static constexpr int rows = frag_shape<Use, M, N, K>::rows;
  static constexpr int cols = frag_shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  using element_type = T;
  T x[num_elements];
};

namespace detail {
template <class T>
void check_ptr(const char* op, const T* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "wmma::%s: pointer %p is not 256-bit (32-byte) aligned", op,
                  static_cast<const void*>(p));
    ::cuda_emu::detail::fail(buf);
  }
  if ((ldm * sizeof(T)) % 16 != 0) {
    char buf[160];
    std::snprintf(buf, sizeof buf,
                  "wmma::%s: ldm=%u is not a multiple of 16 bytes (%zu elements of %zu bytes)",
                  op, ldm, 16 / sizeof(T), sizeof(T));
    ::cuda_emu::detail::fail(buf);
  }
  ::cuda_emu::detail::record_collective(op, p, ldm);
}
}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, T v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;
}

template <class Use, int M, int N, int K, class T>
void load_matrix_sync(fragment<Use, M, N, K, T, row_major>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulators take a layout_t");
  detail::check_ptr("load_matrix_sync", p, ldm);
  for (int r = 0; r < f.rows; ++r)
    for (int c = 0; c < f.cols; ++c) f.x[r * f.cols + c] = p[size_t(r) * ldm + c];
}
template <class Use, int M, int N, int K, class T>
void load_matrix_sync(fragment<Use, M, N, K, T, col_major>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulators take a layout_t");
  detail::check_ptr("load_matrix_sync", p, ldm);
  for (int r = 0; r < f.rows; ++r)
    for (int c = 0; c < f.cols; ++c) f.x[r * f.cols + c] = p[size_t(c) * ldm + r];
}
template <int M, int N, int K, class T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm,
                      layout_t layout) {
  detail::check_ptr("load_matrix_sync", p, ldm);
  for (int r = 0; r < f.rows; ++r)
    for (int c = 0; c < f.cols; ++c)
      f.x[r * f.cols + c] =
          layout == mem_row_major ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r];
}
template <int M, int N, int K, class T>
void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm,
                       layout_t layout) {
  detail::check_ptr("store_matrix_sync", p, ldm);
  for (int r = 0; r < f.rows; ++r)
    for (int c = 0; c < f.cols; ++c)
      (layout == mem_row_major ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r]) =
          f.x[r * f.cols + c];
}

// d = a * b + c, products and sums in float (tensor cores accumulate 16-bit products in fp32).
template <int M, int N, int K, class Tab, class LA, class LB, class Tc>
void mma_sync(fragment<accumulator, M, N, K, Tc>& d, const fragment<matrix_a, M, N, K, Tab, LA>& a,
              const fragment<matrix_b, M, N, K, Tab, LB>& b,
              const fragment<accumulator, M, N, K, Tc>& c) {
  ::cuda_emu::detail::record_collective("mma_sync", nullptr, 0);
  float af[M * K], bf[K * N], acc[M * N];
  for (int i = 0; i < M * K; ++i) af[i] = ::cuda_emu::detail::to_float(a.x[i]);
  for (int i = 0; i < K * N; ++i) bf[i] = ::cuda_emu::detail::to_float(b.x[i]);
  for (int i = 0; i < M * N; ++i) acc[i] = ::cuda_emu::detail::to_float(c.x[i]);
  for (int m = 0; m < M; ++m)
    for (int k = 0; k < K; ++k) {
      const float av = af[m * K + k];
      for (int n = 0; n < N; ++n) acc[m * N + n] += av * bf[k * N + n];
    }
  for (int i = 0; i < M * N; ++i) d.x[i] = ::cuda_emu::detail::from_float<Tc>(acc[i]);
}

}  // namespace wmma
}  // namespace nvcuda
