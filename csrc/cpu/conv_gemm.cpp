// The library convolution of the CPU training paths (the C++ training steps and the Python
// library path call the same functions, so their results stay bitwise equal):
//
//   conv2d_cpu(input, weight, stride, padding, dilation, groups) -> z
//   conv2d_cpu_backward(grad, input, weight, stride, padding, dilation, groups, need_input,
//                       need_weight) -> (grad_input, grad_weight)
//
// A 1x1 convolution (stride 1, no padding, one group) of an fp32 channels_last tensor is a GEMM
// over its pixels: z[p, o] = sum_i a[p, i] w[o, i], grad_a = grad_z w, grad_w = grad_z^T a.
// Where a bottleneck runs on few pixels (ResNet-50's layer3 and layer4: 72-1568 of them at batch
// 8), oneDNN's convolution is slower than at::mm (MKL) on the same data, most in backward, whose
// weight gradient oneDNN also computes in a blocked layout and then reorders: measured on a
// 2-core Intel Xeon (fp32, batch 8), backward 1.2-5.7x and forward 1.1-2.6x faster as GEMMs up
// to 1568 pixels, and no faster from 6272 pixels on (docs/cpu.md). Everything else, and
// anything with more than kGemmPixels pixels, runs at::conv2d / at::convolution_backward.
#include "cpu/conv_gemm.h"

#include "common/kernel_format.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

namespace fused_resnet {
namespace cpu {
namespace {

using at::Tensor;

// Pixels (N*H*W) up to which a 1x1 convolution runs as a GEMM (see the file comment).
constexpr int64_t kGemmPixels = 2048;

bool channels_last_dense(const Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Whether conv2d_cpu(input, weight, ...) runs as a GEMM.
bool runs_as_gemm(const Tensor& input, const Tensor& weight, at::IntArrayRef stride,
                  at::IntArrayRef padding, int64_t groups) {
  if (input.device().type() != at::kCPU || input.scalar_type() != at::kFloat ||
      weight.scalar_type() != at::kFloat || input.dim() != 4 || weight.dim() != 4)
    return false;
  const int64_t pixels = input.numel() / std::max<int64_t>(1, input.size(1));
  return groups == 1 && weight.size(2) == 1 && weight.size(3) == 1 && stride.size() == 2 &&
         stride[0] == 1 && stride[1] == 1 && padding.size() == 2 && padding[0] == 0 &&
         padding[1] == 0 && pixels > 0 && pixels <= kGemmPixels && channels_last_dense(input) &&
         weight.stride(0) == weight.size(1) && weight.stride(1) == 1;
}

// t (N, C, H, W), channels_last-dense, as its (N*H*W, C) matrix (a view).
Tensor pixel_rows(const Tensor& t) { return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)}); }

// (N*H*W, C) rows back as a channels_last (N, C, H, W) tensor shaped like `like` (a view).
Tensor from_pixel_rows(const Tensor& rows, const Tensor& like, int64_t channels) {
  return rows.view({like.size(0), like.size(2), like.size(3), channels}).permute({0, 3, 1, 2});
}

// The 1x1 weight (O, I, 1, 1) as its (O, I) matrix (a view).
Tensor weight_matrix(const Tensor& weight) {
  return weight.as_strided({weight.size(0), weight.size(1)}, {weight.size(1), 1});
}

}  // namespace

Tensor conv2d_cpu(const Tensor& input, const Tensor& weight, at::IntArrayRef stride,
                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  if (runs_as_gemm(input, weight, stride, padding, groups))
    return from_pixel_rows(at::mm(pixel_rows(input), weight_matrix(weight).t()), input,
                           weight.size(0));
  return at::conv2d(input, weight, std::nullopt, stride, padding, dilation, groups)
      .contiguous(kernel_format(input));
}

std::tuple<Tensor, Tensor> conv2d_cpu_backward(const Tensor& grad, const Tensor& input,
                                               const Tensor& weight, at::IntArrayRef stride,
                                               at::IntArrayRef padding, at::IntArrayRef dilation,
                                               int64_t groups, bool need_input,
                                               bool need_weight) {
  if (!runs_as_gemm(input, weight, stride, padding, groups)) {
    const int64_t zero[] = {0, 0};
    auto [grad_input, grad_weight, unused_bias] = at::convolution_backward(
        grad, input, weight, std::nullopt, stride, padding, dilation, false, zero, groups,
        {need_input, need_weight, false});
    return {need_input ? grad_input : at::empty({0}, input.options()),
            need_weight ? grad_weight : at::empty({0}, weight.options())};
  }
  const Tensor g = pixel_rows(grad.contiguous(at::MemoryFormat::ChannelsLast));
  Tensor grad_input = at::empty({0}, input.options());
  Tensor grad_weight = at::empty({0}, weight.options());
  if (need_input)
    grad_input = from_pixel_rows(at::mm(g, weight_matrix(weight)), input, input.size(1));
  if (need_weight)  // the weight's own strides: what autograd accumulates into, no copy
    grad_weight = at::mm(g.t(), pixel_rows(input)).as_strided(weight.sizes(), weight.strides());
  return {grad_input, grad_weight};
}

}  // namespace cpu
}  // namespace fused_resnet

TORCH_LIBRARY_FRAGMENT(fused_resnet, m) {
  m.def(
      "conv2d_cpu(Tensor input, Tensor weight, int[] stride, int[] padding, int[] dilation, "
      "int groups) -> Tensor");
  m.def(
      "conv2d_cpu_backward(Tensor grad, Tensor input, Tensor weight, int[] stride, "
      "int[] padding, int[] dilation, int groups, bool need_input, bool need_weight) "
      "-> (Tensor grad_input, Tensor grad_weight)");
}

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("conv2d_cpu", &fused_resnet::cpu::conv2d_cpu);
  m.impl("conv2d_cpu_backward", &fused_resnet::cpu::conv2d_cpu_backward);
}
