// The library convolution of the CPU training paths (the C++ training steps and the Python
// library path call the same functions, so their results stay bitwise equal):
//
//   conv2d_cpu(input, weight, stride, padding, dilation, groups) -> z
//   conv2d_cpu_backward(grad, input, weight, stride, padding, dilation, groups, need_input,
//                       need_weight) -> (grad_input, grad_weight)
//
// A 1x1 convolution (no padding, one group) of an fp32 channels_last tensor is a GEMM over the
// pixels it reads (every stride-th row and column): z[p, o] = sum_i a[p, i] w[o, i],
// grad_a = grad_z w (scattered back to those pixels), grad_w = grad_z^T a. Where a bottleneck
// runs on few pixels (ResNet-50's layer3 and layer4 and their projection shortcuts: 72-1568
// output pixels at batch 8), oneDNN's convolution is slower than at::mm (MKL) on the same data,
// most in backward, whose weight gradient oneDNN also computes in a blocked layout and then
// reorders: measured on a 2-core Intel Xeon (fp32, batch 8), backward 1.2-5.7x (strided
// projections 1.2-4.8x) and forward up to 2.6x faster as GEMMs up to 1568 output pixels; at
// 6272 output pixels the stride-1 ones no faster (docs/cpu.md). Everything else, and anything
// with more than kGemmPixels output pixels, runs at::conv2d / at::convolution_backward.
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

// Output pixels (N*Ho*Wo) up to which a 1x1 convolution runs as a GEMM (the file comment).
constexpr int64_t kGemmPixels = 2048;

// Output pixels of a 1x1 convolution without padding: every stride-th row and column.
int64_t output_pixels(const Tensor& input, at::IntArrayRef stride) {
  const auto sampled = [](int64_t size, int64_t step) { return (size + step - 1) / step; };
  return input.size(0) * sampled(input.size(2), stride[0]) * sampled(input.size(3), stride[1]);
}

// Whether conv2d_cpu(input, weight, ...) runs as a GEMM.
bool runs_as_gemm(const Tensor& input, const Tensor& weight, at::IntArrayRef stride,
                  at::IntArrayRef padding, int64_t groups) {
  if (input.device().type() != at::kCPU || input.scalar_type() != at::kFloat ||
      weight.scalar_type() != at::kFloat || input.dim() != 4 || weight.dim() != 4 ||
      stride.size() != 2 || padding.size() != 2 || stride[0] < 1 || stride[1] < 1)
    return false;
  const int64_t pixels = output_pixels(input, stride);
  return groups == 1 && weight.size(2) == 1 && weight.size(3) == 1 && padding[0] == 0 &&
         padding[1] == 0 && pixels > 0 && pixels <= kGemmPixels &&
         input.is_contiguous(at::MemoryFormat::ChannelsLast) &&
         weight.stride(0) == weight.size(1) && weight.stride(1) == 1;
}

// The pixels a 1x1 convolution with this stride reads, channels_last-dense (input itself at
// stride 1, a gathered copy otherwise).
Tensor read_pixels(const Tensor& input, at::IntArrayRef stride) {
  return input.slice(2, 0, input.size(2), stride[0])
      .slice(3, 0, input.size(3), stride[1])
      .contiguous(at::MemoryFormat::ChannelsLast);
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

// The input gradient of the read pixels put back in place: zeros elsewhere (strided).
Tensor scattered(const Tensor& grad_read, const Tensor& input, at::IntArrayRef stride) {
  if (stride[0] == 1 && stride[1] == 1) return grad_read;
  Tensor grad_input =
      at::empty(input.sizes(), input.options(), at::MemoryFormat::ChannelsLast).zero_();
  grad_input.slice(2, 0, input.size(2), stride[0])
      .slice(3, 0, input.size(3), stride[1])
      .copy_(grad_read);
  return grad_input;
}

}  // namespace

Tensor conv2d_cpu(const Tensor& input, const Tensor& weight, at::IntArrayRef stride,
                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  if (runs_as_gemm(input, weight, stride, padding, groups)) {
    const Tensor read = read_pixels(input, stride);
    return from_pixel_rows(at::mm(pixel_rows(read), weight_matrix(weight).t()), read,
                           weight.size(0));
  }
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
  if (need_input)  // grad's pixels are the read ones
    grad_input = scattered(from_pixel_rows(at::mm(g, weight_matrix(weight)), grad, input.size(1)),
                           input, stride);
  if (need_weight)  // the weight's own strides: what autograd accumulates into, no copy
    grad_weight = at::mm(g.t(), pixel_rows(read_pixels(input, stride)))
                      .as_strided(weight.sizes(), weight.strides());
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
