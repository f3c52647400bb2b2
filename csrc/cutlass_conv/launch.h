// What every CUTLASS conv launch in this directory shares: NHWC tensor references, the problem
// size, the pointer-alignment guard, and check-initialize-run with the failure named (CUTLASS's
// own status and the problem). Included by the .cu files only (it needs CUTLASS's headers).
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <string>

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

// "input NHWC 8x56x56x64, filter KRSC 64x3x3x64, stride 1, pad 1, output NPQK 8x56x56x64,
// 128x128 tile": what every error names.
inline std::string describe(const CutlassConvProblem& pr, const CutlassConvPlan& plan,
                            int64_t channels) {
  char text[256];
  std::snprintf(text, sizeof(text),
                "input NHWC %lldx%lldx%lldx%lld, filter KRSC %lldx%lldx%lldx%lld, stride %lld, "
                "pad %lld, output NPQK %lldx%lldx%lldx%lld, %s tile",
                (long long)pr.n, (long long)pr.h, (long long)pr.w, (long long)channels,
                (long long)pr.k, (long long)pr.r, (long long)pr.s, (long long)channels,
                (long long)pr.stride, (long long)pr.pad, (long long)pr.n, (long long)plan.p,
                (long long)plan.q, (long long)pr.k,
                plan.tile == CutlassTile::kLarge ? "128x128" : "64x64");
  return text;
}

// Empty when every present pointer meets its operand's alignment (common/cutlass_conv_plan.h),
// else the error: the launch must not happen.
template <int N>
std::string check_alignment(const CutlassOperandPtr (&ptrs)[N], const std::string& problem) {
  const CutlassOperandPtr* bad = cutlass_misaligned(ptrs);
  if (bad == nullptr) return std::string();
  const CutlassOperandInfo& info = cutlass_operand_info(bad->operand);
  char text[160];
  std::snprintf(text, sizeof(text), "the %s pointer %p is not %lld-byte aligned", info.name,
                bad->ptr, (long long)info.alignment);
  return std::string(text) + " (not launched; " + problem + ")";
}

inline std::string step_error(const char* step, cutlass::Status status,
                              const std::string& problem) {
  char text[160];
  std::snprintf(text, sizeof(text), "CUTLASS %s returned %s (cutlass::Status %d)", step,
                cutlassGetStatusString(status), int(status));
  std::string message = std::string(text) + " for " + problem;
  if (std::strcmp(step, "can_implement") != 0) {
    // CUTLASS read (and so cleared) the CUDA error behind its status; a sticky one (a poisoned
    // context) is still there to name
    const cudaError_t sticky = cudaPeekAtLastError();
    if (sticky != cudaSuccess) {
      message += std::string("; CUDA error: ") + cudaGetErrorString(sticky);
    }
  }
  return message;
}

// can_implement, initialize, run on `stream`: empty on success, else which step failed with
// CUTLASS's status and `problem` (describe's text).
template <typename Device>
std::string run(typename Device::Arguments const& args, cudaStream_t stream,
                const std::string& problem) {
  Device op;
  cutlass::Status status = op.can_implement(args);
  if (status != cutlass::Status::kSuccess) return step_error("can_implement", status, problem);
  status = op.initialize(args, nullptr, stream);
  if (status != cutlass::Status::kSuccess) return step_error("initialize", status, problem);
  status = op(stream);
  if (status != cutlass::Status::kSuccess) return step_error("kernel launch", status, problem);
  return std::string();
}

}  // namespace cutlass_launch
}  // namespace fused_resnet
