// Shared declarations of the apl operators: argument checks and the step plan used by every
// device's kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

#include "loss_row.h"

namespace apl {

constexpr int64_t kNumStats = row::NUM_STATS;
constexpr int64_t kNumBatch = row::NUM_BATCH;
// F.cross_entropy's ignore_index default: the only one probability targets take (they have no ignored rows).
constexpr int64_t kDefaultIgnoreIndex = -100;

// Accumulation dtype: float64 for float64 logits, float32 otherwise (also half/bfloat16).
at::ScalarType acc_type_of(at::ScalarType logits_dtype);

// The forward's checks of everything but the target values (shapes, dtypes, devices,
// contiguity, kinds, gamma, q, reduction, the optional per-class weights, label smoothing).
// Raise c10::ValueError (Python ValueError).
void check_forward_args(const at::Tensor& logits, const at::Tensor& target, int64_t active, int64_t passive,
                        double alpha, double beta, double gamma, double q, int64_t reduction, int64_t ignore_index,
                        const std::optional<at::Tensor>& weight, double smoothing);

// Whether a call takes loss_row.h's distribution path: probability targets (floating, the
// logits' shape) or label smoothing.
bool is_distribution(const at::Tensor& target, double smoothing);

// Every target is in [0, C) or equals ignore_index, else a ValueError naming the row and the
// value. Reads the target on the host: free on the CPU, a device sync elsewhere (CUDA runs it
// only when sync_target_check() is on; its kernels assert on the device otherwise).
void check_target_range(const at::Tensor& target, int64_t num_classes, int64_t ignore_index);

// The debug switch that makes CUDA check targets on the host (synchronously, a named
// ValueError) instead of with a device-side assert. Initially on when APL_SYNC_TARGET_CHECK=1.
bool sync_target_check();

// The forward's outputs, uninitialised: the loss in the logits' dtype (positions_shape for
// 'none', else []), stats (rows, NUM_STATS) and batch (NUM_BATCH) in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_outputs(const at::Tensor& logits, int64_t reduction);

// The (checked) weight as a contiguous tensor of the accumulation dtype (undefined when not given).
at::Tensor weight_for(const std::optional<at::Tensor>& weight, const at::Tensor& logits);

// The backward's checks: as the forward's plus stats [rows, NUM_STATS] and batch [NUM_BATCH] in
// the accumulation dtype and grad_loss of the reduced shape ([] or positions_shape).
void check_backward_args(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                         const at::Tensor& stats, const at::Tensor& batch, int64_t active, int64_t passive,
                         double alpha, double beta, double gamma, double q, int64_t reduction, int64_t ignore_index,
                         const std::optional<at::Tensor>& weight, double smoothing);

// F.cross_entropy's (N, C, d1, ..., dK) layout: positions per sample D = d1 * ... * dK (1 for
// (N, C)); row i of the loss is position i % D of sample i / D. positions_shape: (N, d1, ..., dK),
// the shape of class-index targets and of a 'none' loss.
int64_t positions_per_sample(const at::Tensor& logits);
std::vector<int64_t> positions_shape(const at::Tensor& logits);

// Kernels that do not read that layout directly compute on rows: a transposed copy (N * D, C)
// of the logits (and of probability targets), the gradient copied back into the logits'
// layout. `rows_forward(logits_rows, target_rows)` and `rows_backward(grad_rows_loss,
// logits_rows, target_rows)` are the device's implementation on rows.
at::Tensor as_rows(const at::Tensor& logits);
at::Tensor target_as_rows(const at::Tensor& target);
at::Tensor grad_from_rows(const at::Tensor& grad_rows, const at::Tensor& logits);

template <class Forward>
auto forward_on_rows(const at::Tensor& logits, const at::Tensor& target, int64_t reduction, Forward&& rows_forward) {
  auto out = rows_forward(as_rows(logits), target_as_rows(target));
  if (reduction == row::RED_NONE) std::get<0>(out) = std::get<0>(out).view(positions_shape(logits));
  return out;
}

template <class Backward>
at::Tensor backward_on_rows(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                            int64_t reduction, Backward&& rows_backward) {
  const at::Tensor g = reduction == row::RED_NONE ? grad_loss.reshape({-1}) : grad_loss;
  return grad_from_rows(rows_backward(g, as_rows(logits), target_as_rows(target)), logits);
}

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
                      const std::optional<at::Tensor>& weight, double smoothing);

template <typename T>
row::LossParams<T> make_params(int64_t active, int64_t passive, double alpha, double beta, double gamma, double q) {
  return row::LossParams<T>{static_cast<int>(active), static_cast<int>(passive), static_cast<T>(alpha),
                            static_cast<T>(beta),     static_cast<T>(gamma),     static_cast<T>(q)};
}

}  // namespace apl
