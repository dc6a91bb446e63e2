// The CPU output cache (output_cache.h has the what and why).
#include "cpu/output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

namespace fastattn::cpu {
namespace {

// Each block is [header | data]: the header (one cache line) holds the data's byte size, so
// the deleter needs no lookup; data stays 64-byte aligned like torch's own CPU blocks.
constexpr size_t kHeader = 64;

int64_t default_limit() {
  const char* env = std::getenv("FASTATTN_CPU_CACHE_MB");
  if (env == nullptr || *env == '\0') return int64_t{256} << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  return (end != env && mb > 0) ? static_cast<int64_t>(mb) << 20 : 0;
}

class OutputCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    void* data = take(n);
    return {data, data, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &OutputCache::release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  bool enabled() {
    std::lock_guard<std::mutex> g(mu_);
    return limit_ > 0;
  }
  OutputCacheStats stats() {
    std::lock_guard<std::mutex> g(mu_);
    int64_t blocks = 0;
    for (const auto& kv : kept_) blocks += static_cast<int64_t>(kv.second.size());
    return {limit_, kept_bytes_, blocks, hits_, misses_};
  }
  void set_limit(int64_t bytes) {
    std::lock_guard<std::mutex> g(mu_);
    limit_ = bytes < 0 ? 0 : bytes;
    trim_locked();
  }
  void clear() {
    std::lock_guard<std::mutex> g(mu_);
    const int64_t keep = limit_;
    limit_ = 0;
    trim_locked();
    limit_ = keep;
  }

  static OutputCache& get() {
    static OutputCache* cache = new OutputCache();  // never destroyed (see the header)
    return *cache;
  }

 private:
  static size_t size_of(void* data) {
    size_t n;
    std::memcpy(&n, static_cast<char*>(data) - kHeader, sizeof(n));
    return n;
  }
  static void release(void* data) {
    if (data != nullptr) get().give_back(data);
  }

  void* take(size_t n) {
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = kept_.find(n);
      if (it != kept_.end() && !it->second.empty()) {
        void* data = it->second.back();
        it->second.pop_back();
        kept_bytes_ -= static_cast<int64_t>(n);
        ++hits_;
        return data;
      }
      ++misses_;
    }
    void* base = std::aligned_alloc(kHeader, kHeader + (n + kHeader - 1) / kHeader * kHeader);
    if (base == nullptr) throw std::bad_alloc();
    std::memcpy(base, &n, sizeof(n));
    return static_cast<char*>(base) + kHeader;
  }

  void give_back(void* data) {
    const size_t n = size_of(data);
    {
      std::lock_guard<std::mutex> g(mu_);
      if (kept_bytes_ + static_cast<int64_t>(n) <= limit_) {
        kept_[n].push_back(data);
        kept_bytes_ += static_cast<int64_t>(n);
        return;
      }
    }
    std::free(static_cast<char*>(data) - kHeader);
  }

  void trim_locked() {  // frees kept blocks (largest sizes first) until within the limit
    while (kept_bytes_ > limit_) {
      auto big = kept_.end();
      for (auto it = kept_.begin(); it != kept_.end(); ++it)
        if (!it->second.empty() && (big == kept_.end() || it->first > big->first)) big = it;
      if (big == kept_.end()) break;
      std::free(static_cast<char*>(big->second.back()) - kHeader);
      big->second.pop_back();
      kept_bytes_ -= static_cast<int64_t>(big->first);
    }
  }

  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> kept_;  // byte size -> freed blocks
  int64_t limit_ = default_limit(), kept_bytes_ = 0, hits_ = 0, misses_ = 0;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& opt) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  const auto dt = opt.dtype().toScalarType();
  OutputCache& cache = OutputCache::get();
  if (numel * static_cast<int64_t>(c10::elementSize(dt)) < kMinCachedBytes || !cache.enabled())
    return at::empty(shape, opt);
  return at::Tensor(at::detail::empty_generic(shape, &cache, c10::DispatchKeySet(c10::DispatchKey::CPU), dt,
                                              std::nullopt));
}

OutputCacheStats output_cache_stats() { return OutputCache::get().stats(); }
void set_output_cache_limit(int64_t bytes) { OutputCache::get().set_limit(bytes); }
void empty_output_cache() { OutputCache::get().clear(); }

}  // namespace fastattn::cpu
