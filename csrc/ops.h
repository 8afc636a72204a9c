// Shared declarations of the apl operators: argument checks used by every device's kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "loss_row.h"

namespace apl {

constexpr int64_t kNumStats = row::NUM_STATS;

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// Accumulation dtype: float64 for float64 logits, float32 otherwise (also half/bfloat16).
at::ScalarType acc_type_of(at::ScalarType logits_dtype);

// The forward's checks of everything but the target values (shapes, dtypes, devices,
// contiguity, kinds, gamma, q, reduction, the optional per-class weights). Raise
// c10::ValueError (Python ValueError).
void check_forward_args(const at::Tensor& logits, const at::Tensor& target, int64_t active,
                        int64_t passive, double alpha, double beta, double gamma, double q,
                        int64_t reduction, const std::optional<at::Tensor>& weight);

// Every target is in [0, C) or equals ignore_index. Reads the target only (on CUDA a
// reduction and one device sync).
void check_target_range(const at::Tensor& target, int64_t num_classes, int64_t ignore_index);

// The (checked) weight as a contiguous tensor of the accumulation dtype (undefined when not given).
at::Tensor weight_for(const std::optional<at::Tensor>& weight, const at::Tensor& logits);

// The backward's checks: as the forward's plus stats [N, NUM_STATS] in the accumulation
// dtype and grad_loss of the reduced shape ([] or [N]).
void check_backward_args(const at::Tensor& grad_loss, const at::Tensor& logits,
                         const at::Tensor& target, const at::Tensor& stats, int64_t active,
                         int64_t passive, double alpha, double beta, double gamma, double q,
                         int64_t reduction, const std::optional<at::Tensor>& weight);

template <typename T>
row::LossParams<T> make_params(int64_t active, int64_t passive, double alpha, double beta,
                               double gamma, double q) {
  return row::LossParams<T>{static_cast<int>(active), static_cast<int>(passive),
                            static_cast<T>(alpha), static_cast<T>(beta), static_cast<T>(gamma),
                            static_cast<T>(q)};
}

}  // namespace apl
