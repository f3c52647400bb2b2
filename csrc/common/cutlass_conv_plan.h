// Which convolutions the CUTLASS conv path takes, and how: pure host logic (no CUTLASS, no
// CUDA, no torch), shared by the launcher (csrc/cutlass_conv/) and the always-built extension, so the
// CPU tests can check it. Mirrors the conditions of CUTLASS's own can_implement for the
// instantiations in csrc/cutlass_conv/conv_fprop.cu (sm_80 tensor cores, 16-bit operands, NHWC),
// and the pointer alignment every operand of those kernels needs (checked nowhere by CUTLASS).
#pragma once

#include <cstdint>
#include <cstring>

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
  if (pr.r > 32 || pr.s > 32) {
    // Conv2dFpropActivationTileAccessIteratorOptimized keeps one mask bit per filter position
    plan.unsupported = "filter larger than 32x32 (CUTLASS's optimized iterators)";
    return plan;
  }
  if (pr.n < 1 || pr.h < 1 || pr.w < 1 || pr.c < 1 || pr.k < 1 || pr.r < 1 || pr.s < 1 ||
      pr.stride < 1 || pr.pad < 0) {
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
  // The output-channel tiles go along grid.y, which can_implement caps at 65535
  // (GemmIdentityThreadblockSwizzle<4> puts ceil(tiles / 2^log_tile) <= tiles there).
  const int64_t tile_n = plan.tile == CutlassTile::kLarge ? 128 : 64;
  if (cutlass_round_up(pr.k, tile_n) / tile_n > 65535) {
    plan.unsupported = "more than 65535 tiles of output channels (CUTLASS's grid.y limit)";
    return plan;
  }
  return plan;
}

// ---- Pointer alignment -------------------------------------------------------------------------
// CUTLASS's can_implement checks channel counts, never addresses: a base pointer that is not
// aligned to the widest vector access made through it is a misaligned-address fault that
// poisons the CUDA context. The widest accesses of the templates instantiated in
// csrc/cutlass_conv/ (CUTLASS 4.2), in bytes:
//   activation, filter  16   Conv2dFpropActivation/FilterTileAccessIteratorOptimized:
//                            cp.async of AccessType = AlignedArray<Element, 128 / 16 = 8>
//                            (default_conv2d_fprop.h AlignmentA/B; the fusion kernel's
//                            iterators are the same)
//   output, residual    16   epilogue PredicatedTileIterator: AlignedArray<Element, kAccess = 8>
//                            loads (source = residual) and stores
//   bias (fp32)         32   EpilogueWithBroadcast::load_broadcast_fragment_ dereferences the
//                            vector as AlignedArray<float, ThreadMap::kElementsPerAccess = 8>,
//                            i.e. alignas(32) (two 16-byte loads on sm_80/90; the compiler may
//                            assume the full 32)
//   BN scale, shift     16   PredicatedScaleBiasVectorAccessIterator (ConvBNfprop): cp.async of
//                            AlignedArray<half_t, 128 / 16 = 8>
// Offsets inside each tensor are multiples of those (channel counts multiples of 8, the plan's
// rule, and every access starts at a multiple of 8 channels), so only the base pointers need
// checking. Fresh allocations (the caching allocator's 512-byte blocks) always qualify; a view
// with a storage offset (a slice) may not.
enum class CutlassOperand : int {
  kActivation = 0,
  kFilter,
  kOutput,
  kResidual,
  kBias,
  kBnScale,
  kBnShift,
  kCount
};

struct CutlassOperandInfo {
  const char* name;
  int64_t alignment;  // bytes
};

inline const CutlassOperandInfo& cutlass_operand_info(CutlassOperand op) {
  static const CutlassOperandInfo table[] = {
      {"activation", 16}, {"filter", 16}, {"output", 16},  {"residual", 16},
      {"bias", 32},       {"bn_scale", 16}, {"bn_shift", 16},
  };
  static_assert(sizeof(table) / sizeof(table[0]) == int(CutlassOperand::kCount),
                "one entry per CutlassOperand");
  return table[int(op)];
}

// The operand called `name` (cutlass_operand_info's names); false if there is none.
inline bool cutlass_operand_from_name(const char* name, CutlassOperand* op) {
  for (int i = 0; i < int(CutlassOperand::kCount); ++i) {
    if (std::strcmp(cutlass_operand_info(CutlassOperand(i)).name, name) == 0) {
      *op = CutlassOperand(i);
      return true;
    }
  }
  return false;
}

inline bool cutlass_aligned(const void* ptr, CutlassOperand op) {
  return reinterpret_cast<std::uintptr_t>(ptr) %
             static_cast<std::uintptr_t>(cutlass_operand_info(op).alignment) ==
         0;
}

struct CutlassOperandPtr {
  CutlassOperand operand;
  const void* ptr;  // nullptr: operand absent (no residual), not checked
};

// nullptr when every present pointer has its operand's alignment, else the first that has not.
template <int N>
const CutlassOperandPtr* cutlass_misaligned(const CutlassOperandPtr (&ptrs)[N]) {
  for (const CutlassOperandPtr& p : ptrs) {
    if (p.ptr != nullptr && !cutlass_aligned(p.ptr, p.operand)) return &p;
  }
  return nullptr;
}

}  // namespace fused_resnet
