// The CPU kernels compiled for AVX2 + FMA (see bn_add_relu_kernels.h); chosen at run time only
// on a CPU that has them (csrc/cpu/bn_add_relu.cpp).
#include "cpu/bn_add_relu_isa.h"

#if FR_CPU_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
#endif
#define FR_CPU_ISA avx2
#include "cpu/bn_add_relu_kernels.h"
#if FR_CPU_MULTI_ISA
#pragma GCC pop_options
#endif
