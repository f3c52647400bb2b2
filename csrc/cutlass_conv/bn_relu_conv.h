// Launcher of the CUTLASS "ConvBNfprop" (csrc/cutlass_conv/bn_relu_conv.cu): torch-free.
//   z = conv2d(relu(x * scale[c] + shift[c]), w)     NHWC fp16, fp32 accumulate
// The previous layer's training BN + ReLU is applied to the activation tile on its way into
// the tensor cores (CUTLASS's fprop mainloop fusion), so relu(bn(x)) is never written.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "common/cutlass_conv_plan.h"

namespace fused_resnet {

// x: [n, h, w, c] fp16 with c a multiple of 8 (no channel padding here: a padded channel
// would read relu(shift)); scale, shift: fp16 [c]; w: [k, r, s, c]; z: [n, p, q, k]. Every
// pointer must be 16-byte aligned (cutlass_operand_info); a misaligned one is refused, not
// launched. Returns an empty string on success, else what went wrong (CUTLASS's status and
// the problem size).
std::string cutlass_bn_relu_conv2d(const CutlassConvProblem& problem,
                                   const CutlassConvPlan& plan, const void* x,
                                   const void* scale, const void* shift, const void* w, void* z,
                                   cudaStream_t stream);

}  // namespace fused_resnet
