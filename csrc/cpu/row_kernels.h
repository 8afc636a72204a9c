// Interface of the CPU row kernels. The kernels themselves (row_kernels_impl.h) are compiled
// once per instruction set (row_kernels_{default,avx2,avx512}.cpp) and picked at run time
// from ATen's CPU capability (so ATEN_CPU_CAPABILITY=default|avx2|avx512 also applies).
// This header is plain C++: it is included by those files before any ISA pragma.
#pragma once

#include <cstdint>

#include "../loss_row.h"

namespace apl {
namespace cpu {

// The rows-in-lanes kernels' class limit: up to it, W rows in the vector lanes beat one row
// at a time (benchmarks/RESULTS.md, "Kernel design"). They alone read F.cross_entropy's
// (N, C, d1, ..., dK) layout directly; above it the host computes on a transposed copy.
constexpr int64_t kRowsMaxC = 112;

// Forward of `rows` consecutive rows: writes their stats (row::Stat columns).
// D = 1: `logits` is the block's rows x C, contiguous. D > 1 (C <= kRowsMaxC only): the
// (N, C, D) layout, `logits` the tensor's start, the block rows row0 .. row0 + rows - 1, row i
// at position i % D of sample i / D (its class k at logits[(i / D) * C * D + k * D + i % D]).
template <typename T>
struct ForwardBlock {
  const T* logits;
  const int64_t* target;  // the block's rows (already range-checked)
  int64_t rows, C, ignore_index;
  row::LossParams<T> params;
  T* stats;  // rows x row::NUM_STATS
  int64_t D = 1, row0 = 0;
};

// Backward of `rows` consecutive rows: writes dL/dz. Layout as ForwardBlock's.
template <typename T>
struct BackwardBlock {
  const T* logits;
  const int64_t* target;
  int64_t rows, C, ignore_index;
  row::LossParams<T> params;
  const T* stats;
  const T* grad_rows;       // upstream gradient of each row's loss (incl. 1/N_valid for 'mean')
  int64_t grad_stride;      // 0 when one value serves every row
  T scale;                  // batch scale of the active term (1 unless a paper form)
  T batch_coef;             // NFL_PAPER's term through B (row::nfl_paper_batch_coef)
  T* grad;                  // laid out as `logits`
  int64_t D = 1, row0 = 0;  // as ForwardBlock
};

// Rows with soft targets (loss_row.h, "soft targets"): `probs` laid out as the
// logits for probability targets, else nullptr and `target` (class indices, the one-hot,
// ignore_index rows skipped); `weight` (C) or nullptr. D = 1: the block's rows x C. D > 1: the
// (N, C, D) layout as ForwardBlock's, `logits` and `probs` the tensors' starts, `target` the
// block's first row's.
template <typename T>
struct SoftRows {
  const T* logits;
  const T* probs;
  const int64_t* target;
  int64_t rows, C, ignore_index;
  row::SoftCoefs<T> coefs;
  const T* weight;
  int64_t D = 1, row0 = 0;
};

struct RowKernels {
  void (*forward_f32)(const ForwardBlock<float>&);
  void (*forward_f64)(const ForwardBlock<double>&);
  void (*backward_f32)(const BackwardBlock<float>&);
  void (*backward_f64)(const BackwardBlock<double>&);
  // soft targets: forward(rows, stats out), backward(rows, stats, grad_rows, grad_stride, grad out)
  void (*soft_forward_f32)(const SoftRows<float>&, float*);
  void (*soft_forward_f64)(const SoftRows<double>&, double*);
  void (*soft_backward_f32)(const SoftRows<float>&, const float*, const float*, int64_t, float*);
  void (*soft_backward_f64)(const SoftRows<double>&, const double*, const double*, int64_t, double*);
  const char* isa;
};

RowKernels row_kernels_default();
RowKernels row_kernels_avx2();    // == default where the compiler cannot target AVX2
RowKernels row_kernels_avx512();  // == default where the compiler cannot target AVX-512

}  // namespace cpu
}  // namespace apl
