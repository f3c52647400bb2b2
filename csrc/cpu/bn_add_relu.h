// CPU kernels of the fused BatchNorm + add + ReLU op. Plain pointers in the memory order of a
// dense NCHW or NHWC tensor (see Geometry); the torch glue lives in csrc/ops.cpp.
#pragma once
#include <cstdint>

#include "common/types.h"

namespace fused_resnet {
namespace cpu {

// Per-channel batch mean and biased variance (fp32).
void bn_stats(DType dtype, const void* x, Geometry g, float* mean, float* var);

// out = relu(x*scale[c] + shift[c] + residual); mask gets one bit per element (nullptr: none
// wanted, e.g. inference).
// residual may be nullptr.
void bn_add_relu_apply(DType dtype, const void* x, const void* residual, const float* scale,
                       const float* shift, bool relu, Geometry g, void* out, uint8_t* mask);

// sum(dz) and sum(dz * (x - mean)) per channel, dz = grad masked by the ReLU.
void bn_add_relu_grad_reduce(DType dtype, const void* grad, const uint8_t* mask, const void* x,
                             const float* mean, bool relu, Geometry g, float* sum_dz,
                             float* sum_dz_xmu);

// dx = k*dz + b*(x - mean) + c per channel; dres = dz (nullptr: not wanted).
void bn_add_relu_grad_apply(DType dtype, const void* grad, const uint8_t* mask, const void* x,
                            const float* mean, const float* k, const float* b, const float* c,
                            bool relu, Geometry g, void* dx, void* dres);

}  // namespace cpu
}  // namespace fused_resnet
