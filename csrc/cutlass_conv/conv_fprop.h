// Launcher of the CUTLASS fused conv (csrc/cutlass_conv/conv_fprop.cu): torch-free, plain pointers.
//   out = act(conv2d(x, w) + bias [+ residual]),  NHWC, fp16/bf16, fp32 accumulate and epilogue
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "common/cutlass_conv_plan.h"

namespace fused_resnet {

enum class CutlassDtype : int { kHalf = 0, kBFloat16 = 1 };

// x: [n, h, w, padded_c]; w: [k, r, s, padded_c]; bias: fp32 [k]; residual (may be null) and
// out: [n, p, q, k]. Every pointer must have its operand's alignment (cutlass_operand_info:
// 16 bytes, 32 for the bias); a misaligned one is refused, not launched. Returns an empty
// string on success, else what went wrong (CUTLASS's status and the problem size).
std::string cutlass_conv2d_bias_act(const CutlassConvProblem& problem,
                                    const CutlassConvPlan& plan, CutlassDtype dtype,
                                    const void* x, const void* w, const float* bias,
                                    const void* residual, void* out, bool relu,
                                    cudaStream_t stream);

}  // namespace fused_resnet
