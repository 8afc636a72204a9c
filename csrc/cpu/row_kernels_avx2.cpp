// The CPU row kernels compiled for AVX2 + FMA (ATen's AVX2 Vectorized). Only called when
// ATen reports an AVX2 (or better) CPU. The target pragma comes before every include so that
// all code of this file, and nothing else, is compiled for AVX2 (everything it defines has
// internal linkage or lives in the isa_avx2 namespace). See row_kernels_impl.h.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
#include "isa_macros_avx2.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define APL_ISA_NS isa_avx2
#include "row_kernels_impl.h"

namespace apl {
namespace cpu {
RowKernels row_kernels_avx2() { return isa_avx2::table("avx2"); }
}  // namespace cpu
}  // namespace apl
#else
#include "row_kernels.h"

namespace apl {
namespace cpu {
RowKernels row_kernels_avx2() { return row_kernels_default(); }
}  // namespace cpu
}  // namespace apl
#endif
