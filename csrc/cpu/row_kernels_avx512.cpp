// The CPU row kernels compiled for AVX-512 (F, BW, VL, DQ; ATen's AVX512 Vectorized). Only
// called when ATen reports an AVX-512 CPU. See row_kernels_avx2.cpp for why the pragma comes
// first, and row_kernels_impl.h for the kernels.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")
#include "isa_macros_avx2.h"
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define APL_ISA_NS isa_avx512
#include "row_kernels_impl.h"

namespace apl {
namespace cpu {
RowKernels row_kernels_avx512() { return isa_avx512::table("avx512"); }
}  // namespace cpu
}  // namespace apl
#else
#include "row_kernels.h"

namespace apl {
namespace cpu {
RowKernels row_kernels_avx512() { return row_kernels_default(); }
}  // namespace cpu
}  // namespace apl
#endif
