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
//   - The PTX device functions of csrc/cuda/ptx_ops.h (mma.sync m16n8k16, ldmatrix, cp.async,
//     instrumented ld/st.shared) run here with the PTX ISA's per-lane fragment layouts; see the
//     "PTX" section at the end of this file: warp-collective ops meet all 32 lanes and are
//     computed once from every lane's registers, cp.async copies land only at the
//     cp.async.wait_group that covers their group, and every shared-memory access made through
//     those functions is checked by a hazard detector (two threads, one writing, the same
//     4-byte word, no __syncthreads / __syncwarp between them).
//
// Not emulated: memory-model races between blocks (blocks never overlap), clusters,
// inline PTX other than ptx_ops.h's, texture memory, streams (launches are synchronous),
// printf formats beyond the C library's. The hazard detector sees only the shared-memory
// accesses made through ptx_ops.h (plain C++ pointer accesses are invisible to it).
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

struct PendingCopy {  // one cp.async of 16 bytes, not landed yet
  char* dst;
  unsigned char data[16];
  long group;  // -1: not committed yet
  const char* file;
  int line;
};

struct Fiber {
  std::vector<PendingCopy> pending;  // cp.async copies issued by this thread, not landed
  long committed = 0;                // cp.async groups committed by this thread
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
  void* ptrs[32];                // per-lane arguments of a warp-collective PTX op
  bool fence = false;            // the pending meeting is a __syncwarp (orders shared memory)
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
  // Shared-memory hazard detector: barrier generations and one shadow record per 4-byte word.
  uint32_t block_gen = 0;
  std::vector<uint32_t> warp_gen;
  struct Shadow {
    int32_t w_tid = -1;  // last writer
    uint32_t w_gen = 0, w_wgen = 0;
    int32_t r_tid = -1;  // first reader since the write in generation r_gen
    uint32_t r_gen = 0, r_wgen_max = 0;
    int32_t r_warp = -1;  // warp of every such reader, -1 if several warps
    bool r_multi = false;
  };
  std::vector<Shadow> shadow;
  int bar_or = 0, bar_result = 0;  // __syncthreads_or
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
  ++l.block_gen;
  l.bar_result = l.bar_or;
  l.bar_or = 0;
  l.bar_file = nullptr;
  for (auto& f : l.fibers)
    if (f.state == State::WaitBlock) f.state = State::Ready;
}

inline void release_warp_barrier(Launch& l, int w) {
  WarpState& ws = l.warps[w];
  ws.arrived = 0;
  ws.site_file = nullptr;
  if (ws.fence) {
    ++l.warp_gen[w];
    ws.fence = false;
  }
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
    if (!self->pending.empty()) {
      char buf[200];
      std::snprintf(buf, sizeof buf,
                    "thread exited with %zu cp.async copies no cp.async.wait_group covered "
                    "(first issued at %s:%d)",
                    self->pending.size(), self->pending[0].file, self->pending[0].line);
      fail(buf);
    }
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
    ws.fence = false;
    for (int& c : ws.count) c = 0;
  }
  if (l.dyn_smem_bytes) std::memset(l.dyn_smem, 0xFF, l.dyn_smem_bytes);
  l.block_gen = 0;
  l.bar_or = l.bar_result = 0;
  l.warp_gen.assign(l.warps.size(), 0);
  l.shadow.assign((l.dyn_smem_bytes + 3) / 4, Launch::Shadow{});
  for (Fiber& f : l.fibers) {
    f.state = State::Ready;
    f.pending.clear();
    f.committed = 0;
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

// Every launch's configuration, in order (tests read it to see which instantiation ran).
struct LaunchRecord {
  dim3 grid, block;
  size_t smem;
};
inline std::vector<LaunchRecord>& launch_log() {
  static thread_local std::vector<LaunchRecord> log;
  return log;
}

inline void run_grid(const void* fn, dim3 grid, dim3 block, size_t smem,
                     std::function<void()> body) {
  launch_log().push_back(LaunchRecord{grid, block, smem});
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
  using namespace ::cuda_emu::detail;
  L().warps[warp_id()].fence = true;  // orders shared memory among the warp's lanes
  warp_barrier(mask, file, line);
}
inline int __syncthreads_or(int pred, const char* file = __builtin_FILE(),
                            int line = __builtin_LINE()) {
  using namespace ::cuda_emu::detail;
  L().bar_or |= pred != 0;
  block_barrier(file, line);
  return L().bar_result;
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

// ---- PTX: the device functions of csrc/cuda/ptx_ops.h -----------------------------------------
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, ldmatrix.sync.aligned.m8n8
// .x{1,2,4}[.trans].shared.b16, cp.async.cg.shared.global (16 B, zero-fill), commit_group,
// wait_group, and ld/st.shared through which kernels make their shared-memory accesses visible to
// the hazard detector. Fragment layouts are the PTX ISA's ("Matrix Fragments for mma.m16n8k16
// with floating point type", "ldmatrix"): with g = lane / 4 and t = lane % 4,
//   A (16x16, 4 regs of 2 halves): reg0 (g, 2t..2t+1), reg1 (g+8, 2t..), reg2 (g, 2t+8..),
//                                  reg3 (g+8, 2t+8..)
//   B (16x8,  2 regs):             reg0 (k = 2t..2t+1, n = g), reg1 (k = 2t+8.., n = g)
//   C/D (16x8 fp32, 4 regs):       c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1)
//   ldmatrix, matrix i (8x8 of b16, row r's address from lane 8i + r): lane gets reg i =
//   (row g, cols 2t, 2t+1); with .trans, (rows 2t, 2t+1, col g). The low 16 bits hold the
//   element of the lower column (row for .trans).
namespace cuda_emu::ptx {
using namespace ::cuda_emu::detail;

inline bool in_smem(const void* p, size_t bytes) {
  const Launch& l = L();
  const char* c = static_cast<const char*>(p);
  return l.dyn_smem && c >= l.dyn_smem && c + bytes <= l.dyn_smem + l.dyn_smem_bytes;
}

// The hazard detector: thread `tid` reads or writes [p, p + bytes) of dynamic shared memory.
inline void smem_access(int tid, const void* p, size_t bytes, bool write, const char* what,
                        const char* file, int line) {
  Launch& l = L();
  if (!in_smem(p, bytes)) return;
  const size_t off = static_cast<size_t>(static_cast<const char*>(p) - l.dyn_smem);
  const int w = tid >> 5;
  const uint32_t G = l.block_gen, Wg = l.warp_gen[w];
  auto separated = [&](int other, uint32_t gen, uint32_t wgen) {
    return gen != G || ((other >> 5) == w && wgen != Wg);
  };
  auto race = [&](size_t word, int other, const char* other_did) {
    char buf[400];
    std::snprintf(buf, sizeof buf,
                  "shared-memory race: thread %d %s shared byte %zu (%s at %s:%d) after thread "
                  "%d %s it, with no __syncthreads/__syncwarp between them",
                  tid, write ? "writes" : "reads", word * 4, what, file, line, other, other_did);
    fail(buf);
  };
  for (size_t word = off / 4; word < (off + bytes + 3) / 4; ++word) {
    Launch::Shadow& s = l.shadow[word];
    if (s.w_tid >= 0 && s.w_tid != tid && !separated(s.w_tid, s.w_gen, s.w_wgen))
      race(word, s.w_tid, "wrote");
    if (write) {
      if (s.r_tid >= 0 && s.r_gen == G && (s.r_multi || s.r_tid != tid)) {
        const bool warp_ordered = s.r_warp == w && s.r_wgen_max != Wg;
        if (!warp_ordered) race(word, s.r_tid, "read");
      }
      s.w_tid = tid;
      s.w_gen = G;
      s.w_wgen = Wg;
      s.r_tid = -1;
    } else if (s.r_tid < 0 || s.r_gen != G) {
      s.r_tid = tid;
      s.r_gen = G;
      s.r_warp = w;
      s.r_wgen_max = Wg;
      s.r_multi = false;
    } else {
      if (s.r_tid != tid) s.r_multi = true;
      if (s.r_warp != w) s.r_warp = -1;
      s.r_wgen_max = std::max(s.r_wgen_max, Wg);
    }
  }
}

inline int my_tid() { return L().cur->tid; }

// Warp-collective meeting: every lane publishes `args`; the last lane to arrive runs
// compute(ptrs) once over all 32 lanes' arguments, then the warp is released. Needs all 32
// lanes live and at the same source line.
template <class F>
void warp_collective(const char* op, void* args, const char* file, int line, F&& compute) {
  Launch& l = L();
  const int w = warp_id();
  WarpState& ws = l.warps[w];
  if (ws.live != 32 || live_lane_mask(l, w) != 0xffffffffu)
    fail(std::string(op) + " is warp-collective (.sync.aligned): all 32 lanes must execute it");
  if (ws.arrived == 0) {
    ws.site_file = file;
    ws.site_line = line;
  } else if (ws.site_line != line || std::strcmp(ws.site_file, file) != 0) {
    fail(std::string("divergent ") + op + ": lane at " + file + ":" + std::to_string(line) +
         ", other lanes at " + ws.site_file + ":" + std::to_string(ws.site_line));
  }
  ws.ptrs[lane_id()] = args;
  if (++ws.arrived == ws.live) {
    compute(ws.ptrs, w);
    release_warp_barrier(l, w);
    return;
  }
  l.cur->state = State::WaitWarp;
  yield_to_scheduler();
}

inline float bits_to_float(uint16_t b, bool bf16) {
  if (bf16) {
    __nv_bfloat16 h;
    h.__x = b;
    return __bfloat162float(h);
  }
  __half h;
  h.__x = b;
  return __half2float(h);
}

struct MmaArgs {
  float* d;
  const uint32_t* a;
  const uint32_t* b;
};

// d[4] += A * B for the warp's m16n8k16 fragments (fp32 accumulate of 16-bit products).
inline void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, bool bf16,
                         const char* file, int line) {
  MmaArgs args{d, a, b};
  warp_collective("mma.sync.m16n8k16", &args, file, line, [&](void** ptrs, int) {
    float A[16][16], B[16][8], C[16][8];
    for (int lane = 0; lane < 32; ++lane) {
      const MmaArgs& x = *static_cast<MmaArgs*>(ptrs[lane]);
      const int g = lane >> 2, t = lane & 3;
      for (int r = 0; r < 4; ++r) {
        const int row = g + (r & 1) * 8, col = 2 * t + (r >> 1) * 8;
        A[row][col] = bits_to_float(static_cast<uint16_t>(x.a[r] & 0xffffu), bf16);
        A[row][col + 1] = bits_to_float(static_cast<uint16_t>(x.a[r] >> 16), bf16);
      }
      for (int r = 0; r < 2; ++r) {
        const int k = 2 * t + r * 8;
        B[k][g] = bits_to_float(static_cast<uint16_t>(x.b[r] & 0xffffu), bf16);
        B[k + 1][g] = bits_to_float(static_cast<uint16_t>(x.b[r] >> 16), bf16);
      }
      for (int r = 0; r < 4; ++r) C[g + (r >> 1) * 8][2 * t + (r & 1)] = x.d[r];
    }
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 8; ++n) {
        float acc = C[m][n];
        for (int k = 0; k < 16; ++k) acc += A[m][k] * B[k][n];
        C[m][n] = acc;
      }
    for (int lane = 0; lane < 32; ++lane) {
      const MmaArgs& x = *static_cast<MmaArgs*>(ptrs[lane]);
      const int g = lane >> 2, t = lane & 3;
      for (int r = 0; r < 4; ++r) x.d[r] = C[g + (r >> 1) * 8][2 * t + (r & 1)];
    }
  });
}

struct LdmArgs {
  uint32_t* r;
  const void* addr;
};

// ldmatrix.sync.aligned.m8n8.x{num}[.trans].shared.b16: lanes 8i..8i+7 give the row addresses
// of matrix i (16-byte aligned, in shared memory); every lane gets one register per matrix.
inline void ldmatrix(int num, bool trans, uint32_t* r, const void* addr, const char* file,
                     int line) {
  LdmArgs args{r, addr};
  warp_collective(trans ? "ldmatrix.trans" : "ldmatrix", &args, file, line,
                  [&](void** ptrs, int w) {
    uint16_t M[4][8][8];
    for (int i = 0; i < num; ++i)
      for (int row = 0; row < 8; ++row) {
        const int src = 8 * i + row;
        const void* p = static_cast<LdmArgs*>(ptrs[src])->addr;
        if (reinterpret_cast<uintptr_t>(p) % 16 != 0 || !in_smem(p, 16)) {
          char buf[200];
          std::snprintf(buf, sizeof buf,
                        "ldmatrix at %s:%d: lane %d's row address %p is not a 16-byte aligned "
                        "address of dynamic shared memory",
                        file, line, src, p);
          fail(buf);
        }
        smem_access(w * 32 + src, p, 16, false, "ldmatrix", file, line);
        std::memcpy(M[i][row], p, 16);
      }
    for (int lane = 0; lane < 32; ++lane) {
      LdmArgs& x = *static_cast<LdmArgs*>(ptrs[lane]);
      const int g = lane >> 2, t = lane & 3;
      for (int i = 0; i < num; ++i) {
        const uint16_t lo = trans ? M[i][2 * t][g] : M[i][g][2 * t];
        const uint16_t hi = trans ? M[i][2 * t + 1][g] : M[i][g][2 * t + 1];
        x.r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
      }
    }
  });
}

// cp.async.cg.shared.global [dst], [src], 16, src_size (src_size 0: 16 zero bytes). The source
// is read now; the destination is written only when a cp.async.wait_group covers the copy's
// group (a read before that sees whatever shared memory held: NaN-filled or stale).
inline void cp_async_16(void* dst, const void* src, bool pred, const char* file, int line) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || !in_smem(dst, 16) ||
      (pred && reinterpret_cast<uintptr_t>(src) % 16 != 0)) {
    char buf[200];
    std::snprintf(buf, sizeof buf,
                  "cp.async at %s:%d: destination %p must be 16-byte aligned dynamic shared "
                  "memory and the source 16-byte aligned",
                  file, line, dst);
    fail(buf);
  }
  const int tid = my_tid();
  // The copy may write any time until its wait: it conflicts with reads not yet ordered.
  smem_access(tid, dst, 16, true, "cp.async (issue)", file, line);
  PendingCopy c;
  c.dst = static_cast<char*>(dst);
  if (pred)
    std::memcpy(c.data, src, 16);
  else
    std::memset(c.data, 0, 16);
  c.group = -1;
  c.file = file;
  c.line = line;
  L().cur->pending.push_back(c);
}

inline void cp_async_commit() {
  Fiber& f = *L().cur;
  for (PendingCopy& c : f.pending)
    if (c.group < 0) c.group = f.committed;
  ++f.committed;
}

// cp.async.wait_group n: every committed group but the newest n has landed.
inline void cp_async_wait(int n, const char* file, int line) {
  Fiber& f = *L().cur;
  const long upto = f.committed - n;  // groups [0, upto) must be complete
  std::vector<PendingCopy> keep;
  for (PendingCopy& c : f.pending) {
    if (c.group >= 0 && c.group < upto) {
      smem_access(f.tid, c.dst, 16, true, "cp.async (lands at wait_group)", file, line);
      std::memcpy(c.dst, c.data, 16);
    } else {
      keep.push_back(c);
    }
  }
  f.pending.swap(keep);
}

template <class V>
V lds(const V* p, const char* file, int line) {
  smem_access(my_tid(), p, sizeof(V), false, "ld.shared", file, line);
  return *p;
}
template <class V>
void sts(V* p, V v, const char* file, int line) {
  smem_access(my_tid(), p, sizeof(V), true, "st.shared", file, line);
  *p = v;
}

}  // namespace cuda_emu::ptx
