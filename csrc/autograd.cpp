// Autograd of apl::apl_loss, registered for the Autograd dispatch key (every device).
//
// The forward runs the op below autograd and, when the logits need a gradient, attaches an
// AplLossBackward node to the loss, written like PyTorch's generated ones: the saved tensors
// (logits, target, stats, batch, weight) and the scalar arguments (LossArgs) as plain members,
// so a step pays no Python and no per-call bookkeeping beyond the node itself. Its apply calls
// apl::apl_loss_backward, whose own gradient is an Error node: second derivatives are not
// supported (LOSSES.md, "The fused operator"). Plain nodes, not torch::autograd::Function, so the
// functorch transforms (torch.func.grad, vjp, jacrev) run through them too.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>

#include "ops.h"

namespace apl {

using OptTensor = std::optional<at::Tensor>;

Outputs call_apl_loss(const at::Tensor& logits, const at::Tensor& target, const LossArgs& args,
                      const OptTensor& weight) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("apl::apl_loss", "")
                       .typed<Outputs(const at::Tensor&, const at::Tensor& APL_SCALAR_TYPES, const OptTensor&)>();
  return op.call(logits, target APL_LOSS_ARGS_EXPANDED, weight);
}

at::Tensor call_apl_loss_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                  const at::Tensor& stats, const at::Tensor& batch, const LossArgs& args,
                                  const OptTensor& weight) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("apl::apl_loss_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor& APL_SCALAR_TYPES, const OptTensor&)>();
  return op.call(grad_loss, logits, target, stats, batch APL_LOSS_ARGS_EXPANDED, weight);
}

namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// The gradient of apl_loss's loss output with respect to the logits.
struct AplLossBackward : public torch::autograd::TraceableFunction {
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list out(1);
    if (!grads[0].defined() || !task_should_compute_output(0)) return out;
    const at::Tensor w = weight_.unpack();
    out[0] = call_apl_loss_backward(grads[0], logits_.unpack(), target_.unpack(), stats_.unpack(), batch_.unpack(),
                                    args, w.defined() ? OptTensor(w) : std::nullopt);
    return out;
  }
  std::string name() const override { return "AplLossBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : {&logits_, &target_, &stats_, &batch_, &weight_}) v->reset_data();
  }

  SavedVariable logits_, target_, stats_, batch_, weight_;
  LossArgs args{};
};

Outputs apl_loss_autograd(const at::Tensor& logits, const at::Tensor& target APL_SCALAR_PARAMS,
                          const OptTensor& weight) {
  TORCH_CHECK_VALUE(!weight.has_value() || !weight->defined() || !weight->requires_grad(),
                    "apl_loss: weight must not require grad (the fused operator has no gradient for it); pass "
                    "weight.detach()");
  TORCH_CHECK(!torch::autograd::isFwGradDefined(logits),
              "apl_loss: forward-mode AD is not supported by the fused operator; use apl.losses.reference_loss");
  const LossArgs args = APL_LOSS_ARGS_IN_SCOPE;
  Outputs out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = call_apl_loss(logits, target, args, weight);
  }
  if (torch::autograd::compute_requires_grad(logits)) {
    auto node = c10::make_intrusive<AplLossBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(logits));
    node->logits_ = SavedVariable(logits, false);
    node->target_ = SavedVariable(target, false);
    node->stats_ = SavedVariable(std::get<1>(out), false);
    node->batch_ = SavedVariable(std::get<2>(out), false);
    node->weight_ = SavedVariable(weight, false);
    node->args = args;
    torch::autograd::set_history(std::get<0>(out), node);
  }
  return out;
}

// apl_loss_backward under autograd: computes the gradient; differentiating it again raises.
at::Tensor apl_loss_backward_autograd(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                      const at::Tensor& stats, const at::Tensor& batch APL_SCALAR_PARAMS,
                                      const OptTensor& weight) {
  const LossArgs args = APL_LOSS_ARGS_IN_SCOPE;
  at::Tensor grad;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    grad = call_apl_loss_backward(grad_loss, logits, target, stats, batch, args, weight);
  }
  if (torch::autograd::compute_requires_grad(grad_loss, logits)) {
    auto node = c10::make_intrusive<torch::autograd::Error>(
        "apl: the fused loss does not support double backward (second derivatives); use "
        "apl.losses.reference_loss for higher-order gradients",
        torch::autograd::collect_next_edges(grad_loss, logits));
    torch::autograd::set_history(grad, node);
  }
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(apl, Autograd, m) {
  m.impl("apl_loss", &apl_loss_autograd);
  m.impl("apl_loss_backward", &apl_loss_backward_autograd);
}

}  // namespace apl
