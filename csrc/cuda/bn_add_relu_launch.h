// Launchers of the CUDA kernels of the fused BatchNorm + add + ReLU op, in plain C++ types so
// the torch glue (csrc/ops.cpp) and the torch-free kernels (bn_add_relu.cu) share only this.
// Every launcher enqueues on `stream`, never synchronises, and returns the launch status.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/types.h"

namespace fused_resnet {
namespace cuda {

// Scratch memory (bytes) the two-level reductions need for partial results.
size_t bn_stats_workspace_bytes(Geometry g);
size_t grad_reduce_workspace_bytes(Geometry g);

// Per channel: batch mean and biased variance, and scale/shift of the centred form
// y = (x - mean)*scale + shift (weight/bias nullptr: affine=False).
cudaError_t bn_stats(DType dtype, const void* x, Geometry g, const float* weight,
                     const float* bias, float eps, StatsOutputs out, void* workspace,
                     cudaStream_t stream);

// out = relu((x - mean)*scale + shift + residual) (mean nullptr: x*scale + shift).
cudaError_t bn_add_relu_apply(DType dtype, const void* x, const void* residual,
                              const float* mean, const float* scale, const float* shift,
                              bool relu, Geometry g, void* out, uint8_t* mask,
                              cudaStream_t stream);

// Per channel: the coefficients of the input gradient and the parameter gradients
// (common/bn_add_relu_math.h: bn_backward_coefficients).
cudaError_t bn_add_relu_grad_reduce(DType dtype, const void* grad, const uint8_t* mask,
                                    const void* x, const float* mean, const float* var,
                                    const float* weight, float eps, bool relu, bool training,
                                    Geometry g, BackwardOutputs out, void* workspace,
                                    cudaStream_t stream);

cudaError_t bn_add_relu_grad_apply(DType dtype, const void* grad, const uint8_t* mask,
                                   const void* x, const float* mean, const float* k,
                                   const float* b, const float* c, bool relu, Geometry g,
                                   void* dx, void* dres, cudaStream_t stream);

}  // namespace cuda
}  // namespace fused_resnet
