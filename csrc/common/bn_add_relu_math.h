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

// Chan et al.'s update of one channel's (mean, m2) by a part b holding a share
// b_share = n_b / (n_a + n_b) of the elements; a_count = n_a. The division that gives b_share
// is the caller's: channels that always hold equal counts share it (welford_channels_combine).
// F: float on the GPU, double where the CPU kernels merge their partial results.
template <typename F>
FR_HD void chan_update(F& mean, F& m2, F b_mean, F b_m2, F b_share, F a_count) {
  const F delta = b_mean - mean;
  mean += delta * b_share;
  m2 += b_m2 + delta * delta * a_count * b_share;
}

FR_HD void welford_combine(WelfordState& a, const WelfordState& b) {
  if (b.count == 0) return;
  if (a.count == 0) {
    a = b;
    return;
  }
  const int64_t n = a.count + b.count;
  const float b_share = static_cast<float>(b.count) / static_cast<float>(n);
  chan_update(a.mean, a.m2, b.mean, b.m2, b_share, static_cast<float>(a.count));
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
// Backward reductions: sum(dz), sum(dz * (x - mean)) and sum(x - mean) per channel, in fp32.
// `mean` is the fp32 batch mean, up to half an ulp of |mean| away from the exact one; the third
// sum measures that offset so backward can correct for it (bn_backward_coefficients).
struct GradSums {
  float sum_dz;
  float sum_dz_xmu;
  float sum_xmu;
};

FR_HD GradSums grad_sums_empty() { return GradSums{0.f, 0.f, 0.f}; }

FR_HD void grad_sums_combine(GradSums& a, const GradSums& b) {
  a.sum_dz += b.sum_dz;
  a.sum_dz_xmu += b.sum_dz_xmu;
  a.sum_xmu += b.sum_xmu;
}

// ---------------------------------------------------------------------------------------------
// Per-channel finishing math, run once per channel at the end of the reductions.

// BatchNorm in its centred form y = (x - mean)*scale + shift: scale = weight/sqrt(var + eps),
// shift = bias (weight/bias are 1/0 for affine=False). Not folded into x*scale + (bias -
// mean*scale), whose two terms cancel where |mean| >> std; x - mean is exact near the mean.
// 1/sqrt rather than a fast reciprocal square root: the same rounding on CPU and GPU.
FR_HD void bn_centred_scale_shift(float var, float weight, float bias, float eps, float& scale,
                                  float& shift) {
  scale = weight * (1.f / sqrtf(var + eps));
  shift = bias;
}

// What backward needs per channel, from the three sums over the channel's `count` elements:
// the coefficients of bn_backward_input (below) and the parameter gradients.
//
// In training the sums are taken around the fp32 batch mean m, which is off the exact mean mu by
// d = mu - m = sum(x - m) / count (half an ulp of |mean| at best). On a channel with
// |mean| >> std that offset is not small against x - mu, and b is large (~ 1/var), so b*d
// would dominate the error of every input gradient. Taking the offset out exactly:
//   sum(dz*(x - mu)) = sum(dz*(x - m)) - d*sum(dz),  b*(x - mu) + c = b*(x - m) + (c - b*d),
// so the kernels keep computing b*(x - m) with the stored fp32 mean and get mu's gradient.
struct BackwardCoefficients {
  float k, b, c;
  float grad_weight, grad_bias;
};

// The sums come in the caller's accumulation type A (fp32 on the GPU, double on the CPU), in
// which the offset is taken out; the coefficients are fp32.
template <typename A>
FR_HD BackwardCoefficients bn_backward_coefficients(A sum_dz, A sum_dz_xmu, A sum_xmu,
                                                    float var, float weight, float eps,
                                                    int64_t count, bool training) {
  const float invstd = 1.f / sqrtf(var + eps);
  BackwardCoefficients r;
  r.k = weight * invstd;
  const float inv_count = 1.f / static_cast<float>(count);
  // An empty batch (count 0) has NaN statistics: PyTorch's weight gradient is 0, not 0*NaN.
  const bool batch = training && count > 0;
  // eval: `mean` is the running mean, the one the forward used: nothing to correct
  const A offset = batch ? sum_xmu / static_cast<A>(count) : static_cast<A>(0);
  const float centred = static_cast<float>(sum_dz_xmu - offset * sum_dz);
  const float dz_total = static_cast<float>(sum_dz);
  r.b = batch ? -r.k * invstd * invstd * centred * inv_count : 0.f;
  r.c = batch ? -r.k * dz_total * inv_count - r.b * static_cast<float>(offset) : 0.f;
  r.grad_weight = count > 0 ? centred * invstd : 0.f;
  r.grad_bias = dz_total;
  return r;
}

// ---------------------------------------------------------------------------------------------
// Packed ReLU mask: bit (i & 7) of byte (i >> 3) is 1 where the output at memory offset i is > 0.
FR_HD bool mask_bit(const uint8_t* mask, int64_t i) { return (mask[i >> 3] >> (i & 7)) & 1; }

// The ReLU mask bit is torch.relu's backward decision, made on the *stored* output (> 0): an
// fp32 result y > 0 stored as fp16 / bf16 rounds to 0 when it is at most half the dtype's
// smallest subnormal (2^-24 / 2^-133; the half-way case rounds to even, 0). So the bit is
// y > relu_mask_floor(dtype), which is exactly "the stored output > 0".
FR_HD float relu_mask_floor(DType dtype) {
  return dtype == DType::Float16 ? 0x1p-25f : dtype == DType::BFloat16 ? 0x1p-134f : 0.f;
}

// relu(y) as torch.relu: NaN stays NaN (its mask bit is 0, as threshold_backward's y > 0).
// Written as two selects, no short-circuit: branch-free on random signs.
FR_HD float relu_keep_nan(float y) {
  const float clamped = y > 0.f ? y : 0.f;
  return y != y ? y : clamped;
}

// out = relu((x - mean) * scale + shift + residual) (bn_centred_scale_shift; mean 0: any affine
// map x * scale + shift, e.g. a folded one).
FR_HD float bn_add_relu_forward(float x, float mean, float scale, float shift, float residual,
                                bool relu) {
  const float y = (x - mean) * scale + shift + residual;
  return relu ? relu_keep_nan(y) : y;
}

// Gradient through the ReLU: what reaches the sum (the residual's gradient, and BN's output grad).
FR_HD float relu_backward(float grad, bool positive, bool relu) {
  const bool passes = !relu | positive;  // bitwise: no branch on the random sign
  return passes ? grad : 0.f;
}

FR_HD void grad_sums_add(GradSums& s, float dz, float x, float mean) {
  const float xmu = x - mean;
  s.sum_dz += dz;
  s.sum_dz_xmu += dz * xmu;
  s.sum_xmu += xmu;
}

// BatchNorm input gradient, written so train and eval share one kernel:
//   train: dx = k*dz + b*(x - mean) + c, k = w*invstd, b = -k*invstd^2*sum(dz*(x-mean))/M,
//          c = -k*sum(dz)/M
//   eval:  dx = k*dz (b = c = 0; mean is the running mean)
FR_HD float bn_backward_input(float dz, float x, float mean, float k, float b, float c) {
  return k * dz + b * (x - mean) + c;
}

// ---------------------------------------------------------------------------------------------
// Division by a divisor fixed for a whole launch, without a division instruction: a multiply-high
// by a magic number and a shift (Granlund & Montgomery's round-up method, as PyTorch's
// IntDivider, at 64 bits). A 64-bit division is a ~70-instruction subroutine on the GPU; this is
// a few multiplies. The magic number is computed once on the host (make_fast_divmod).
// Exact for every dividend in [0, 2^63) (so (hi + n) cannot overflow) and divisor >= 1:
// shift = ceil(log2(d)), magic = floor(2^64 * (2^shift - d) / d) + 1 (< 2^64), and
// n / d == (mulhi(n, magic) + n) >> shift.
struct FastDivmod {
  uint64_t divisor;
  uint64_t magic;
  uint32_t shift;

  FR_HD static uint64_t mulhi(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
    return __umul64hi(a, b);
#else
    return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
  }
  FR_HD int64_t div(int64_t n) const {
    const uint64_t u = static_cast<uint64_t>(n);
    return static_cast<int64_t>((mulhi(u, magic) + u) >> shift);
  }
  FR_HD int64_t mod(int64_t n) const {
    return n - div(n) * static_cast<int64_t>(divisor);
  }
};

// Host only. d >= 1 (the callers pass channel counts and plane sizes of non-empty tensors).
inline FastDivmod make_fast_divmod(int64_t d) {
  const uint64_t u = static_cast<uint64_t>(d < 1 ? 1 : d);
  uint32_t shift = 0;
  while (shift < 63 && (uint64_t{1} << shift) < u) ++shift;
  const unsigned __int128 two64 = static_cast<unsigned __int128>(1) << 64;
  const uint64_t magic =
      static_cast<uint64_t>(two64 * ((uint64_t{1} << shift) - u) / u + 1);
  return FastDivmod{u, magic, shift};
}

// Walks the channel index along memory order of a dense [outer, C, inner] tensor without a
// division per element: a ChannelMap places it once (two multiply-high divisions), then next()
// per element.
struct ChannelWalker {
  int64_t channels;
  int64_t inner;
  int64_t c;  // channel of the current element
  int64_t s;  // position inside the current run of `inner` same-channel elements

  FR_HD void next() {
    if (++s == inner) {
      s = 0;
      if (++c == channels) c = 0;
    }
  }
};

// The channel of memory offset i, (i / inner) % C, by FastDivmod: built on the host once per
// launch (make_channel_map), passed to the kernels by value.
struct ChannelMap {
  FastDivmod inner;
  FastDivmod channels;

  // A walker at memory offset i (0 <= i < 2^63).
  FR_HD ChannelWalker walker_at(int64_t i) const {
    const int64_t q = inner.div(i);
    return ChannelWalker{static_cast<int64_t>(channels.divisor),
                         static_cast<int64_t>(inner.divisor), channels.mod(q),
                         i - q * static_cast<int64_t>(inner.divisor)};
  }
};

inline ChannelMap make_channel_map(Geometry g) {
  return ChannelMap{make_fast_divmod(g.inner), make_fast_divmod(g.channels)};
}

// A group of up to 8 consecutive elements (one mask byte), starting at memory offset 8*g.
// Values are already converted to fp32 (residual: zeros when there is none); `count` < 8 only
// for the tensor's last group.
// mean: nullptr for the uncentred map x * scale + shift.
// HAS_MEAN: the centred form, with mean; otherwise x * scale + shift (mean unused).
// mask_floor: relu_mask_floor of the output's dtype.
template <bool HAS_MEAN>
FR_HD uint8_t forward_group8(const float* x, const float* residual, int count, ChannelWalker& w,
                             const float* mean, const float* scale, const float* shift, bool relu,
                             float mask_floor, float* out) {
  uint8_t bits = 0;
  FR_UNROLL
  for (int k = 0; k < 8; ++k) {
    if (k >= count) break;
    const int64_t c = w.c;
    const float y =
        bn_add_relu_forward(x[k], HAS_MEAN ? mean[c] : 0.f, scale[c], shift[c], residual[k], relu);
    bits |= static_cast<uint8_t>(y > mask_floor) << k;
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

// ---------------------------------------------------------------------------------------------
// Reductions over groups of items, as the CUDA reductions run them (tests/cpp/cuda_reduce_sim.cpp
// runs the same functions on the CPU). A lane reads items of E consecutive elements (E = 1, or
// 8 = one 16-byte vector of 16-bit values) in which element e belongs to the lane's channel
// e % K: K = 1 when the whole item is one channel's (a scalar, or 8 elements of an NCHW plane),
// K = 8 = E for 8 consecutive channels of an NHWC row. The lane reduces a group of N items in
// registers to each channel's exact mean and M2 (the mean by a multiply with the compile-time
// 1/count), then merges the group into its running state: one division per group, shared by
// the K channels, instead of one per element as welford_add pays.

// Welford states of K channels that always hold the same number of elements: one count.
template <int K>
struct WelfordChannels {
  static constexpr int kChannels = K;
  float mean[K];
  float m2[K];
  int64_t count;
};

// sum(dz) and sum(dz * (x - mean)) of K channels.
template <int K>
struct GradSumsChannels {
  static constexpr int kChannels = K;
  GradSums ch[K];
};

// out[k] = sum of col[e] over the positions e of channel k (e % K == k), in order of e.
template <int K, int E>
FR_HD void fold_positions(const float (&col)[E], float (&out)[K]) {
  static_assert(E % K == 0, "an item holds the same number of elements of each of its channels");
  FR_UNROLL
  for (int k = 0; k < K; ++k) out[k] = col[k];
  FR_UNROLL
  for (int e = K; e < E; ++e) out[e % K] += col[e];
}

// The exact mean and M2 of each channel over a group of N items of E elements (values in fp32).
// Two passes over registers; the sums run per position e over the items first (E independent
// chains, then folded into channels), which shortens the dependency chains and the rounding.
template <int K, int N, int E>
FR_HD WelfordChannels<K> welford_of_group(const float (&v)[N][E]) {
  constexpr int kCount = N * E / K;  // elements of each channel in the group
  // Exact for the power-of-two counts the kernels use; otherwise within an ulp, which the
  // second pass (deviations from that mean) absorbs.
  constexpr float kInvCount = 1.f / kCount;
  WelfordChannels<K> r;
  float col[E];
  FR_UNROLL
  for (int e = 0; e < E; ++e) {
    col[e] = v[0][e];
    FR_UNROLL
    for (int n = 1; n < N; ++n) col[e] += v[n][e];
  }
  fold_positions(col, r.mean);
  FR_UNROLL
  for (int k = 0; k < K; ++k) r.mean[k] *= kInvCount;
  FR_UNROLL
  for (int e = 0; e < E; ++e) {
    col[e] = 0.f;
    FR_UNROLL
    for (int n = 0; n < N; ++n) {
      const float d = v[n][e] - r.mean[e % K];
      col[e] += d * d;
    }
  }
  fold_positions(col, r.m2);
  r.count = kCount;
  return r;
}

// Chan et al.'s merge of K channels at once: one division for all of them.
template <int K>
FR_HD void welford_channels_combine(WelfordChannels<K>& a, const WelfordChannels<K>& b) {
  if (b.count == 0) return;
  if (a.count == 0) {
    a = b;
    return;
  }
  const int64_t n = a.count + b.count;
  const float b_share = static_cast<float>(b.count) / static_cast<float>(n);
  const float a_count = static_cast<float>(a.count);
  FR_UNROLL
  for (int k = 0; k < K; ++k) chan_update(a.mean[k], a.m2[k], b.mean[k], b.m2[k], b_share, a_count);
  a.count = n;
}

// Bit e of the result is the ReLU mask bit of element first + e of an item of E elements.
// E == 8 requires first % 8 == 0: the item is then exactly one byte of the packed mask.
template <int E>
FR_HD uint8_t item_mask_bits(const uint8_t* mask, int64_t first) {
  static_assert(E == 1 || E == 8, "items are single elements or whole mask bytes");
  if constexpr (E == 8) {
    return mask[first >> 3];
  } else {
    return static_cast<uint8_t>(mask_bit(mask, first));
  }
}

// The gradient sums of each channel over a group of N items (bits[n]: item n's mask bits, as
// item_mask_bits gives), summed per position first like welford_of_group.
template <int K, int N, int E>
FR_HD GradSumsChannels<K> grad_sums_of_group(const float (&grad)[N][E], const uint8_t (&bits)[N],
                                             const float (&x)[N][E], const float (&mean)[K],
                                             bool relu) {
  GradSums col[E];
  FR_UNROLL
  for (int e = 0; e < E; ++e) {
    col[e] = grad_sums_empty();
    FR_UNROLL
    for (int n = 0; n < N; ++n)
      grad_sums_add(col[e], relu_backward(grad[n][e], (bits[n] >> e) & 1, relu), x[n][e],
                    mean[e % K]);
  }
  GradSumsChannels<K> r;
  FR_UNROLL
  for (int k = 0; k < K; ++k) r.ch[k] = col[k];
  FR_UNROLL
  for (int e = K; e < E; ++e) grad_sums_combine(r.ch[e % K], col[e]);
  return r;
}

template <int K>
FR_HD void grad_sums_channels_combine(GradSumsChannels<K>& a, const GradSumsChannels<K>& b) {
  FR_UNROLL
  for (int k = 0; k < K; ++k) grad_sums_combine(a.ch[k], b.ch[k]);
}

// Channel k's own state, as the per-channel partial results store it.
template <int K>
FR_HD WelfordState channel_state(const WelfordChannels<K>& s, int k) {
  return WelfordState{s.mean[k], s.m2[k], s.count};
}

template <int K>
FR_HD GradSums channel_state(const GradSumsChannels<K>& s, int k) {
  return s.ch[k];
}

// Merges partial reduction states of any kind (what the generic reductions call).
struct MergeStates {
  FR_HD void operator()(WelfordState& a, const WelfordState& b) const { welford_combine(a, b); }
  FR_HD void operator()(GradSums& a, const GradSums& b) const { grad_sums_combine(a, b); }
  template <int K>
  FR_HD void operator()(WelfordChannels<K>& a, const WelfordChannels<K>& b) const {
    welford_channels_combine(a, b);
  }
  template <int K>
  FR_HD void operator()(GradSumsChannels<K>& a, const GradSumsChannels<K>& b) const {
    grad_sums_channels_combine(a, b);
  }
};

}  // namespace fused_resnet
