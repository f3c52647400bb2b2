// torch glue of the CUTLASS conv kernels (built into fused_resnet._C when the CUTLASS headers
// are found, see setup.py): input checks, NHWC layout, zero padding of the input channels to a
// multiple of 8 (as cuDNN and TensorRT do for the 3-channel stem), pointer alignment,
// allocation, stream.
//
//   conv2d_bias_act_cutlass(input, weight, stride, padding, bias, residual?, relu) -> out
//       out = act(conv2d(input, weight) + bias [+ residual]), square stride and padding,
//       fp16 / bf16, bias fp32 per output channel (BN folded into the weights), out
//       channels_last.                                            (conv_fprop.cu)
//   bn_relu_conv2d_cutlass(input, scale, shift, weight, stride, padding) -> z
//       z = conv2d(relu(input * scale + shift), weight): the previous BN + ReLU on the
//       operand load, fp16 only; scale/shift per input channel (any float dtype), ROUNDED TO
//       FP16 for CUTLASS's fp16 fma: with |mean|/std ~ 20 that is a ~1% error in every
//       activation, so fused_resnet does not offer it as a candidate of
//       bn_relu_conv2d_bn_stats (see fused_resnet/ops/bn_relu_conv.py). (bn_relu_conv.cu)
//   cutlass_launch_operand(t, operand) -> t or an aligned copy
//       what the two ops above launch with in place of `t` for that operand ("activation",
//       "filter", "output", "residual", "bias", "bn_scale", "bn_shift"): contiguous in the
//       kernel's layout at an address with the operand's alignment (common/cutlass_conv_plan.h),
//       copied only where needed. Any device: the CPU tests check the rule with it.
//
// CUTLASS never checks addresses: a misaligned pointer (a view with an odd storage offset) is a
// misaligned-address fault that poisons the CUDA context, so every operand goes through
// launch_operand, and the launchers refuse (do not launch) a pointer that still is not aligned.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

#include "common/cutlass_conv_plan.h"
#include "cutlass_conv/bn_relu_conv.h"
#include "cutlass_conv/conv_fprop.h"

namespace fused_resnet {
namespace {

using at::Tensor;

bool is_4d_operand(CutlassOperand operand) {
  return operand == CutlassOperand::kActivation || operand == CutlassOperand::kFilter ||
         operand == CutlassOperand::kOutput || operand == CutlassOperand::kResidual;
}

// `t` as the kernel reads that operand: contiguous (NHWC order for the 4-D ones) at an address
// with the operand's alignment. `t` itself where it already is, else a copy in fresh storage
// (the CUDA caching allocator's blocks are 512-byte aligned, the CPU allocator's 64).
Tensor launch_operand(const Tensor& t, CutlassOperand operand) {
  const char* name = cutlass_operand_info(operand).name;
  const bool nhwc = is_4d_operand(operand);
  TORCH_CHECK(t.dim() == (nhwc ? 4 : 1), "CUTLASS conv: the ", name, " must be ",
              nhwc ? 4 : 1, "-D, got ", t.sizes());
  Tensor c = nhwc ? t.contiguous(at::MemoryFormat::ChannelsLast) : t.contiguous();
  if (c.numel() == 0 || cutlass_aligned(c.const_data_ptr(), operand)) return c;
  Tensor copy = c.clone();  // dense: same strides, fresh storage
  TORCH_CHECK(cutlass_aligned(copy.const_data_ptr(), operand), "CUTLASS conv: a fresh copy of ",
              "the ", name, " is not ", cutlass_operand_info(operand).alignment,
              "-byte aligned");
  return copy;
}

Tensor cutlass_launch_operand(const Tensor& t, c10::string_view operand) {
  const std::string name(operand);
  CutlassOperand op = CutlassOperand::kActivation;
  TORCH_CHECK(cutlass_operand_from_name(name.c_str(), &op), "cutlass_launch_operand: unknown ",
              "operand '", name, "' (activation, filter, output, residual, bias, bn_scale, ",
              "bn_shift)");
  return launch_operand(t, op);
}

// NHWC-ordered copy of a 4-D tensor with its dim 1 zero-padded to `channels`, aligned for
// `operand`. One pass over the data: only the pad channels are zeroed, then t is copied in
// (fresh storage from the allocator is aligned, so launch_operand copies nothing more).
Tensor nhwc_padded(const Tensor& t, int64_t channels, CutlassOperand operand) {
  if (t.size(1) == channels) return launch_operand(t, operand);
  Tensor padded = at::empty({t.size(0), channels, t.size(2), t.size(3)},
                            t.options().memory_format(at::MemoryFormat::ChannelsLast));
  padded.narrow(1, t.size(1), channels - t.size(1)).zero_();
  padded.narrow(1, 0, t.size(1)).copy_(t);
  return launch_operand(padded, operand);
}

// What every CUTLASS conv needs of its input and weight; `op` prefixes the messages.
void check_conv(const char* op, const Tensor& input, const Tensor& weight) {
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4, op, "input and weight must be 4-D, got ",
              input.sizes(), " and ", weight.sizes());
  TORCH_CHECK(input.is_cuda() && weight.device() == input.device(), op,
              "input and weight must be on one CUDA device, got ", input.device(), " and ",
              weight.device());
  TORCH_CHECK(input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16, op,
              "input must be float16 or bfloat16, got ", input.scalar_type());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op, "weight dtype ",
              weight.scalar_type(), " differs from input dtype ", input.scalar_type());
  TORCH_CHECK(weight.size(1) == input.size(1), op, "weight expects ", weight.size(1),
              " input channels (groups=1 only), input has ", input.size(1));
}

// A per-channel vector: on input's device, 1-D of `size`, floating point (float32 if `fp32`).
void check_vector(const char* op, const char* name, const Tensor& t, const Tensor& input,
                  int64_t size, bool fp32) {
  TORCH_CHECK(t.device() == input.device(), op, name, " must be on ", input.device(),
              " like the input, got ", t.device());
  TORCH_CHECK(fp32 ? t.scalar_type() == at::kFloat : at::isFloatingType(t.scalar_type()), op,
              name, " must be ", fp32 ? "float32" : "floating point", ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, op, name, " must have shape (", size,
              "), got ", t.sizes());
}

void check_inputs(const Tensor& input, const Tensor& weight, const Tensor& bias,
                  const std::optional<Tensor>& residual) {
  const char* op = "conv2d_bias_act_cutlass: ";
  check_conv(op, input, weight);
  check_vector(op, "bias", bias, input, weight.size(0), true);
  if (residual) {
    TORCH_CHECK(residual->scalar_type() == input.scalar_type() &&
                    residual->device() == input.device(),
                op, "residual must be ", input.scalar_type(), " on ", input.device(), ", got ",
                residual->scalar_type(), " on ", residual->device());
  }
}

Tensor conv2d_bias_act_cutlass(const Tensor& input, const Tensor& weight, int64_t stride,
                               int64_t padding, const Tensor& bias,
                               const std::optional<Tensor>& residual, bool relu) {
  const char* op = "conv2d_bias_act_cutlass: ";
  check_inputs(input, weight, bias, residual);
  const CutlassConvProblem problem{input.size(0), input.size(2), input.size(3), input.size(1),
                                   weight.size(0), weight.size(2), weight.size(3), stride,
                                   padding, 1, 1, 2};
  const CutlassConvPlan plan = cutlass_conv_plan(problem);
  TORCH_CHECK(plan.unsupported == nullptr, op, plan.unsupported, " (input ", input.sizes(),
              ", weight ", weight.sizes(), ")");
  const c10::cuda::CUDAGuard guard(input.device());
  std::optional<Tensor> res;
  if (residual) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef({problem.n, problem.k, plan.p, plan.q}),
                op, "residual has shape ", residual->sizes(), ", the conv output is ",
                at::IntArrayRef({problem.n, problem.k, plan.p, plan.q}));
    res = launch_operand(*residual, CutlassOperand::kResidual);
  }
  const Tensor x = nhwc_padded(input, plan.padded_c, CutlassOperand::kActivation);
  const Tensor w = nhwc_padded(weight, plan.padded_c, CutlassOperand::kFilter);
  const Tensor b = launch_operand(bias, CutlassOperand::kBias);
  Tensor out = at::empty({problem.n, problem.k, plan.p, plan.q},
                         input.options().memory_format(at::MemoryFormat::ChannelsLast));
  const CutlassDtype dtype =
      input.scalar_type() == at::kHalf ? CutlassDtype::kHalf : CutlassDtype::kBFloat16;
  const std::string error = cutlass_conv2d_bias_act(
      problem, plan, dtype, x.const_data_ptr(), w.const_data_ptr(), b.const_data_ptr<float>(),
      res ? res->const_data_ptr() : nullptr, out.mutable_data_ptr(), relu,
      c10::cuda::getCurrentCUDAStream(input.device().index()).stream());
  TORCH_CHECK(error.empty(), op, error);
  return out;
}

Tensor bn_relu_conv2d_cutlass(const Tensor& input, const Tensor& scale, const Tensor& shift,
                              const Tensor& weight, int64_t stride, int64_t padding) {
  const char* op = "bn_relu_conv2d_cutlass: ";
  check_conv(op, input, weight);
  TORCH_CHECK(input.scalar_type() == at::kHalf, op,
              "the fused BN prologue is float16 only (CUTLASS's transform), got ",
              input.scalar_type());
  check_vector(op, "scale", scale, input, input.size(1), false);
  check_vector(op, "shift", shift, input, input.size(1), false);
  const CutlassConvProblem problem{input.size(0), input.size(2), input.size(3), input.size(1),
                                   weight.size(0), weight.size(2), weight.size(3), stride,
                                   padding, 1, 1, 2};
  const CutlassConvPlan plan = cutlass_conv_plan(problem);
  TORCH_CHECK(plan.unsupported == nullptr, op, plan.unsupported, " (input ", input.sizes(),
              ", weight ", weight.sizes(), ")");
  TORCH_CHECK(plan.padded_c == problem.c, op, "input channels (", problem.c,
              ") must be a multiple of 8");
  const c10::cuda::CUDAGuard guard(input.device());
  const Tensor x = launch_operand(input, CutlassOperand::kActivation);
  const Tensor w = launch_operand(weight, CutlassOperand::kFilter);
  // CUTLASS's transform takes fp16 scale and shift (see the header comment)
  const Tensor s = launch_operand(scale.to(at::kHalf), CutlassOperand::kBnScale);
  const Tensor b = launch_operand(shift.to(at::kHalf), CutlassOperand::kBnShift);
  Tensor z = at::empty({problem.n, problem.k, plan.p, plan.q},
                       input.options().memory_format(at::MemoryFormat::ChannelsLast));
  const std::string error = cutlass_bn_relu_conv2d(
      problem, plan, x.const_data_ptr(), s.const_data_ptr(), b.const_data_ptr(),
      w.const_data_ptr(), z.mutable_data_ptr(),
      c10::cuda::getCurrentCUDAStream(input.device().index()).stream());
  TORCH_CHECK(error.empty(), op, error);
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
  m.def("cutlass_launch_operand(Tensor t, str operand) -> Tensor");
}

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) {
  m.impl("conv2d_bias_act_cutlass", &fused_resnet::conv2d_bias_act_cutlass);
  m.impl("bn_relu_conv2d_cutlass", &fused_resnet::bn_relu_conv2d_cutlass);
}

TORCH_LIBRARY_IMPL(fused_resnet, CompositeExplicitAutograd, m) {
  m.impl("cutlass_launch_operand", &fused_resnet::cutlass_launch_operand);
}
