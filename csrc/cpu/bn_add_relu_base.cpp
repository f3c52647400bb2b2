// The CPU kernels for the baseline instruction set of the build (see bn_add_relu_kernels.h).
#include "cpu/bn_add_relu_isa.h"

#define FR_CPU_ISA base
#include "cpu/bn_add_relu_kernels.h"
