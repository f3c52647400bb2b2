// The library convolution of the CPU training paths (the C++ training steps and the Python
// library path call the same functions, so their results stay bitwise equal):
//
//   conv2d_cpu(input, weight, stride, padding, dilation, groups) -> z
//   conv2d_cpu_backward(grad, input, weight, stride, padding, dilation, groups, need_input,
//                       need_weight) -> (grad_input, grad_weight)
//
// A convolution (one group, no dilation) of an fp32 (or, where oneDNN has native bf16 kernels,
// bf16: autocast's) channels_last tensor, the weight in any layout (an NCHW model computing in
// channels_last passes NCHW weights: copied to channels_last per call), is a GEMM over its
// output pixels: each pixel's kernel window, (kh, kw, C) values, is a row of `cols` (im2col),
// z = cols w^T, grad_cols = grad_z w (added back into the windows' places: col2im),
// grad_w = grad_z^T cols. A 1x1 window without padding reads the input's pixels themselves
// (every stride-th row and column; no copy at stride 1).
//
// Where a bottleneck runs on few pixels (ResNet-50's layer3 and layer4 and their projection
// shortcuts: 72-1568 output pixels at batch 8), oneDNN's convolution is slower than at::mm
// (MKL) on the same data, most in backward, whose weight gradient oneDNN also computes in a
// blocked layout and then reorders. Measured on a 2-core Intel Xeon (fp32, batch 8;
// benchmarks/results/cpu-conv-gemm-2026-12-02-intel/, docs/cpu.md): 1x1 convs up to 1568 output
// pixels up to ~5x faster in backward (strided projections up to ~3x) and ~2.5x in forward as
// GEMMs, mixed from 6272 pixels on; 3x3 convs with 512 channels over 128-392 pixels 1.3-2.3x
// faster in backward (the GEMMs alone, before the im2col copies), with 256 channels about even
// over 392 pixels and slower over 1568. Hence the rule (runs_as_gemm): 1x1 without padding up
// to kPointwisePixels output pixels; a larger window while the output pixels are no more than
// the input channels (its weight gradient, a reduction over the pixels, is short and wide
// there); everything else at::conv2d / at::convolution_backward. bf16 (same machine, AMX): every
// shape the rule selects was faster as GEMMs too (1x1s up to 2048 pixels 1.3-2.5x in forward,
// 1.3-3.7x in backward; 3x3 with 512 channels over 128 / 392 pixels 5x / 2.8x in backward),
// and the fused bf16 training step went from 0.97x to 1.17x of eager's (docs/cpu.md).
#include "cpu/conv_gemm.h"

#include "common/kernel_format.h"

#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

namespace fused_resnet {
namespace cpu {
namespace {

using at::Tensor;

// Output pixels (N*Ho*Wo) up to which a 1x1 convolution runs as a GEMM (the file comment).
constexpr int64_t kPointwisePixels = 2048;

// A convolution's window along one spatial axis: kernel size, stride, padding (no dilation).
struct Axis {
  int64_t size, kernel, stride, pad;
  int64_t out() const { return (size + 2 * pad - kernel) / stride + 1; }
  // The output positions [first, last) whose input position o*stride + k - pad is inside the
  // input, for kernel offset k, and the input position of the first.
  int64_t first(int64_t k) const { return std::max<int64_t>(0, (pad - k + stride - 1) / stride); }
  int64_t last(int64_t k) const {
    const int64_t top = size - 1 + pad - k;  // the last output reads input row <= size - 1
    return top < 0 ? 0 : std::min(out(), top / stride + 1);
  }
  int64_t input_at(int64_t o, int64_t k) const { return o * stride + k - pad; }
};

struct Window {
  Axis h, w;
  bool pointwise() const { return h.kernel == 1 && w.kernel == 1 && h.pad == 0 && w.pad == 0; }
};

Window window_of(const Tensor& input, const Tensor& weight, at::IntArrayRef stride,
                 at::IntArrayRef padding) {
  return {{input.size(2), weight.size(2), stride[0], padding[0]},
          {input.size(3), weight.size(3), stride[1], padding[1]}};
}

// Whether oneDNN has native bf16 kernels here (AVX-512 BF16 / AMX), which at::mm and the
// convolutions then use alike; without them a bf16 at::mm takes a slow reference path.
// A torch built without oneDNN registers no such op: no bf16 GEMMs there.
bool native_bf16() {
  static const bool supported = [] {
    if (!at::hasMKLDNN()) return false;
    const auto op =
        c10::Dispatcher::singleton().findSchema({"mkldnn::_is_mkldnn_bf16_supported", ""});
    return op.has_value() && op->typed<bool()>().call();
  }();
  return supported && at::globalContext().userEnabledMkldnn();
}

// The dtypes whose convolutions run as GEMMs: fp32, and bf16 (autocast's) where native.
bool gemm_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || (dtype == at::kBFloat16 && native_bf16());
}

// Whether conv2d_cpu(input, weight, ...) runs as a GEMM (the file comment).
bool runs_as_gemm(const Tensor& input, const Tensor& weight, at::IntArrayRef stride,
                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  // Anything unusual (empty tensors, a window larger than the padded input, invalid
  // arguments) goes to aten, which computes it or raises aten's error.
  if (input.device().type() != at::kCPU || !gemm_dtype(input.scalar_type()) ||
      weight.scalar_type() != input.scalar_type() || input.dim() != 4 || weight.dim() != 4 ||
      groups != 1 || stride.size() != 2 || padding.size() != 2 || dilation.size() != 2 ||
      stride[0] < 1 || stride[1] < 1 || padding[0] < 0 || padding[1] < 0 ||
      dilation[0] < 1 || dilation[1] < 1 || input.numel() == 0 || weight.numel() == 0 ||
      input.size(1) != weight.size(1) || !input.is_contiguous(at::MemoryFormat::ChannelsLast))
    return false;
  const Window win = window_of(input, weight, stride, padding);
  if (input.size(2) + 2 * padding[0] < weight.size(2) ||
      input.size(3) + 2 * padding[1] < weight.size(3))
    return false;
  const int64_t pixels = input.size(0) * win.h.out() * win.w.out();
  if (win.pointwise()) return pixels <= kPointwisePixels;
  return dilation[0] == 1 && dilation[1] == 1 && pixels <= input.size(1);
}

// t (N, C, H, W), channels_last-dense, as its (N*H*W, C) matrix (a view).
Tensor pixel_rows(const Tensor& t) { return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)}); }

// (N*Ho*Wo, C) rows as a channels_last (N, C, Ho, Wo) tensor (a view).
Tensor from_pixel_rows(const Tensor& rows, int64_t n, const Window& win, int64_t channels) {
  return rows.view({n, win.h.out(), win.w.out(), channels}).permute({0, 3, 1, 2});
}

// The weight (O, I, kh, kw) as its (O, kh*kw*I) matrix: a view of a channels_last-dense weight,
// a copy of any other (an NCHW model's).
Tensor weight_matrix(const Tensor& weight) {
  const Tensor dense = weight.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t row = dense.numel() / dense.size(0);
  return dense.as_strided({dense.size(0), row}, {row, 1});
}

// t in the strides of `like` (same shape): t itself when it has them.
Tensor in_strides_of(const Tensor& t, const Tensor& like) {
  return t.strides() == like.strides() ? t : at::empty_like(like).copy_(t);
}

// The weight gradient from its (O, kh*kw*I) matrix in the weight's own strides (what autograd
// accumulates into without a copy, and what the fake kernels say: empty_like(weight)): a view
// for a channels_last weight, a copy for any other (an NCHW model's).
Tensor weight_from_matrix(const Tensor& rows, const Tensor& weight) {
  if (weight.is_contiguous(at::MemoryFormat::ChannelsLast))  // the rows' own order
    return rows.as_strided(weight.sizes(), weight.strides());
  return in_strides_of(
      rows.view({weight.size(0), weight.size(2), weight.size(3), weight.size(1)})
          .permute({0, 3, 1, 2}),
      weight);
}

// The input positions of kernel offsets (i, j) for the output pixels whose windows reach
// inside the input: `nhwc` (an (N, H, W, C) view) sliced to them, and the (N, Ho, Wo, C) view
// `per_pixel` sliced to those output pixels. False where no window reaches inside.
bool window_slices(const Tensor& nhwc, const Tensor& per_pixel, const Window& win, int64_t i,
                   int64_t j, Tensor& input_part, Tensor& pixel_part) {
  const int64_t h0 = win.h.first(i), h1 = win.h.last(i), w0 = win.w.first(j),
                w1 = win.w.last(j);
  if (h0 >= h1 || w0 >= w1) return false;
  const int64_t r0 = win.h.input_at(h0, i), c0 = win.w.input_at(w0, j);
  input_part = nhwc.slice(1, r0, win.h.input_at(h1 - 1, i) + 1, win.h.stride)
                   .slice(2, c0, win.w.input_at(w1 - 1, j) + 1, win.w.stride);
  pixel_part = per_pixel.slice(1, h0, h1).slice(2, w0, w1);
  return true;
}

// cols: each output pixel's window, (kh, kw, C) values (zeros outside the input), one row per
// pixel: (N*Ho*Wo, kh*kw*C). A 1x1 window without padding: the read pixels themselves.
Tensor im2col(const Tensor& input, const Window& win) {
  if (win.pointwise())
    return pixel_rows(input.slice(2, 0, input.size(2), win.h.stride)
                          .slice(3, 0, input.size(3), win.w.stride)
                          .contiguous(at::MemoryFormat::ChannelsLast));
  const int64_t n = input.size(0), c = input.size(1);
  const Tensor nhwc = input.permute({0, 2, 3, 1});
  Tensor cols = at::zeros({n, win.h.out(), win.w.out(), win.h.kernel, win.w.kernel, c},
                          input.options());
  for (int64_t i = 0; i < win.h.kernel; ++i)
    for (int64_t j = 0; j < win.w.kernel; ++j) {
      Tensor from, to;
      if (window_slices(nhwc, cols.select(3, i).select(3, j), win, i, j, from, to))
        to.copy_(from);
    }
  return cols.view({n * win.h.out() * win.w.out(), -1});
}

// The input gradient from the windows' gradients (N*Ho*Wo, kh*kw*C): each added back into its
// input position (col2im), channels_last. A 1x1 window without padding: the read pixels'
// gradients in place (zeros between them at a stride > 1).
Tensor col2im(const Tensor& grad_cols, const Tensor& input, const Window& win) {
  const int64_t n = input.size(0), c = input.size(1);
  if (win.pointwise() && win.h.stride == 1 && win.w.stride == 1)
    return from_pixel_rows(grad_cols, n, win, c);
  // Overlapping windows add up to kh*kw gradients per position: in fp32 (bf16 rounded once at
  // the end, as oneDNN's fp32-accumulating backward does), not rounded at every add
  const bool widen = grad_cols.scalar_type() == at::kBFloat16 && !win.pointwise();
  Tensor grad_input = at::empty(input.sizes(), input.options().dtype(
                                    widen ? at::kFloat : input.scalar_type()),
                                at::MemoryFormat::ChannelsLast)
                          .zero_();
  const Tensor nhwc = grad_input.permute({0, 2, 3, 1});
  const Tensor windows =  // bf16 added into fp32 in place: no widened copy of them
      grad_cols.view({n, win.h.out(), win.w.out(), win.h.kernel, win.w.kernel, c});
  for (int64_t i = 0; i < win.h.kernel; ++i)
    for (int64_t j = 0; j < win.w.kernel; ++j) {
      Tensor to, from;
      if (window_slices(nhwc, windows.select(3, i).select(3, j), win, i, j, to, from))
        to.add_(from);
    }
  return widen ? grad_input.to(input.scalar_type()) : grad_input;
}

}  // namespace

Tensor conv2d_cpu(const Tensor& input, const Tensor& weight, at::IntArrayRef stride,
                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  if (runs_as_gemm(input, weight, stride, padding, dilation, groups)) {
    const Window win = window_of(input, weight, stride, padding);
    // channels_last, unless the input is NCHW-contiguous too (one channel, or 1x1 pixels)
    return from_pixel_rows(at::mm(im2col(input, win), weight_matrix(weight).t()),
                           input.size(0), win, weight.size(0))
        .contiguous(kernel_format(input));
  }
  return at::conv2d(input, weight, std::nullopt, stride, padding, dilation, groups)
      .contiguous(kernel_format(input));
}

std::tuple<Tensor, Tensor> conv2d_cpu_backward(const Tensor& grad, const Tensor& input,
                                               const Tensor& weight, at::IntArrayRef stride,
                                               at::IntArrayRef padding, at::IntArrayRef dilation,
                                               int64_t groups, bool need_input,
                                               bool need_weight) {
  if (!runs_as_gemm(input, weight, stride, padding, dilation, groups)) {
    const int64_t zero[] = {0, 0};
    auto [grad_input, grad_weight, unused_bias] = at::convolution_backward(
        grad, input, weight, std::nullopt, stride, padding, dilation, false, zero, groups,
        {need_input, need_weight, false});
    // aten picks channels_last when either operand is (a channels_last input with an NCHW
    // weight: an NCHW model computing in channels_last); the fakes promise the input's kernel
    // format and the weight's strides, as the GEMM gives them
    return {need_input ? grad_input.contiguous(kernel_format(input))
                       : at::empty({0}, input.options()),
            need_weight ? in_strides_of(grad_weight, weight) : at::empty({0}, weight.options())};
  }
  const Window win = window_of(input, weight, stride, padding);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == input.size(0) &&
                  grad.size(1) == weight.size(0) && grad.size(2) == win.h.out() &&
                  grad.size(3) == win.w.out(),
              "conv2d_cpu_backward: grad has shape ", grad.sizes(), " but the convolution's "
              "output has shape [", input.size(0), ", ", weight.size(0), ", ", win.h.out(), ", ",
              win.w.out(), "]");
  const Tensor g = pixel_rows(grad.contiguous(at::MemoryFormat::ChannelsLast));
  Tensor grad_input = at::empty({0}, input.options());
  Tensor grad_weight = at::empty({0}, weight.options());
  if (need_input) grad_input = col2im(at::mm(g, weight_matrix(weight)), input, win);
  if (need_weight) grad_weight = weight_from_matrix(at::mm(g.t(), im2col(input, win)), weight);
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
