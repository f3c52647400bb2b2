// The library convolution of the CPU training paths: a convolution over few pixels (fp32, or bf16
// where native; channels_last) as one GEMM, anything else as at::conv2d (oneDNN). See
// conv_gemm.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace fused_resnet {
namespace cpu {

// conv2d(input, weight) without bias, in input's memory format (NCHW or channels_last).
at::Tensor conv2d_cpu(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// (grad_input, grad_weight) of conv2d_cpu; each empty unless asked for.
std::tuple<at::Tensor, at::Tensor> conv2d_cpu_backward(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    bool need_input, bool need_weight);

}  // namespace cpu
}  // namespace fused_resnet
