// Plain types shared by the torch glue (ops.cpp), the CPU kernels and the torch-free CUDA kernels.
#pragma once
#include <cstdint>

// Functions that both host code and CUDA device code call.
#if defined(__CUDACC__)
#define FR_HD __host__ __device__ __forceinline__
#else
#define FR_HD inline
#endif

// Fully unrolled fixed-count loops keep small per-thread arrays in registers on the GPU.
#if defined(__CUDACC__)
#define FR_UNROLL _Pragma("unroll")
#else
#define FR_UNROLL
#endif

namespace fused_resnet {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// A dense 4-D tensor seen in memory order as [outer, C, inner]:
//   NCHW (contiguous):     outer = N,       inner = H*W
//   NHWC (channels_last):  outer = N*H*W,   inner = 1
// The channel of the element at memory offset i is (i / inner) % C.
struct Geometry {
  int64_t outer;
  int64_t channels;
  int64_t inner;
  FR_HD int64_t numel() const { return outer * channels * inner; }
  FR_HD int64_t per_channel() const { return outer * inner; }  // elements that share one channel
};

// Per-channel fp32 outputs of the statistics reduction.
struct StatsOutputs {
  float *mean, *var, *scale, *shift;
};

// Per-channel fp32 outputs of the backward reduction: grad_input = k*dz + b*(x - mean) + c.
struct BackwardOutputs {
  float *k, *b, *c, *grad_weight, *grad_bias;
};

// Number of bytes of the packed ReLU mask: one bit per element, in memory order.
FR_HD int64_t mask_bytes(int64_t numel) { return (numel + 7) / 8; }

}  // namespace fused_resnet
