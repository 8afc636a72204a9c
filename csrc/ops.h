// Shared declarations of the apl operators: argument checks and the step plan used by every
// device's kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "loss_row.h"

namespace apl {

constexpr int64_t kNumStats = row::NUM_STATS;
constexpr int64_t kNumBatch = row::NUM_BATCH;

// Accumulation dtype: float64 for float64 logits, float32 otherwise (also half/bfloat16).
at::ScalarType acc_type_of(at::ScalarType logits_dtype);

// The forward's checks of everything but the target values (shapes, dtypes, devices,
// contiguity, kinds, gamma, q, reduction, the optional per-class weights). Raise
// c10::ValueError (Python ValueError).
void check_forward_args(const at::Tensor& logits, const at::Tensor& target, int64_t active, int64_t passive,
                        double alpha, double beta, double gamma, double q, int64_t reduction,
                        const std::optional<at::Tensor>& weight);

// Every target is in [0, C) or equals ignore_index, else a ValueError naming the row and the
// value. Reads the target on the host: free on the CPU, a device sync elsewhere (CUDA runs it
// only when sync_target_check() is on; its kernels assert on the device otherwise).
void check_target_range(const at::Tensor& target, int64_t num_classes, int64_t ignore_index);

// The debug switch that makes CUDA check targets on the host (synchronously, a named
// ValueError) instead of with a device-side assert. Initially on when APL_SYNC_TARGET_CHECK=1.
bool sync_target_check();

// The (checked) weight as a contiguous tensor of the accumulation dtype (undefined when not given).
at::Tensor weight_for(const std::optional<at::Tensor>& weight, const at::Tensor& logits);

// The backward's checks: as the forward's plus stats [rows, NUM_STATS] and batch [NUM_BATCH] in
// the accumulation dtype and grad_loss of the reduced shape ([] or the target's).
void check_backward_args(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                         const at::Tensor& stats, const at::Tensor& batch, int64_t active, int64_t passive,
                         double alpha, double beta, double gamma, double q, int64_t reduction,
                         const std::optional<at::Tensor>& weight);

// F.cross_entropy's (N, C, d1, ..., dK) layout: positions per sample D = d1 * ... * dK (1 for
// (N, C)); row i of the loss is position i % D of sample i / D. Kernels that do not read the
// layout directly compute on logits_as_rows (a transposed copy, (N * D, C)) and return their
// gradient through grad_from_rows (the inverse copy, in the logits' shape).
int64_t positions_per_sample(const at::Tensor& logits);
at::Tensor logits_as_rows(const at::Tensor& logits);
at::Tensor grad_from_rows(const at::Tensor& grad_rows, const at::Tensor& logits);

// Steps (kernel launches on CUDA) of one forward and one backward call with N > 0 rows:
// the row pass, plus the batch step where row::needs_batch_step / needs_backward_batch_step.
struct LaunchPlan {
  int64_t forward;
  int64_t backward;
};
LaunchPlan launch_plan(int64_t active, int64_t reduction);

// Every device counts the steps it runs here, so a test on any device can compare them with
// launch_plan (torch.ops.apl._steps_run).
void count_step();

// apl::apl_loss through the dispatcher (every key from the caller's on), typed: no boxing.
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // loss, stats, batch
Outputs call_apl_loss(const at::Tensor& logits, const at::Tensor& target, int64_t active, int64_t passive, double alpha,
                      double beta, double gamma, double q, int64_t reduction, int64_t ignore_index,
                      const std::optional<at::Tensor>& weight);

template <typename T>
row::LossParams<T> make_params(int64_t active, int64_t passive, double alpha, double beta, double gamma, double q) {
  return row::LossParams<T>{static_cast<int>(active), static_cast<int>(passive), static_cast<T>(alpha),
                            static_cast<T>(beta),     static_cast<T>(gamma),     static_cast<T>(q)};
}

}  // namespace apl
