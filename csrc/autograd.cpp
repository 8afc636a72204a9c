// Autograd of apl::apl_loss, registered for the Autograd dispatch key (every device).
//
// The forward runs the op below autograd and, when the logits need a gradient, attaches an
// AplLossBackward node to the loss, written like PyTorch's generated ones: the saved tensors
// (logits, target, stats, batch, weight) and the scalar arguments as plain members, so a step
// pays no Python and no per-call bookkeeping beyond the node itself. Its apply calls
// apl::apl_loss_backward, whose own autograd formula only raises: second derivatives are not
// supported (LOSSES.md, "The fused operator").
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <string>
#include <tuple>

#include "ops.h"

namespace apl {

Outputs call_apl_loss(const at::Tensor& logits, const at::Tensor& target, int64_t active, int64_t passive, double alpha,
                      double beta, double gamma, double q, int64_t reduction, int64_t ignore_index,
                      const std::optional<at::Tensor>& weight, double smoothing) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("apl::apl_loss", "")
                       .typed<Outputs(const at::Tensor&, const at::Tensor&, int64_t, int64_t, double, double, double,
                                      double, int64_t, int64_t, const std::optional<at::Tensor>&, double)>();
  return op.call(logits, target, active, passive, alpha, beta, gamma, q, reduction, ignore_index, weight, smoothing);
}

namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

at::Tensor call_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                         const at::Tensor& stats, const at::Tensor& batch, int64_t active, int64_t passive,
                         double alpha, double beta, double gamma, double q, int64_t reduction, int64_t ignore_index,
                         const OptTensor& weight, double smoothing) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("apl::apl_loss_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, int64_t, int64_t, double, double, double, double, int64_t,
                                         int64_t, const OptTensor&, double)>();
  return op.call(grad_loss, logits, target, stats, batch, active, passive, alpha, beta, gamma, q, reduction,
                 ignore_index, weight, smoothing);
}

// The gradient of apl_loss's loss output with respect to the logits.
struct AplLossBackward : public torch::autograd::TraceableFunction {
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list out(1);
    if (!grads[0].defined() || !task_should_compute_output(0)) return out;
    const at::Tensor w = weight_.unpack();
    out[0] = call_backward(grads[0], logits_.unpack(), target_.unpack(), stats_.unpack(), batch_.unpack(), active,
                           passive, alpha, beta, gamma, q, reduction, ignore_index,
                           w.defined() ? OptTensor(w) : std::nullopt, smoothing);
    return out;
  }
  std::string name() const override { return "AplLossBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : {&logits_, &target_, &stats_, &batch_, &weight_}) v->reset_data();
  }

  SavedVariable logits_, target_, stats_, batch_, weight_;
  int64_t active = 0, passive = 0, reduction = 0, ignore_index = 0;
  double alpha = 0, beta = 0, gamma = 0, q = 0, smoothing = 0;
};

Outputs apl_loss_autograd(const at::Tensor& logits, const at::Tensor& target, int64_t active, int64_t passive,
                          double alpha, double beta, double gamma, double q, int64_t reduction, int64_t ignore_index,
                          const OptTensor& weight, double smoothing) {
  TORCH_CHECK_VALUE(!weight.has_value() || !weight->defined() || !weight->requires_grad(),
                    "apl_loss: weight must not require grad (the fused operator has no gradient for it); pass "
                    "weight.detach()");
  TORCH_CHECK(!torch::autograd::isFwGradDefined(logits),
              "apl_loss: forward-mode AD is not supported by the fused operator; use apl.losses.reference_loss");
  Outputs out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = call_apl_loss(logits, target, active, passive, alpha, beta, gamma, q, reduction, ignore_index, weight,
                        smoothing);
  }
  if (torch::autograd::compute_requires_grad(logits)) {
    auto node = c10::make_intrusive<AplLossBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(logits));
    node->logits_ = SavedVariable(logits, false);
    node->target_ = SavedVariable(target, false);
    node->stats_ = SavedVariable(std::get<1>(out), false);
    node->batch_ = SavedVariable(std::get<2>(out), false);
    node->weight_ = SavedVariable(weight, false);
    node->active = active, node->passive = passive, node->reduction = reduction, node->ignore_index = ignore_index;
    node->alpha = alpha, node->beta = beta, node->gamma = gamma, node->q = q, node->smoothing = smoothing;
    torch::autograd::set_history(std::get<0>(out), node);
  }
  return out;
}

// apl_loss_backward under autograd: computes the gradient, and any attempt to differentiate
// it again raises.
class AplLossBackwardFunction : public torch::autograd::Function<AplLossBackwardFunction> {
 public:
  static variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& grad_loss,
                               const at::Tensor& logits, const at::Tensor& target, const at::Tensor& stats,
                               const at::Tensor& batch, int64_t active, int64_t passive, double alpha, double beta,
                               double gamma, double q, int64_t reduction, int64_t ignore_index, const OptTensor& weight,
                               double smoothing) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return {call_backward(grad_loss, logits, target, stats, batch, active, passive, alpha, beta, gamma, q, reduction,
                          ignore_index, weight, smoothing)};
  }

  static variable_list backward(torch::autograd::AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "apl: the fused loss does not support double backward (second derivatives); "
                "use apl.losses.reference_loss for higher-order gradients");
    return {};
  }
};

at::Tensor apl_loss_backward_autograd(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                      const at::Tensor& stats, const at::Tensor& batch, int64_t active, int64_t passive,
                                      double alpha, double beta, double gamma, double q, int64_t reduction,
                                      int64_t ignore_index, const OptTensor& weight, double smoothing) {
  return AplLossBackwardFunction::apply(grad_loss, logits, target, stats, batch, active, passive, alpha, beta, gamma, q,
                                        reduction, ignore_index, weight, smoothing)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(apl, Autograd, m) {
  m.impl("apl_loss", &apl_loss_autograd);
  m.impl("apl_loss_backward", &apl_loss_backward_autograd);
}

}  // namespace apl
