// CUDA kernels of the fused BatchNorm + add + ReLU op. No torch headers: plain pointers, a
// Geometry and a stream (see bn_add_relu_launch.h). Per-element math: common/bn_add_relu_math.h.
//
// Elementwise kernels (apply, grad_apply): one thread per 8 consecutive elements = one byte of
// the packed ReLU mask, read and written as 16-byte vectors when the tensor allows it. Works the
// same for NCHW and NHWC since everything is in memory order; the channel of each element comes
// from a ChannelWalker. Reductions (stats, grad_reduce): partial states over a 2-D grid
// (channel tiles x splits of the per-channel elements), then one block per channel merges the
// partials in a fixed order (deterministic, no atomics).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "common/bn_add_relu_math.h"
#include "common/reduce_plan.h"
#include "cuda/bn_add_relu_launch.h"

namespace fused_resnet {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxElementwiseBlocks = int64_t{1} << 20;  // grid-stride loop beyond this

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// 8 elements of T as 16-byte vectors: one for 16-bit types, two for fp32.
template <typename T>
struct Vec8 {
  static constexpr int kChunks = static_cast<int>(sizeof(T)) * 8 / 16;
  uint4 chunk[kChunks];
};

// Loads the group of up to 8 elements starting at i0 into fp32. VEC: the tensor's element count
// is a multiple of 8 and the pointer 16-byte aligned, so the group is whole and aligned.
template <typename T, bool VEC>
__device__ __forceinline__ int load8(const T* __restrict__ p, int64_t i0, int64_t numel,
                                     float* v) {
  if constexpr (VEC) {
    Vec8<T> raw;
    const uint4* src = reinterpret_cast<const uint4*>(p + i0);
#pragma unroll
    for (int j = 0; j < Vec8<T>::kChunks; ++j) raw.chunk[j] = __ldg(src + j);
    const T* e = reinterpret_cast<const T*>(raw.chunk);
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = to_float(e[k]);
    return 8;
  }
  const int count = static_cast<int>(numel - i0 < 8 ? numel - i0 : 8);
#pragma unroll
  for (int k = 0; k < 8; ++k) v[k] = k < count ? to_float(p[i0 + k]) : 0.f;
  return count;
}

template <typename T, bool VEC>
__device__ __forceinline__ void store8(T* __restrict__ p, int64_t i0, int count, const float* v) {
  if constexpr (VEC) {
    Vec8<T> raw;
    T* e = reinterpret_cast<T*>(raw.chunk);
#pragma unroll
    for (int k = 0; k < 8; ++k) e[k] = from_float<T>(v[k]);
    uint4* dst = reinterpret_cast<uint4*>(p + i0);
#pragma unroll
    for (int j = 0; j < Vec8<T>::kChunks; ++j) dst[j] = raw.chunk[j];
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k)
      if (k < count) p[i0 + k] = from_float<T>(v[k]);
  }
}

// Grid-stride loop over the 8-element groups (mask bytes): body(group, first offset, walker).
template <typename Body>
__device__ __forceinline__ void for_each_group(Geometry g, Body body) {
  const int64_t groups = mask_bytes(g.numel());
  for (int64_t grp = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; grp < groups;
       grp += int64_t{gridDim.x} * blockDim.x) {
    ChannelWalker w{g.channels, g.inner, 0, 0};
    w.seek(grp * 8);
    body(grp, grp * 8, w);
  }
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
    apply_kernel(const T* __restrict__ x, const T* __restrict__ res,
                 const float* __restrict__ scale, const float* __restrict__ shift, bool relu,
                 Geometry g, T* __restrict__ out, uint8_t* __restrict__ mask) {
  const int64_t numel = g.numel();
  for_each_group(g, [&](int64_t grp, int64_t i0, ChannelWalker& w) {
    float xv[8], rv[8], yv[8];
    const int count = load8<T, VEC>(x, i0, numel, xv);
    if (res) {
      load8<T, VEC>(res, i0, numel, rv);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) rv[k] = 0.f;
    }
    const uint8_t bits = forward_group8(xv, rv, count, w, scale, shift, relu, yv);
    store8<T, VEC>(out, i0, count, yv);
    if (mask) mask[grp] = bits;
  });
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
    grad_apply_kernel(const T* __restrict__ grad, const uint8_t* __restrict__ mask,
                      const T* __restrict__ x, const float* __restrict__ mean,
                      const float* __restrict__ kc, const float* __restrict__ bc,
                      const float* __restrict__ cc, bool relu, Geometry g, T* __restrict__ dx,
                      T* __restrict__ dres) {
  const int64_t numel = g.numel();
  for_each_group(g, [&](int64_t grp, int64_t i0, ChannelWalker& w) {
    float gv[8], xv[8], dzv[8], dxv[8];
    const int count = load8<T, VEC>(grad, i0, numel, gv);
    load8<T, VEC>(x, i0, numel, xv);
    const uint8_t bits = relu ? mask[grp] : 0;
    backward_group8(gv, bits, xv, count, w, mean, kc, bc, cc, relu, dzv, dxv);
    store8<T, VEC>(dx, i0, count, dxv);
    if (dres) store8<T, VEC>(dres, i0, count, dzv);
  });
}

// ---------------------------------------------------------------------------------------------
// Reductions: the split, the lane accumulation and the merge steps are the __host__ __device__
// functions of common/reduce_plan.h (also run on the CPU by tests/cpp/cuda_reduce_sim.cpp).
template <typename T>
struct StatsAccumulate {
  const T* x;
  __device__ void operator()(WelfordState& s, int64_t i, int64_t) const {
    welford_add(s, to_float(x[i]));
  }
};

struct StatsFinish {
  const float* weight;  // nullptr: affine=False
  const float* bias;
  float eps;
  float *mean, *var, *scale, *shift;
  __device__ void operator()(int64_t c, const WelfordState& s) const {
    mean[c] = welford_mean(s);
    var[c] = welford_biased_var(s);
    bn_scale_shift(mean[c], var[c], weight ? weight[c] : 1.f, bias ? bias[c] : 0.f, eps,
                   scale[c], shift[c]);
  }
};

template <typename T>
struct GradAccumulate {
  const T* grad;
  const uint8_t* mask;
  const T* x;
  const float* mean;
  bool relu;
  __device__ void operator()(GradSums& s, int64_t i, int64_t c) const {
    const float dz = relu_backward(to_float(grad[i]), relu && mask_bit(mask, i), relu);
    grad_sums_add(s, dz, to_float(x[i]), mean[c]);
  }
};

struct GradFinish {
  const float* var;
  const float* weight;  // nullptr: affine=False
  float eps;
  int64_t count;
  bool training;
  BackwardOutputs out;
  __device__ void operator()(int64_t c, const GradSums& s) const {
    const BackwardCoefficients r = bn_backward_coefficients(
        s.sum_dz, s.sum_dz_xmu, var[c], weight ? weight[c] : 1.f, eps, count, training);
    out.k[c] = r.k;
    out.b[c] = r.b;
    out.c[c] = r.c;
    out.grad_weight[c] = r.grad_weight;
    out.grad_bias[c] = r.grad_bias;
  }
};

// Tree merge of the block's lanes in shared memory; lane tx then holds channel tx's result.
template <typename State>
__device__ void merge_block_lanes(State* lanes, int channel_lanes) {
  const int row_lanes = kReduceThreads / channel_lanes;
  for (int stride = row_lanes / 2; stride > 0; stride >>= 1) {
    merge_lanes_step(lanes, static_cast<int>(threadIdx.x), stride, channel_lanes,
                     MergeStates{});
    __syncthreads();
  }
}

template <typename State, typename Acc>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_partial_kernel(Acc acc, State empty, Geometry g, ReducePlan plan,
                          State* __restrict__ partial) {
  __shared__ State lanes[kReduceThreads];
  lanes[threadIdx.x] =
      accumulate_lane(g, plan, blockIdx.x, blockIdx.y, threadIdx.x, acc, empty);
  __syncthreads();
  merge_block_lanes(lanes, plan.channel_lanes);
  const int64_t c = int64_t{blockIdx.x} * plan.channel_lanes + threadIdx.x;
  if (threadIdx.x < plan.channel_lanes && c < g.channels)
    partial[int64_t{blockIdx.y} * g.channels + c] = lanes[threadIdx.x];
}

// One block per channel merges that channel's partials, in split order within each lane.
template <typename State, typename Finish>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_final_kernel(const State* __restrict__ partial, int64_t splits, int64_t channels,
                        State empty, Finish finish) {
  __shared__ State lanes[kReduceThreads];
  const int64_t c = blockIdx.x;
  State s = empty;
  for (int64_t p = threadIdx.x; p < splits; p += kReduceThreads)
    MergeStates{}(s, partial[p * channels + c]);
  lanes[threadIdx.x] = s;
  __syncthreads();
  merge_block_lanes(lanes, 1);
  if (threadIdx.x == 0) finish(c, lanes[0]);
}

template <typename State, typename Acc, typename Finish>
cudaError_t reduce_per_channel(Geometry g, Acc acc, State empty, Finish finish, void* workspace,
                               cudaStream_t stream) {
  if (g.channels == 0) return cudaSuccess;
  const ReducePlan p = reduce_plan(g);
  State* partial = static_cast<State*>(workspace);
  const dim3 grid(static_cast<unsigned>(p.channel_tiles), static_cast<unsigned>(p.splits));
  reduce_partial_kernel<<<grid, kReduceThreads, 0, stream>>>(acc, empty, g, p, partial);
  reduce_final_kernel<<<static_cast<unsigned>(g.channels), kReduceThreads, 0, stream>>>(
      partial, p.splits, g.channels, empty, finish);
  return cudaGetLastError();
}

template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::Float16: return f(__half{});
    case DType::BFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Vector loads need whole, aligned groups: numel % 8 == 0 and 16-byte aligned pointers.
bool can_vectorize(Geometry g, std::initializer_list<const void*> ptrs) {
  if (g.numel() % 8 != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return false;
  return true;
}

unsigned elementwise_blocks(Geometry g) {
  const int64_t groups = mask_bytes(g.numel());
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min((groups + kThreads - 1) / kThreads, kMaxElementwiseBlocks)));
}

template <typename State>
size_t workspace_bytes(Geometry g) {
  const ReducePlan p = reduce_plan(g);
  return static_cast<size_t>(p.splits * g.channels) * sizeof(State);
}

}  // namespace

size_t bn_stats_workspace_bytes(Geometry g) { return workspace_bytes<WelfordState>(g); }
size_t grad_reduce_workspace_bytes(Geometry g) { return workspace_bytes<GradSums>(g); }

cudaError_t bn_stats(DType dtype, const void* x, Geometry g, const float* weight,
                     const float* bias, float eps, StatsOutputs out, void* workspace,
                     cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return reduce_per_channel(
        g, StatsAccumulate<T>{static_cast<const T*>(x)}, welford_empty(),
        StatsFinish{weight, bias, eps, out.mean, out.var, out.scale, out.shift}, workspace,
        stream);
  });
}

cudaError_t bn_add_relu_apply(DType dtype, const void* x, const void* residual,
                              const float* scale, const float* shift, bool relu, Geometry g,
                              void* out, uint8_t* mask, cudaStream_t stream) {
  if (g.numel() == 0) return cudaSuccess;
  const bool vec = can_vectorize(g, {x, residual, out});
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto kernel = vec ? apply_kernel<T, true> : apply_kernel<T, false>;
    kernel<<<elementwise_blocks(g), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(residual), scale, shift, relu, g,
        static_cast<T*>(out), mask);
    return cudaGetLastError();
  });
}

cudaError_t bn_add_relu_grad_reduce(DType dtype, const void* grad, const uint8_t* mask,
                                    const void* x, const float* mean, const float* var,
                                    const float* weight, float eps, bool relu, bool training,
                                    Geometry g, BackwardOutputs out, void* workspace,
                                    cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    GradAccumulate<T> acc{static_cast<const T*>(grad), mask, static_cast<const T*>(x), mean,
                          relu};
    return reduce_per_channel(
        g, acc, grad_sums_empty(),
        GradFinish{var, weight, eps, g.per_channel(), training, out}, workspace, stream);
  });
}

cudaError_t bn_add_relu_grad_apply(DType dtype, const void* grad, const uint8_t* mask,
                                   const void* x, const float* mean, const float* k,
                                   const float* b, const float* c, bool relu, Geometry g,
                                   void* dx, void* dres, cudaStream_t stream) {
  if (g.numel() == 0) return cudaSuccess;
  const bool vec = can_vectorize(g, {grad, x, dx, dres});
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto kernel = vec ? grad_apply_kernel<T, true> : grad_apply_kernel<T, false>;
    kernel<<<elementwise_blocks(g), kThreads, 0, stream>>>(
        static_cast<const T*>(grad), mask, static_cast<const T*>(x), mean, k, b, c, relu, g,
        static_cast<T*>(dx), static_cast<T*>(dres));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fused_resnet
