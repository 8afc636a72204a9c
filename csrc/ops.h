// Shared declarations of the apl operators: the scalar arguments (one list, APL_SCALAR_ARGS), the
// argument checks, the device-neutral entries and what each device implements (DeviceKernels),
// and the step plan every device follows.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

#include "loss_row.h"

namespace apl {

// The operator's scalar arguments in schema order, written once: (C++ type, name, schema type).
// The schema, LossArgs, the signatures of the functions bound to the schema, the Python module's
// parser and apl.losses.fused's OpArgs (through torch.ops.apl._scalar_args) all come from it.
// clang-format off
#define APL_SCALAR_ARGS(X)                                                                              \
  X(int64_t, active, "int") X(int64_t, passive, "int") X(double, alpha, "float") X(double, beta, "float") \
  X(double, gamma, "float") X(double, q, "float") X(double, a, "float") X(double, m, "float")             \
  X(double, min_prob, "float") X(double, label_smoothing, "float") X(int64_t, reduction, "int")           \
  X(int64_t, ignore_index, "int")
// clang-format on

// ", int64_t active, double alpha, ...": the loose scalars of a function bound to the schema.
#define APL_ARG_PARAM(type, name, schema) , type name
#define APL_SCALAR_PARAMS APL_SCALAR_ARGS(APL_ARG_PARAM)
// ", int64_t, double, ...": their types, for a typed dispatcher handle.
#define APL_ARG_TYPE(type, name, schema) , type
#define APL_SCALAR_TYPES APL_SCALAR_ARGS(APL_ARG_TYPE)
// ", int active, float alpha, ...": the schema's text.
#define APL_ARG_SCHEMA(type, name, schema) ", " schema " " #name
#define APL_SCALAR_SCHEMA APL_SCALAR_ARGS(APL_ARG_SCHEMA)

// The scalar arguments of one call, as one value.
struct LossArgs {
#define APL_ARG_FIELD(type, name, schema) type name;
  APL_SCALAR_ARGS(APL_ARG_FIELD)
#undef APL_ARG_FIELD
};
// LossArgs{active, passive, ...} from the loose scalars in scope.
#define APL_ARG_INIT(type, name, schema) name,
#define APL_LOSS_ARGS_IN_SCOPE \
  LossArgs { APL_SCALAR_ARGS(APL_ARG_INIT) }
// ", args.active, args.passive, ...": a LossArgs as the loose scalars of a schema call.
#define APL_ARG_MEMBER(type, name, schema) , args.name
#define APL_LOSS_ARGS_EXPANDED APL_SCALAR_ARGS(APL_ARG_MEMBER)

constexpr int64_t kNumStats = row::NUM_STATS;
constexpr int64_t kNumBatch = row::NUM_BATCH;
// F.cross_entropy's ignore_index default: the only one probability targets take (they have no ignored rows).
constexpr int64_t kDefaultIgnoreIndex = -100;

// Accumulation dtype: float64 for float64 logits, float32 otherwise (also half/bfloat16).
at::ScalarType acc_type_of(at::ScalarType logits_dtype);

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // loss, stats, batch

// One call as a device sees it: the checked tensors (a probability target and the weights in the
// accumulation dtype), the scalar arguments, and the layout: D positions per sample (1 for (N, C)),
// rows = N * D.
struct Call {
  at::Tensor logits, target, weight;  // weight undefined without per-class weights
  LossArgs args;
  bool soft;  // probability targets or label smoothing (loss_row.h, "soft targets")
  int64_t C, D, rows;
};

// What each device implements: its row paths (index and soft), forward and backward, on a Call
// the entry has checked; and whether it reads F.cross_entropy's (N, C, d1, ..., dK) layout in place
// for these logits (else the entry hands it a transposed copy, as rows).
struct DeviceKernels {
  bool (*reads_layout)(const at::Tensor& logits, bool soft);
  Outputs (*forward)(const Call& call);
  at::Tensor (*backward)(const at::Tensor& grad_loss, const at::Tensor& stats, const at::Tensor& batch,
                         const Call& call);
};
const DeviceKernels& cpu_kernels();
#ifdef APL_WITH_CUDA
const DeviceKernels& cuda_kernels();
#endif

// The forward's checks of everything but the target values (shapes, dtypes, devices,
// contiguity, kinds, parameters, reduction, the optional per-class weights, label smoothing).
// Raise c10::ValueError (Python ValueError).
void check_forward_args(const at::Tensor& logits, const at::Tensor& target, const LossArgs& args,
                        const std::optional<at::Tensor>& weight);

// The backward's checks: as the forward's plus stats [rows, NUM_STATS] and batch [NUM_BATCH] in
// the accumulation dtype and grad_loss of the reduced shape ([] or positions_shape).
void check_backward_args(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                         const at::Tensor& stats, const at::Tensor& batch, const LossArgs& args,
                         const std::optional<at::Tensor>& weight);

// Whether a call takes loss_row.h's soft-target path: probability targets (floating, the
// logits' shape) or label smoothing.
bool is_soft(const at::Tensor& target, double smoothing);

// Every target is in [0, C) or equals ignore_index, else a ValueError naming the row and the
// value. Reads the target on the host: free on the CPU, a device sync elsewhere (CUDA runs it
// only when sync_target_check() is on; its kernels assert on the device otherwise).
void check_target_range(const at::Tensor& target, int64_t num_classes, int64_t ignore_index);

// The debug switch that makes CUDA check targets on the host (synchronously, a named
// ValueError) instead of with a device-side assert. Initially on when APL_SYNC_TARGET_CHECK=1.
bool sync_target_check();

// Threads per row the CUDA kernels use when the GPU check forces them (0: the launch plan's choice).
int64_t cuda_row_group_override();

// The forward's outputs, uninitialised: the loss in the logits' dtype (positions_shape for
// 'none', else []), stats (rows, NUM_STATS) and batch (NUM_BATCH) in the accumulation dtype.
Outputs empty_outputs(const at::Tensor& logits, int64_t reduction);

// F.cross_entropy's (N, C, d1, ..., dK) layout: positions per sample D = d1 * ... * dK (1 for
// (N, C)); row i of the loss is position i % D of sample i / D. positions_shape: (N, d1, ..., dK),
// the shape of class-index targets and of a 'none' loss.
int64_t positions_per_sample(const at::Tensor& logits);
std::vector<int64_t> positions_shape(const at::Tensor& logits);

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

// apl::apl_loss and apl::apl_loss_backward through the dispatcher (every key from the caller's
// on), typed: no boxing.
Outputs call_apl_loss(const at::Tensor& logits, const at::Tensor& target, const LossArgs& args,
                      const std::optional<at::Tensor>& weight);
at::Tensor call_apl_loss_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                  const at::Tensor& stats, const at::Tensor& batch, const LossArgs& args,
                                  const std::optional<at::Tensor>& weight);

}  // namespace apl
