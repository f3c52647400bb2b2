// The memory format the kernels see a tensor in (fused_resnet.layout.kernel_format): NCHW when
// it is NCHW-contiguous (also the case of H = W = 1) or neither, channels_last when it is
// channels_last-contiguous only.
#pragma once
#include <ATen/core/Tensor.h>

namespace fused_resnet {

inline at::MemoryFormat kernel_format(const at::Tensor& x) {
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  return at::MemoryFormat::Contiguous;
}

}  // namespace fused_resnet
