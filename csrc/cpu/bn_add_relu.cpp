// The CPU kernels of the fused BatchNorm + add + ReLU op: each entry point runs the copy of
// csrc/cpu/bn_add_relu_kernels.h compiled for the widest instruction set PyTorch itself uses on
// this CPU (at::get_cpu_capability: CPU detection, OS support, and the ATEN_CPU_CAPABILITY
// override). The build's baseline (x86-64: SSE2) alone would run these
// loops 4 floats at a time where AVX-512 does 16.
#include "cpu/bn_add_relu.h"

#include <ATen/Version.h>

#include <string>

#include "cpu/bn_add_relu_isa.h"

namespace fused_resnet {
namespace cpu {
namespace {

enum class Isa { Base, Avx2, Avx512 };

Isa detect() {
  if (!FR_CPU_MULTI_ISA) return Isa::Base;
  const std::string cap = at::get_cpu_capability();  // "AVX512", "AVX2", "DEFAULT", ...
  if (cap == "AVX512") return Isa::Avx512;
  if (cap == "AVX2") return Isa::Avx2;
  return Isa::Base;
}

Isa isa() {
  static const Isa chosen = detect();
  return chosen;
}

}  // namespace

const char* isa_name() {
  switch (isa()) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "base";
  }
}

#define FR_DISPATCH_ISA(fn, ...)                         \
  switch (isa()) {                                       \
    case Isa::Avx512: return avx512::fn(__VA_ARGS__);    \
    case Isa::Avx2: return avx2::fn(__VA_ARGS__);        \
    default: return base::fn(__VA_ARGS__);               \
  }

void bn_stats(DType dtype, const void* x, Geometry g, const float* weight, const float* bias,
              float eps, StatsOutputs out) {
  FR_DISPATCH_ISA(bn_stats, dtype, x, g, weight, bias, eps, out)
}

void bn_add_relu_apply(DType dtype, const void* x, const void* residual, const float* mean,
                       const float* scale, const float* shift, bool relu, Geometry g, void* out,
                       uint8_t* mask) {
  FR_DISPATCH_ISA(bn_add_relu_apply, dtype, x, residual, mean, scale, shift, relu, g, out, mask)
}

void bn_add_relu_grad_reduce(DType dtype, const void* grad, const uint8_t* mask, const void* x,
                             const float* mean, const float* var, const float* weight,
                             float eps, bool relu, bool training, Geometry g,
                             BackwardOutputs out) {
  FR_DISPATCH_ISA(bn_add_relu_grad_reduce, dtype, grad, mask, x, mean, var, weight, eps, relu,
                  training, g, out)
}

void bn_add_relu_grad_apply(DType dtype, const void* grad, const uint8_t* mask, const void* x,
                            const float* mean, const float* k, const float* b, const float* c,
                            bool relu, Geometry g, void* dx, void* dres) {
  FR_DISPATCH_ISA(bn_add_relu_grad_apply, dtype, grad, mask, x, mean, k, b, c, relu, g, dx,
                  dres)
}

}  // namespace cpu
}  // namespace fused_resnet
