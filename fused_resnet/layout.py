"""Memory layout the kernels see.

Every kernel works on a dense 4-D tensor in memory order, viewed as [outer, C, inner]:
NCHW-contiguous stays NCHW (inner = H*W), channels_last-contiguous stays NHWC (inner = 1),
anything else is copied to NCHW. The packed ReLU mask follows the same memory order, so every
backend (and the fake tensors torch.compile sees) must apply the same rule; csrc/ops.cpp has
its C++ twin (kernel_format).
"""

from typing import NamedTuple

import torch


class Geometry(NamedTuple):
    outer: int
    channels: int
    inner: int

    @property
    def per_channel(self) -> int:
        return self.outer * self.inner


def kernel_format(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def is_channels_last(x: torch.Tensor) -> bool:
    return kernel_format(x) == torch.channels_last


def dense_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`t` laid out in the kernel format of `x` (a no-op when it already is)."""
    return t.contiguous(memory_format=kernel_format(x))


def empty_like_kernel(x: torch.Tensor, dtype=None) -> torch.Tensor:
    return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device,
                       memory_format=kernel_format(x))


def geometry(x: torch.Tensor) -> Geometry:
    n, c, h, w = x.shape
    if is_channels_last(x):
        return Geometry(n * h * w, c, 1)
    return Geometry(n, c, h * w)


def mask_bytes(numel: int) -> int:
    """Bytes of a packed ReLU mask: one bit per element."""
    return (numel + 7) // 8


def empty_mask(x: torch.Tensor, written: bool) -> torch.Tensor:
    """The packed ReLU mask of `x` (empty when no mask is written)."""
    return torch.empty(mask_bytes(x.numel()) if written else 0, dtype=torch.uint8,
                       device=x.device)


def accumulate_dtype(x: torch.Tensor) -> torch.dtype:
    """Arithmetic and per-channel statistics are fp32 (fp64 for fp64 input, which only the
    torch reference backend runs: it exists for gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def empty_per_channel(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape[1], dtype=accumulate_dtype(x), device=x.device)


def memory_order(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """1-D view of `t`'s elements in the memory order the kernels use for `like`."""
    if is_channels_last(like):
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t.reshape(-1)


def from_memory_order(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of memory_order: a tensor shaped and laid out like `like`."""
    n, c, h, w = like.shape
    if is_channels_last(like):
        return flat.reshape(n, h, w, c).permute(0, 3, 1, 2)
    return flat.reshape(n, c, h, w)


def fits_int32_pixel_index(n: int, pixels: int) -> bool:
    """Whether N*H*W pixels (pixels = H*W) stay below 2^31, with room for a tile past the end:
    the Triton conv indexes pixels in int32 (element offsets in int64)."""
    return n * pixels < 2**31 - 256
