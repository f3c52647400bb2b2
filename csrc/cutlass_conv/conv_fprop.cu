// CUTLASS implicit-GEMM conv fprop with the fused epilogue act(conv + bias [+ residual]):
// sm_80 tensor-core kernels (they run on sm_90 too), fp16/bf16 in, fp32 accumulate, the
// per-channel bias (BN folded into the weights) and the residual added in fp32, one rounding
// to the output dtype. Torch-free: launched through conv_fprop.h.
//
// Instantiations: {fp16, bf16} x {ReLU, identity} x {large, small tile}; one CUTLASS
// instantiation costs ~10-20 s of nvcc time, so this list is kept short on purpose.
#include "cutlass_conv/conv_fprop.h"

#include "cutlass/cutlass.h"
// the kernel header before the device one: the device adapter uses helpers it declares
#include "cutlass/conv/kernel/default_conv2d_fprop_with_broadcast.h"
#include "cutlass/conv/device/implicit_gemm_convolution.h"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/epilogue/thread/linear_combination_bias_elementwise.h"
#include "cutlass_conv/launch.h"

namespace fused_resnet {
namespace {

using Layout = cutlass::layout::TensorNHWC;

template <typename Element, typename Threadblock, typename Warp, int Stages, typename Act>
struct FusedConv {
  static constexpr int kAccess = 128 / cutlass::sizeof_bits<Element>::value;
  // Z = Act(AB + beta * residual + bias), bias fp32 per output channel, no second output.
  using Epilogue = cutlass::epilogue::thread::LinearCombinationBiasElementwise<
      Element, float, float, Element, Element, kAccess, Act, cutlass::plus<float>,
      /*StoreT=*/false, /*ElementVector=*/float>;
  using Kernel = typename cutlass::conv::kernel::DefaultConv2dFpropWithBroadcast<
      Element, Layout, Element, Layout, Element, Layout, float, cutlass::arch::OpClassTensorOp,
      cutlass::arch::Sm80, Threadblock, Warp, cutlass::gemm::GemmShape<16, 8, 16>, Epilogue,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<4>, Stages,
      cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized>::Kernel;
  using Device = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;
};

using LargeTile = cutlass::gemm::GemmShape<128, 128, 32>;
using LargeWarp = cutlass::gemm::GemmShape<64, 64, 32>;
using SmallTile = cutlass::gemm::GemmShape<64, 64, 32>;
using SmallWarp = cutlass::gemm::GemmShape<32, 32, 32>;

template <typename Conv>
std::string run(const CutlassConvProblem& pr, const CutlassConvPlan& plan, const void* x,
                const void* w, const float* bias, const void* residual, void* out,
                cudaStream_t stream) {
  using Element = typename Conv::Device::ElementA;
  using cutlass_launch::nhwc;
  const int64_t c = plan.padded_c;
  const std::string problem = cutlass_launch::describe(pr, plan, c);
  const CutlassOperandPtr operands[] = {{CutlassOperand::kActivation, x},
                                        {CutlassOperand::kFilter, w},
                                        {CutlassOperand::kBias, bias},
                                        {CutlassOperand::kResidual, residual},
                                        {CutlassOperand::kOutput, out}};
  std::string error = cutlass_launch::check_alignment(operands, problem);
  if (!error.empty()) return error;
  auto out_ref = nhwc<Element>(out, pr.n, plan.p, plan.q, pr.k);
  typename Conv::Device::Arguments args(
      cutlass_launch::problem_size(pr, plan, c), nhwc<Element>(x, pr.n, pr.h, pr.w, c),
      nhwc<Element>(w, pr.k, pr.r, pr.s, c),
      residual != nullptr ? nhwc<Element>(residual, pr.n, plan.p, plan.q, pr.k) : out_ref,
      out_ref, {1.0f, residual != nullptr ? 1.0f : 0.0f}, cutlass::conv::SplitKMode::kSerial,
      const_cast<float*>(bias), nullptr, 0, 0);
  return cutlass_launch::run<typename Conv::Device>(args, stream, problem);
}

template <typename Element, typename Act>
std::string run_tile(const CutlassConvProblem& pr, const CutlassConvPlan& plan, const void* x,
                     const void* w, const float* bias, const void* residual, void* out,
                     cudaStream_t stream) {
  if (plan.tile == CutlassTile::kLarge) {
    return run<FusedConv<Element, LargeTile, LargeWarp, 3, Act>>(pr, plan, x, w, bias, residual,
                                                                 out, stream);
  }
  return run<FusedConv<Element, SmallTile, SmallWarp, 4, Act>>(pr, plan, x, w, bias, residual,
                                                               out, stream);
}

template <typename Element>
std::string run_act(const CutlassConvProblem& pr, const CutlassConvPlan& plan, const void* x,
                    const void* w, const float* bias, const void* residual, void* out, bool relu,
                    cudaStream_t stream) {
  if (relu) {
    return run_tile<Element, cutlass::epilogue::thread::ReLu<float>>(pr, plan, x, w, bias,
                                                                     residual, out, stream);
  }
  return run_tile<Element, cutlass::epilogue::thread::Identity<float>>(pr, plan, x, w, bias,
                                                                       residual, out, stream);
}

}  // namespace

std::string cutlass_conv2d_bias_act(const CutlassConvProblem& problem,
                                    const CutlassConvPlan& plan, CutlassDtype dtype,
                                    const void* x, const void* w, const float* bias,
                                    const void* residual, void* out, bool relu,
                                    cudaStream_t stream) {
  if (plan.unsupported != nullptr) return plan.unsupported;
  if (bias == nullptr || x == nullptr || w == nullptr || out == nullptr) {
    return "null input, filter, bias or output pointer";
  }
  if (dtype == CutlassDtype::kHalf) {
    return run_act<cutlass::half_t>(problem, plan, x, w, bias, residual, out, relu, stream);
  }
  return run_act<cutlass::bfloat16_t>(problem, plan, x, w, bias, residual, out, relu, stream);
}

}  // namespace fused_resnet
