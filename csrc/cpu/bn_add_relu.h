// CPU kernels of the fused BatchNorm + add + ReLU op. Plain pointers in the memory order of a
// dense NCHW or NHWC tensor (see Geometry); the torch glue lives in csrc/ops.cpp.
#pragma once
#include <cstdint>

#include "common/types.h"

namespace fused_resnet {
namespace cpu {

// Per channel: batch mean and biased variance, and scale/shift of the centred form
// y = (x - mean)*scale + shift (weight/bias nullptr: affine=False).
// Accumulated in double, as PyTorch's CPU BatchNorm accumulates.
void bn_stats(DType dtype, const void* x, Geometry g, const float* weight, const float* bias,
              float eps, StatsOutputs out);

// out = relu((x - mean[c])*scale[c] + shift[c] + residual); mask gets one bit per element
// (nullptr: none wanted, e.g. inference).
// residual may be nullptr; mean may be nullptr (then x*scale[c] + shift[c]).
void bn_add_relu_apply(DType dtype, const void* x, const void* residual, const float* mean,
                       const float* scale, const float* shift, bool relu, Geometry g, void* out,
                       uint8_t* mask);

// Per channel, from sum(dz), sum(dz * (x - mean)) and sum(x - mean) with dz = grad masked by
// the ReLU (accumulated in double): the input-gradient coefficients and the parameter gradients
// (bn_backward_coefficients).
void bn_add_relu_grad_reduce(DType dtype, const void* grad, const uint8_t* mask, const void* x,
                             const float* mean, const float* var, const float* weight,
                             float eps, bool relu, bool training, Geometry g,
                             BackwardOutputs out);

// dx = k*dz + b*(x - mean) + c per channel; dres = dz (nullptr: not wanted).
void bn_add_relu_grad_apply(DType dtype, const void* grad, const uint8_t* mask, const void* x,
                            const float* mean, const float* k, const float* b, const float* c,
                            bool relu, Geometry g, void* dx, void* dres);

// The instruction set the kernels above run with here: "avx512", "avx2" or "base".
const char* isa_name();

}  // namespace cpu
}  // namespace fused_resnet
