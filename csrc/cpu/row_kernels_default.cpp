// The CPU row kernels for any x86-64 / other CPU: at::vec's portable (compiler-vectorised)
// Vectorized. See row_kernels_impl.h.
#define CPU_CAPABILITY DEFAULT
#define APL_ISA_NS isa_default
#include "row_kernels_impl.h"

namespace apl {
namespace cpu {
RowKernels row_kernels_default() { return isa_default::table("default"); }
}  // namespace cpu
}  // namespace apl
