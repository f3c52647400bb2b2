// What every CUTLASS conv launch in this directory shares: NHWC tensor references, the problem
// size, and check-initialize-run with the failure named. Included by the .cu files only (it
// needs CUTLASS's headers).
#pragma once

#include <cuda_runtime.h>

#include "common/cutlass_conv_plan.h"
#include "cutlass/conv/conv2d_problem_size.h"
#include "cutlass/cutlass.h"
#include "cutlass/layout/tensor.h"
#include "cutlass/tensor_ref.h"

namespace fused_resnet {
namespace cutlass_launch {

template <typename Element>
cutlass::TensorRef<Element, cutlass::layout::TensorNHWC> nhwc(const void* ptr, int64_t d0,
                                                               int64_t d1, int64_t d2,
                                                               int64_t d3) {
  using Layout = cutlass::layout::TensorNHWC;
  return cutlass::TensorRef<Element, Layout>(
      static_cast<Element*>(const_cast<void*>(ptr)),
      Layout::packed(cutlass::Tensor4DCoord(int(d0), int(d1), int(d2), int(d3))));
}

// The problem with `channels` input channels (the plan's padded count, or the real one).
inline cutlass::conv::Conv2dProblemSize problem_size(const CutlassConvProblem& pr,
                                                     const CutlassConvPlan& plan,
                                                     int64_t channels) {
  return cutlass::conv::Conv2dProblemSize(
      int(pr.n), int(pr.h), int(pr.w), int(channels), int(pr.k), int(pr.r), int(pr.s),
      int(plan.p), int(plan.q), int(pr.pad), int(pr.pad), int(pr.stride), int(pr.stride), 1, 1,
      cutlass::conv::Mode::kCrossCorrelation, 1, 1);
}

// can_implement, initialize, run on `stream`: nullptr, or which step failed.
template <typename Device>
const char* run(typename Device::Arguments const& args, cudaStream_t stream) {
  Device op;
  if (op.can_implement(args) != cutlass::Status::kSuccess) {
    return "CUTLASS can_implement rejected the problem (alignment or size)";
  }
  if (op.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) {
    return "CUTLASS initialize failed";
  }
  if (op(stream) != cutlass::Status::kSuccess) {
    return "CUTLASS kernel launch failed";
  }
  return nullptr;
}

}  // namespace cutlass_launch
}  // namespace fused_resnet
