// CUTLASS "ConvBNfprop": the previous layer's BN-apply + ReLU fused into this conv's operand
// load (DefaultConv2dFpropFusion: the activation tile is transformed in registers with the
// per-channel scale and bias, fma + relu in fp16; out-of-bounds elements are filled with a
// NaN pattern that the transform turns into 0, so the zero padding stays zero). sm_80 tensor
// cores, fp16 only: CUTLASS's transform is written for fp16 pairs (bf16 takes the Triton
// prologue or the library path). Epilogue: the raw conv output, whose BN statistics the
// caller computes. Torch-free: launched through bn_relu_conv.h.
//
// Precision: scale and shift are fp16 all the way (cp.async into shared memory, ldmatrix into
// the fp16-pair fragment FpropScaleBiasReluTransform takes). On a raw conv output with
// |mean|/std ~ 20 that rounding is a ~1% per-channel error in the activations, which is why
// fused_resnet does not offer this kernel to bn_relu_conv2d_bn_stats (see
// fused_resnet/ops/bn_relu_conv.py); the op stays registered for what it is.
#include "cutlass_conv/bn_relu_conv.h"

#include "cutlass/cutlass.h"
// the kernel header before the device one: the device adapter uses helpers it declares
#include "cutlass/conv/kernel/default_conv2d_fprop_fusion.h"
#include "cutlass/conv/device/implicit_gemm_convolution_fusion.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass_conv/launch.h"

namespace fused_resnet {
namespace {

using Layout = cutlass::layout::TensorNHWC;
using Element = cutlass::half_t;

template <typename Threadblock, typename Warp, int Stages>
struct BnReluConv {
  using Epilogue = cutlass::epilogue::thread::LinearCombination<Element, 8, float, float>;
  using Kernel = typename cutlass::conv::kernel::DefaultConv2dFpropFusion<
      Element, Layout, Element, Layout, Element, cutlass::layout::RowMajor, Element, Layout,
      float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, Threadblock, Warp,
      cutlass::gemm::GemmShape<16, 8, 16>, Epilogue,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<4>, Stages,
      cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized>::Kernel;
  using Device = cutlass::conv::device::ImplicitGemmConvolutionFusion<Kernel>;
};

template <typename Conv>
std::string run(const CutlassConvProblem& pr, const CutlassConvPlan& plan, const void* x,
                const void* scale, const void* shift, const void* w, void* z,
                cudaStream_t stream) {
  using cutlass_launch::nhwc;
  const int64_t c = pr.c;
  const std::string problem = cutlass_launch::describe(pr, plan, c);
  const CutlassOperandPtr operands[] = {{CutlassOperand::kActivation, x},
                                        {CutlassOperand::kBnScale, scale},
                                        {CutlassOperand::kBnShift, shift},
                                        {CutlassOperand::kFilter, w},
                                        {CutlassOperand::kOutput, z}};
  std::string error = cutlass_launch::check_alignment(operands, problem);
  if (!error.empty()) return error;
  auto vector = [c](const void* ptr) {  // per-input-channel scale / shift, a 1 x C row
    return cutlass::TensorRef<Element, cutlass::layout::RowMajor>(
        static_cast<Element*>(const_cast<void*>(ptr)),
        cutlass::layout::RowMajor::packed(cutlass::MatrixCoord(1, int(c))));
  };
  auto z_ref = nhwc<Element>(z, pr.n, plan.p, plan.q, pr.k);
  typename Conv::Device::Arguments args(
      cutlass_launch::problem_size(pr, plan, c), nhwc<Element>(x, pr.n, pr.h, pr.w, c),
      nhwc<Element>(w, pr.k, pr.r, pr.s, c), vector(scale), vector(shift), z_ref, z_ref,
      {1.0f, 0.0f});
  return cutlass_launch::run<typename Conv::Device>(args, stream, problem);
}

}  // namespace

std::string cutlass_bn_relu_conv2d(const CutlassConvProblem& problem,
                                   const CutlassConvPlan& plan, const void* x,
                                   const void* scale, const void* shift, const void* w, void* z,
                                   cudaStream_t stream) {
  if (plan.unsupported != nullptr) return plan.unsupported;
  if (x == nullptr || scale == nullptr || shift == nullptr || w == nullptr || z == nullptr) {
    return "null input, scale, shift, filter or output pointer";
  }
  if (problem.c % kCutlassAlignment != 0) {
    return "input channels not a multiple of 8 (the fused BN prologue has no channel padding)";
  }
  if (plan.tile == CutlassTile::kLarge) {
    return run<BnReluConv<cutlass::gemm::GemmShape<128, 128, 32>,
                          cutlass::gemm::GemmShape<64, 64, 32>, 3>>(problem, plan, x, scale,
                                                                    shift, w, z, stream);
  }
  return run<BnReluConv<cutlass::gemm::GemmShape<64, 64, 32>, cutlass::gemm::GemmShape<32, 32, 32>,
                        4>>(problem, plan, x, scale, shift, w, z, stream);
}

}  // namespace fused_resnet
