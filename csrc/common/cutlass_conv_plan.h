// Which convolutions the CUTLASS conv path takes, and how: pure host logic (no CUTLASS, no
// CUDA, no torch), shared by the launcher (csrc/cutlass_conv/) and the always-built extension, so the
// CPU tests can check it. Mirrors the conditions of CUTLASS's own can_implement for the
// instantiations in csrc/cutlass_conv/conv_fprop.cu (sm_80 tensor cores, 16-bit operands, NHWC).
#pragma once

#include <cstdint>

namespace fused_resnet {

// Elements per 128-bit access of a 16-bit operand: CUTLASS's optimized iterators need C and K
// to be multiples of it.
constexpr int64_t kCutlassAlignment = 8;

enum class CutlassTile : int {
  kLarge = 0,  // 128x128x32 threadblock: big GEMMs (early stages, wide 1x1 convs)
  kSmall = 1,  // 64x64x32: few output pixels (late stages at small batch)
};

struct CutlassConvProblem {
  int64_t n, h, w, c;       // input, NHWC
  int64_t k, r, s;          // output channels, filter height, width
  int64_t stride, pad, dilation, groups;
  int64_t element_bytes;    // 2: fp16 / bf16
};

struct CutlassConvPlan {
  const char* unsupported;  // nullptr when the CUTLASS path can run it
  int64_t padded_c;         // input channels after zero padding to the alignment
  int64_t p, q;             // output height, width
  CutlassTile tile;
};

inline int64_t cutlass_round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

inline CutlassConvPlan cutlass_conv_plan(const CutlassConvProblem& pr) {
  CutlassConvPlan plan{nullptr, cutlass_round_up(pr.c, kCutlassAlignment), 0, 0,
                       CutlassTile::kLarge};
  if (pr.element_bytes != 2) {
    plan.unsupported = "dtype: the CUTLASS conv takes float16 or bfloat16";
    return plan;
  }
  if (pr.groups != 1) {
    plan.unsupported = "grouped convolution";
    return plan;
  }
  if (pr.dilation != 1) {
    plan.unsupported = "dilation";
    return plan;
  }
  if (pr.k % kCutlassAlignment != 0) {
    plan.unsupported = "output channels not a multiple of 8 (128-bit stores)";
    return plan;
  }
  if (pr.n < 1 || pr.h < 1 || pr.w < 1 || pr.c < 1 || pr.k < 1 || pr.stride < 1 || pr.pad < 0) {
    plan.unsupported = "empty or negative size";
    return plan;
  }
  plan.p = (pr.h + 2 * pr.pad - pr.r) / pr.stride + 1;
  plan.q = (pr.w + 2 * pr.pad - pr.s) / pr.stride + 1;
  if (plan.p < 1 || plan.q < 1) {
    plan.unsupported = "filter larger than the padded input";
    return plan;
  }
  // CUTLASS computes offsets in 32 bits: every tensor below 2 GiB.
  const int64_t limit = int64_t(1) << 31;
  const int64_t act = pr.n * pr.h * pr.w * plan.padded_c * pr.element_bytes;
  const int64_t flt = pr.k * pr.r * pr.s * plan.padded_c * pr.element_bytes;
  const int64_t out = pr.n * plan.p * plan.q * pr.k * pr.element_bytes;
  if (act >= limit || flt >= limit || out >= limit) {
    plan.unsupported = "a tensor of 2 GiB or more (CUTLASS uses 32-bit offsets)";
    return plan;
  }
  // One wave of 128x128 tiles needs about 132 of them on an H100: below that, smaller tiles
  // keep more SMs busy.
  const int64_t tiles = cutlass_round_up(pr.n * plan.p * plan.q, 128) / 128 *
                        (cutlass_round_up(pr.k, 128) / 128);
  plan.tile = tiles >= 132 ? CutlassTile::kLarge : CutlassTile::kSmall;
  return plan;
}

}  // namespace fused_resnet
