// The cache of large CPU output blocks (output_pool.h says why).
#include "cpu/output_pool.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace fused_resnet {
namespace cpu {
namespace {

constexpr size_t kMinPooledBytes = size_t{256} << 10;
constexpr size_t kClassBytes = size_t{64} << 10;
constexpr size_t kAlignment = 64;  // PyTorch's CPU allocator aligns to 64 bytes as well
constexpr int64_t kDefaultLimitMiB = 1024;

int64_t limit_from_env() {
  const char* text = std::getenv("FUSED_RESNET_CPU_CACHE_MB");
  if (text == nullptr || *text == '\0') return kDefaultLimitMiB << 20;
  char* end = nullptr;
  const long long mib = std::strtoll(text, &end, 10);
  TORCH_CHECK(end != text && *end == '\0' && mib >= 0,
              "fused_resnet: FUSED_RESNET_CPU_CACHE_MB must be a whole number of MiB >= 0, got '",
              text, "'");
  return static_cast<int64_t>(mib) << 20;
}

// One block of memory; the DataPtr's context, so that its deleter knows the block's class.
struct Block {
  void* ptr;
  size_t bytes;
};

class OutputPool final : public c10::Allocator {
 public:
  OutputPool() : limit_(limit_from_env()) {}

  bool enabled() const { return limit_ > 0; }

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinPooledBytes || !enabled()) return c10::GetCPUAllocator()->allocate(n);
    const size_t bytes = (n + kClassBytes - 1) / kClassBytes * kClassBytes;
    Block* block = take(bytes);
    return {block->ptr, block, &OutputPool::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

  PoolStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_, in_use_, hits_, misses_, limit_};
  }

  void release_cached() {
    std::vector<Block*> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto& [bytes, list] : free_) blocks.insert(blocks.end(), list.begin(), list.end());
      free_.clear();
      cached_ = 0;
    }
    for (Block* block : blocks) destroy(block);
  }

 private:
  Block* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_ += static_cast<int64_t>(bytes);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        Block* block = it->second.back();
        it->second.pop_back();
        cached_ -= static_cast<int64_t>(bytes);
        ++hits_;
        return block;
      }
      ++misses_;
    }
    void* ptr = nullptr;
    if (posix_memalign(&ptr, kAlignment, bytes) != 0) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        in_use_ -= static_cast<int64_t>(bytes);
      }
      release_cached();  // the cache may be what holds the memory: retry without it
      if (posix_memalign(&ptr, kAlignment, bytes) != 0)
        TORCH_CHECK_WITH(OutOfMemoryError, false, "fused_resnet: out of CPU memory allocating ",
                         bytes, " bytes");
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_ += static_cast<int64_t>(bytes);
    }
    return new Block{ptr, bytes};
  }

  static void give_back(void* context) { instance().put(static_cast<Block*>(context)); }

  void put(Block* block) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto bytes = static_cast<int64_t>(block->bytes);
      in_use_ -= bytes;
      if (cached_ + bytes <= limit_) {
        free_[block->bytes].push_back(block);
        cached_ += bytes;
        return;
      }
    }
    destroy(block);  // over the limit: back to the system
  }

  static void destroy(Block* block) {
    std::free(block->ptr);
    delete block;
  }

 public:
  // Never destroyed: tensors freed during interpreter shutdown still call give_back.
  static OutputPool& instance() {
    static OutputPool* pool = new OutputPool();
    return *pool;
  }

 private:
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<Block*>> free_;
  int64_t cached_ = 0, in_use_ = 0, hits_ = 0, misses_ = 0;
  const int64_t limit_;
};

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, at::ScalarType dtype, at::MemoryFormat format) {
  return at::detail::empty_generic(sizes, &OutputPool::instance(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, format);
}

PoolStats pool_stats() { return OutputPool::instance().stats(); }

void release_cached() { OutputPool::instance().release_cached(); }

}  // namespace cpu
}  // namespace fused_resnet
