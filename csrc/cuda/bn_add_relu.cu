// CUDA kernels of the fused BatchNorm + add + ReLU op. No torch headers: plain pointers, a
// Geometry and a stream (see bn_add_relu_launch.h). Per-element math: common/bn_add_relu_math.h.
//
// Elementwise kernels (apply, grad_apply): one thread per 8 consecutive elements = one byte of
// the packed ReLU mask, read and written as 16-byte vectors when the tensor allows it. Works the
// same for NCHW and NHWC since everything is in memory order; the channel of each element comes
// from a ChannelWalker, placed by multiply-high divisions (ChannelMap: no 64-bit div/rem).
// Reductions (stats, grad_reduce): partial states over a 2-D grid
// (channel tiles x splits of the per-channel elements), then one block per channel merges the
// partials in a fixed order (deterministic, no atomics). Their lanes read 16-byte vectors (8
// channels of an NHWC row, or 8 elements of an NCHW plane) where the geometry and alignment
// allow, single elements otherwise, several loads in flight, and reduce each group of loads in
// registers before one merge (one division) per group.
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

// The 8 elements at p + i0 (16-byte aligned) as raw 16-byte vectors, through the read-only path.
template <typename T>
__device__ __forceinline__ Vec8<T> load_vec8(const T* __restrict__ p, int64_t i0) {
  Vec8<T> raw;
  const uint4* src = reinterpret_cast<const uint4*>(p + i0);
#pragma unroll
  for (int j = 0; j < Vec8<T>::kChunks; ++j) raw.chunk[j] = __ldg(src + j);
  return raw;
}

template <typename T>
__device__ __forceinline__ void vec8_to_float(const Vec8<T>& raw, float* v) {
  const T* e = reinterpret_cast<const T*>(raw.chunk);
#pragma unroll
  for (int k = 0; k < 8; ++k) v[k] = to_float(e[k]);
}

// Loads the group of up to 8 elements starting at i0 into fp32. VEC: the tensor's element count
// is a multiple of 8 and the pointer 16-byte aligned, so the group is whole and aligned.
template <typename T, bool VEC>
__device__ __forceinline__ int load8(const T* __restrict__ p, int64_t i0, int64_t numel,
                                     float* v) {
  if constexpr (VEC) {
    vec8_to_float(load_vec8(p, i0), v);
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
// The walker's place comes from multiply-high divisions (ChannelMap), not 64-bit div/rem.
template <typename Body>
__device__ __forceinline__ void for_each_group(Geometry g, const ChannelMap& map, Body body) {
  const int64_t groups = mask_bytes(g.numel());
  for (int64_t grp = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; grp < groups;
       grp += int64_t{gridDim.x} * blockDim.x) {
    ChannelWalker w = map.walker_at(grp * 8);
    body(grp, grp * 8, w);
  }
}

template <typename T, bool VEC, bool HAS_MEAN>
__global__ void __launch_bounds__(kThreads)
    apply_kernel(const T* __restrict__ x, const T* __restrict__ res,
                 const float* __restrict__ mean, const float* __restrict__ scale,
                 const float* __restrict__ shift, bool relu, float mask_floor, Geometry g,
                 ChannelMap map, T* __restrict__ out, uint8_t* __restrict__ mask) {
  const int64_t numel = g.numel();
  for_each_group(g, map, [&](int64_t grp, int64_t i0, ChannelWalker& w) {
    float xv[8], rv[8], yv[8];
    const int count = load8<T, VEC>(x, i0, numel, xv);
    if (res) {
      load8<T, VEC>(res, i0, numel, rv);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) rv[k] = 0.f;
    }
    const uint8_t bits =
        forward_group8<HAS_MEAN>(xv, rv, count, w, mean, scale, shift, relu, mask_floor, yv);
    store8<T, VEC>(out, i0, count, yv);
    if (mask) mask[grp] = bits;
  });
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
    grad_apply_kernel(const T* __restrict__ grad, const uint8_t* __restrict__ mask,
                      const T* __restrict__ x, const float* __restrict__ mean,
                      const float* __restrict__ kc, const float* __restrict__ bc,
                      const float* __restrict__ cc, bool relu, Geometry g, ChannelMap map,
                      T* __restrict__ dx, T* __restrict__ dres) {
  const int64_t numel = g.numel();
  for_each_group(g, map, [&](int64_t grp, int64_t i0, ChannelWalker& w) {
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
// Reductions: the split, the lane accumulation, the merge steps and the per-group math are the
// __host__ __device__ functions of common/reduce_plan.h and common/bn_add_relu_math.h (also run
// on the CPU by tests/cpp/cuda_reduce_sim.cpp). One kernel per reduction and dtype takes the
// plan's path (uniform over the grid): single elements, or 16-byte vectors of 8 elements.

// Loads the N items of E elements of `items` into fp32, all loads issued before any is used.
// E == 8: each item is 16-byte aligned (reduce_path checked the base pointer, and items start at
// multiples of 8 elements).
template <typename T, int E, int N>
__device__ __forceinline__ void load_items(const T* __restrict__ p, const ItemGroup<E, N>& items,
                                           float (&v)[N][E]) {
  if constexpr (E == kVectorElements) {
    Vec8<T> raw[N];
#pragma unroll
    for (int n = 0; n < N; ++n) raw[n] = load_vec8(p, items.first[n]);
#pragma unroll
    for (int n = 0; n < N; ++n) vec8_to_float(raw[n], v[n]);
  } else {
    static_assert(E == 1, "items are single elements or 16-byte vectors");
#pragma unroll
    for (int n = 0; n < N; ++n) v[n][0] = to_float(__ldg(p + items.first[n]));
  }
}

template <typename T>
struct StatsAccumulate {
  template <int K>
  using Lane = WelfordChannels<K>;
  static constexpr int kTensorsRead = 1;
  const T* x;
  template <int K>
  __device__ StatsAccumulate for_item_channel(int64_t) const { return *this; }
  template <int E, int N, int K>
  __device__ void operator()(WelfordChannels<K>& s, const ItemGroup<E, N>& items) const {
    float v[N][E];
    load_items(x, items, v);
    welford_channels_combine(s, welford_of_group<K>(v));
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
    bn_centred_scale_shift(var[c], weight ? weight[c] : 1.f, bias ? bias[c] : 0.f, eps,
                           scale[c], shift[c]);
  }
};

template <typename T>
struct GradInputs {
  const T* grad;
  const uint8_t* mask;  // nullptr without ReLU
  const T* x;
  bool relu;
};

// The gradient sums of K channels whose means it holds.
template <typename T, int K>
struct GradChannelsAccumulate {
  GradInputs<T> in;
  float mean[K];
  template <int E, int N>
  __device__ void operator()(GradSumsChannels<K>& s, const ItemGroup<E, N>& items) const {
    float g[N][E], xv[N][E];
    uint8_t bits[N];
    load_items(in.grad, items, g);
    load_items(in.x, items, xv);
#pragma unroll
    for (int n = 0; n < N; ++n)
      bits[n] = in.relu ? item_mask_bits<E>(in.mask, items.first[n]) : 0;
    grad_sums_channels_combine(s, grad_sums_of_group<K>(g, bits, xv, mean, in.relu));
  }
};

template <typename T>
struct GradAccumulate {
  template <int K>
  using Lane = GradSumsChannels<K>;
  static constexpr int kTensorsRead = 2;  // grad and x (and a mask byte per item)
  GradInputs<T> in;
  const float* mean;
  template <int K>
  __device__ GradChannelsAccumulate<T, K> for_item_channel(int64_t c) const {
    GradChannelsAccumulate<T, K> r{in, {}};
#pragma unroll
    for (int k = 0; k < K; ++k) r.mean[k] = mean[c * K + k];
    return r;
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
        s.sum_dz, s.sum_dz_xmu, s.sum_xmu, var[c], weight ? weight[c] : 1.f, eps, count,
        training);
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

// The block's part of the plan with lanes of Lane = Acc::Lane<K> over items of E elements:
// accumulate, merge the lanes in shared memory, store per-channel partial states.
template <int E, int K, typename Acc, typename Partial>
__device__ __forceinline__ void reduce_block(const Acc& acc, const ReducePlan& plan,
                                             void* shared, Partial* __restrict__ partial) {
  using Lane = typename Acc::template Lane<K>;
  Lane* lanes = static_cast<Lane*>(shared);
  lanes[threadIdx.x] =
      accumulate_lane<E>(plan, blockIdx.x, blockIdx.y, threadIdx.x, acc, Lane{});  // {}: empty
  __syncthreads();
  merge_block_lanes(lanes, plan.channel_lanes);
  const int64_t c = int64_t{blockIdx.x} * plan.channel_lanes + threadIdx.x;
  if (threadIdx.x < plan.channel_lanes && c < plan.items.channels)
    store_lane_result(lanes[threadIdx.x], c, partial);
}

template <typename Acc>
constexpr size_t kLaneBytes = std::max(sizeof(typename Acc::template Lane<1>),
                                       sizeof(typename Acc::template Lane<kVectorElements>));

// Partial states of split blockIdx.y into partial[blockIdx.y * channels + c].
template <typename Acc, typename Partial>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_partial_kernel(Acc acc, ReducePlan plan, int64_t channels,
                          Partial* __restrict__ partial) {
  // The lanes of whichever path runs: one buffer for the differently sized lane states.
  __shared__ __align__(16) unsigned char lanes[kReduceThreads * kLaneBytes<Acc>];
  partial += int64_t{blockIdx.y} * channels;
  switch (plan.path) {
    case ReducePath::Scalar: return reduce_block<1, 1>(acc, plan, lanes, partial);
    case ReducePath::ChannelVectors:
      return reduce_block<kVectorElements, kVectorElements>(acc, plan, lanes, partial);
    case ReducePath::PlaneVectors:
      return reduce_block<kVectorElements, 1>(acc, plan, lanes, partial);
  }
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

// path: reduce_path's answer for the pointers acc reads.
template <typename State, typename Acc, typename Finish>
cudaError_t reduce_per_channel(Geometry g, ReducePath path, Acc acc, State empty, Finish finish,
                               void* workspace, cudaStream_t stream) {
  if (g.channels == 0) return cudaSuccess;
  const ReducePlan p = reduce_plan(g, path);
  State* partial = static_cast<State*>(workspace);
  const dim3 grid(static_cast<unsigned>(p.channel_tiles), static_cast<unsigned>(p.splits));
  reduce_partial_kernel<<<grid, kReduceThreads, 0, stream>>>(acc, p, g.channels, partial);
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
  return static_cast<size_t>(max_reduce_splits(g) * g.channels) * sizeof(State);
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
        g, reduce_path(g, {x}), StatsAccumulate<T>{static_cast<const T*>(x)}, welford_empty(),
        StatsFinish{weight, bias, eps, out.mean, out.var, out.scale, out.shift}, workspace,
        stream);
  });
}

cudaError_t bn_add_relu_apply(DType dtype, const void* x, const void* residual,
                              const float* mean, const float* scale, const float* shift,
                              bool relu, Geometry g, void* out, uint8_t* mask,
                              cudaStream_t stream) {
  if (g.numel() == 0) return cudaSuccess;
  const bool vec = can_vectorize(g, {x, residual, out});
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto kernel = vec ? (mean ? apply_kernel<T, true, true> : apply_kernel<T, true, false>)
                      : (mean ? apply_kernel<T, false, true> : apply_kernel<T, false, false>);
    kernel<<<elementwise_blocks(g), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(residual), mean, scale, shift, relu,
        relu_mask_floor(dtype), g,
        make_channel_map(g), static_cast<T*>(out), mask);
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
    const GradAccumulate<T> acc{
        {static_cast<const T*>(grad), mask, static_cast<const T*>(x), relu}, mean};
    return reduce_per_channel(
        g, reduce_path(g, {grad, x}), acc, grad_sums_empty(),
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
        make_channel_map(g), static_cast<T*>(dx), static_cast<T*>(dres));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fused_resnet
