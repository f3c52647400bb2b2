// Whole training steps of the fused ops on the CPU, each one call from Python.
//
// On a 2-core CPU a ResNet-50 training step spent ~1 ms per residual block in the Python that
// strings the BN kernels and the conv together (per-channel scale/shift as half a dozen tiny
// tensor ops, the recomputed activation, the conv backward, the two backward reductions, each
// a Python -> dispatcher round trip): as much as the kernels saved. These ops do the same
// calls from C++, in the same order on the same operands, so their results are bitwise those
// of the Python path (fused_resnet/ops/bn_relu_conv.py and bn_add_relu.py, which call them only
// in plain eager mode on CPU tensors with the C++ backend: fused_resnet.ops.eager.cpu_step;
// traced code keeps seeing the individual ops).
//
//   bn_relu_conv2d_bn_stats_step(input, bn_weight?, bn_bias?, mean, var, eps, weight, stride,
//                                padding, dilation, groups) -> (z, z_mean, z_var)
//       a = relu((input - mean) * weight/sqrt(var + eps) + bias); z = conv2d(a, weight);
//       z's batch statistics
//   bn_relu_conv2d_bn_stats_step_backward(grad_z, input, bn_weight?, bn_bias?, mean, var, eps,
//                                         weight, stride, padding, dilation, groups,
//                                         need_bn, need_weight, param_grads)
//       -> (grad_input, grad_weight, grad_bn_weight, grad_bn_bias)
//       a and its ReLU mask recomputed, the conv's backward, then the training BN's backward
//       (its input gradient written over the conv's); gradients not asked for come back empty.
//   bn_add_relu_step(input, residual?, weight?, bias?, mean, var, eps, relu, save_mask)
//       -> (out, mask, mean, var)       bn_add_relu with given statistics
//   bn_add_relu_step_backward(grad, input, mask, mean, var, weight?, training, eps, relu,
//                             residual_grad, param_grads)
//       -> (grad_input, grad_residual, grad_weight, grad_bias)     bn_add_relu's backward
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <utility>

#include "common/kernel_format.h"
#include "cpu/conv_gemm.h"

namespace fused_resnet {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// The C++ BN pieces (csrc/ops.cpp), called through the dispatcher like any op.
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_stats(const Tensor& x) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_resnet::bn_stats_cpp", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&,
                                                            const OptTensor&, double)>();
  return op.call(x, std::nullopt, std::nullopt, 0.0);
}

std::tuple<Tensor, Tensor> bn_add_relu_apply(const Tensor& x, const OptTensor& residual,
                                             const Tensor& scale, const Tensor& shift, bool relu,
                                             bool save_mask, const Tensor& mean) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_resnet::bn_add_relu_apply_cpp", "")
          .typed<std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&, const Tensor&,
                                            const Tensor&, bool, bool, const OptTensor&)>();
  return op.call(x, residual, scale, shift, relu, save_mask, mean);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> grad_reduce(
    const Tensor& grad, const Tensor& mask, const Tensor& x, const Tensor& mean,
    const Tensor& var, const OptTensor& weight, double eps, bool relu, bool training) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_resnet::bn_add_relu_grad_reduce_cpp", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
              const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
              const OptTensor&, double, bool, bool)>();
  return op.call(grad, mask, x, mean, var, weight, eps, relu, training);
}

std::tuple<Tensor, Tensor> grad_apply(const Tensor& grad, const Tensor& mask, const Tensor& x,
                                      const Tensor& mean, const Tensor& k, const Tensor& b,
                                      const Tensor& c, bool relu, bool residual_grad) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_resnet::bn_add_relu_grad_apply_cpp", "")
          .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                            const Tensor&, const Tensor&, const Tensor&,
                                            const Tensor&, bool, bool)>();
  return op.call(grad, mask, x, mean, k, b, c, relu, residual_grad);
}

// grad_apply's input gradient written over `grad` (which only the caller holds), returned.
Tensor grad_apply_into_grad(Tensor& grad, const Tensor& mask, const Tensor& x, const Tensor& mean,
                            const Tensor& k, const Tensor& b, const Tensor& c, bool relu) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_resnet::bn_add_relu_grad_apply_into_grad_cpp", "")
          .typed<Tensor&(Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                         const Tensor&, const Tensor&, bool)>();
  return op.call(grad, mask, x, mean, k, b, c, relu);
}

Tensor as_float(const OptTensor& t) {
  return t.has_value() && t->defined() ? t->to(at::kFloat).contiguous() : Tensor();
}

// (scale, shift) of the centred BN (x - mean) * scale + shift in fp32: scale =
// weight / sqrt(var + eps), shift = bias; with the tensor ops reference.bn_centred_scale_shift
// runs (a scalar loop's 1/sqrt can differ from them in the last bit), so that the results are
// bitwise the Python path's. var: fp32.
std::pair<Tensor, Tensor> centred_scale_shift(const Tensor& var, const OptTensor& weight_in,
                                              const OptTensor& bias_in, double eps) {
  const Tensor weight = as_float(weight_in), bias = as_float(bias_in);
  Tensor invstd = at::add(var, eps).sqrt_().reciprocal_();
  Tensor scale = weight.defined() ? at::mul(invstd, weight) : invstd;
  Tensor shift = bias.defined() ? bias : at::zeros_like(var);
  return {scale, shift};
}

// conv2d_bn_stats's library path: the conv (conv2d_cpu: in the input's memory format), its
// statistics.
std::tuple<Tensor, Tensor, Tensor> conv_with_stats(const Tensor& a, const Tensor& weight,
                                                   at::IntArrayRef stride,
                                                   at::IntArrayRef padding,
                                                   at::IntArrayRef dilation, int64_t groups) {
  Tensor z = cpu::conv2d_cpu(a, weight, stride, padding, dilation, groups);
  auto [mean, var, scale, shift] = bn_stats(z);
  return {z, mean, var};
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_conv_step(
    const Tensor& input, const OptTensor& bn_weight, const OptTensor& bn_bias,
    const Tensor& mean, const Tensor& var, double eps, const Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  auto [scale, shift] = centred_scale_shift(var.to(at::kFloat), bn_weight, bn_bias, eps);
  Tensor a =
      std::get<0>(bn_add_relu_apply(input, std::nullopt, scale, shift, true, false,
                                    mean.to(at::kFloat)));
  return conv_with_stats(a, weight, stride, padding, dilation, groups);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_relu_conv_step_backward(
    const Tensor& grad_z, const Tensor& input, const OptTensor& bn_weight,
    const OptTensor& bn_bias, const Tensor& mean, const Tensor& var, double eps,
    const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool need_bn, bool need_weight, bool param_grads) {
  auto [scale, shift] = centred_scale_shift(var.to(at::kFloat), bn_weight, bn_bias, eps);
  auto [a, mask] =
      bn_add_relu_apply(input, std::nullopt, scale, shift, true, true, mean.to(at::kFloat));
  auto [grad_a, grad_weight] = cpu::conv2d_cpu_backward(grad_z, a, weight, stride, padding,
                                                        dilation, groups, need_bn, need_weight);
  a.reset();  // only the conv's weight gradient needed it
  const Tensor none = at::empty({0}, input.options());
  Tensor grad_input = none, grad_bn_weight = none, grad_bn_bias = none;
  if (need_bn) {
    auto [k, b, c, gw, gb] = grad_reduce(grad_a, mask, input, mean, var, bn_weight, eps, true,
                                         true);
    // the conv's input gradient is this step's alone: the apply writes over it (in place, ~1.8x
    // faster than into fresh memory on a CPU), the same values as into a new tensor
    Tensor dense = grad_a.contiguous(kernel_format(input));
    grad_input = grad_apply_into_grad(dense, mask, input, mean, k, b, c, true);
    if (param_grads) {
      grad_bn_weight = gw;
      grad_bn_bias = gb;
    }
  }
  return {grad_input, need_weight ? grad_weight : none, grad_bn_weight, grad_bn_bias};
}

// bn_add_relu with the batch (or running) statistics given: fp32 copies of them (the op
// returns them), the centred scale and shift, the apply.
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_add_relu_step(
    const Tensor& input, const OptTensor& residual, const OptTensor& weight,
    const OptTensor& bias, const Tensor& mean, const Tensor& var, double eps, bool relu,
    bool save_mask) {
  Tensor mean32 = mean.to(at::kFloat, false, true), var32 = var.to(at::kFloat, false, true);
  auto [scale, shift] = centred_scale_shift(var32, weight, bias, eps);
  auto [out, mask] = bn_add_relu_apply(input, residual, scale, shift, relu, save_mask, mean32);
  return {out, mask, mean32, var32};
}

// bn_add_relu's backward: the reduction (training, or parameter gradients wanted), else the
// eval coefficients (k = weight/sqrt(var + eps), b = c = 0); then the apply.
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_add_relu_step_backward(
    const Tensor& grad, const Tensor& input, const Tensor& mask, const Tensor& mean,
    const Tensor& var, const OptTensor& weight, bool training, double eps, bool relu,
    bool residual_grad, bool param_grads) {
  Tensor k, b, c, grad_weight, grad_bias;
  if (training || param_grads) {
    std::tie(k, b, c, grad_weight, grad_bias) =
        grad_reduce(grad, mask, input, mean, var, weight, eps, relu, training);
  } else {
    k = centred_scale_shift(var, weight, std::nullopt, eps).first;
    b = at::zeros_like(k);
    c = at::zeros_like(k);
  }
  auto [grad_input, grad_residual] =
      grad_apply(grad, mask, input, mean, k, b, c, relu, residual_grad);
  if (!param_grads) {
    grad_weight = at::empty({0}, mean.options());
    grad_bias = at::empty({0}, mean.options());
  }
  return {grad_input, grad_residual, grad_weight, grad_bias};
}

}  // namespace
}  // namespace fused_resnet

TORCH_LIBRARY_FRAGMENT(fused_resnet, m) {
  m.def(
      "bn_relu_conv2d_bn_stats_step(Tensor input, Tensor? bn_weight, Tensor? bn_bias, "
      "Tensor mean, Tensor var, float eps, Tensor weight, int[] stride, int[] padding, "
      "int[] dilation, int groups) -> (Tensor z, Tensor z_mean, Tensor z_var)");
  m.def(
      "bn_relu_conv2d_bn_stats_step_backward(Tensor grad_z, Tensor input, Tensor? bn_weight, "
      "Tensor? bn_bias, Tensor mean, Tensor var, float eps, Tensor weight, int[] stride, "
      "int[] padding, int[] dilation, int groups, bool need_bn, bool need_weight, "
      "bool param_grads) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bn_weight, "
      "Tensor grad_bn_bias)");
  m.def(
      "bn_add_relu_step(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor var, float eps, bool relu, bool save_mask) "
      "-> (Tensor out, Tensor mask, Tensor mean_out, Tensor var_out)");
  m.def(
      "bn_add_relu_step_backward(Tensor grad, Tensor input, Tensor mask, Tensor mean, "
      "Tensor var, Tensor? weight, bool training, float eps, bool relu, bool residual_grad, "
      "bool param_grads) -> (Tensor grad_input, Tensor grad_residual, Tensor grad_weight, "
      "Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("bn_relu_conv2d_bn_stats_step", &fused_resnet::bn_relu_conv_step);
  m.impl("bn_relu_conv2d_bn_stats_step_backward", &fused_resnet::bn_relu_conv_step_backward);
  m.impl("bn_add_relu_step", &fused_resnet::bn_add_relu_step);
  m.impl("bn_add_relu_step_backward", &fused_resnet::bn_add_relu_step_backward);
}
