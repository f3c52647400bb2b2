// A cache of the CPU memory the fused ops' large outputs live in (activations, input
// gradients), reused from one training step to the next.
//
// Why: glibc gives a large block back to the kernel when it is freed (munmap, or trimming the
// heap's top once a step's backward has freed most of its memory), so the next step's block is
// fresh pages, and the first write to each 4 KiB page is a page fault that zeroes it. Measured
// with perf on a 2-core CPU (ResNet-50, fp32, batch 8, 224px training), the fused model's
// BN kernels spent as long faulting in their output pages as eager spends in its whole BN
// backward: ~5% of the step. Blocks kept here stay mapped, already faulted in.
//
// Only blocks of at least kMinPooledBytes; a freed block waits in a free list of its size
// class (64 KiB steps) until an allocation of that class takes it; free blocks are limited to
// FUSED_RESNET_CPU_CACHE_MB (default 1024; 0 turns the cache off: plain at::empty) and beyond
// that go back to the system. Like PyTorch's CUDA caching allocator, the cache holds memory the
// process no longer uses; release_cached() gives it back.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fused_resnet {
namespace cpu {

// An uninitialised CPU tensor of `sizes` in `format`, its memory from the cache where large.
at::Tensor pooled_empty(at::IntArrayRef sizes, at::ScalarType dtype, at::MemoryFormat format);

struct PoolStats {
  int64_t cached_bytes;     // free blocks held
  int64_t in_use_bytes;     // blocks in live tensors
  int64_t hits;             // allocations served from the cache
  int64_t misses;           // allocations that took new memory
  int64_t limit_bytes;      // the free-block limit
};

PoolStats pool_stats();

// Frees every cached (unused) block; blocks in use return to the system when freed.
void release_cached();

}  // namespace cpu
}  // namespace fused_resnet
