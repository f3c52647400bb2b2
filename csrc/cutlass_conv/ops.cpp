// torch glue of the CUTLASS conv kernels (built into fused_resnet._C when the CUTLASS headers
// are found, see setup.py): input checks, NHWC layout, zero padding of the input channels to a
// multiple of 8 (as cuDNN and TensorRT do for the 3-channel stem), allocation, stream.
//
//   conv2d_bias_act_cutlass(input, weight, stride, padding, bias, residual?, relu) -> out
//       out = act(conv2d(input, weight) + bias [+ residual]), square stride and padding,
//       fp16 / bf16, bias fp32 per output channel (BN folded into the weights), out
//       channels_last.                                            (conv_fprop.cu)
//   bn_relu_conv2d_cutlass(input, scale, shift, weight, stride, padding) -> z
//       z = conv2d(relu(input * scale + shift), weight): the previous BN + ReLU on the
//       operand load, fp16 only; scale/shift fp32 per input channel, rounded to fp16 for
//       the kernel's fp16 fma.                                     (bn_relu_conv.cu)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/cutlass_conv_plan.h"
#include "cutlass_conv/bn_relu_conv.h"
#include "cutlass_conv/conv_fprop.h"

namespace fused_resnet {
namespace {

using at::Tensor;

// NHWC-ordered copy of a 4-D tensor with its dim 1 zero-padded to `channels`.
Tensor nhwc_padded(const Tensor& t, int64_t channels) {
  Tensor nhwc = t.contiguous(at::MemoryFormat::ChannelsLast);
  if (t.size(1) == channels) return nhwc;
  Tensor padded = at::zeros({t.size(0), channels, t.size(2), t.size(3)},
                            t.options().memory_format(at::MemoryFormat::ChannelsLast));
  padded.narrow(1, 0, t.size(1)).copy_(t);
  return padded;
}

// What every CUTLASS conv needs of its input and weight; `op` prefixes the messages.
void check_conv(const char* op, const Tensor& input, const Tensor& weight,
                const Tensor& per_channel) {
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4, op, "input and weight must be 4-D, got ",
              input.sizes(), " and ", weight.sizes());
  TORCH_CHECK(input.is_cuda() && weight.device() == input.device() &&
                  per_channel.device() == input.device(),
              op, "all tensors must be on one CUDA device, got ", input.device(), ", ",
              weight.device(), ", ", per_channel.device());
  TORCH_CHECK(input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16, op,
              "input must be float16 or bfloat16, got ", input.scalar_type());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op, "weight dtype ",
              weight.scalar_type(), " differs from input dtype ", input.scalar_type());
  TORCH_CHECK(weight.size(1) == input.size(1), op, "weight expects ", weight.size(1),
              " input channels (groups=1 only), input has ", input.size(1));
}

void check_inputs(const Tensor& input, const Tensor& weight, const Tensor& bias,
                  const std::optional<Tensor>& residual) {
  const char* op = "conv2d_bias_act_cutlass: ";
  check_conv(op, input, weight, bias);
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.dim() == 1 &&
                  bias.size(0) == weight.size(0),
              op, "bias must be float32 of shape (", weight.size(0), "), got ",
              bias.scalar_type(), " ", bias.sizes());
  if (residual) {
    TORCH_CHECK(residual->scalar_type() == input.scalar_type() &&
                    residual->device() == input.device(),
                op, "residual must be ", input.scalar_type(), " on ", input.device());
  }
}

Tensor conv2d_bias_act_cutlass(const Tensor& input, const Tensor& weight, int64_t stride,
                               int64_t padding, const Tensor& bias,
                               const std::optional<Tensor>& residual, bool relu) {
  check_inputs(input, weight, bias, residual);
  const CutlassConvProblem problem{input.size(0), input.size(2), input.size(3), input.size(1),
                                   weight.size(0), weight.size(2), weight.size(3), stride,
                                   padding, 1, 1, 2};
  const CutlassConvPlan plan = cutlass_conv_plan(problem);
  TORCH_CHECK(plan.unsupported == nullptr, "conv2d_bias_act_cutlass: ", plan.unsupported,
              " (input ", input.sizes(), ", weight ", weight.sizes(), ")");
  std::optional<Tensor> res;
  if (residual) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef({problem.n, problem.k, plan.p, plan.q}),
                "conv2d_bias_act_cutlass: residual has shape ", residual->sizes(),
                ", the conv output is ", at::IntArrayRef({problem.n, problem.k, plan.p, plan.q}));
    res = residual->contiguous(at::MemoryFormat::ChannelsLast);
  }
  const c10::cuda::CUDAGuard guard(input.device());
  const Tensor x = nhwc_padded(input, plan.padded_c);
  const Tensor w = nhwc_padded(weight, plan.padded_c);
  const Tensor b = bias.contiguous();
  Tensor out = at::empty({problem.n, problem.k, plan.p, plan.q},
                         input.options().memory_format(at::MemoryFormat::ChannelsLast));
  const CutlassDtype dtype =
      input.scalar_type() == at::kHalf ? CutlassDtype::kHalf : CutlassDtype::kBFloat16;
  const char* error = cutlass_conv2d_bias_act(
      problem, plan, dtype, x.const_data_ptr(), w.const_data_ptr(), b.const_data_ptr<float>(),
      res ? res->const_data_ptr() : nullptr, out.mutable_data_ptr(), relu,
      c10::cuda::getCurrentCUDAStream(input.device().index()).stream());
  TORCH_CHECK(error == nullptr, "conv2d_bias_act_cutlass: ", error);
  return out;
}

Tensor bn_relu_conv2d_cutlass(const Tensor& input, const Tensor& scale, const Tensor& shift,
                              const Tensor& weight, int64_t stride, int64_t padding) {
  const char* op = "bn_relu_conv2d_cutlass: ";
  check_conv(op, input, weight, scale);
  TORCH_CHECK(input.scalar_type() == at::kHalf, op,
              "the fused BN prologue is float16 only (CUTLASS's transform), got ",
              input.scalar_type());
  TORCH_CHECK(scale.dim() == 1 && shift.dim() == 1 && scale.size(0) == input.size(1) &&
                  shift.size(0) == input.size(1),
              op, "scale and shift must have shape (", input.size(1), "), got ", scale.sizes(),
              " and ", shift.sizes());
  const CutlassConvProblem problem{input.size(0), input.size(2), input.size(3), input.size(1),
                                   weight.size(0), weight.size(2), weight.size(3), stride,
                                   padding, 1, 1, 2};
  const CutlassConvPlan plan = cutlass_conv_plan(problem);
  TORCH_CHECK(plan.unsupported == nullptr, op, plan.unsupported, " (input ", input.sizes(),
              ", weight ", weight.sizes(), ")");
  TORCH_CHECK(plan.padded_c == problem.c, op, "input channels (", problem.c,
              ") must be a multiple of 8");
  const c10::cuda::CUDAGuard guard(input.device());
  const Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const Tensor w = weight.contiguous(at::MemoryFormat::ChannelsLast);
  const Tensor s = scale.to(at::kHalf).contiguous();
  const Tensor b = shift.to(at::kHalf).contiguous();
  Tensor z = at::empty({problem.n, problem.k, plan.p, plan.q},
                       input.options().memory_format(at::MemoryFormat::ChannelsLast));
  const char* error = cutlass_bn_relu_conv2d(
      problem, plan, x.const_data_ptr(), s.const_data_ptr(), b.const_data_ptr(),
      w.const_data_ptr(), z.mutable_data_ptr(),
      c10::cuda::getCurrentCUDAStream(input.device().index()).stream());
  TORCH_CHECK(error == nullptr, op, error);
  return z;
}

}  // namespace
}  // namespace fused_resnet

TORCH_LIBRARY_FRAGMENT(fused_resnet, m) {
  m.def(
      "conv2d_bias_act_cutlass(Tensor input, Tensor weight, int stride, int padding, "
      "Tensor bias, Tensor? residual, bool relu) -> Tensor");
  m.def(
      "bn_relu_conv2d_cutlass(Tensor input, Tensor scale, Tensor shift, Tensor weight, "
      "int stride, int padding) -> Tensor");
}

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) {
  m.impl("conv2d_bias_act_cutlass", &fused_resnet::conv2d_bias_act_cutlass);
  m.impl("bn_relu_conv2d_cutlass", &fused_resnet::bn_relu_conv2d_cutlass);
}
