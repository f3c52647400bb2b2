// What each per-ISA compilation of csrc/cpu/bn_add_relu_kernels.h provides, and the headers
// it needs. The headers are included here, before any `#pragma GCC target`, so that every
// inline function they define (torch's, the standard library's, our shared math) is compiled
// for the baseline instruction set in every file: otherwise the linker could keep an AVX-512
// copy of such a function for the whole library, and a CPU without AVX-512 would crash in it.
#pragma once
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/bn_add_relu_math.h"
#include "cpu/bn_add_relu.h"

#define FR_DECLARE_CPU_KERNELS(isa)                                                            \
  namespace fused_resnet {                                                                     \
  namespace cpu {                                                                              \
  namespace isa {                                                                              \
  void bn_stats(DType dtype, const void* x, Geometry g, const float* weight, const float* bias, \
                float eps, StatsOutputs out);                                                  \
  void bn_add_relu_apply(DType dtype, const void* x, const void* residual, const float* mean,   \
                         const float* scale, const float* shift, bool relu, Geometry g,         \
                         void* out, uint8_t* mask);                                             \
  void bn_add_relu_grad_reduce(DType dtype, const void* grad, const uint8_t* mask,              \
                               const void* x, const float* mean, const float* var,              \
                               const float* weight, float eps, bool relu, bool training,        \
                               Geometry g, BackwardOutputs out);                                \
  void bn_add_relu_grad_apply(DType dtype, const void* grad, const uint8_t* mask, const void* x, \
                              const float* mean, const float* k, const float* b, const float* c, \
                              bool relu, Geometry g, void* dx, void* dres);                     \
  }                                                                                            \
  }                                                                                            \
  }

FR_DECLARE_CPU_KERNELS(base)
FR_DECLARE_CPU_KERNELS(avx2)
FR_DECLARE_CPU_KERNELS(avx512)

// Whether the avx2 / avx512 files were really compiled for their instruction set (GCC on
// x86-64); elsewhere they hold baseline code and are never chosen.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FR_CPU_MULTI_ISA 1
#else
#define FR_CPU_MULTI_ISA 0
#endif
