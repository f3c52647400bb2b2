// Per-element and per-channel math of the fused BatchNorm + add + ReLU op.
//
// Everything here is __host__ __device__: the CPU kernels (csrc/cpu) and the CUDA kernels
// (csrc/cuda) both call these functions, so the CPU tests exercise the formulas the GPU runs.
// Arithmetic is fp32 whatever the storage dtype; the kernels convert on load and store.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/types.h"

namespace fused_resnet {

// ---------------------------------------------------------------------------------------------
// Statistics: Welford per element, Chan et al. to merge partial results. Never E[x^2] - E[x]^2.
struct WelfordState {
  float mean;
  float m2;       // sum of squared deviations from mean
  int64_t count;  // int64: a channel of a large batch can hold more than 2^24 elements
};

FR_HD WelfordState welford_empty() { return WelfordState{0.f, 0.f, 0}; }

FR_HD void welford_add(WelfordState& s, float x) {
  s.count += 1;
  const float delta = x - s.mean;
  s.mean += delta / static_cast<float>(s.count);
  s.m2 += delta * (x - s.mean);
}

FR_HD void welford_combine(WelfordState& a, const WelfordState& b) {
  if (b.count == 0) return;
  if (a.count == 0) {
    a = b;
    return;
  }
  const int64_t n = a.count + b.count;
  const float b_share = static_cast<float>(b.count) / static_cast<float>(n);
  const float delta = b.mean - a.mean;
  a.mean += delta * b_share;
  a.m2 += b.m2 + delta * delta * static_cast<float>(a.count) * b_share;
  a.count = n;
}

// Mean and biased variance (what BatchNorm normalises with); NaN for an empty channel, as
// torch.var_mean gives.
FR_HD float welford_mean(const WelfordState& s) {
  return s.count > 0 ? s.mean : __builtin_nanf("");
}

FR_HD float welford_biased_var(const WelfordState& s) {
  return s.count > 0 ? s.m2 / static_cast<float>(s.count) : __builtin_nanf("");
}

// ---------------------------------------------------------------------------------------------
// Backward reductions: sum(dz) and sum(dz * (x - mean)) per channel, in fp32.
struct GradSums {
  float sum_dz;
  float sum_dz_xmu;
};

FR_HD GradSums grad_sums_empty() { return GradSums{0.f, 0.f}; }

FR_HD void grad_sums_combine(GradSums& a, const GradSums& b) {
  a.sum_dz += b.sum_dz;
  a.sum_dz_xmu += b.sum_dz_xmu;
}

// Merges partial reduction states of either kind (what the generic reductions call).
struct MergeStates {
  FR_HD void operator()(WelfordState& a, const WelfordState& b) const { welford_combine(a, b); }
  FR_HD void operator()(GradSums& a, const GradSums& b) const { grad_sums_combine(a, b); }
};

// ---------------------------------------------------------------------------------------------
// Per-channel finishing math, run once per channel at the end of the reductions.

// BatchNorm as an affine map y = x*scale + shift. weight/bias are 1/0 for affine=False.
// 1/sqrt rather than a fast reciprocal square root: the same rounding on CPU and GPU.
FR_HD void bn_scale_shift(float mean, float var, float weight, float bias, float eps,
                          float& scale, float& shift) {
  const float invstd = 1.f / sqrtf(var + eps);
  scale = weight * invstd;
  shift = bias - mean * scale;
}

// What backward needs per channel, from the two sums over the channel's `count` elements:
// the coefficients of bn_backward_input (below) and the parameter gradients.
struct BackwardCoefficients {
  float k, b, c;
  float grad_weight, grad_bias;
};

FR_HD BackwardCoefficients bn_backward_coefficients(float sum_dz, float sum_dz_xmu, float var,
                                                    float weight, float eps, int64_t count,
                                                    bool training) {
  const float invstd = 1.f / sqrtf(var + eps);
  BackwardCoefficients r;
  r.k = weight * invstd;
  const float inv_count = 1.f / static_cast<float>(count);
  r.b = training ? -r.k * invstd * invstd * sum_dz_xmu * inv_count : 0.f;
  r.c = training ? -r.k * sum_dz * inv_count : 0.f;
  r.grad_weight = sum_dz_xmu * invstd;
  r.grad_bias = sum_dz;
  return r;
}

// ---------------------------------------------------------------------------------------------
// Packed ReLU mask: bit (i & 7) of byte (i >> 3) is 1 where the output at memory offset i is > 0.
FR_HD bool mask_bit(const uint8_t* mask, int64_t i) { return (mask[i >> 3] >> (i & 7)) & 1; }

// relu(y) as torch.relu: NaN stays NaN (its mask bit is 0, as threshold_backward's y > 0).
// Written as two selects, no short-circuit: branch-free on random signs.
FR_HD float relu_keep_nan(float y) {
  const float clamped = y > 0.f ? y : 0.f;
  return y != y ? y : clamped;
}

// out = relu(x * scale + shift + residual); scale = weight * invstd, shift = bias - mean * scale.
FR_HD float bn_add_relu_forward(float x, float scale, float shift, float residual, bool relu) {
  const float y = x * scale + shift + residual;
  return relu ? relu_keep_nan(y) : y;
}

// Gradient through the ReLU: what reaches the sum (the residual's gradient, and BN's output grad).
FR_HD float relu_backward(float grad, bool positive, bool relu) {
  const bool passes = !relu | positive;  // bitwise: no branch on the random sign
  return passes ? grad : 0.f;
}

FR_HD void grad_sums_add(GradSums& s, float dz, float x, float mean) {
  s.sum_dz += dz;
  s.sum_dz_xmu += dz * (x - mean);
}

// BatchNorm input gradient, written so train and eval share one kernel:
//   train: dx = k*dz + b*(x - mean) + c, k = w*invstd, b = -k*invstd^2*sum(dz*(x-mean))/M,
//          c = -k*sum(dz)/M
//   eval:  dx = k*dz (b = c = 0; mean is the running mean)
FR_HD float bn_backward_input(float dz, float x, float mean, float k, float b, float c) {
  return k * dz + b * (x - mean) + c;
}

// ---------------------------------------------------------------------------------------------
// Walks the channel index along memory order of a dense [outer, C, inner] tensor without a
// division per element: seek() once, then next() per element.
struct ChannelWalker {
  int64_t channels;
  int64_t inner;
  int64_t c;  // channel of the current element
  int64_t s;  // position inside the current run of `inner` same-channel elements

  FR_HD void seek(int64_t i) {
    const int64_t q = i / inner;
    s = i - q * inner;
    c = q % channels;
  }
  FR_HD void next() {
    if (++s == inner) {
      s = 0;
      if (++c == channels) c = 0;
    }
  }
};

// A group of up to 8 consecutive elements (one mask byte), starting at memory offset 8*g.
// Values are already converted to fp32 (residual: zeros when there is none); `count` < 8 only
// for the tensor's last group.
FR_HD uint8_t forward_group8(const float* x, const float* residual, int count, ChannelWalker& w,
                             const float* scale, const float* shift, bool relu, float* out) {
  uint8_t bits = 0;
  FR_UNROLL
  for (int k = 0; k < 8; ++k) {
    if (k >= count) break;
    const int64_t c = w.c;
    const float y = bn_add_relu_forward(x[k], scale[c], shift[c], residual[k], relu);
    bits |= static_cast<uint8_t>(y > 0.f) << k;
    out[k] = y;
    w.next();
  }
  return bits;
}

FR_HD void backward_group8(const float* grad, uint8_t bits, const float* x, int count,
                           ChannelWalker& w, const float* mean, const float* k_coef,
                           const float* b_coef, const float* c_coef, bool relu, float* dz,
                           float* dx) {
  FR_UNROLL
  for (int k = 0; k < 8; ++k) {
    if (k >= count) break;
    const int64_t c = w.c;
    dz[k] = relu_backward(grad[k], (bits >> k) & 1, relu);
    dx[k] = bn_backward_input(dz[k], x[k], mean[c], k_coef[c], b_coef[c], c_coef[c]);
    w.next();
  }
}

}  // namespace fused_resnet
