// The CPU kernels compiled for AVX-512 (F, BW, VL, DQ: what PyTorch's own AVX-512 kernels
// require; see bn_add_relu_kernels.h); chosen at run time only on a CPU that has them
// (csrc/cpu/bn_add_relu.cpp).
#include "cpu/bn_add_relu_isa.h"

#if FR_CPU_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")
#endif
#define FR_CPU_ISA avx512
#define FR_CPU_LANES_IN_ONE_REGISTER FR_CPU_MULTI_ISA  // 16 floats: one zmm register
#include "cpu/bn_add_relu_kernels.h"
#if FR_CPU_MULTI_ISA
#pragma GCC pop_options
#endif
