// The apl operator library: schemas, the argument checks, the device-neutral entries (check, layout,
// then the device's row paths) and the launch plan every device follows. Kernels: csrc/cpu/,
// csrc/cuda/. Math: csrc/loss_row.h. Formulas: LOSSES.md.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <string>
#include <vector>

#include "ops.h"

namespace apl {

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The kinds' names in code order (codes are 0 .. NUM_KINDS - 1).
static const char* const kKindNames[] = {
#define APL_KIND_NAME(name, code) #name,
    APL_LOSS_KINDS(APL_KIND_NAME)
#undef APL_KIND_NAME
};
static_assert(sizeof(kKindNames) / sizeof(kKindNames[0]) == row::NUM_KINDS, "kind codes must be 0 .. NUM_KINDS - 1");

static const char* kind_name(int64_t k) { return (k >= 0 && k < row::NUM_KINDS) ? kKindNames[k] : "unknown"; }

// `weight`, when given: per-class weights, 1-D of C floating values on the logits' device.
static void check_weight(const std::optional<at::Tensor>& weight, const at::Tensor& logits) {
  if (!weight.has_value() || !weight->defined()) return;
  const at::Tensor& w = *weight;
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == logits.size(1),
                    "apl_loss: weight must be 1-D with one entry per class (", logits.size(1), "), got shape ",
                    w.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(w.scalar_type()), "apl_loss: weight must be a floating tensor, got dtype ",
                    w.scalar_type());
  TORCH_CHECK_VALUE(w.device() == logits.device(), "apl_loss: weight is on ", w.device(), " but logits are on ",
                    logits.device());
}

std::vector<int64_t> positions_shape(const at::Tensor& logits) {
  std::vector<int64_t> shape{logits.size(0)};
  for (int64_t d = 2; d < logits.dim(); ++d) shape.push_back(logits.size(d));
  return shape;
}

bool is_soft(const at::Tensor& target, double smoothing) {
  return at::isFloatingType(target.scalar_type()) || smoothing != 0;
}

// The terms of a sum by name, NONE left out: "NCE_MA2020+RCE" (as apl.losses.reference names them).
static std::string kinds_text(int64_t active, int64_t passive) {
  std::string text = kind_name(active);
  if (passive != row::NONE) text += std::string("+") + kind_name(passive);
  return text;
}

static bool uses_kind(const LossArgs& args, int kind) { return args.active == kind || args.passive == kind; }

// The parameters each kind takes, in apl.losses.spec.LossSpec's words.
static void check_parameters(const LossArgs& args) {
  TORCH_CHECK_VALUE(std::isfinite(args.alpha) && std::isfinite(args.beta),
                    "apl_loss: alpha and beta must be finite, got ", args.alpha, ", ", args.beta);
  TORCH_CHECK_VALUE(std::isfinite(args.gamma) && args.gamma >= 0, "apl_loss: gamma must be finite and >= 0, got ",
                    args.gamma);
  if (uses_kind(args, row::GCE) || uses_kind(args, row::NGCE)) {
    TORCH_CHECK_VALUE(args.q > 0 && args.q <= 1, "apl_loss: q must be in (0, 1], got ", args.q);
  } else {
    TORCH_CHECK_VALUE(std::isfinite(args.q) && args.q > 0, "apl_loss: q must be a finite number > 0, got ", args.q);
  }
  TORCH_CHECK_VALUE(std::isfinite(args.a), "apl_loss: a must be finite, got ", args.a);
  TORCH_CHECK_VALUE(!uses_kind(args, row::AUL) || args.a > 1, "apl_loss: AUL needs a > 1, got a=", args.a);
  TORCH_CHECK_VALUE(!(uses_kind(args, row::AGCE) || uses_kind(args, row::AEL)) || args.a > 0,
                    "apl_loss: AGCE and AEL need a > 0, got a=", args.a);
  TORCH_CHECK_VALUE(std::isfinite(args.m) && args.m >= 0, "apl_loss: m must be a finite number >= 0, got ", args.m);
  TORCH_CHECK_VALUE(args.min_prob > 0 && args.min_prob < 1, "apl_loss: min_prob must be in (0, 1), got ",
                    args.min_prob);
}

// Probability targets (the logits' shape) or label smoothing: the kinds and options
// loss_row.h's soft-target path defines, in the reference's words (LOSSES.md "Soft targets").
static void check_soft_args(const at::Tensor& logits, const at::Tensor& target, const LossArgs& args,
                            const std::optional<at::Tensor>& weight) {
  const double smoothing = args.label_smoothing;
  TORCH_CHECK_VALUE(std::isfinite(smoothing) && smoothing >= 0 && smoothing <= 1,
                    "apl_loss: label_smoothing must be in [0, 1], got ", smoothing);
  const int a = static_cast<int>(args.active), p = static_cast<int>(args.passive);
  TORCH_CHECK_VALUE(smoothing == 0 || row::takes_smoothing(a, p),
                    "apl_loss: label_smoothing is defined for ce alone (F.cross_entropy's semantics), got ",
                    kinds_text(args.active, args.passive));
  if (!at::isFloatingType(target.scalar_type())) return;
  TORCH_CHECK_VALUE(
      row::takes_soft(a) && row::takes_soft(p),
      "apl_loss: probability targets are defined for CE, MAE and RCE terms (LOSSES.md \"Soft targets\"); ",
      kinds_text(args.active, args.passive), " has no principled extension to them: pass class indices");
  TORCH_CHECK_VALUE(args.ignore_index == kDefaultIgnoreIndex, "apl_loss: ignore_index=", args.ignore_index,
                    " applies to class-index targets; probability targets have no ignored rows");
  TORCH_CHECK_VALUE(!weight.has_value() || !weight->defined() || (a == row::CE && p == row::NONE),
                    "apl_loss: per-class weights with probability targets are defined for ce alone "
                    "(F.cross_entropy's)");
  TORCH_CHECK_VALUE(target.dim() != logits.dim() - 1,  // the shape of class indices: float labels, a common slip
                    "apl_loss: target must be an int64 tensor of class indices (got dtype ", target.scalar_type(),
                    "), or probabilities of the logits' shape ", logits.sizes());
  TORCH_CHECK_VALUE(target.sizes() == logits.sizes(), "apl_loss: probability targets must have the logits' shape ",
                    logits.sizes(), ", got ", target.sizes());
}

void check_forward_args(const at::Tensor& logits, const at::Tensor& target, const LossArgs& args,
                        const std::optional<at::Tensor>& weight) {
  TORCH_CHECK_VALUE(logits.dim() >= 2, "apl_loss: logits must be 2-D (N, C) or (N, C, d1, ..., dK), got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(logits.scalar_type()), "apl_loss: logits must be a floating tensor, got dtype ",
                    logits.scalar_type());
  auto dt = logits.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                    "apl_loss: logits dtype ", dt, " is not supported (float16, bfloat16, float32, float64)");
  TORCH_CHECK_VALUE(logits.size(1) >= 2, "apl_loss: logits need at least 2 classes, got C=", logits.size(1));
  TORCH_CHECK_VALUE(row::valid_active(static_cast<int>(args.active)), "apl_loss: active kind ", args.active,
                    " is not a loss kind (1..", row::NUM_KINDS - 1, ")");
  TORCH_CHECK_VALUE(row::valid_passive(static_cast<int>(args.passive)), "apl_loss: passive kind ", args.passive, " (",
                    kind_name(args.passive),
                    ") is not supported by the fused operator; the passive term must be a per-row kind (not "
                    "NCE_PAPER or NFL_PAPER, whose batch statistic scales the active term)");
  check_soft_args(logits, target, args, weight);
  if (!at::isFloatingType(target.scalar_type())) {
    if (logits.dim() == 2) {
      TORCH_CHECK_VALUE(target.dim() == 1, "apl_loss: target must be 1-D (N,), got shape ", target.sizes());
      TORCH_CHECK_VALUE(target.size(0) == logits.size(0), "apl_loss: logits have N=", logits.size(0),
                        " rows but target has ", target.size(0), " entries");
    }
    const std::vector<int64_t> expected = positions_shape(logits);
    TORCH_CHECK_VALUE(target.sizes() == at::IntArrayRef(expected), "apl_loss: target of shape ", target.sizes(),
                      " does not match logits of shape ", logits.sizes(), " (expected ", at::IntArrayRef(expected),
                      ")");
    TORCH_CHECK_VALUE(target.scalar_type() == at::kLong,
                      "apl_loss: target must be an int64 tensor of class indices (or floating probabilities), got "
                      "dtype ",
                      target.scalar_type());
  }
  TORCH_CHECK_VALUE(target.device() == logits.device(), "apl_loss: target is on ", target.device(),
                    " but logits are on ", logits.device());
  TORCH_CHECK_VALUE(logits.is_contiguous(), "apl_loss: logits must be contiguous (call .contiguous())");
  TORCH_CHECK_VALUE(target.is_contiguous(), "apl_loss: target must be contiguous (call .contiguous())");
  check_parameters(args);
  TORCH_CHECK_VALUE(row::valid_reduction(args.reduction),
                    "apl_loss: reduction must be 0 (none), 1 (mean) or 2 (sum), got ", args.reduction);
  check_weight(weight, logits);
}

static void target_out_of_range(int64_t y, int64_t i, int64_t num_classes, int64_t ignore_index) {
  TORCH_CHECK_VALUE(false, "apl_loss: target ", y, " (row ", i, ") is out of range for C=", num_classes,
                    " classes (valid: 0..", num_classes - 1, ", or ignore_index=", ignore_index, ")");
}

void check_target_range(const at::Tensor& target, int64_t num_classes, int64_t ignore_index) {
  const int64_t n = target.numel();
  if (n == 0) return;
  if (target.device().is_cpu()) {
    const int64_t* t = target.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t y = t[i];
      if (!((y >= 0 && y < num_classes) || y == ignore_index)) target_out_of_range(y, i, num_classes, ignore_index);
    }
    return;
  }
  // Other devices: one reduction and a host read (a sync); the debug path only.
  at::Tensor bad = at::logical_and(at::logical_or(target.lt(0), target.ge(num_classes)), target.ne(ignore_index));
  if (bad.any().item<bool>()) {
    const int64_t i = bad.nonzero().select(1, 0)[0].item<int64_t>();
    target_out_of_range(target.reshape({-1})[i].item<int64_t>(), i, num_classes, ignore_index);
  }
}

static std::atomic<bool>& sync_target_check_flag() {
  static std::atomic<bool> flag{[] {
    const char* v = std::getenv("APL_SYNC_TARGET_CHECK");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }()};
  return flag;
}

bool sync_target_check() { return sync_target_check_flag().load(std::memory_order_relaxed); }

static bool set_sync_target_check(bool enabled) {
  return sync_target_check_flag().exchange(enabled, std::memory_order_relaxed);
}

static std::atomic<int64_t>& cuda_row_group_flag() {
  static std::atomic<int64_t> threads{0};
  return threads;
}

int64_t cuda_row_group_override() { return cuda_row_group_flag().load(std::memory_order_relaxed); }

static int64_t set_cuda_row_group(int64_t threads) {
  TORCH_CHECK_VALUE(threads == 0 || threads == 1 || threads == 16 || threads == 32 || threads == 512,
                    "_set_cuda_row_group: threads per row must be 0 (the launch plan's), 1, 16, 32 or 512, got ",
                    threads);
  return cuda_row_group_flag().exchange(threads, std::memory_order_relaxed);
}

int64_t positions_per_sample(const at::Tensor& logits) {
  int64_t d = 1;
  for (int64_t i = 2; i < logits.dim(); ++i) d *= logits.size(i);
  return d;
}

LaunchPlan launch_plan(int64_t active, int64_t reduction) {
  const int a = static_cast<int>(active), r = static_cast<int>(reduction);
  return LaunchPlan{1 + int64_t(row::needs_batch_step(a, r)), 1 + int64_t(row::needs_backward_batch_step(a, r))};
}

static std::atomic<int64_t> steps_run{0};

void count_step() { steps_run.fetch_add(1, std::memory_order_relaxed); }

Outputs empty_outputs(const at::Tensor& logits, int64_t reduction) {
  const auto acc_options = logits.options().dtype(acc_type_of(logits.scalar_type()));
  const int64_t rows = logits.numel() / logits.size(1);
  at::Tensor loss = reduction == row::RED_NONE ? at::empty(positions_shape(logits), logits.options())
                                               : at::empty({}, logits.options());
  return {loss, at::empty({rows, kNumStats}, acc_options), at::empty({kNumBatch}, acc_options)};
}

void check_backward_args(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                         const at::Tensor& stats, const at::Tensor& batch, const LossArgs& args,
                         const std::optional<at::Tensor>& weight) {
  check_forward_args(logits, target, args, weight);
  const int64_t n = logits.numel() / logits.size(1);  // rows: one per position
  const at::ScalarType acc = acc_type_of(logits.scalar_type());
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == n && stats.size(1) == kNumStats,
                    "apl_loss_backward: stats must have shape (", n, ", ", kNumStats, "), got ", stats.sizes());
  TORCH_CHECK_VALUE(batch.dim() == 1 && batch.size(0) == kNumBatch, "apl_loss_backward: batch must have shape (",
                    kNumBatch, "), got ", batch.sizes());
  for (const at::Tensor* t : {&stats, &batch}) {
    const char* name = t == &stats ? "stats" : "batch";
    TORCH_CHECK_VALUE(t->scalar_type() == acc, "apl_loss_backward: ", name, " must have dtype ", acc, ", got ",
                      t->scalar_type());
    TORCH_CHECK_VALUE(t->is_contiguous(), "apl_loss_backward: ", name, " must be contiguous");
    TORCH_CHECK_VALUE(t->device() == logits.device(), "apl_loss_backward: ", name, " is on ", t->device(),
                      " but logits are on ", logits.device());
  }
  TORCH_CHECK_VALUE(grad_loss.device() == logits.device(), "apl_loss_backward: grad_loss is on ", grad_loss.device(),
                    " but logits are on ", logits.device());
  TORCH_CHECK_VALUE(at::isFloatingType(grad_loss.scalar_type()), "apl_loss_backward: grad_loss must be floating, got ",
                    grad_loss.scalar_type());
  if (args.reduction == row::RED_NONE) {
    const std::vector<int64_t> shape = positions_shape(logits);
    TORCH_CHECK_VALUE(grad_loss.sizes() == at::IntArrayRef(shape), "apl_loss_backward: grad_loss must have shape ",
                      at::IntArrayRef(shape), " for reduction='none', got ", grad_loss.sizes());
  } else {
    TORCH_CHECK_VALUE(grad_loss.numel() == 1,
                      "apl_loss_backward: grad_loss must be a scalar for a reduced loss, got shape ",
                      grad_loss.sizes());
  }
}

// ---------------------------------------------------------------- the entries
namespace {

const DeviceKernels& kernels_for(const at::Tensor& logits) {
#ifdef APL_WITH_CUDA
  if (logits.is_cuda()) return cuda_kernels();
#endif
  return cpu_kernels();
}

// For a device that does not read the (N, C, d1, ..., dK) layout: a transposed copy (N * D, C)
// of the logits (and of probability targets), the gradient copied back into the logits' layout.
// contiguous: for one sample (N = 1) the reshape alone is a strided view
at::Tensor as_rows(const at::Tensor& logits) {
  return logits.movedim(1, -1).reshape({-1, logits.size(1)}).contiguous();
}

at::Tensor target_as_rows(const at::Tensor& target) {
  return at::isFloatingType(target.scalar_type()) ? as_rows(target) : target.reshape({-1});
}

at::Tensor grad_from_rows(const at::Tensor& grad_rows, const at::Tensor& logits) {
  std::vector<int64_t> moved = positions_shape(logits);
  moved.push_back(logits.size(1));
  return grad_rows.view(moved).movedim(-1, 1).contiguous();
}

// A checked call as its device sees it: probability targets and weights in the accumulation
// dtype (no copy when they already are), the targets' range checked on the host where that is
// free (the CPU) or asked for (sync_target_check; CUDA's kernels assert on the device otherwise).
Call make_call(const at::Tensor& logits, const at::Tensor& target, const LossArgs& args,
               const std::optional<at::Tensor>& weight, bool soft) {
  const at::ScalarType acc = acc_type_of(logits.scalar_type());
  const bool probs = at::isFloatingType(target.scalar_type());
  Call call;
  call.logits = logits;
  call.target = probs ? target.to(acc).contiguous() : target;
  call.weight = weight.has_value() && weight->defined() ? weight->to(acc).contiguous() : at::Tensor();
  call.args = args;
  call.soft = soft;
  call.C = logits.size(1);
  call.D = positions_per_sample(logits);
  call.rows = logits.numel() / call.C;
  if (!probs && (logits.is_cpu() || sync_target_check())) check_target_range(target, call.C, args.ignore_index);
  return call;
}

Outputs forward(const at::Tensor& logits, const at::Tensor& target, const LossArgs& args,
                const std::optional<at::Tensor>& weight) {
  const bool soft = is_soft(target, args.label_smoothing);
  const DeviceKernels& device = kernels_for(logits);
  if (logits.dim() > 2 && !device.reads_layout(logits, soft)) {
    Outputs out = forward(as_rows(logits), target_as_rows(target), args, weight);
    if (args.reduction == row::RED_NONE) std::get<0>(out) = std::get<0>(out).view(positions_shape(logits));
    return out;
  }
  return device.forward(make_call(logits, target, args, weight, soft));
}

at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                    const at::Tensor& stats, const at::Tensor& batch, const LossArgs& args,
                    const std::optional<at::Tensor>& weight) {
  const bool soft = is_soft(target, args.label_smoothing);
  const DeviceKernels& device = kernels_for(logits);
  if (logits.dim() > 2 && !device.reads_layout(logits, soft)) {
    const at::Tensor g = args.reduction == row::RED_NONE ? grad_loss.reshape({-1}) : grad_loss;
    return grad_from_rows(backward(g, as_rows(logits), target_as_rows(target), stats, batch, args, weight), logits);
  }
  return device.backward(grad_loss, stats, batch, make_call(logits, target, args, weight, soft));
}

// apl::apl_loss on CPU and CUDA tensors: check, then the device's row paths.
Outputs apl_loss_entry(const at::Tensor& logits, const at::Tensor& target APL_SCALAR_PARAMS,
                       const std::optional<at::Tensor>& weight) {
  const LossArgs args = APL_LOSS_ARGS_IN_SCOPE;
  check_forward_args(logits, target, args, weight);
  const c10::OptionalDeviceGuard guard(logits.device());
  return forward(logits, target, args, weight);
}

at::Tensor apl_loss_backward_entry(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                   const at::Tensor& stats, const at::Tensor& batch APL_SCALAR_PARAMS,
                                   const std::optional<at::Tensor>& weight) {
  const LossArgs args = APL_LOSS_ARGS_IN_SCOPE;
  check_backward_args(grad_loss, logits, target, stats, batch, args, weight);
  const c10::OptionalDeviceGuard guard(logits.device());
  return backward(grad_loss, logits, target, stats, batch, args, weight);
}

std::vector<int64_t> launch_counts(int64_t active, int64_t reduction) {
  TORCH_CHECK_VALUE(row::valid_active(static_cast<int>(active)), "_launch_counts: active kind ", active,
                    " is not a loss kind");
  TORCH_CHECK_VALUE(row::valid_reduction(reduction), "_launch_counts: reduction must be 0, 1 or 2, got ", reduction);
  const LaunchPlan p = launch_plan(active, reduction);
  return {p.forward, p.backward};
}

int64_t steps_run_so_far() { return steps_run.load(std::memory_order_relaxed); }

std::vector<std::string> kind_names() { return {std::begin(kKindNames), std::end(kKindNames)}; }

std::vector<std::string> scalar_arg_names() {
#define APL_ARG_STRING(type, name, schema) #name,
  return {APL_SCALAR_ARGS(APL_ARG_STRING)};
#undef APL_ARG_STRING
}

std::vector<int64_t> layout() { return {kNumStats, kNumBatch}; }

}  // namespace

TORCH_LIBRARY(apl, m) {
  m.def("apl_loss(Tensor logits, Tensor target" APL_SCALAR_SCHEMA
        ", Tensor? weight=None) -> (Tensor loss, Tensor stats, Tensor batch)");
  m.def("apl_loss_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor stats, Tensor batch" APL_SCALAR_SCHEMA
        ", Tensor? weight=None) -> Tensor");
  // Host-side helpers (no tensors): the step plan, the step counter, the debug switch.
  m.def("_launch_counts(int active, int reduction) -> int[]", &launch_counts);
  // The ABI Python mirrors: the loss kinds' names by code, the scalar arguments' names in schema
  // order, and (NUM_STATS, NUM_BATCH).
  m.def("_kind_names() -> str[]", &kind_names);
  m.def("_scalar_args() -> str[]", &scalar_arg_names);
  m.def("_layout() -> int[]", &layout);
  m.def("_steps_run() -> int", &steps_run_so_far);
  m.def("_set_sync_target_check(bool enabled) -> bool", &set_sync_target_check);
  m.def("_sync_target_check() -> bool", &sync_target_check);
  // The GPU check's switch: the CUDA kernels' threads per row, forced (0: the launch plan's choice).
  m.def("_set_cuda_row_group(int threads) -> int", &set_cuda_row_group);
}

TORCH_LIBRARY_IMPL(apl, CPU, m) {
  m.impl("apl_loss", &apl_loss_entry);
  m.impl("apl_loss_backward", &apl_loss_backward_entry);
}

#ifdef APL_WITH_CUDA
TORCH_LIBRARY_IMPL(apl, CUDA, m) {
  m.impl("apl_loss", &apl_loss_entry);
  m.impl("apl_loss_backward", &apl_loss_backward_entry);
}
#endif

}  // namespace apl
