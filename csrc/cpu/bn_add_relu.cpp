// CPU kernels of the fused BatchNorm + add + ReLU op. The per-element math comes from
// common/bn_add_relu_math.h, the same code the CUDA kernels run.
#include "cpu/bn_add_relu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "common/bn_add_relu_math.h"

namespace fused_resnet {
namespace cpu {
namespace {

// Fixed work sizes (not derived from the thread count) so results are bitwise reproducible
// whatever OMP_NUM_THREADS is.
constexpr int64_t kGroupsPerTask = 1024;  // elementwise: 8 elements per group
constexpr int64_t kRowsPerChunk = 256;    // NHWC reductions: rows (pixels) per partial result

template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: f(float{}); break;
    case DType::Float16: f(c10::Half{}); break;
    case DType::BFloat16: f(c10::BFloat16{}); break;
  }
}

template <typename T>
int load_group(const T* src, int64_t i0, int64_t numel, float* dst) {
  const int count = static_cast<int>(std::min<int64_t>(8, numel - i0));
  for (int k = 0; k < count; ++k) dst[k] = static_cast<float>(src[i0 + k]);
  return count;
}

template <typename T>
void store_group(T* dst, int64_t i0, int count, const float* src) {
  for (int k = 0; k < count; ++k) dst[i0 + k] = static_cast<T>(src[k]);
}

// Per-channel reduction of a dense [outer, C, inner] tensor into one State per channel, in two
// levels: partial states over fixed chunks, then merged in chunk order (deterministic).
//   add(State&, int64_t offset, int64_t channel)     accumulates one element
//   combine(State&, const State&)                     merges two partial states
template <typename State, typename Add, typename Combine>
std::vector<State> reduce_per_channel(Geometry g, State empty, Add add, Combine combine) {
  const int64_t C = g.channels;
  std::vector<State> result(C, empty);
  if (g.inner == 1) {
    // NHWC: a row is one pixel's C channels; a chunk of rows yields C partial states.
    const int64_t chunks = (g.outer + kRowsPerChunk - 1) / kRowsPerChunk;
    std::vector<State> partial(chunks * C, empty);
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ch = begin; ch < end; ++ch) {
        State* p = partial.data() + ch * C;
        const int64_t row_end = std::min(g.outer, (ch + 1) * kRowsPerChunk);
        for (int64_t r = ch * kRowsPerChunk; r < row_end; ++r)
          for (int64_t c = 0; c < C; ++c) add(p[c], r * C + c, c);
      }
    });
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c)
        for (int64_t ch = 0; ch < chunks; ++ch) combine(result[c], partial[ch * C + c]);
    });
  } else {
    // NCHW: each (n, c) plane of `inner` contiguous elements yields one partial state.
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t n = 0; n < g.outer; ++n) {
          State plane = empty;
          const int64_t base = (n * C + c) * g.inner;
          for (int64_t s = 0; s < g.inner; ++s) add(plane, base + s, c);
          combine(result[c], plane);
        }
      }
    });
  }
  return result;
}

// Runs body(group_index, first_offset, walker) over all 8-element groups in parallel. Tasks
// cover whole groups, so no two threads write the same mask byte.
template <typename Body>
void for_each_group(Geometry g, Body body) {
  const int64_t numel = g.numel();
  const int64_t groups = mask_bytes(numel);
  at::parallel_for(0, groups, kGroupsPerTask, [&](int64_t begin, int64_t end) {
    ChannelWalker w{g.channels, g.inner, 0, 0};
    w.seek(begin * 8);
    for (int64_t grp = begin; grp < end; ++grp) body(grp, grp * 8, w);
  });
}

}  // namespace

void bn_stats(DType dtype, const void* x_, Geometry g, float* mean, float* var) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(x_);
    auto states = reduce_per_channel(
        g, welford_empty(),
        [&](WelfordState& s, int64_t i, int64_t) { welford_add(s, static_cast<float>(x[i])); },
        [](WelfordState& a, const WelfordState& b) { welford_combine(a, b); });
    for (int64_t c = 0; c < g.channels; ++c) {
      mean[c] = welford_mean(states[c]);
      var[c] = welford_biased_var(states[c]);
    }
  });
}

void bn_add_relu_apply(DType dtype, const void* x_, const void* res_, const float* scale,
                       const float* shift, bool relu, Geometry g, void* out_, uint8_t* mask) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(x_);
    const T* res = static_cast<const T*>(res_);
    T* out = static_cast<T*>(out_);
    const int64_t numel = g.numel();
    for_each_group(g, [&](int64_t grp, int64_t i0, ChannelWalker& w) {
      float xv[8], rv[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, yv[8];
      const int count = load_group(x, i0, numel, xv);
      if (res) load_group(res, i0, numel, rv);
      const uint8_t bits = forward_group8(xv, rv, count, w, scale, shift, relu, yv);
      store_group(out, i0, count, yv);
      if (mask) mask[grp] = bits;
    });
  });
}

void bn_add_relu_grad_reduce(DType dtype, const void* grad_, const uint8_t* mask, const void* x_,
                             const float* mean, bool relu, Geometry g, float* sum_dz,
                             float* sum_dz_xmu) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* grad = static_cast<const T*>(grad_);
    const T* x = static_cast<const T*>(x_);
    auto sums = reduce_per_channel(
        g, grad_sums_empty(),
        [&](GradSums& s, int64_t i, int64_t c) {
          const float dz = relu_backward(static_cast<float>(grad[i]),
                                         relu && mask_bit(mask, i), relu);
          grad_sums_add(s, dz, static_cast<float>(x[i]), mean[c]);
        },
        [](GradSums& a, const GradSums& b) { grad_sums_combine(a, b); });
    for (int64_t c = 0; c < g.channels; ++c) {
      sum_dz[c] = sums[c].sum_dz;
      sum_dz_xmu[c] = sums[c].sum_dz_xmu;
    }
  });
}

void bn_add_relu_grad_apply(DType dtype, const void* grad_, const uint8_t* mask, const void* x_,
                            const float* mean, const float* k, const float* b, const float* c,
                            bool relu, Geometry g, void* dx_, void* dres_) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* grad = static_cast<const T*>(grad_);
    const T* x = static_cast<const T*>(x_);
    T* dx = static_cast<T*>(dx_);
    T* dres = static_cast<T*>(dres_);
    const int64_t numel = g.numel();
    for_each_group(g, [&](int64_t grp, int64_t i0, ChannelWalker& w) {
      float gv[8], xv[8], dzv[8], dxv[8];
      const int count = load_group(grad, i0, numel, gv);
      load_group(x, i0, numel, xv);
      const uint8_t bits = relu ? mask[grp] : 0;
      backward_group8(gv, bits, xv, count, w, mean, k, b, c, relu, dzv, dxv);
      store_group(dx, i0, count, dxv);
      if (dres) store_group(dres, i0, count, dzv);
    });
  });
}

}  // namespace cpu
}  // namespace fused_resnet
