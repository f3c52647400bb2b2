"""The cache of CPU memory behind the fused ops' large outputs (csrc/cpu/output_pool.h).

On a CPU, the C++ kernels' outputs of 256 KiB and more (activations, input gradients, ReLU
masks) come from a cache of blocks that stay mapped from one training step to the next:
glibc hands large freed blocks back to the kernel, and faulting fresh pages in again cost a
ResNet-50 training step about as much as eager's whole BatchNorm backward (measured:
docs/cpu.md). Like PyTorch's CUDA caching allocator, the cache keeps memory the process no
longer uses: at most FUSED_RESNET_CPU_CACHE_MB MiB of unused blocks (default 1024; 0 turns it
off, read once when the extension loads). release() gives the unused blocks back now.
"""

from fused_resnet import _extension


def stats() -> dict:
    """cached_bytes (unused blocks held), in_use_bytes (blocks in live tensors), hits and
    misses (allocations served from the cache, or with new memory), limit_bytes. All zero
    without the compiled extension."""
    module = _extension.load()
    if module is None:
        return dict(cached_bytes=0, in_use_bytes=0, hits=0, misses=0, limit_bytes=0)
    return module.cpu_cache_stats()


def release() -> None:
    """Frees the unused cached blocks (blocks in live tensors return to the system, or to the
    cache, when their tensors are freed)."""
    module = _extension.load()
    if module is not None:
        module.cpu_cache_release()
